"""`carelake import physionet2012`: records -> FHIR Patient/Encounter + device readings through the landing zone, then
silver and gold like any feed; outcomes -> silver.outcomes. Bad input gets a one-line error."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest

from pipelines.errors import UsageError
from pipelines.physionet2012 import (
    ALSO,
    DEFAULT_ANCHOR,
    PARAMS,
    admission_time,
    gcs_to_acvpu,
    parse_anchor,
    parse_outcomes,
    parse_record,
)
from silver.vitals import BY_CODE, normalize
from tests.test_cli import run_cli

RECORD = """Time,Parameter,Value
00:00,RecordID,140001
00:00,Age,71
00:00,Gender,1
00:00,Height,-1
00:00,ICUType,3
00:00,Weight,82.5
00:30,HR,112
00:30,RespRate,24
00:30,SaO2,93
00:30,NISysABP,98
00:30,NIDiasABP,55
00:30,NIMAP,69
00:30,Temp,38.4
00:30,GCS,14
00:30,FiO2,0.4
00:30,Glucose,140
00:30,Cholesterol,180
01:00,SysABP,101
01:00,DiasABP,52
01:00,MAP,68
01:00,WBC,14.2
01:00,Lactate,3.1
01:00,Creatinine,1.6
01:00,HR,-1
01:00,Temp,-17.8
01:00,GCS,2
"""

OUTCOMES = "RecordID,SAPS-I,SOFA,Length_of_stay,Survival,In-hospital_death\n140001,19,8,6,-1,0\n999999,5,1,2,-1,0\n"


def _sql(root, query: str) -> list[dict]:
    out = run_cli(root, "-q", "sql", query, "--format", "json").stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def _write_record(folder, text=RECORD, name="140001.txt"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)
    return folder


# -- pure parts ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("gcs", "letter"), [("15", "A"), ("14", "C"), ("13", "C"), ("12", "V"), ("9", "V"),
                                             ("8", "P"), ("7", "P"), ("6", "U"), ("3", "U"), ("-1", "-1"),
                                             ("2", "2"), ("16", "16"), ("14.5", "14.5"), ("x", "x")])
def test_gcs_to_acvpu(gcs, letter):
    assert gcs_to_acvpu(gcs) == letter


def test_parse_record_keeps_descriptors_apart_and_weight_as_a_reading(tmp_path):
    rec = parse_record(_write_record(tmp_path) / "140001.txt")
    assert rec.record_id == "140001"
    assert rec.descriptors == {"RecordID": "140001", "Age": "71", "Gender": "1", "Height": "-1", "ICUType": "3",
                               "Weight": "82.5"}
    assert rec.rows[0] == (0, "Weight", "82.5") and (60, "Temp", "-17.8") in rec.rows and len(rec.rows) == 21


def test_admission_is_anchor_plus_a_fixed_offset_under_a_year():
    a = admission_time("140001", DEFAULT_ANCHOR)
    assert a == admission_time("140001", DEFAULT_ANCHOR) != admission_time("140002", DEFAULT_ANCHOR)
    assert DEFAULT_ANCHOR <= a < DEFAULT_ANCHOR.replace(year=2021) and a.second == 0


@pytest.mark.parametrize(("text", "message"), [
    ("", "is not a PhysioNet 2012 record: first line must be 'Time,Parameter,Value'"),
    ("Time,Parameter,Value\n00:00,RecordID,1\n00:05,HR\n", ":3: expected 3 comma-separated fields"),
    ("Time,Parameter,Value\n00:00,RecordID,1\nfive,HR,80\n", ":3: time 'five' is not HH:MM"),
    ("Time,Parameter,Value\n00:05,HR,80\n", "has no RecordID descriptor"),
])
def test_not_a_record_is_refused(tmp_path, text, message):
    (tmp_path / "r.txt").write_text(text)
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(".", r"\.")):
        parse_record(tmp_path / "r.txt")


@pytest.mark.parametrize(("text", "message"), [
    ("RecordID,SAPS\n", "is not a PhysioNet 2012 outcomes file: the header must be"),
    (OUTCOMES.replace("140001,19,8,6,-1,0", "140001,19,8,6,-1,2"), ":2: expected RecordID and five numbers"),
    (OUTCOMES.replace("140001,19", "140001,nineteen"), ":2: expected RecordID and five numbers"),
])
def test_bad_outcomes_are_refused(tmp_path, text, message):
    (tmp_path / "o.txt").write_text(text)
    with pytest.raises(UsageError, match=message):
        parse_outcomes(tmp_path / "o.txt")


def test_outcomes_minus_one_is_unknown(tmp_path):
    (tmp_path / "o.txt").write_text(OUTCOMES)
    assert parse_outcomes(tmp_path / "o.txt")[0] == {
        "record_id": "140001", "saps_i": 19.0, "sofa": 8.0, "length_of_stay_days": 6.0, "survival_days": None,
        "in_hospital_death": False}


def test_anchor():
    assert parse_anchor(None) == DEFAULT_ANCHOR
    assert parse_anchor("2019-06-01T12:00:00+02:00") == datetime(2019, 6, 1, 10, tzinfo=UTC)
    with pytest.raises(UsageError, match="is not an ISO-8601 time"):
        parse_anchor("yesterday")
    with pytest.raises(UsageError, match="in the future"):
        parse_anchor(datetime.now(tz=UTC).isoformat())


def test_every_parameter_code_is_one_silver_knows():
    assert {p.code for p in (*PARAMS.values(), *ALSO.values())} <= set(BY_CODE)


# -- through the CLI ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "message"), [
    (("nowhere",), "nowhere is not a folder; pass the folder of record files"),
    (("{empty}",), "holds no *.txt record files"),
    (("{bad}",), "is not a PhysioNet 2012 record: first line must be"),
    (("{good}", "--outcomes", "nowhere.txt"), "--outcomes nowhere.txt does not exist"),
    (("{good}", "--anchor", "soon"), "--anchor 'soon' is not an ISO-8601 time"),
])
def test_bad_input_gets_one_line(tmp_path, args, message):
    folders = {"empty": tmp_path / "empty", "bad": tmp_path / "bad", "good": _write_record(tmp_path / "good")}
    folders["empty"].mkdir()
    _write_record(folders["bad"], text="RecordID,SAPS-I\n", name="Outcomes-a.txt")
    args = [a.format(**folders) for a in args]
    proc = run_cli(tmp_path / "lake", "import", "physionet2012", *args, check=False)
    assert proc.returncode != 0 and proc.stdout == ""
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "lake" / "landing").exists() or not any((tmp_path / "lake" / "landing").rglob("*.*"))


@pytest.mark.slow
def test_a_record_goes_to_silver_and_gold(tmp_path):
    root = tmp_path / "lake"
    (tmp_path / "Outcomes-a.txt").write_text(OUTCOMES)
    out = run_cli(root, "import", "physionet2012", str(_write_record(tmp_path / "records")),
                  "--outcomes", str(tmp_path / "Outcomes-a.txt")).stdout
    assert "imported 1 record(s): 2 FHIR resources and 22 device readings" in out
    assert "not sent (no LOINC code in silver): 1 values of Cholesterol" in out and "1 outcome label(s)" in out
    run_cli(root, "run", "all", "--available-now")

    obs = _sql(root, "select code, unit, round(value, 2) as value, value_text, cast(effective_at as string) as t "
                     "from silver.observations order by code, t")
    admitted = admission_time("140001", DEFAULT_ANCHOR)
    t0, t30, t60 = ((admitted + timedelta(minutes=m)).strftime("%Y-%m-%d %H:%M:%S") for m in (0, 30, 60))
    assert obs == [
        {"code": "2160-0", "unit": "mg/dL", "value": 1.6, "value_text": None, "t": t60},
        {"code": "2345-7", "unit": "mg/dL", "value": 140.0, "value_text": None, "t": t30},
        {"code": "2524-7", "unit": "mmol/L", "value": 3.1, "value_text": None, "t": t60},
        {"code": "2708-6", "unit": "%", "value": 93.0, "value_text": None, "t": t30},
        {"code": "29463-7", "unit": "kg", "value": 82.5, "value_text": None, "t": t0},
        {"code": "3150-0", "unit": "%", "value": 40.0, "value_text": None, "t": t30},
        {"code": "6690-2", "unit": "10*3/uL", "value": 14.2, "value_text": None, "t": t60},
        {"code": "67775-7", "unit": None, "value": None, "value_text": "C", "t": t30},
        {"code": "76213-5", "unit": "mm[Hg]", "value": 52.0, "value_text": None, "t": t60},
        {"code": "76214-3", "unit": "mm[Hg]", "value": 68.0, "value_text": None, "t": t60},
        {"code": "76215-0", "unit": "mm[Hg]", "value": 101.0, "value_text": None, "t": t60},
        {"code": "8310-5", "unit": "Cel", "value": 38.4, "value_text": None, "t": t30},
        {"code": "8462-4", "unit": "mm[Hg]", "value": 55.0, "value_text": None, "t": t30},
        {"code": "8478-0", "unit": "mm[Hg]", "value": 69.0, "value_text": None, "t": t30},
        {"code": "8480-6", "unit": "mm[Hg]", "value": 98.0, "value_text": None, "t": t30},
        {"code": "8867-4", "unit": "/min", "value": 112.0, "value_text": None, "t": t30},
        {"code": "9269-2", "unit": "{score}", "value": 14.0, "value_text": None, "t": t30},
        {"code": "9279-1", "unit": "/min", "value": 24.0, "value_text": None, "t": t30},
    ]
    quarantined = _sql(root, "select get_json_object(cast(b.payload as string), '$.code') as code, q.reason "
                             "from silver.quarantine q join bronze.device_readings b "
                             "using (landing_file, landing_position) order by code")
    assert quarantined == [{"code": "67775-7", "reason": "unrecognized_value"},
                           {"code": "8310-5", "reason": "implausible_value"},
                           {"code": "8867-4", "reason": "implausible_value"},
                           {"code": "9269-2", "reason": "implausible_value"}]

    people = _sql(root, "select p.mrn, p.sex, cast(p.birth_date as string) as birth_date, e.patient_class, "
                        "e.location_point_of_care as unit, o.saps_i, o.in_hospital_death, o.record_id "
                        "from silver.patients p join silver.outcomes o on o.patient_key = p.patient_key "
                        "join silver.patients ref on ref.merged_into = p.patient_key "  # the Encounter's subject
                        "join silver.encounters e on e.patient_key = ref.patient_key")
    assert people == [{"mrn": "140001", "sex": "male", "birth_date": f"{admitted.year - 71}-"
                       f"{admitted.month:02d}-{min(admitted.day, 28):02d}", "patient_class": "IMP",
                       "unit": "Medical ICU", "saps_i": 19.0, "in_hospital_death": False, "record_id": "140001"}]

    # NEWS2 at 00:30: RR 24 (2), SaO2 93 on scale 1 (2), O2 (2), SBP 98 (2), HR 112 (2), C (3), 38.4 (1) = 14.
    scores = _sql(root, "select s.news2_score, s.news2_consciousness, s.systolic_bp, s.on_oxygen "
                        "from gold.early_warning_scores s join silver.patients p on s.patient_key = p.patient_key "
                        f"where p.mrn = '140001' and s.scored_at = timestamp'{t30}'")
    assert scores == [{"news2_score": 14, "news2_consciousness": 3, "systolic_bp": 98.0, "on_oxygen": True}]


@pytest.mark.slow
@pytest.mark.realdata
def test_set_a_records_land_in_silver_or_quarantine(tmp_path, realdata):
    set_a = realdata / "physionet2012" / "set-a"
    # The first 12, and 5 that hold impossible values (arterial pressures of 0, Temp < 25 Cel, HR 0, Weight -1).
    records = sorted(set_a.glob("*.txt"))[:12] + [set_a / f"{r}.txt" for r in (132584, 132642, 132704, 132894,
                                                                              132960)]
    folder = tmp_path / "records"
    folder.mkdir()
    for f in records:  # a handful, read from ../shared (copied to a temp folder, never into the repo)
        shutil.copy(f, folder / f.name)
    root = tmp_path / "lake"
    run_cli(root, "import", "physionet2012", str(folder),
            "--outcomes", str(realdata / "physionet2012" / "Outcomes-a.txt"))
    run_cli(root, "run", "all", "--available-now")

    sent, keys, flagged = Counter(), {}, Counter()
    for f in records:
        rec = parse_record(f)
        for minute, name, value in rec.rows:
            for p in (PARAMS[name], *([ALSO[name]] if name in ALSO else [])) if name in PARAMS else ():
                sent[p.code] += 1
                keys.setdefault(p.code, set()).add((rec.record_id, minute))
                text = gcs_to_acvpu(value) if p.unit is None else value
                flagged[p.code] += normalize(p.code, None, None, None, text, p.unit).problem is not None
    counts = _sql(root, "select code, 'bronze' as kind, count(*) as n from (select get_json_object(cast(payload as "
                        "string), '$.code') as code from bronze.device_readings) group by code "
                        "union all select code, 'silver', count(*) from silver.observations group by code "
                        "union all select get_json_object(cast(b.payload as string), '$.code'), 'quarantine', "
                        "count(*) from silver.quarantine q join bronze.device_readings b "
                        "using (landing_file, landing_position) group by 1")
    n = {(r["code"], r["kind"]): r["n"] for r in counts}
    print("sent per code:", dict(sent), "\nlanded/silver/quarantine:", n)
    for code, count in sent.items():
        assert n[(code, "bronze")] == count, code
        ended = n.get((code, "silver"), 0) + n.get((code, "quarantine"), 0)
        assert len(keys[code]) <= ended <= count, code  # duplicate (time, parameter) rows merge into one
    assert {c for c, k in flagged.items() if k} >= {"76215-0", "76213-5", "8310-5", "8867-4", "29463-7"}
    for code, count in flagged.items():  # every impossible value is quarantined (duplicates may merge)
        assert (count > 0) <= n.get((code, "quarantine"), 0) <= count, code
    bounds = _sql(root, "select code, min(value) as lo, max(value) as hi from silver.observations "
                        "where value is not null group by code")
    for b in bounds:
        v = BY_CODE[b["code"]]
        assert v.low <= b["lo"] and b["hi"] <= v.high, b
    labels = _sql(root, "select count(*) as n, count(distinct patient_key) as k from silver.outcomes o "
                        "where exists (select 1 from silver.patients p where p.patient_key = o.patient_key)")
    assert labels == [{"n": len(records), "k": len(records)}]


def test_bad_flag_is_named(tmp_path):
    proc = run_cli(tmp_path / "lake", "import", "physionet2012", str(tmp_path), "--bogus", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        "carelake: error: unrecognized arguments: --bogus")
