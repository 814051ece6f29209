"""Simulator dirt ends where it should: silver compared with the simulator's ground truth (truth/)."""

from __future__ import annotations

import csv
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.test_cli import run_cli

HOURS, PATIENTS, SEED = 6, 30, 11


def _dirt(out: Path) -> dict[tuple[str, str], list[dict]]:
    rows: dict[tuple[str, str], list[dict]] = {}
    with open(out / "truth" / "dirt.csv", newline="") as f:
        for r in csv.DictReader(f):
            rows.setdefault((r["feed"], r["kind"]), []).append(r)
    return rows


def _device_lines(out: Path) -> list[dict | None]:
    lines = []
    for path in sorted((out / "devices").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:
                lines.append(None)
    return lines


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    """A small hospital, simulated with plenty of dirt, landed by file drop and run through every job."""
    base = tmp_path_factory.mktemp("truth")
    out, root = base / "sim", base / "lake"
    run_cli(root, "simulate", "--patients", str(PATIENTS), "--hours", str(HOURS), "--seed", str(SEED),
            "--out", str(out), "--feeds", "hl7,fhir,devices",
            CARELAKE_SIMULATOR__ICU_BEDS="3", CARELAKE_SIMULATOR__DIRT__DUPLICATE="0.05",
            CARELAKE_SIMULATOR__DIRT__UNIT_VARIANT="0.2", CARELAKE_SIMULATOR__DIRT__LF_TERMINATOR="0.2")
    run_cli(root, "ingest", str(out / "hl7"), "--feed", "hl7")
    run_cli(root, "ingest", *map(str, sorted((out / "fhir").glob("*.json"))), "--feed", "fhir")
    run_cli(root, "ingest", str(out / "devices"), "--feed", "devices")
    # bronze and silver only: these tests compare silver with the truth (gold has its own tests)
    run_cli(root, "run", "bronze.hl7_messages", "bronze.fhir_resources", "bronze.device_readings",
            "silver.observations", "silver.patients", "silver.encounters", "silver.imaging_orders",
            "silver.imaging_reports", "--available-now")
    from pipelines.store.deltars import DeltaRsStore
    from tests.conftest import make_config

    cfg = make_config(root)
    store = DeltaRsStore(cfg)
    tables = {t: store.read_arrow(t).to_pylist() for t in ("silver.observations", "silver.quarantine",
                                                             "silver.patients", "silver.encounters",
                                                             "silver.imaging_orders", "silver.imaging_reports")}
    return out, cfg, tables


@pytest.mark.slow
def test_device_readings_land_once_by_event_time_with_dirt_quarantined(lake):
    out, _cfg, t = lake
    dirt = _dirt(out)
    missing = {r["identifier"] for r in dirt.get(("devices", "missing_value"), [])}
    parsed = [d for d in _device_lines(out) if d is not None]
    expected = {(d["device_id"], d["time"], d["code"]) for d in parsed
                if f'{d["device_id"]}|{d["patient_mrn"]}|{d["time"]}|{d["code"]}' not in missing}
    got = [(o["source_system"], o["effective_at"], o["code"], o["value"], o["unit"])
           for o in t["silver.observations"] if o["source_feed"] == "devices"]
    as_text = {(dev, at.replace(tzinfo=UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z", code)
               for dev, at, code, _, _ in got}
    assert len(got) == len(as_text) == len(expected)  # resends and duplicate lines landed once
    assert as_text == expected  # every clean reading, at its own event time (late files included)
    broken = missing | {r["identifier"] for r in dirt.get(("devices", "malformed"), [])}
    late = [tuple(r["identifier"].split("|")[i] for i in (0, 2, 3)) for r in dirt.get(("devices", "late"), [])
            if r["identifier"] not in broken]
    assert late and set(late) <= as_text  # delivered hours later, landed at their own event time
    temps = [v for _, _, code, v, unit in got if code == "8310-5"]
    assert temps and all(34 <= v <= 42 for v in temps)  # [degF] variants converted to Cel
    assert {unit for _, _, code, _, unit in got if code == "8310-5"} == {"Cel"}
    reasons: dict[str, int] = {}
    for q in t["silver.quarantine"]:
        if q["feed"] == "devices":
            reasons[q["reason"]] = reasons.get(q["reason"], 0) + 1
    malformed_lines = sum(1 for d in _device_lines(out) if d is None)
    assert reasons.get("invalid_json", 0) == malformed_lines
    assert reasons.get("missing_value", 0) >= len(missing)


@pytest.mark.slow
def test_hl7_resends_lf_messages_and_unit_variants(lake):
    out, _cfg, t = lake
    dirt = _dirt(out)
    hl7_rows = [o for o in t["silver.observations"] if o["source_feed"] == "hl7"]
    assert len(hl7_rows) == len({o["observation_id"] for o in hl7_rows})
    by_message: dict[str, list[dict]] = {}
    for o in hl7_rows:
        by_message.setdefault(o["source_id"].split("#")[0], []).append(o)
    for r in dirt.get(("hl7", "lf_terminator"), []):
        ids = {r["identifier"]}
        oru = [o for i in ids for o in by_message.get(i, [])]
        text = (out / r["file"]).read_bytes()
        if b"ORU^R01" in text.split(r["identifier"].encode())[0][-200:]:
            assert oru, f"LF-terminated ORU {r['identifier']} produced no observations"
    for r in dirt.get(("hl7", "unit_variant"), []):
        if "8310-5" in r["detail"]:
            (temp,) = [o for o in by_message.get(r["identifier"], []) if o["code"] == "8310-5"]
            sent_cel = float(r["detail"].split("8310-5 ")[1].split(" ")[0])
            assert temp["unit"] == "Cel" and temp["value"] == pytest.approx(sent_cel, abs=0.06)
            assert temp["original_unit"] == "[degF]"


@pytest.mark.slow
def test_patients_merges_and_cancelled_admissions_match_truth(lake):
    out, cfg, t = lake
    from pipelines.secrets import key_secret
    from silver.identity import ENCOUNTER, PATIENT, identity_key

    secret = key_secret(cfg)
    counts = json.loads((out / "truth" / "expected_counts.json").read_text())["population"]
    walk_ins = {r["patient_mrn"] for r in _imaging_truth(out) if int(r["visit_number"][1:]) >= 7_000_000}
    registered = [p for p in t["silver.patients"] if p["identity_kind"] == "patient"]
    mrn_rows = {p["patient_key"]: p for p in registered if p["mrn"] not in walk_ins}
    assert len(mrn_rows) == counts["patient_records"]  # every registration, duplicates included
    found = {p["mrn"] for p in registered} & walk_ins  # registered by their orders' and reports' PID
    assert walk_ins and len(found) >= len(walk_ins) - _malformed(out)
    with open(out / "truth" / "merges.csv", newline="") as f:
        for m in csv.DictReader(f):
            prior = identity_key(secret, PATIENT, "CARELAKE", m["merged_mrn"])
            surviving = identity_key(secret, PATIENT, "CARELAKE", m["surviving_mrn"])
            assert mrn_rows[prior]["merged_into"] == surviving
    encounters = {e["encounter_key"]: e for e in t["silver.encounters"]}
    with open(out / "truth" / "encounters.csv", newline="") as f:
        for e in csv.DictReader(f):
            row = encounters[identity_key(secret, ENCOUNTER, "CARELAKE", e["visit_number"])]
            if e["cancelled"] == "yes":
                assert row["status"] == "cancelled"
            elif e["discharge_time"]:
                assert row["status"] == "finished"
            else:
                assert row["status"] == "in-progress"
            admitted = datetime.fromisoformat(e["admit_time"].replace("Z", "+00:00"))
            assert row["admitted_at"].astimezone(UTC) == admitted


def _imaging_truth(out: Path) -> list[dict]:
    with open(out / "truth" / "imaging.csv", newline="") as f:
        return list(csv.DictReader(f))


def _iso(at: datetime | None) -> str:
    return at.replace(tzinfo=UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if at else ""


def _malformed(out: Path) -> int:
    return sum(len(v) for (feed, kind), v in _dirt(out).items() if kind == "malformed" and feed in ("hl7", "fhir"))


@pytest.mark.slow
def test_imaging_orders_match_truth(lake):
    """Every order (sent as ORM and as ServiceRequest) is one row with the truth's priority, procedure, indication,
    place and time; only an order whose copies were both malformed in transit may be missing."""
    out, _cfg, t = lake
    truth = {r["order_number"]: r for r in _imaging_truth(out)}
    silver = {r["order_number"]: r for r in t["silver.imaging_orders"]}
    assert len(silver) == len(t["silver.imaging_orders"]) and set(silver) <= set(truth)
    assert len(set(truth) - set(silver)) <= _malformed(out) and len(silver) > 20
    for number, row in silver.items():
        want = truth[number]
        assert (row["accession_number"], row["procedure_code"], row["priority"], row["location_class"],
                _iso(row["ordered_at"]), row["indication_codes"], row["indication_text"], row["status"]) == (
            want["accession_number"], want["procedure_code"], want["priority"].upper(), want["location_class"],
            want["ordered_time"], [f"ICD-10-CM|{want['indication_code']}"], want["indication_text"],
            "cancelled" if want["cancelled_time"] else "active")
    assert {r["location_class"] for r in silver.values()} >= {"ED", "WARD"}


@pytest.mark.slow
def test_imaging_reports_match_truth(lake):
    """Every read study has its report: read time, reader, study UID and the critical flag of the truth, and a
    critical result carries when it was communicated."""
    out, _cfg, t = lake
    read = {r["accession_number"]: r for r in _imaging_truth(out) if r["read_time"]}
    silver = {r["accession_number"]: r for r in t["silver.imaging_reports"]}
    assert set(silver) <= set(read) and len(set(read) - set(silver)) <= _malformed(out) and len(silver) > 10
    for accession, row in silver.items():
        want = read[accession]
        critical = want["critical_finding"] == "1"
        assert (_iso(row["read_at"]), row["reader"], row["study_instance_uid"], row["critical"], row["status"]) == (
            want["read_time"], want["reader"], want["study_instance_uid"], critical, "final")
        assert (row["critical_communicated_at"] is not None) == critical
        assert (want["finding"] in row["conclusion"]) if critical else row["conclusion"] == "No acute abnormality."
