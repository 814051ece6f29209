"""silver.observations: every measured value normalized, keyed, deduplicated; the rest quarantined with a reason."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from pyspark.sql import functions as F

from bronze.device_readings import device_readings
from bronze.fhir_resources import fhir_resources
from bronze.hl7_messages import hl7_messages
from pipelines.runner import LANDING_FILE_SCHEMA
from silver.identity import PATIENT, identity_key
from silver.observations import OBSERVATIONS, OUTPUT, observations
from silver.quarantine import QUARANTINE

SECRET = "test-secret"
NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
OPTIONS = {"processed_at": NOW, "secret": SECRET, "timezone": "Europe/London", "mrn_system": "CARELAKE",
           "system_aliases": (("http://carelake.example/fhir/sid/mrn", "CARELAKE"),), "fhir_validation": "fast"}


def oru(control: str, sent: str, hr: str, *, status: str = "F", terminator: str = "\r") -> bytes:
    segs = [f"MSH|^~\\&|WARD|GENERAL^HOSPITAL|CARELAKE|CARELAKE|{sent}||ORU^R01^ORU_R01|{control}|P|2.5",
            "PID|1||MRN1001^^^CARELAKE^MR||Doe^Jane||19500101|F",
            "PV1|1|I|6N^12^1^GENERAL||||||||||||||||V0001^^^CARELAKE^VN",
            "OBR|1|P1|F1|vitals^Vital signs|||20261121100000+0000",
            f"OBX|1|NM|8867-4^Heart rate^LN||{hr}|/min^/min^UCUM|||||{status}|||20261121100000+0000",
            "OBX|2|NM|8310-5^Body temperature^LN||99.5|[degF]^degF^UCUM|||||F|||20261121100000+0000",
            "OBX|3|CWE|67775-7^Level of responsiveness^LN||V^Voice^ACVPU||||||F|||20261121100000+0000",
            "OBX|4|NM|9279-1^Respiratory rate^LN||||||||F|||20261121100000+0000"]
    return (terminator.join(segs) + terminator).encode()


VXU = b"MSH|^~\\&|IMM|GENERAL|||20261121100000||VXU^V04^VXU_V04|VX-1|P|2.5\rRXA|0|1|20261121\r"

FHIR_BP = {"resourceType": "Observation", "id": "bp-1", "meta": {"versionId": "2"}, "status": "final",
           "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                     "code": "vital-signs"}]}],
           "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9"}]},
           "subject": {"reference": "Patient/pat-1"}, "effectiveDateTime": "2026-11-21T10:05:00+01:00",
           "component": [
               {"code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
                "valueQuantity": {"value": 15.2, "unit": "kPa", "system": "http://unitsofmeasure.org", "code": "kPa"}},
               {"code": {"coding": [{"system": "http://loinc.org", "code": "8462-4"}]},
                "valueQuantity": {"value": 70, "unit": "mmHg", "system": "http://unitsofmeasure.org",
                                  "code": "mm[Hg]"}}]}
FHIR_SPO2 = {"resourceType": "Observation", "id": "sp-1", "status": "final",
             "code": {"coding": [{"system": "http://loinc.org", "code": "59408-5"}]},
             "subject": {"identifier": {"system": "http://carelake.example/fhir/sid/mrn", "value": "MRN1001"}},
             "effectiveDateTime": "2026-11-21T10:06:00Z",
             "valueQuantity": {"value": 0.95, "unit": "1", "system": "http://unitsofmeasure.org", "code": "1"}}


def reading(**kw) -> str:
    base = {"device_id": "icu-bed-01", "patient_mrn": "MRN1001", "time": "2026-11-21T10:00:00.000Z",
            "code": "8867-4", "value": 88.0, "unit": "/min"}
    return json.dumps({**base, **kw})


def bronze(spark, hl7: bytes = b"", fhir: bytes = b"", devices: bytes = b""):
    """Bronze rows of all three feeds as one insert change set, like the runner's union."""
    def files(path: str, content: bytes):
        return spark.createDataFrame([(path, datetime(2026, 11, 21, 11, 0), len(content), content)],
                                     LANDING_FILE_SCHEMA)

    parts = []
    if hl7:
        parts.append(hl7_messages(files("file:/l/hl7/a.hl7", hl7), ingest_batch_id="b"))
    if fhir:
        parts.append(fhir_resources(files("file:/l/fhir/a.ndjson", fhir), ingest_batch_id="b"))
    if devices:
        parts.append(device_readings(files("file:/l/devices/a.jsonl", devices), ingest_batch_id="b"))
    out = parts[0]
    for p in parts[1:]:
        out = out.unionByName(p, allowMissingColumns=True)
    return out.withColumn("_change_type", F.lit("insert"))


def routed(spark, **feeds):
    rows = [r.asDict(recursive=True) for r in observations(bronze(spark, **feeds), **OPTIONS).collect()]
    obs = [r for r in rows if r[OUTPUT] == OBSERVATIONS]
    quarantine = [r for r in rows if r[OUTPUT] == QUARANTINE]
    return obs, quarantine


