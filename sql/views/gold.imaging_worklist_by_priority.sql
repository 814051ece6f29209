-- The radiology worklist now, per status, priority and modality: items waiting, how many are past their SLA, and how
-- long they have waited (mean and longest, minutes). No patient keys or accession numbers leave the view.
SELECT
  status,
  COALESCE(priority, 'no order')                              AS priority,
  COALESCE(modality, 'unknown')                               AS modality,
  COUNT(*)                                                    AS items,
  SUM(CASE WHEN sla_breached THEN 1 ELSE 0 END)               AS past_sla,
  ROUND(AVG(waited_minutes), 1)                               AS mean_waited_minutes,
  ROUND(MAX(waited_minutes), 1)                               AS max_waited_minutes,
  MAX(as_of)                                                  AS as_of
FROM gold.imaging_worklist
GROUP BY 1, 2, 3
