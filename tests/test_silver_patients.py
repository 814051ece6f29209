"""silver.patients: identities, demographics by version, HL7 nulls, merges and FHIR links, through MERGE."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime

import pytest
from pyspark.sql import functions as F

from bronze.fhir_resources import fhir_resources
from bronze.hl7_messages import hl7_messages
from pipelines.jobs import builtin_jobs, load_registry
from pipelines.landing import ingest
from pipelines.runner import LANDING_FILE_SCHEMA, Runner, Trigger, _route
from pipelines.store import open_store
from pipelines.store.deltars import DeltaRsStore
from silver import observations
from silver.identity import FHIR_FULLURL, FHIR_PATIENT, PATIENT, identity_key
from silver.patients import PATIENTS, patients, resolved
from tests.conftest import make_config

SECRET = "test-secret"
OPTS = {"secret": SECRET, "timezone": "UTC", "mrn_system": "CARELAKE",
        "system_aliases": (("http://carelake.example/fhir/sid/mrn", "CARELAKE"),
                           ("http://carelake.example/fhir/sid/visit", "CARELAKE")), "fhir_validation": "fast"}
PROCESSED_AT = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
MRN_SYSTEM = "http://carelake.example/fhir/sid/mrn"
MR_TYPE = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]}


# -- building bronze rows and applying batches (shared with test_silver_encounters) ------------------
def pid(mrn: str = "M1^^^HOSP^MR", name: str = "Doe^Jane", dob: str = "19800101", sex: str = "F",
        address: str = "1 Main St^^Town^ST^12345", phone: str = "555-0100") -> str:
    return f"PID|1||{mrn}||{name}||{dob}|{sex}|||{address}||{phone}"


def pv1(visit: str = "V1^^^HOSP^VN", cls: str = "I", loc: str = "W1^101^A^HOSP", admit: str = "",
        discharge: str = "") -> str:
    return f"PV1|1|{cls}|{loc}" + "|" * 16 + visit + "|" * 25 + admit + "|" + discharge


def adt(control: str, trigger: str, at: str, *segments: str) -> bytes:
    """An ADT message: MSH, EVN (event time `at`), then `segments`."""
    head = [f"MSH|^~\\&|ADT|HOSP|LAKE|HOSP|{at}||ADT^{trigger}|{control}|P|2.5", f"EVN|{trigger}|{at}"]
    return "\r".join([*head, *segments, ""]).encode()


def fhir_patient(pid_: str, mrn: str | None, family: str, version: str | None = None, **extra) -> dict:
    resource = {"resourceType": "Patient", "id": pid_, "name": [{"family": family, "given": ["Ann"]}],
                "gender": "female", "birthDate": "1970-05-06", **extra}
    if mrn:
        resource["identifier"] = [{"system": MRN_SYSTEM, "value": mrn, "type": MR_TYPE}]
    if version:
        resource["meta"] = {"versionId": version, "lastUpdated": f"2026-11-2{version}T10:00:00Z"}
    return resource


def bundle(*entries: tuple[str | None, dict]) -> bytes:
    """A transaction Bundle of (fullUrl, resource) entries."""
    items = [{"fullUrl": url, "resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
             if url else {"resource": r} for url, r in entries]
    return json.dumps({"resourceType": "Bundle", "type": "transaction", "entry": items}).encode()


def bronze(spark, *files: bytes | dict, received: datetime = datetime(2026, 11, 21, 3, 0)):
    """Change-feed rows (inserts) of bronze.hl7_messages / bronze.fhir_resources for landed files."""
    payloads = [json.dumps(f).encode() if isinstance(f, dict) else f for f in files]
    hl7 = [(f"file:/l/m{i}.hl7", received, len(b), b) for i, b in enumerate(payloads) if not b.startswith(b"{")]
    fhir = [(f"file:/l/r{i}.json", received, len(b), b) for i, b in enumerate(payloads) if b.startswith(b"{")]
    parts = []
    if hl7:
        parts.append(hl7_messages(spark.createDataFrame(hl7, LANDING_FILE_SCHEMA), ingest_batch_id="t"))
    if fhir:
        parts.append(fhir_resources(spark.createDataFrame(fhir, LANDING_FILE_SCHEMA), ingest_batch_id="t"))
    df = parts[0]
    for more in parts[1:]:
        df = df.unionByName(more, allowMissingColumns=True)
    return df.withColumn("_change_type", F.lit("insert"))


def job(cfg, name: str):
    return next(j for j in builtin_jobs(cfg) if j.name == name)


def write(store, job_, routed) -> None:
    """Commit one routed batch the way the runner does: split by `_output`, merge each table."""
    for output in job_.outputs:
        arrow = _route(job_, routed)[output.table]
        if arrow.num_rows or not store.exists(output.table):
            store.merge(output.table, arrow, output.merge)


def rows(store, table: str, key: str) -> dict[str, dict]:
    return {r[key]: r for r in store.read_arrow(table).to_pylist()} if store.exists(table) else {}


def quarantined(store) -> list[tuple[str, str]]:
    return sorted((r["item"], r["reason"]) for r in rows(store, "silver.quarantine", "quarantine_id").values())


def mrn_key(mrn: str, system: str = "HOSP") -> str:
    return identity_key(SECRET, PATIENT, system, mrn)


# -- the tests -------------------------------------------------------------------------------------
@pytest.fixture
def store(cfg, spark):
    """The embedded engine, able to read tables back as Spark DataFrames."""
    return DeltaRsStore(cfg, spark)


@pytest.fixture
def apply(spark, cfg, store):
    """apply(*files): run silver.patients over them as one batch and merge it."""
    def run(*files, received=datetime(2026, 11, 21, 3, 0)):
        write(store, job(cfg, PATIENTS), patients(bronze(spark, *files, received=received),
                                                   processed_at=PROCESSED_AT, **OPTS))
        return rows(store, PATIENTS, "patient_key")

    return run


A01 = adt("C1", "A01", "20261121080000", pid(), pv1())


def test_resent_message_lands_once_and_replay_changes_nothing(apply, store):
    first = apply(A01, A01)
    assert list(first) == [mrn_key("M1")]
    row = first[mrn_key("M1")]
    assert (row["identity_kind"], row["source_system"], row["mrn"], row["family_name"], row["given_name"]) == (
        PATIENT, "HOSP", "M1", "Doe", "Jane")
    assert (row["birth_date"], row["sex"], row["address_line"], row["city"], row["postal_code"], row["phone"]) == (
        date(1980, 1, 1), "female", "1 Main St", "Town", "12345", "555-0100")
    assert row["source_version"] == "1|2026-11-21T08:00:00.000000Z|C1" and row["nulled_fields"] == []
    assert apply(A01) == first


def test_a08_correction_wins_null_clears_and_empty_keeps(apply):
    a08 = adt("C2", "A08", "20261121090000", pid(name="Roe^Jane^Q", address='""', phone=""), pv1())
    row = apply(A01, a08)[mrn_key("M1")]  # same batch: folded
    expected = ("Roe", "Jane Q", None, None, "555-0100", ["address_line", "city", "state", "postal_code", "country"])
    got = (row["family_name"], row["given_name"], row["address_line"], row["city"], row["phone"], row["nulled_fields"])
    assert got == expected
    assert apply(A01)[mrn_key("M1")] == row  # separate batch, older: no change


def test_a08_applied_across_batches_and_older_a08_arriving_late_is_ignored(apply):
    apply(A01)
    new = adt("C3", "A08", "20261121100000", pid(name="New^Name", phone=""), pv1())
    old = adt("C2", "A08", "20261121090000", pid(name="Old^Name", phone="555-9999"), pv1())
    after_new = apply(new)[mrn_key("M1")]
    assert (after_new["family_name"], after_new["phone"]) == ("New", "555-0100")
    assert apply(old)[mrn_key("M1")] == after_new


def test_a40_points_the_prior_mrn_at_the_survivor_and_keeps_its_demographics(apply):
    apply(adt("C1", "A01", "20261121080000", pid(mrn="M2^^^HOSP^MR", name="Prior^Pat"), pv1()))
    a40 = adt("C9", "A40", "20261121110000", pid(mrn="M1^^^HOSP^MR", name="Survivor^Sam"), "MRG|M2^^^HOSP^MR")
    table = apply(a40)
    prior, survivor = table[mrn_key("M2")], table[mrn_key("M1")]
    assert prior["merged_into"] == mrn_key("M1") and prior["family_name"] == "Prior"
    assert prior["link_version"] == "1|2026-11-21T11:00:00.000000Z|C9"
    assert survivor["merged_into"] is None and survivor["family_name"] == "Survivor"


@pytest.mark.parametrize("order", [("1", "2"), ("2", "1"), ("12",)])
def test_fhir_patient_newer_version_wins_in_any_arrival_order(apply, order):
    versions = {"1": fhir_patient("p1", "A100", "First", "1", telecom=[{"system": "phone", "value": "1"}]),
                "2": fhir_patient("p1", "A100", "Second", "2")}
    for batch in order:
        table = apply(*(versions[v] for v in batch))
    row = table[identity_key(SECRET, PATIENT, "CARELAKE", "A100")]
    assert (row["family_name"], row["phone"], row["source_feed"]) == ("Second", None, "fhir")
    assert row["source_version"] == "1|2026-11-22T10:00:00.000000Z|000000000002" and "phone" in row["nulled_fields"]
    assert table[identity_key(SECRET, FHIR_PATIENT, None, "p1")]["merged_into"] == row["patient_key"]


def test_fhir_replaced_by_link_resolves_to_the_new_patient(apply, spark, store):
    old = fhir_patient("p-old", "OLD1", "Old", "3", link=[{"other": {"reference": "Patient/p-new"},
                                                          "type": "replaced-by"}])
    table = apply(old, fhir_patient("p-new", "NEW1", "New", "1"))
    old_key = identity_key(SECRET, PATIENT, "CARELAKE", "OLD1")
    assert table[old_key]["merged_into"] == identity_key(SECRET, FHIR_PATIENT, None, "p-new")
    assert table[old_key]["family_name"] == "Old"
    mapping = {r.patient_key: r.resolved_key for r in resolved(store.read(PATIENTS)).collect()}
    assert mapping[old_key] == mapping[identity_key(SECRET, FHIR_PATIENT, None, "p-old")] == identity_key(
        SECRET, PATIENT, "CARELAKE", "NEW1")


def test_bundle_observations_by_fullurl_or_id_resolve_to_the_mrn(apply, spark, store):
    def obs(oid: str, ref: str) -> dict:
        return {"resourceType": "Observation", "id": oid, "status": "final", "subject": {"reference": ref},
                "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                "effectiveDateTime": "2026-11-21T08:00:00Z",
                "valueQuantity": {"value": 80, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"}}

    body = bundle(("urn:uuid:aaa", fhir_patient("p7", "P700", "Bundled")), ("urn:uuid:o1", obs("o1", "urn:uuid:aaa")),
                  ("urn:uuid:o2", obs("o2", "Patient/p7")))
    apply(body)
    changes = bronze(spark, body)
    measured = observations.observations(changes, processed_at=PROCESSED_AT, **OPTS)
    keys = {r.patient_key for r in measured.where("_output = 'silver.observations'").collect()}
    assert keys == {identity_key(SECRET, FHIR_FULLURL, None, "urn:uuid:aaa"), identity_key(SECRET, FHIR_PATIENT,
                                                                                           None, "p7")}
    mapping = {r.patient_key: r.resolved_key for r in resolved(store.read(PATIENTS)).collect()}
    assert {mapping[k] for k in keys} == {identity_key(SECRET, PATIENT, "CARELAKE", "P700")}


def test_fhir_delete_is_recorded_on_the_resource_identity(apply):
    deleted = json.dumps({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "DELETE", "url": "Patient/p1"}}]}).encode()
    table = apply(fhir_patient("p1", "A100", "Kept", "1"), deleted, received=datetime(2026, 11, 23, 9, 0))
    row = table[identity_key(SECRET, FHIR_PATIENT, None, "p1")]
    assert row["deleted_at"] == datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
    assert table[identity_key(SECRET, PATIENT, "CARELAKE", "A100")]["family_name"] == "Kept"


def test_patient_problems_are_quarantined_with_a_reason(apply, store):
    no_id = adt("C5", "A01", "20261121080000", "PID|1||||Nobody^Here", pv1())
    bad = fhir_patient("p9", "X1", "Bad")
    bad["gender"] = "mal"
    no_fhir_id = {"resourceType": "Patient", "name": [{"family": "Anon"}]}  # bronze: missing_id (observations')
    table = apply(no_id, bad, no_fhir_id)
    assert quarantined(store) == [("PID[2]", "missing_patient_id"), ("Patient", "validation_failed")]
    assert table == {}


def test_runner_lands_hl7_and_fhir_into_patients_and_encounters_once(tmp_path, spark):
    cfg = make_config(tmp_path / "lake")
    store = open_store(cfg, spark)
    runner = Runner(cfg, spark, store, load_registry(cfg))
    (tmp_path / "adt.hl7").write_bytes(A01 + adt("C2", "A03", "20261121100000", pid(), pv1()))
    (tmp_path / "p.json").write_bytes(bundle(("urn:uuid:u1", fhir_patient("p1", "A100", "Fhir", "1"))))
    ingest(cfg, [tmp_path / "adt.hl7"], "hl7")
    ingest(cfg, [tmp_path / "p.json"], "fhir")
    names = ["bronze.hl7_messages", "bronze.fhir_resources", "silver.patients", "silver.encounters"]
    summaries = runner.run(names, Trigger(available_now=True))
    assert [s.status for s in summaries] == ["done"] * 4
    kinds = sorted(r["identity_kind"] for r in store.read_arrow(PATIENTS).to_pylist())
    assert kinds == [FHIR_FULLURL, FHIR_PATIENT, PATIENT, PATIENT]
    (encounter,) = store.read_arrow("silver.encounters").to_pylist()
    assert (encounter["status"], encounter["last_event"]) == ("finished", "A03")
    versions = {t: store.version(t) for t in ("silver.patients", "silver.encounters")}
    runner.run(names, Trigger(available_now=True))
    assert {t: store.version(t) for t in versions} == versions