def test_devices_are_normalized_and_bad_lines_quarantined_with_lineage(spark):
    lines = [reading(), reading(code="8310-5", value=101.3, unit="[degF]"), reading(code="59408-5", value=0.97,
             unit=""), reading(value=900), reading(value=None), "{not json", reading(patient_mrn=None),
             reading(code="67775-7", value=None, unit=None, value_text="alert"), reading(time="not a time"),
             reading(value="abc")]
    obs, quarantine = routed(spark, devices=("\n".join(lines) + "\n").encode())
    got = sorted((o["code"], o["concept"], o["value"] and round(o["value"], 2), o["value_text"], o["unit"])
                 for o in obs)
    assert got == sorted([("8867-4", "hr", 88.0, None, "/min"), ("8310-5", "temp", 38.5, None, "Cel"),
                          ("59408-5", "spo2", 97.0, None, "%"), ("67775-7", "acvpu", None, "A", None)])
    assert sorted(q["reason"] for q in quarantine) == ["bad_timestamp", "bad_value", "implausible_value",
                                                      "invalid_json", "missing_patient", "missing_value"]
    key = identity_key(SECRET, PATIENT, "CARELAKE", "MRN1001")
    assert {o["patient_key"] for o in obs} == {key}
    assert all(o["source_record"]["table"] == "bronze.device_readings" for o in obs)
    bad = next(q for q in quarantine if q["reason"] == "implausible_value")
    assert bad["landing_file"] == "file:/l/devices/a.jsonl" and bad["item"] == "reading" and "900" in bad["detail"]


def test_hl7_oru_values_become_rows_and_problems_quarantine(spark):
    obs, quarantine = routed(spark, hl7=oru("C-1", "20261121100100+0000", "72") + VXU)
    by_code = {o["code"]: o for o in obs}
    assert set(by_code) == {"8867-4", "8310-5", "67775-7"}
    assert by_code["8310-5"]["value"] == pytest.approx(37.5) and by_code["8310-5"]["original_unit"] == "[degF]"
    assert by_code["67775-7"]["value_text"] == "V"
    assert by_code["8867-4"]["effective_at"] == datetime(2026, 11, 21, 10, 0)  # UTC, from OBX-14
    assert by_code["8867-4"]["patient_key"] == identity_key(SECRET, PATIENT, "CARELAKE", "MRN1001")
    assert by_code["8867-4"]["encounter_key"] is not None and by_code["8867-4"]["source_id"] == "C-1#OBX[1]"
    assert sorted((q["item"], q["reason"]) for q in quarantine) == [("OBX[4]", "missing_value"),
                                                                    ("message", "not_modelled")]


def test_fhir_panels_split_into_components_and_units_convert(spark):
    ndjson = (json.dumps(FHIR_BP) + "\n" + json.dumps(FHIR_SPO2) + "\n").encode()
    obs, quarantine = routed(spark, fhir=ndjson)
    got = sorted((o["code"], round(o["value"], 1), o["unit"], o["source_version"]) for o in obs)
    assert got == [("59408-5", 95.0, "%", "000000000000"), ("8462-4", 70.0, "mm[Hg]", "000000000002"),
                   ("8480-6", 114.0, "mm[Hg]", "000000000002")]
    by_code = {o["code"]: o for o in obs}
    assert by_code["8480-6"]["effective_at"] == datetime(2026, 11, 21, 9, 5)
    # An identifier reference resolves straight to the MRN key; a Patient/<id> reference to its FHIR identity.
    assert by_code["59408-5"]["patient_key"] == identity_key(SECRET, PATIENT, "CARELAKE", "MRN1001")
    assert by_code["8480-6"]["patient_key"] == identity_key(SECRET, "fhir-patient", None, "pat-1")
    assert quarantine == []


def test_every_bronze_record_is_in_silver_or_quarantine(spark):
    hl7 = b"garbage\r" + oru("C-9", "20261121100100+0000", "70")
    obs, quarantine = routed(spark, hl7=hl7, devices=(reading() + "\n{broken\n").encode())
    records = {(o["source_record"]["landing_file"], o["source_record"]["landing_position"]) for o in obs}
    records |= {(q["landing_file"], q["landing_position"]) for q in quarantine}
    assert len(records) == 4  # the ORU, the garbage message, the good reading, the broken line


