"""carelake simulate: feeds parse, truth matches the files, output is reproducible, flags fail clearly."""

from __future__ import annotations

import csv
import hashlib
import json
import re
import subprocess
from collections import Counter, defaultdict
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.conftest import REPO, carelake_cmd, carelake_env, make_config

SETTINGS = {"simulator.deterioration_fraction": 0.5, "simulator.icu_beds": 4, "simulator.imaging_fraction": 0.6,
            "simulator.icu_admission_fraction": 0.3, "simulator.icu_cadence_min_s": 5,
            "simulator.fraud.duplicate_billing": 0.3, "simulator.fraud.upcoding": 0.3,
            "simulator.fraud.unbundling": 0.3, "simulator.fraud.phantom_services": 0.3,
            "simulator.fraud.impossible_volume": 0.3, "simulator.dirt.duplicate": 0.05,
            "simulator.dirt.malformed": 0.03, "simulator.dirt.lf_terminator": 0.1}
MSH_START = re.compile(rb"(?:(?<=[\r\n])|^)(?=MSH\|)")


def run_simulation(spark, tmp: Path, out: Path, seed: int = 11, **extra):
    from pipelines.simulator.params import resolve_params
    from pipelines.simulator.run import simulate

    cfg = make_config(tmp / "lake", **{**SETTINGS, **extra})
    return simulate(spark, resolve_params(cfg.simulator, out, patients=20, hours=6, seed=seed))


