"""silver.encounters: ADT lifecycle by event time in any arrival order, FHIR versions, aliases, quarantine."""

from __future__ import annotations

import itertools
from collections import Counter
from datetime import UTC, datetime

import pytest
from pyspark.sql import functions as F

from bronze.fhir_resources import fhir_resources
from bronze.hl7_messages import hl7_messages
from pipelines.runner import LANDING_FILE_SCHEMA
from pipelines.store.deltars import DeltaRsStore
from silver.encounters import ENCOUNTERS, encounters
from silver.identity import ENCOUNTER, FHIR_ENCOUNTER, identity_key
from silver.patients import PATIENTS, patients
from tests.conftest import make_config
from tests.test_silver_patients import OPTS, PROCESSED_AT, SECRET, adt, bronze, job, pid, pv1, quarantined, rows, write

VISIT = identity_key(SECRET, ENCOUNTER, "HOSP", "V1")
A01 = adt("C1", "A01", "20261121080000", pid(), pv1(loc="W1^101^A^HOSP", admit="20261121075500"))
A02 = adt("C2", "A02", "20261121090000", pid(), pv1(loc="ICU^7^1^HOSP"))
A03 = adt("C3", "A03", "20261121100000", pid(), pv1(loc="ICU^7^1^HOSP", discharge="20261121095900"))
A11 = adt("C4", "A11", "20261121083000", pid(), pv1())
A13 = adt("C5", "A13", "20261121110000", pid(), pv1(loc="ICU^7^1^HOSP"))


def at(hour: int, minute: int = 0) -> datetime:
    return datetime(2026, 11, 21, hour, minute, tzinfo=UTC)


def land(spark, cfg, store, *batches) -> dict[str, dict]:
    """Each batch (a tuple of files) through silver.encounters and MERGE, in turn; the table by key."""
    for files in batches:
        write(store, job(cfg, ENCOUNTERS), encounters(bronze(spark, *files), processed_at=PROCESSED_AT, **OPTS))
    return rows(store, ENCOUNTERS, "encounter_key")


@pytest.fixture
def apply(spark, cfg, store):
    return lambda *batches: land(spark, cfg, store, *batches)


def test_admit_transfer_discharge(apply):
    row = apply((A01,), (A02,), (A03,))[VISIT]
    assert (row["status"], row["admitted_at"], row["discharged_at"], row["cancelled_at"]) == (
        "finished", at(7, 55), at(9, 59), None)
    assert (row["location_point_of_care"], row["location_room"], row["location_bed"], row["patient_class"]) == (
        "ICU", "7", "1", "I")
    assert (row["last_event"], row["last_event_at"], row["visit_number"], row["visit_system"]) == (
        "A03", at(10), "V1", "HOSP")
    assert row["patient_key"] == identity_key(SECRET, "patient", "HOSP", "M1")


def test_shuffled_arrival_gives_the_same_row(spark, tmp_path):
    orders = [[(m,) for m in order] for order in itertools.permutations((A01, A02, A03))] + [[(A03, A01, A02)]]
    finals = []
    for i, batches in enumerate(orders):
        cfg = make_config(tmp_path / f"lake{i}")
        finals.append(land(spark, cfg, DeltaRsStore(cfg), *batches)[VISIT])
    row = finals[0]
    expected = {"status": "finished", "admitted_at": at(7, 55), "discharged_at": at(9, 59), "location_bed": "1",
                "location_point_of_care": "ICU", "last_event": "A03", "source_version": row["status_version"]}
    assert {k: row[k] for k in expected} == expected
    assert all(f == row for f in finals[1:])


def test_a11_cancels_and_stays_cancelled_against_a_late_older_admit(apply):
    row = apply((A11,), (A01,))[VISIT]
    assert (row["status"], row["cancelled_at"], row["last_event"]) == ("cancelled", at(8, 30), "A11")
    assert apply((A01, A11))[VISIT] == row


def test_a13_undoes_the_discharge_until_a_newer_a03(apply):
    row = apply((A01,), (A13,), (A03,))[VISIT]  # the A03 is older than the A13: late
    assert (row["status"], row["discharged_at"], row["last_event"]) == ("in-progress", None, "A13")
    again = adt("C6", "A03", "20261121120000", pid(), pv1(loc="ICU^7^1^HOSP"))
    row = apply((again,))[VISIT]
    assert (row["status"], row["discharged_at"]) == ("finished", at(12))


def test_a08_changes_fields_but_never_status(apply):
    a08 = adt("C7", "A08", "20261121103000", pid(), pv1(cls="O", loc='""'))
    row = apply((A01, A03), (a08,))[VISIT]
    assert (row["status"], row["patient_class"], row["location_point_of_care"], row["location_room"]) == (
        "finished", "O", None, None)
    assert "location_point_of_care" in row["nulled_fields"] and row["last_event"] == "A08"


