"""End to end through the CLI: HL7 ORU and FHIR Observations of one patient -> the expected gold score row.

`carelake ingest` (both feeds, the HL7 message resent), `carelake run all --available-now`, `carelake sql`. The
FHIR Bundle names the patient by its own Patient resource (fullUrl and Patient/<id>), linked to the MRN the HL7
feed uses, so the score combines both feeds for one person; the resent message changes nothing.
"""

from __future__ import annotations

import json

import pytest

from tests.test_cli import run_cli

pytestmark = pytest.mark.slow

ORU = "\r".join([
    "MSH|^~\\&|WARD|GENERAL|CARELAKE|CARELAKE|20261121100100+0000||ORU^R01^ORU_R01|G-1|P|2.5",
    "PID|1||MRN2001^^^CARELAKE^MR||Roe^Sam||19470312|M",
    "PV1|1|I|6N^12^1^GENERAL||||||||||||||||V2001^^^CARELAKE^VN",
    "OBR|1|P1|F1|vitals^Vital signs|||20261121100000+0000",
    "OBX|1|NM|9279-1^Respiratory rate^LN||22|/min^/min^UCUM|||||F|||20261121100000+0000",
    "OBX|2|NM|8867-4^Heart rate^LN||95|/min^/min^UCUM|||||F|||20261121100000+0000",
    "OBX|3|CWE|67775-7^Level of responsiveness^LN||A^Alert^ACVPU||||||F|||20261121100000+0000",
    "OBX|4|NM|3150-0^Inhaled oxygen concentration^LN||21|%^%^UCUM|||||F|||20261121100000+0000",
]) + "\r"


def _observation(oid: str, code: str, value: float, unit: str, at: str) -> dict:
    return {"fullUrl": f"urn:uuid:{oid}", "resource": {
        "resourceType": "Observation", "id": oid, "meta": {"versionId": "1"}, "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": "Patient/pt-2001"}, "effectiveDateTime": at,
        "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit}},
        "request": {"method": "PUT", "url": f"Observation/{oid}"}}


BUNDLE = {"resourceType": "Bundle", "type": "transaction", "entry": [
    {"fullUrl": "urn:uuid:pt-2001", "resource": {
        "resourceType": "Patient", "id": "pt-2001", "meta": {"versionId": "1"},
        "identifier": [{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                             "code": "MR"}]},
                        "system": "http://carelake.example/fhir/sid/mrn", "value": "MRN2001"}],
        "name": [{"family": "Roe", "given": ["Sam"]}], "gender": "male", "birthDate": "1947-03-12"},
     "request": {"method": "PUT", "url": "Patient/pt-2001"}},
    # Five minutes later the nurse's FHIR app sends SpO2, blood pressure and a temperature in [degF].
    _observation("o-spo2", "59408-5", 95, "%", "2026-11-21T10:05:00Z"),
    _observation("o-sbp", "8480-6", 105, "mm[Hg]", "2026-11-21T10:05:00Z"),
    _observation("o-temp", "8310-5", 101.3, "[degF]", "2026-11-21T10:05:00Z"),
]}


def _sql(root, query: str) -> list[dict]:
    out = run_cli(root, "sql", query, "--format", "json").stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_hl7_and_fhir_of_one_patient_give_the_expected_score_row(tmp_path):
    root = tmp_path / "lake"
    (tmp_path / "vitals.hl7").write_bytes(ORU.encode())
    (tmp_path / "vitals.json").write_text(json.dumps(BUNDLE))
    run_cli(root, "ingest", str(tmp_path / "vitals.hl7"), "--feed", "hl7")
    run_cli(root, "ingest", str(tmp_path / "vitals.json"), "--feed", "fhir")
    run_cli(root, "ingest", str(tmp_path / "vitals.hl7"), "--feed", "hl7")  # the ward system resends the message
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    run = run_cli(root, "run", "all", "--available-now", TMPDIR=str(scratch))
    # The score job's RocksDB stores are closed by the JVM before its scratch folder is removed at exit.
    assert "RocksDB" not in run.stderr and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert list(scratch.iterdir()) == []

    rows = _sql(root, "select s.*, p.mrn from gold.early_warning_scores s join silver.patients p "
                      "on p.patient_key = s.patient_key order by scored_at")
    assert [r["scored_at"][:16] for r in rows] == ["2026-11-21T10:00", "2026-11-21T10:05"]
    assert {r["mrn"] for r in rows} == {"MRN2001"}  # one person: the FHIR Patient resolved to the MRN identity
    first, both = rows
    # 10:00, HL7 only: RR 22 -> 2, air -> 0, HR 95 -> 1, alert -> 0; SpO2, SBP, temperature not yet known.
    assert (first["news2_score"], first["news2_partial"]) == (3, True)
    assert sorted(first["missing_inputs"]) == ["news2_spo2", "news2_systolic_bp", "news2_temperature"]
    # 10:05: + SpO2 95 -> 1, SBP 105 -> 1, 101.3 [degF] = 38.5 Cel -> 1: total 6, medium, complete.
    assert (both["news2_score"], both["news2_band"], both["news2_partial"]) == (6, "medium", False)
    assert [both[c] for c in ("news2_respiratory_rate", "news2_spo2", "news2_supplemental_o2", "news2_systolic_bp",
                              "news2_pulse", "news2_consciousness", "news2_temperature")] == [2, 1, 0, 1, 1, 0, 1]
    assert both["temperature"] == pytest.approx(38.5) and both["qsofa_score"] == 1 and both["sirs_count"] == 3
    assert len(both["input_observation_ids"]) == 7 and both["silver_version"] is not None
    alerts = _sql(root, "select level, status, opened_at, news2_score from gold.deterioration_alerts")
    assert [(a["level"], a["status"], a["opened_at"][:16], a["news2_score"]) for a in alerts] == [
        ("news2_medium", "open", "2026-11-21T10:05", 6)]