@pytest.fixture(scope="module")
def sim(spark, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sim")
    summary = run_simulation(spark, tmp, tmp / "out")
    return summary.params.out


def truth(out: Path, name: str) -> list[dict]:
    with open(out / "truth" / name, newline="") as fh:
        return list(csv.DictReader(fh))


def counts(out: Path) -> dict:
    return json.loads((out / "truth" / "expected_counts.json").read_text())


def hl7_messages(out: Path) -> list[bytes]:
    return [m for f in sorted((out / "hl7").glob("*.hl7")) for m in MSH_START.split(f.read_bytes()) if m]


def control_id(message: bytes) -> str | None:
    first = re.split(rb"[\r\n]", message, maxsplit=1)[0].decode("utf-8", "replace")
    fields = first.split("|")
    return fields[9] if first.startswith("MSH|") and len(fields) > 11 else None


def folder_digest(out: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(out)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def device_lines(out: Path) -> list[tuple[str, int, str]]:
    return [(f.name, n, line) for f in sorted((out / "devices").glob("*.jsonl"))
            for n, line in enumerate(f.read_text().splitlines(), start=1)]


def test_every_feed_is_written_and_parses(sim):
    from fhir.resources.R4B import get_fhir_model_class

    assert {p.name for p in sim.iterdir()} >= {"hl7", "fhir", "devices", "dicom", "claims", "truth", "manifest.json"}
    malformed = {r["identifier"] for r in truth(sim, "dirt.csv") if r["kind"] == "malformed"}
    ids = [control_id(m) for m in hl7_messages(sim)]
    assert all(i is not None for i in ids if i not in malformed | {None}) and len(set(ids)) > 20
    # a message without a usable MSH is read as part of the one before it, unless it opens its file
    assert ids.count(None) == len(headless_file_starts(sim))
    for path in (sim / "fhir").glob("*.json"):
        text = path.read_text()
        bundle_id = re.search(r'"id": "(bundle-[^"]+)"', text).group(1)
        if bundle_id in malformed:
            with pytest.raises(json.JSONDecodeError):
                json.loads(text)
            continue
        for entry in json.loads(text)["entry"]:
            get_fhir_model_class(entry["resource"]["resourceType"]).model_validate(entry["resource"])
    for path in (sim / "claims").glob("*.json"):
        for entry in json.loads(path.read_text())["entry"]:
            get_fhir_model_class(entry["resource"]["resourceType"]).model_validate(entry["resource"])
    bad = {(r["file"], int(r["position"])) for r in truth(sim, "dirt.csv") if r["kind"] == "malformed"}
    for name, n, line in device_lines(sim):
        if (f"devices/{name}", n) not in bad:
            assert set(json.loads(line)) >= {"device_id", "patient_mrn", "time", "code"}


def test_dicom_files_are_part10_and_match_orders(sim):
    import pydicom

    orders = {r["accession_number"]: r for r in truth(sim, "imaging.csv") if r["study_instance_uid"]}
    files = list((sim / "dicom").rglob("*.dcm"))
    assert orders and len(files) == counts(sim)["dicom"]["instances"]
    for path in files:
        ds = pydicom.dcmread(path)
        order = orders[ds.AccessionNumber]
        assert ds.StudyInstanceUID == order["study_instance_uid"] == path.parent.name
        assert ds.PatientID.startswith("MRN") and ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
        assert ds.pixel_array.shape == (64, 64)


def headless_file_starts(sim: Path) -> list[dict]:
    """The HL7 messages that lost their MSH (garbage, missing_msh) and open their file: nothing before them to join."""
    return [r for r in truth(sim, "dirt.csv") if r["feed"] == "hl7" and r["kind"] == "malformed"
            and r["detail"] in ("garbage", "missing_msh") and r["position"] == "1"]


def test_expected_counts_equal_the_files(sim):
    c = counts(sim)
    dirt = truth(sim, "dirt.csv")
    unsplittable = sum(1 for r in dirt if r["feed"] == "hl7" and r["kind"] == "malformed"
                       and r["detail"] in ("garbage", "missing_msh")) - len(headless_file_starts(sim))
    dup_of_unsplittable = sum(1 for r in dirt if r["feed"] == "hl7" and r["kind"] == "duplicate"
                              and any(m["identifier"] == r["identifier"] and m["kind"] == "malformed"
                                      and m["detail"] in ("garbage", "missing_msh") for m in dirt))
    assert len(hl7_messages(sim)) == c["hl7"]["messages_written"] - unsplittable - dup_of_unsplittable
    assert len(list((sim / "fhir").glob("*.json"))) == c["fhir"]["bundles_written"]
    lines = device_lines(sim)
    assert len(lines) == c["devices"]["lines_written"]
    per_code = Counter(re.search(r'"code": "([^"]+)"', line).group(1) for *_, line in lines
                       if '"code": "' in line)
    assert sum(per_code.values()) <= c["devices"]["lines_written"]
    with_code = sum(1 for *_, line in lines if '"code": "' in line)
    assert with_code == sum(per_code.values())
    claim_lines = [row for p in (sim / "claims").glob("*.csv") for row in csv.DictReader(open(p, newline=""))]
    assert len(claim_lines) == c["claims"]["claim_lines"]
    encounters = truth(sim, "encounters.csv")
    assert sum(1 for e in encounters if e["cancelled"] == "no") == c["population"]["encounters"]
    assert len(truth(sim, "merges.csv")) == c["population"]["merges"]


def test_duplicates_in_truth_really_are_duplicates(sim):
    ids = Counter(control_id(m) for m in hl7_messages(sim))
    dirt = truth(sim, "dirt.csv")
    broken = {r["identifier"] for r in dirt if r["kind"] == "malformed"}
    dups = [r for r in dirt if r["feed"] == "hl7" and r["kind"] == "duplicate" and r["identifier"] not in broken]
    assert dups
    assert all(ids[r["identifier"]] == 2 for r in dups)
    lines = {(f"devices/{name}", n): line for name, n, line in device_lines(sim)}
    all_lines = Counter(lines.values())
    device_dups = [r for r in dirt if r["feed"] == "devices" and r["kind"] == "duplicate"]
    assert device_dups and all(all_lines[lines[(r["file"], int(r["position"]))]] >= 2 for r in device_dups)


def test_late_events_arrive_in_a_later_file(sim):
    late = [r for r in truth(sim, "dirt.csv") if r["feed"] == "devices" and r["kind"] == "late"]
    assert late
    for r in late:
        event_hour = r["identifier"].split("|")[2][:13].replace("-", "").replace("T", "T")
        file_hour = Path(r["file"]).name[:11]
        assert file_hour > event_hour.replace(":", "")[:11]


def test_dirt_rates_roughly_as_configured(sim):
    c = counts(sim)["devices"]
    readings = c["readings"]
    assert 0.03 < c["dirt"]["duplicate"] / readings < 0.07
    assert 0.01 < c["dirt"]["late"] / readings < 0.03
    numeric = readings - c["by_code"].get("67775-7", {}).get("readings", 0)
    assert 0.02 < c["dirt"]["malformed"] / numeric < 0.045


def test_fraud_labels_point_at_real_patterns(sim):
    labels = truth(sim, "fraud_labels.csv")
    lines = {(r["claim_id"], int(r["line"])): r for p in (sim / "claims").glob("*.csv")
             for r in csv.DictReader(open(p, newline=""))}
    assert {"duplicate_billing", "upcoding", "unbundling"} <= {label["pattern"] for label in labels}
    for label in labels:
        line = lines[(label["claim_id"], int(label["line"]))]
        if label["pattern"] == "duplicate_billing":
            original = lines[(label["claim_id"][:-1], int(label["line"]))]
            keys = ("patient_mrn", "service_date", "procedure_code", "units", "line_charge", "rendering_npi")
            assert all(line[k] == original[k] for k in keys)
        if label["pattern"] == "unbundling":
            assert line["procedure_code"] in ("85027", "85004")
        if label["pattern"] == "impossible_volume":
            assert int(line["units"]) * 30 > 24 * 60



def test_upcoding_is_one_hospitalists_habit_at_the_configured_share(sim):
    """All upcoded lines are the one upcoder's (so it stands out against its peers), each the top of its E/M family;
    over stays shared evenly by the hospitalists, the upcoded share of all claims is the configured rate."""
    from types import SimpleNamespace

    from pipelines.simulator.claims import HOSPITALISTS, UPCODERS, _upcodes

    lines = {(r["claim_id"], r["line"]): r for p in (sim / "claims").glob("*.csv")
             for r in csv.DictReader(open(p, newline=""))}
    upcoded = [lines[(r["claim_id"], r["line"])] for r in truth(sim, "fraud_labels.csv") if r["pattern"] == "upcoding"]
    assert upcoded and {r["rendering_npi"] for r in upcoded} == set(UPCODERS) and len(UPCODERS) == 1
    assert {r["procedure_code"] for r in upcoded} <= {"99223", "99233", "99239"}
    stays, rate, deteriorating = 20_000, 0.04, 0.2
    drawn = sum(_upcodes(SimpleNamespace(enc=SimpleNamespace(deterioration=None if n // 10 % 5 else "sepsis"),
                                         lines=[SimpleNamespace(rendering_npi=HOSPITALISTS[n % 10])]),
                         (n // 10 * 0.6180339887) % 1.0, rate, deteriorating) for n in range(stays))
    assert abs(drawn / stays - rate) < 0.004

def _monitor_series(out: Path) -> dict[tuple[str, str], list[tuple[datetime, float]]]:
    series = defaultdict(list)
    for *_, line in device_lines(out):
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if r.get("value") is not None and r.get("unit") not in ("[degF]", "1"):
            series[(r["patient_mrn"], r["code"])].append((datetime.fromisoformat(r["time"]), r["value"]))
    return series


BASES = {"hr": 80.0, "sbp": 120.0, "rr": 16.0, "spo2": 97.0}
VITAL_LOINC = {"8867-4": "hr", "9279-1": "rr", "8480-6": "sbp"}


def _severity_scores(out: Path) -> dict[str, list[tuple[datetime, float]]]:
    """HR + 2 x RR - SBP / 2 per patient and time, from monitor lines and HL7 ward observations."""
    sets: dict[tuple[str, datetime], dict[str, float]] = defaultdict(dict)
    for (mrn, code), points in _monitor_series(out).items():
        for t, v in points:
            if code in VITAL_LOINC:
                sets[(mrn, t)][VITAL_LOINC[code]] = v
    for m in hl7_messages(out):
        text = m.decode("utf-8", "replace").replace("\n", "\r")
        mrn = re.search(r"PID\|1\|\|(MRN\d+)", text)
        for obx in re.findall(r"OBX\|\d+\|NM\|([\d-]+)\^[^|]*\|\|([\d.]+)\|(?:[^|]*\|){8}(\d{14})", text):
            if mrn and obx[0] in VITAL_LOINC:
                at = datetime.strptime(obx[2], "%Y%m%d%H%M%S").replace(tzinfo=UTC)
                sets[(mrn.group(1), at)][VITAL_LOINC[obx[0]]] = float(obx[1])
    out_scores = defaultdict(list)
    for (mrn, t), v in sets.items():
        if len(v) == 3:
            out_scores[mrn].append((t, v["hr"] + 2 * v["rr"] - v["sbp"] / 2))
    return out_scores


def test_deteriorating_patients_deteriorate(sim, spark):
    from pipelines.simulator.clinical import CODE_NO
    from pipelines.simulator.trajectory import measure_value

    cases = truth(sim, "deteriorations.csv")
    assert cases
    scores = _severity_scores(sim)
    checked = 0
    for case in cases:
        onset = datetime.fromisoformat(case["onset_time"])
        points = scores.get(case["patient_mrn"], [])
        before = [v for t, v in points if t < onset]
        after = [v for t, v in points if (t - onset).total_seconds() >= 2 * 3600]
        if before and after:
            checked += 1
            assert sum(after) / len(after) > sum(before) / len(before) + 3, case
    # At the peak, every kind is NEWS2-visible: heart rate up; blood pressure or saturation down.
    from pyspark.sql import functions as F

    for kind, code, sign in (("sepsis", "sbp", -1), ("respiratory_failure", "spo2", -1), ("haemorrhage", "sbp", -1),
                             ("sepsis", "hr", 1), ("haemorrhage", "hr", 1), ("respiratory_failure", "rr", 1)):
        kind_no = {"sepsis": 1, "respiratory_failure": 2, "haemorrhage": 3}[kind]
        df = spark.createDataFrame([(1, t, CODE_NO[code]) for t in (0, 36000, 72000)], "v long, t long, c int")
        value = measure_value(seed=1, start_hour=0.0, visit_no=F.col("v"), t=F.col("t"), code_no=F.col("c"),
                              base=F.lit(BASES[code]), kind_no=F.lit(kind_no),
                              onset_s=F.lit(3600.0), ramp_s=F.lit(8 * 3600.0), recovery_start_s=F.lit(1e12),
                              recovery_s=F.lit(3600.0))
        v0, _, v2 = [r[0] for r in df.select(value).collect()]
        assert sign * (v2 - v0) > 5 if code != "spo2" else v2 < 90
    assert checked


def test_cadence_icu_seconds_and_ward_hours(sim):
    for (_, code), points in _monitor_series(sim).items():
        if code != "8867-4":
            continue
        times = sorted({t for t, _ in points})
        gaps = {(b - a).total_seconds() for a, b in zip(times, times[1:], strict=False)}
        assert gaps and min(gaps) >= 1 and max(gaps) <= 60 or max(gaps) % 60 == 0
    ward = defaultdict(list)
    malformed = {r["identifier"] for r in truth(sim, "dirt.csv") if r["kind"] == "malformed"}
    for m in hl7_messages(sim):
        text = m.decode("utf-8", "replace")
        whole = control_id(m) not in malformed and len(re.findall(r"(?:^|[\r\n])PID\|", text)) == 1  # none joined
        if whole and "ORU^R01" in text and "85353-1" in text:
            visit = re.search(r"\|(V\d{8})\^", text).group(1)
            ward[visit].append(datetime.strptime(re.search(r"OBR\|1\|\|\|[^|]*\|\|\|(\d{14})", text).group(1),
                                                 "%Y%m%d%H%M%S"))
    gaps = [(b - a).total_seconds() / 3600 for ts in ward.values() for a, b in zip(sorted(set(ts)),
                                                                               sorted(set(ts))[1:], strict=False)]
    assert gaps and all(1 <= g <= 4 for g in gaps)


def test_hl7_format(sim):
    message = next(m for m in hl7_messages(sim) if b"ORU^R01" in m and b"\r" in m)
    segments = message.decode().rstrip("\r").split("\r")
    msh = segments[0].split("|")
    assert msh[8] == "ORU^R01^ORU_R01" and msh[10] == "P" and msh[11] == "2.5" and re.fullmatch(r"\d{14}[+-]\d{4}",
                                                                                              msh[6])
    obx = [s.split("|") for s in segments if s.startswith("OBX|")]
    hr = next(o for o in obx if o[3].startswith("8867-4^Heart rate^LN"))
    assert hr[2] == "NM" and hr[6] == "/min^/min^UCUM" and re.fullmatch(r"\d{14}\+0000", hr[14])
    assert {o[2] for o in obx} >= {"NM", "ST", "CWE"}


@pytest.mark.slow
def test_same_seed_same_bytes_other_seed_other_bytes(spark, tmp_path, sim):
    again = run_simulation(spark, tmp_path, tmp_path / "again").params.out
    other = run_simulation(spark, tmp_path, tmp_path / "other", seed=12).params.out
    assert folder_digest(again) == folder_digest(sim)
    assert folder_digest(other) != folder_digest(sim)


@pytest.mark.parametrize(("args", "message"), [
    (("--feeds", "hl7,vitals"), "unknown: vitals"),
    (("--patients", "0"), "simulator.patients (or its flag) must be at least 1"),
    (("--start", "tomorrow"), "must be an ISO-8601 time with a zone"),
])
def test_bad_flags_fail_with_one_line(tmp_path, args, message):
    proc = subprocess.run(carelake_cmd("simulate", "--out", str(tmp_path / "o"), *args),
                          env=carelake_env(tmp_path / "lake"), capture_output=True, text=True, timeout=120, cwd=REPO)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("carelake:")]
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr


def test_non_empty_out_is_refused(tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "notes.txt").write_text("mine")
    proc = subprocess.run(carelake_cmd("simulate", "--out", str(tmp_path / "o")),
                          env=carelake_env(tmp_path / "lake"), capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2 and "is not empty" in proc.stderr and "--force" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_dbldatagen_gets_a_session_that_writes_the_current_arrow_key():
    """dbldatagen sets Spark's deprecated `spark.sql.execution.arrow.enabled` on Spark 4 (a warning in the output):
    the session the simulator hands it writes the current key, and passes everything else through."""
    from pipelines.simulator.population import _CurrentArrowKey

    class Conf:
        def __init__(self):
            self.values = {}

        def set(self, key, value):
            self.values[key] = value

        def get(self, key, default=None):
            return self.values.get(key, default)

    class Session:
        version = "4.0.1"
        conf = Conf()

    wrapped = _CurrentArrowKey(Session())
    wrapped.conf.set("spark.sql.execution.arrow.enabled", "true")
    wrapped.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", 100)
    assert Session.conf.values == {"spark.sql.execution.arrow.pyspark.enabled": "true",
                                   "spark.sql.execution.arrow.maxRecordsPerBatch": 100}
    assert wrapped.version == "4.0.1" and wrapped.conf.get("spark.sql.execution.arrow.maxRecordsPerBatch") == 100


def test_imaging_truth_has_indications_places_findings_and_reads(sim):
    rows = truth(sim, "imaging.csv")
    assert rows and {r["location_class"] for r in rows} <= {"ED", "ICU", "WARD", "OUTPATIENT"}
    assert {"ED", "WARD"} <= {r["location_class"] for r in rows}
    for r in rows:
        assert r["indication_code"] and r["indication_text"] and r["critical_finding"] in ("0", "1")
        assert bool(r["finding"]) == (r["critical_finding"] == "1")
        assert bool(r["reader"]) == bool(r["read_time"]) and (not r["read_time"] or r["study_time"])
        assert not r["read_time"] or r["study_time"] <= r["read_time"] and r["ordered_time"] <= r["study_time"]
    reports = [m for m in hl7_messages(sim) if b"|RAD|F|" in m]
    assert len(reports) >= sum(1 for r in rows if r["read_time"]) - counts(sim)["dirt"].get("hl7.malformed", 0)
    vitals = truth(sim, "ward_vitals.csv")  # the charted ward sets and ICU hourly monitor sets NEWS2 is scored from
    inpatients = {r["visit_number"] for r in truth(sim, "encounters.csv")}
    assert vitals and {r["visit_number"] for r in vitals} <= inpatients
    assert all(r["acvpu"] in ("A", "C", "V", "P", "U") and 4 <= float(r["respiratory_rate"]) <= 60 for r in vitals)
    monitored = [r for r in vitals if not r["o2_flow_l_min"]]  # ICU monitors send FiO2, never an O2 flow
    assert monitored and all(r["spo2_pct"] and r["fio2_pct"] for r in monitored)
    icu_studies = {r["visit_number"] for r in rows if r["location_class"] == "ICU"}
    assert not icu_studies or icu_studies & {r["visit_number"] for r in monitored}  # their acuity is now known


def test_sicker_patients_studies_find_more_and_emergencies_are_sometimes_under_triaged():
    from pipelines.simulator.clinical import DETERIORATION_PRIORITY, ED_CASES, INDICATIONS, critical_chance

    assert critical_chance(0.1, None) == 0.1  # nothing charted: the indication's prevalence
    chances = [critical_chance(0.1, band) for band in ("low", "low-medium", "medium", "high")]
    assert chances == sorted(chances) and chances[0] < 0.1 < chances[2] and chances[-1] < 0.3
    emergencies = [p for i, _, p in ED_CASES if INDICATIONS[i].critical_p >= 0.08]
    assert emergencies and all(p.get("routine", 0) > 0 and p.get("stat", 0) > 0.4 for p in emergencies)
    assert 0 < DETERIORATION_PRIORITY["routine"] < DETERIORATION_PRIORITY["stat"]


def test_critical_findings_are_not_predicted_by_priority_alone():
    from pipelines.simulator.clinical import ED_CASES, INDICATIONS, OUTPATIENT_CASES

    def expected(priority: str) -> float:
        cases = [(INDICATIONS[i].critical_p, w * p.get(priority, 0)) for i, w, p in (*ED_CASES, *OUTPATIENT_CASES)]
        return sum(c * w for c, w in cases) / sum(w for _, w in cases)

    assert 0 < expected("routine") < expected("asap") < expected("stat") < 0.3  # most STAT studies hold none
