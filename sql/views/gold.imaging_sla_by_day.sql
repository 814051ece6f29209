-- Imaging reads that missed their SLA, per day the images became available and order priority: how many, how many
-- are still unread, the SLA that applied, and how late the reads were (mean and 90th percentile, minutes past SLA).
SELECT
  CAST(available_at AS DATE)                                  AS available_on,
  COALESCE(priority, 'no order')                              AS priority,
  COUNT(*)                                                    AS breaches,
  SUM(CASE WHEN status = 'open' THEN 1 ELSE 0 END)            AS still_unread,
  ROUND(AVG(sla_minutes), 1)                                  AS sla_minutes,
  ROUND(AVG(minutes_past_sla), 1)                             AS mean_minutes_past_sla,
  ROUND(percentile_approx(minutes_past_sla, 0.9), 1)          AS p90_minutes_past_sla
FROM gold.imaging_sla_breaches
GROUP BY 1, 2
