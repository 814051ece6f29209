-- Patients for analysts: the pseudonymous key, sex, birth date and death date truncated to
-- sql_server.mask_date_unit ({{mask_date_unit}}); no names, MRNs, addresses, phone numbers or free text.
SELECT
  patient_key,
  sex,
  CAST(date_trunc('{{mask_date_unit}}', birth_date) AS DATE)  AS birth_period,
  deceased,
  CAST(date_trunc('{{mask_date_unit}}', deceased_at) AS DATE) AS deceased_period,
  country
FROM silver.patients
WHERE merged_into IS NULL AND deleted_at IS NULL
