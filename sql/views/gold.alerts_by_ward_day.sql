-- Deterioration alerts opened per day, ward and level/band: how many, how many escalated, how severe.
-- Ward = the encounter's point of care (silver.encounters); no patient or encounter keys leave the view.
SELECT
  CAST(a.opened_at AS DATE)                              AS opened_on,
  COALESCE(e.location_point_of_care, 'unknown')          AS ward,
  a.level                                                AS level,
  a.news2_band                                           AS news2_band,
  COUNT(*)                                               AS alerts,
  COUNT(DISTINCT a.patient_key)                          AS patients,
  SUM(CASE WHEN a.escalated_at IS NOT NULL THEN 1 ELSE 0 END) AS escalated,
  SUM(CASE WHEN a.status = 'open' THEN 1 ELSE 0 END)     AS still_open,
  ROUND(AVG(a.peak_news2_score), 2)                      AS mean_peak_news2,
  ROUND(AVG((unix_timestamp(a.resolved_at) - unix_timestamp(a.opened_at)) / 60.0), 1) AS mean_minutes_to_resolve
FROM gold.deterioration_alerts a
LEFT JOIN silver.encounters e ON e.encounter_key = a.encounter_key
WHERE a.status <> 'withdrawn'
GROUP BY 1, 2, 3, 4