def test_visit_authority_of_its_own_gets_an_alias_under_the_patient_system(apply):
    message = adt("C1", "A01", "20261121080000", pid(), pv1(visit="V9^^^ACCT^VN"))
    table = apply((message,))
    main = identity_key(SECRET, ENCOUNTER, "ACCT", "V9")
    alias = identity_key(SECRET, ENCOUNTER, "HOSP", "V9")  # what silver.observations keys an OBX of this visit by
    assert table[main]["status"] == "in-progress" and table[alias]["merged_into"] == main
    assert table[alias]["status"] is None


def fhir_encounter(version: str, status: str, **extra) -> dict:
    return {"resourceType": "Encounter", "id": "e1", "status": status, "meta": {
        "versionId": version, "lastUpdated": f"2026-11-2{version}T10:00:00Z"},
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"},
        "identifier": [{"system": "http://carelake.example/fhir/sid/visit", "value": "V1"}],
        "subject": {"reference": "Patient/p1"}, **extra}


@pytest.mark.parametrize("newest_first", [False, True])
def test_fhir_encounter_newest_version_wins(apply, newest_first):
    v1 = fhir_encounter("1", "in-progress", period={"start": "2026-11-21T08:00:00Z"},
                        location=[{"location": {"display": "Ward 3"}, "status": "active"}])
    v2 = fhir_encounter("2", "finished", period={"start": "2026-11-21T08:00:00Z", "end": "2026-11-22T09:00:00Z"})
    table = apply(*([(v2,), (v1,)] if newest_first else [(v1,), (v2,)]))
    key = identity_key(SECRET, ENCOUNTER, "CARELAKE", "V1")
    row = table[key]
    assert (row["status"], row["admitted_at"], row["discharged_at"], row["location_point_of_care"]) == (
        "finished", at(8), datetime(2026, 11, 22, 9, 0, tzinfo=UTC), None)
    assert (row["patient_class"], row["last_event"], row["source_feed"]) == ("IMP", "fhir:finished", "fhir")
    assert table[identity_key(SECRET, FHIR_ENCOUNTER, None, "e1")]["merged_into"] == key


def test_replaying_the_same_batch_changes_nothing(apply):
    first = apply((A01, A02, A03, A13))
    assert apply((A01, A02, A03, A13)) == first


def test_encounter_problems_are_quarantined_with_a_reason(apply, store):
    no_visit = adt("C8", "A01", "20261121080000", pid(), pv1(visit=""))
    no_subject = fhir_encounter("1", "planned")
    del no_subject["subject"]
    oru = b"MSH|^~\\&|LAB|HOSP|||20261121||ORU^R01|L1|P|2.5\rPID|1||M1^^^HOSP^MR\rPV1|1|I\r"  # context only
    table = apply((no_visit, no_subject, oru))
    assert quarantined(store) == [("Encounter", "missing_subject"), ("PV1[3]", "missing_visit_number")]
    assert table == {}


def summary(table: str, routed) -> dict[str, Counter]:
    """Counts of a routed batch: rows by identity kind, linked rows, quarantine reasons."""
    out = {"kinds": Counter(), "linked": Counter(), "quarantine": Counter()}
    for r in routed.select("_output", "identity_kind", "merged_into", "reason").collect():
        if r["_output"] == table:
            out["kinds"][r["identity_kind"]] += 1
            out["linked"][r["identity_kind"]] += r["merged_into"] is not None
        else:
            out["quarantine"][r["reason"]] += 1
    return out


@pytest.mark.realdata
def test_every_real_hl7_and_fhir_file_through_both_transforms(spark, realdata):
    files = sorted(p for p in (realdata / "hl7v2").rglob("*") if p.is_file())
    files += sorted(p for p in (realdata / "fhir").rglob("*") if p.is_file() and p.suffix in (".json", ".ndjson"))
    changes = bronze_files(spark, files).cache()
    try:
        got = {table: summary(table, transform(changes, processed_at=PROCESSED_AT, **OPTS))
               for table, transform in ((PATIENTS, patients), (ENCOUNTERS, encounters))}
    finally:
        changes.unpersist()
    for table, counts in got.items():
        print(f"real data -> {table}: {sum(counts['kinds'].values())} rows {dict(counts['kinds'])}, "
              f"linked {dict(counts['linked'])}, quarantine {dict(counts['quarantine'])}")
    assert sum(got[PATIENTS]["kinds"].values()) >= 100 and got[PATIENTS]["linked"]["fhir-patient"] > 0
    assert sum(got[ENCOUNTERS]["kinds"].values()) >= 50


def bronze_files(spark, paths):
    """Bronze change rows for real landing files (under hl7v2/ HL7, everything else FHIR)."""
    def frame(ps):
        data = [(f"file:{p}", datetime(2026, 11, 21, 3, 0), p.stat().st_size, p.read_bytes()) for p in ps]
        return spark.createDataFrame(data, LANDING_FILE_SCHEMA)

    hl7 = hl7_messages(frame([p for p in paths if "hl7v2" in p.parts]), ingest_batch_id="real")
    fhir = fhir_resources(frame([p for p in paths if "hl7v2" not in p.parts]), ingest_batch_id="real")
    return hl7.unionByName(fhir, allowMissingColumns=True).withColumn("_change_type", F.lit("insert"))