def test_resends_corrections_versions_deletes_and_replays_through_the_runner(tmp_path, spark):
    from pipelines.jobs import load_registry
    from pipelines.landing import ingest
    from pipelines.runner import Runner, Trigger
    from pipelines.store import open_store
    from tests.conftest import make_config

    cfg = make_config(tmp_path / "lake")
    store = open_store(cfg, spark)
    runner = Runner(cfg, spark, store, load_registry(cfg))
    jobs = ["bronze.hl7_messages", "bronze.fhir_resources", "bronze.device_readings", OBSERVATIONS]
    src = tmp_path / "src"
    src.mkdir()
    original = oru("C-1", "20261121100100+0000", "72")
    # The resend is byte-identical; the correction (OBX-11 C) is a later message for the same OBX.
    (src / "a.hl7").write_bytes(original + original)
    (src / "b.hl7").write_bytes(oru("C-2", "20261121101500+0000", "75", status="C", terminator="\n"))
    late = reading(time="2026-11-21T09:00:00.000Z", value=64.0)
    future = reading(time="2099-01-01T00:00:00.000Z", value=70.0)  # a device clock gone wrong
    (src / "m.jsonl").write_text("\n".join([reading(), reading(), late, future]) + "\n")
    v1 = {**FHIR_SPO2, "meta": {"versionId": "1"}, "valueQuantity": {"value": 93, "unit": "%", "code": "%"}}
    v2 = {**FHIR_SPO2, "meta": {"versionId": "2"}, "valueQuantity": {"value": 94, "unit": "%", "code": "%"}}
    (src / "o.ndjson").write_text(json.dumps(v2) + "\n" + json.dumps(v1) + "\n" + json.dumps(v2) + "\n")
    ingest(cfg, [src / "a.hl7", src / "b.hl7"], "hl7")
    ingest(cfg, [src / "m.jsonl"], "devices")
    ingest(cfg, [src / "o.ndjson"], "fhir")
    runner.run(jobs, Trigger(available_now=True))

    rows = store.read_arrow(OBSERVATIONS).to_pylist()
    hr = sorted((r["source_feed"], r["value"], r["status"]) for r in rows if r["code"] == "8867-4")
    assert hr == [("devices", 64.0, "final"), ("devices", 88.0, "final"), ("hl7", 75.0, "corrected")]
    spo2 = [r for r in rows if r["code"] == "59408-5"]
    assert [(r["value"], r["source_version"]) for r in spo2] == [(94.0, "000000000002")]
    assert len(rows) == len({r["observation_id"] for r in rows})
    quarantined = store.read_arrow(QUARANTINE).to_pylist()
    assert sorted({(q["item"], q["reason"]) for q in quarantined}) == [
        ("OBX[4]", "missing_value"), ("dq:icu-bed-01", "dq_effective_in_future")]
    # The blank respiratory rate of each of the three HL7 messages once each, and the future reading, caught by
    # the expectation suite (severity quarantine), with its lineage.
    assert len(quarantined) == 4
    dq = store.read_arrow("silver.dq_results").to_pylist()
    assert {r["table"] for r in dq} == {OBSERVATIONS} and any(not r["success"] for r in dq)
    assert (cfg.path("_reports", "dq", f"{OBSERVATIONS}.html")).read_text().count("dq_effective_in_future") >= 1

    # Replaying the same input changes nothing; a FHIR DELETE marks the observation, keeping it for audit.
    before = store.version(OBSERVATIONS)
    ingest(cfg, [src / "a.hl7"], "hl7")
    runner.run(jobs, Trigger(available_now=True))
    assert store.read_arrow(OBSERVATIONS).num_rows == len(rows)
    assert sorted(r["value"] for r in store.read_arrow(OBSERVATIONS).to_pylist() if r["code"] == "8867-4") == [
        64.0, 75.0, 88.0]
    delete = {"resourceType": "Bundle", "type": "transaction",
              "entry": [{"request": {"method": "DELETE", "url": "Observation/sp-1"}}]}
    (src / "d.json").write_text(json.dumps(delete))
    ingest(cfg, [src / "d.json"], "fhir")
    runner.run(jobs, Trigger(available_now=True))
    after = store.read_arrow(OBSERVATIONS).to_pylist()
    assert store.version(OBSERVATIONS) > before and len(after) == len(rows)
    (deleted,) = [r for r in after if r["source_id"] == "Observation/sp-1"]
    assert deleted["status"] == "deleted" and deleted["value"] == 94.0


def test_suite_rules_judged_without_great_expectations_give_its_results():
    """The validation step's vectorized pass (rules no row fails) reports exactly what Great Expectations does."""
    from dataclasses import replace
    from pathlib import Path

    from pipelines import quality
    from tests.test_quality import obs, table

    suite = quality.load_suite("silver.observations", Path(__file__).parents[1] / "expectations")
    rows = [obs(i) for i in range(40)] + [obs(99, status="deleted", patient_key=None, effective_at=None)]
    at = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
    params = quality._resolved_parameters(suite, None, at)
    frame = quality._frame(table(rows), suite, params)
    judged = 0
    for rule in [*suite.rules, *(replace(r, row_filter="status == 'none'") for r in suite.rules)]:
        fast = quality._clean_pass(frame, rule)
        if fast is not None:
            judged += 1
            assert fast == quality._run(frame, [rule], params, complete=True)[rule.index], rule
    assert judged >= 25
    bad = table([obs(1, patient_key="NOT-A-KEY"), obs(2)])
    rule = next(r for r in suite.rules if r.reason == "dq_bad_patient_key")
    assert quality._clean_pass(quality._frame(bad, suite, params), rule) is None  # a failing rule goes to GE
