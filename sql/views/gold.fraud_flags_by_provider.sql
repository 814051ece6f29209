-- Claims fraud flags per billing provider (NPI): claims scored, flagged by band, billed amounts, rules that fired.
SELECT
  billing_npi,
  COUNT(*)                                                   AS claims,
  SUM(CASE WHEN band = 'high' THEN 1 ELSE 0 END)             AS high,
  SUM(CASE WHEN band = 'medium' THEN 1 ELSE 0 END)           AS medium,
  SUM(CASE WHEN band = 'low' THEN 1 ELSE 0 END)              AS low,
  ROUND(AVG(score), 1)                                       AS mean_score,
  SUM(billed_amount)                                         AS billed_amount,
  SUM(CASE WHEN band IN ('medium', 'high') THEN billed_amount ELSE 0 END) AS flagged_billed_amount,
  array_sort(array_distinct(flatten(collect_list(transform(reasons, r -> r.code))))) AS rules_fired
FROM gold.claims_fraud_scores
WHERE band <> 'withdrawn'
GROUP BY billing_npi
