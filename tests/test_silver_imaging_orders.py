"""silver.imaging_orders: HL7 ORM/OMI and FHIR ServiceRequest into one current-state row per order."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from silver import imaging_codes
from silver.identity import ENCOUNTER, identity_key
from silver.imaging_orders import ORDER, ORDERS, hl7_status, imaging_orders
from tests.test_silver_patients import OPTS, PROCESSED_AT, SECRET, bronze, job, mrn_key, pid, pv1, quarantined, rows
from tests.test_silver_patients import write as merge

ORDER_SYSTEM = "http://carelake.example/fhir/sid/placer-order"
ALIASES = {**OPTS, "system_aliases": (*OPTS["system_aliases"], (ORDER_SYSTEM, "CARELAKE"))}
KEY = identity_key(SECRET, ORDER, "CARELAKE", "ORD1")


def at(hour: int, minute: int = 0) -> datetime:
    return datetime(2026, 11, 21, hour, minute, tzinfo=UTC)


def orm(control_id: str, sent: str, *, control: str = "NW", status: str = "", priority: str = "S",
        obr31: str = "I63.9^Cerebral infarction^I10", cls: str = "E", loc: str = "ED^1^A^HOSP", kind: str = "ORM^O01",
        placer: str = "ORD1", extra: tuple[str, ...] = ()) -> bytes:
    """An imaging order message: ORC (control, placer, status, timing priority, ORC-9) and OBR (CT head)."""
    orc = f"ORC|{control}|{placer}|||{status}||^^^{sent}^^{priority}||{sent}"
    obr = (f"OBR|1|{placer}||70450^CT head without contrast^C4|||{sent}" + "|" * 11 + "ACC1" + "|" * 6 + "CT"
           + "|" * 7 + obr31) if control == "NW" else "OBR|1|ORD1||70450^CT head without contrast^C4"
    head = f"MSH|^~\\&|RIS|HOSP|LAKE|HOSP|{sent}||{kind}|{control_id}|P|2.5"
    return "\r".join([head, pid(), pv1(cls=cls, loc=loc), orc, obr, *extra, ""]).encode()


def service_request(version: str = "1", status: str = "active", priority: str | None = "stat", **extra) -> dict:
    resource = {
        "resourceType": "ServiceRequest", "id": "sr-ord1", "status": status, "intent": "order",
        "meta": {"versionId": version, "lastUpdated": f"2026-11-21T1{version}:00:00Z"},
        "identifier": [{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                             "code": "PLAC"}]}, "system": ORDER_SYSTEM, "value": "ORD1"}],
        "category": [{"coding": [{"system": "http://snomed.info/sct", "code": "363679005"}]}],
        "code": {"coding": [{"system": "http://www.ama-assn.org/go/cpt", "code": "71275",
                             "display": "CT angiography chest"}]},
        "subject": {"identifier": {"system": "http://carelake.example/fhir/sid/mrn", "value": "M1"}},
        "encounter": {"reference": "Encounter/enc-v1"}, "authoredOn": "2026-11-21T09:00:00Z",
        "reasonCode": [{"coding": [{"system": "http://snomed.info/sct", "code": "59282003",
                                    "display": "Pulmonary embolism"}], "text": "Suspected PE"}],
        "locationCode": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-RoleCode",
                                      "code": "ICU"}]}], **extra}
    if priority:
        resource["priority"] = priority
    return resource


def applier(spark, cfg, store, table: str, key: str, transform, options: dict):
    """apply(*files): run `transform` over them as one batch, merge it as the runner does; the table by key."""
    def run(*files):
        merge(store, job(cfg, table), transform(bronze(spark, *files), processed_at=PROCESSED_AT, **options))
        return rows(store, table, key)

    return run


@pytest.fixture
def apply(spark, cfg, store):
    return applier(spark, cfg, store, ORDERS, "order_key", imaging_orders, ALIASES)


def test_new_order_columns_and_a_replay_changes_nothing(apply, store):
    table = apply(orm("C1", "20261121080000"))
    row = table[KEY]
    expected = {"order_number": "ORD1", "order_system": "CARELAKE", "accession_number": "ACC1",
                "patient_key": mrn_key("M1"), "encounter_key": identity_key(SECRET, ENCOUNTER, "HOSP", "V1"),
                "procedure_code": "70450", "procedure_system": "C4", "modality": "CT", "body_part": "HEAD",
                "priority": "STAT", "priority_raw": "S", "indication_text": "Cerebral infarction",
                "indication_codes": ["ICD-10-CM|I63.9"], "ordered_at": at(8), "location_class": "ED",
                "ordering_location": "ED", "status": "active", "last_event": "NW", "source_feed": "hl7"}
    assert {k: row[k] for k in expected} == expected
    assert apply(orm("C1", "20261121080000")) == table


def test_cancel_wins_against_the_older_new_order_arriving_late(apply):
    cancel = orm("C2", "20261121083000", control="CA", priority="")
    row = apply(cancel)[KEY]
    assert (row["status"], row["priority"], row["ordered_at"]) == ("cancelled", None, None)
    row = apply(orm("C1", "20261121080000"))[KEY]
    assert (row["status"], row["priority"], row["ordered_at"], row["modality"]) == ("cancelled", "STAT", at(8), "CT")
    assert (row["last_event"], row["status_version"]) == ("CA", "1|2026-11-21T08:30:00.000000Z|C2")


def test_status_change_and_dg1_reason(apply):
    dg1 = "DG1|1||R07.9^Chest pain, unspecified^I10"
    row = apply(orm("C1", "20261121080000", obr31="", extra=(dg1,)),
                orm("C3", "20261121090000", control="SC", status="CM", priority=""))[KEY]
    assert (row["status"], row["indication_codes"], row["indication_text"]) == (
        "completed", ["ICD-10-CM|R07.9"], "Chest pain, unspecified")


def test_omi_with_icu_location(apply):
    row = apply(orm("C1", "20261121080000", kind="OMI^O23", cls="I", loc="MICU^3^1^HOSP", priority="R"))[KEY]
    assert (row["location_class"], row["priority"], row["ordering_location"]) == ("ICU", "ROUTINE", "MICU")


def test_fhir_service_request_is_the_same_order_and_revoked_cancels(apply):
    row = apply(service_request())[KEY]
    expected = {"order_number": "ORD1", "procedure_code": "71275", "modality": "CT", "body_part": "CHEST",
                "priority": "STAT", "indication_codes": ["SNOMED|59282003"], "indication_text": "Suspected PE",
                "location_class": "ICU", "ordering_location": "ICU", "ordered_at": at(9), "status": "active",
                "source_feed": "fhir", "encounter_key": identity_key(SECRET, "fhir-encounter", None, "enc-v1")}
    assert {k: row[k] for k in expected} == expected
    row = apply(service_request(version="2", status="revoked", priority="urgent"))[KEY]
    assert (row["status"], row["priority"], row["priority_raw"], row["last_event"]) == (
        "cancelled", "ASAP", "urgent", "fhir:revoked")
    hl7_row = apply(orm("C1", "20261121080000"))[KEY]  # older than the FHIR versions: fills nothing they set
    assert (hl7_row["status"], hl7_row["procedure_code"], hl7_row["accession_number"]) == ("cancelled", "71275", None)


def test_bad_orders_are_quarantined_with_reasons(apply, store):
    no_placer = orm("C5", "20261121080000", placer="")
    bad_priority = orm("C6", "20261121080000", priority="Z", placer="ORD9")
    no_subject = service_request(subject={"display": "a patient without an identifier"})
    fhir_bad_priority = {**service_request(), "id": "sr-2", "priority": "whenever"}
    lab = orm("C7", "20261121080000", placer="LAB1").replace(b"70450^CT head without contrast^C4", b"CBC^Blood^L")
    table = apply(no_placer, bad_priority, no_subject, fhir_bad_priority, lab.replace(b"|CT|", b"||"))
    assert table == {}
    assert quarantined(store) == [("ORC[3]", "missing_order_number"), ("ORC[3]", "unknown_priority"),
                                  ("ServiceRequest", "missing_patient_id"), ("ServiceRequest", "validation_failed")]


@pytest.mark.parametrize(("control", "status", "expected"), [
    ("NW", "", "active"), ("CA", "", "cancelled"), ("OC", "", "cancelled"), ("DC", "IP", "cancelled"),
    ("HD", "", "on-hold"), ("SC", "CM", "completed"), ("SC", "IP", "active"), ("XO", "", None), ("SC", "", None)])
def test_hl7_status(control, status, expected):
    assert hl7_status(control, status) == expected


@pytest.mark.parametrize(("cls", "point", "expected"), [
    ("E", "ED", "ED"), ("I", "MED4W", "WARD"), ("I", "ICU", "ICU"), ("E", "SICU", "ICU"), ("O", "RAD", "OUTPATIENT"),
    (None, "Emergency Dept", "ED"), ("I", "PICU-2", "ICU"), (None, "MED4W", None), ("I", "MEDICAL", "WARD")])
def test_location_class(cls, point, expected):
    assert imaging_codes.hl7_location_class(cls, point) == expected
