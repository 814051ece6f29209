"""silver.encounters: one row per encounter identity, its lifecycle from ADT events and FHIR Encounter versions.

Identities (`encounter_key`, silver.identity): a visit number (`encounter`: canonical PV1-19 assigning
authority, else the patient's system, + PV1-19; or a FHIR Encounter identifier with a system), a FHIR resource
id (`fhir-encounter`) and a Bundle `urn:uuid:` fullUrl (`fhir-fullurl`). Aliases point at the row holding the
data through `merged_into`: the FHIR id and fullUrl rows, and, when PV1-19 names its own authority, the visit
keyed under the patient's system (the key silver.observations gives an OBX of that visit).

Versions (silver.patients.entity_version) order updates by authority rank (ADT and FHIR 1, a PV1 in another
HL7 message 0), UTC event time (EVN-2, else MSH-7; FHIR meta.lastUpdated), then MSH-10 or the versionId. The
status is last-writer-wins over status-bearing events only, so it is the same whatever order they arrive in:

| event                       | status           | admitted_at         | discharged_at       | cancelled_at | fields |
|-----------------------------|------------------|---------------------|---------------------|--------------|--------|
| A01 admit, A04 register     | in-progress      | PV1-44 or event     | cleared             | cleared      | set    |
| A05 pre-admit, A14 pending  | planned          | PV1-44 when sent    | cleared             | cleared      | set    |
| A03 discharge               | finished         | PV1-44 when sent    | PV1-45 or event     | cleared      | set    |
| A11, A27, A38 cancel        | cancelled        | kept                | cleared             | event        | set    |
| A13 cancel discharge        | in-progress      | kept                | cleared             | cleared      | set    |
| A02, A08, A12, other ADT    | kept             | PV1-44 when sent    | kept                | kept         | set    |
| PV1 of ORU and others       | kept             | PV1-44 when sent    | kept                | kept         | rank 0 |
| FHIR Encounter version      | from status [1]  | period.start        | period.end if done  | lastUpdated  | set    |

MERGE (and the in-batch fold before it, `s` = incoming, `t` = stored):

| columns                                          | change when                          | to                         |
|--------------------------------------------------|--------------------------------------|----------------------------|
| identity (kind, visit_*, fhir_reference)         | never                                | first seen                 |
| fields (patient_key, patient_class, location_*,  | s.source_version > t.source_version  | s; HL7 empty keeps t, `""` |
|   admitted_at)                                   |                                      | clears                     |
|                                                  | else: t lacks it (not cleared)       | s (late older fills a gap) |
| last_event, last_event_at, source_*, nulled_...  | s.source_version > t.source_version  | s                          |
| status, discharged_at, cancelled_at              | s.status_version > t.status_version  | s                          |
| merged_into, link_version, link_record           | s.link_version > t.link_version      | s                          |
| deleted_at (FHIR DELETE)                         | s.deleted_at > t.deleted_at          | s                          |

So an A11 stays cancelled against an older A01 arriving late, an A13 un-discharges unless a newer A03 follows,
and an A08 or A02 never changes the status. [1] FHIR planned -> planned; arrived, triaged, in-progress, onleave
-> in-progress; finished, cancelled, entered-in-error as sent; unknown changes no status.
"""

from __future__ import annotations

from datetime import datetime, tzinfo
from typing import Any

from pyspark.sql import DataFrame
from pyspark.sql.types import ArrayType, StringType, StructField, StructType, TimestampType

from silver import hl7_parse
from silver.identity import ENCOUNTER, FHIR_ENCOUNTER, FHIR_FULLURL, identity_key, reference_identity
from silver.patients import (
    EntityRows,
    Merging,
    fhir_resource,
    fhir_version,
    hl7_version,
    link,
    mrn_identity,
    nulled,
    parsed_rows,
)
from silver.routing import SOURCE_RECORD, Params, fhir_patient_key, lineage, routed_schema

ENCOUNTERS = "silver.encounters"

FIELDS = ("patient_key", "patient_class", "location_point_of_care", "location_room", "location_bed",
          "location_facility", "admitted_at")

SCHEMA = StructType([
    StructField("encounter_key", StringType(), False),
    StructField("identity_kind", StringType(), False),  # encounter (visit number), fhir-encounter, fhir-fullurl
    StructField("visit_system", StringType(), True),  # canonical assigning authority of the visit number
    StructField("visit_number", StringType(), True),
    StructField("fhir_reference", StringType(), True),  # Encounter/<id> or the urn:uuid fullUrl (FHIR kinds)
    StructField("merged_into", StringType(), True),  # the encounter_key holding this encounter's data
    StructField("patient_key", StringType(), True),  # silver.patients identity (resolve through merged_into)
    StructField("status", StringType(), True),  # planned, in-progress, finished, cancelled, entered-in-error
    StructField("patient_class", StringType(), True),  # PV1-2 as sent (I, O, E, ...) or FHIR class code
    StructField("location_point_of_care", StringType(), True),
    StructField("location_room", StringType(), True),
    StructField("location_bed", StringType(), True),
    StructField("location_facility", StringType(), True),
    StructField("admitted_at", TimestampType(), True),
    StructField("discharged_at", TimestampType(), True),
    StructField("cancelled_at", TimestampType(), True),
    StructField("last_event", StringType(), True),  # ADT trigger (A01, A08, ...) or fhir:<status>
    StructField("last_event_at", TimestampType(), True),  # its event time
    StructField("nulled_fields", ArrayType(StringType()), True),  # fields the applied update cleared
    StructField("source_feed", StringType(), True),
    StructField("source_version", StringType(), True),  # version of the applied fields: the larger one wins
    StructField("status_version", StringType(), True),  # version of the applied status
    StructField("source_record", SOURCE_RECORD, True),
    StructField("link_version", StringType(), True),
    StructField("link_record", SOURCE_RECORD, True),
    StructField("deleted_at", TimestampType(), True),  # when a FHIR DELETE of this Encounter was received
    StructField("received_at", TimestampType(), True),
    StructField("ingested_at", TimestampType(), False),
])
ROUTED = routed_schema(SCHEMA)

MERGING = Merging(
    key="encounter_key",
    identity=("identity_kind", "visit_system", "visit_number", "fhir_reference"),
    fields=FIELDS,
    groups=(("source_version", ("nulled_fields", "last_event", "last_event_at", "source_feed", "source_record",
                                "received_at")),
            ("status_version", ("status", "discharged_at", "cancelled_at")),
            ("link_version", ("merged_into", "link_record"))),
)
UPDATE = MERGING.update(SCHEMA)
UPDATE_WHEN = MERGING.update_when

# ADT trigger -> the status it sets; triggers not listed change fields only.
_STATUS_EVENTS = {"A01": "in-progress", "A04": "in-progress", "A13": "in-progress", "A05": "planned",
                  "A14": "planned", "A03": "finished", "A11": "cancelled", "A27": "cancelled", "A38": "cancelled"}
# ADT triggers about a visit: a PV1 in them must name it (patient merges and the like need not).
_VISIT_EVENTS = frozenset({*_STATUS_EVENTS, "A02", "A06", "A07", "A08", "A12", "A21", "A22"})
_FHIR_STATUS = {"planned": "planned", "arrived": "in-progress", "triaged": "in-progress",
                "in-progress": "in-progress", "onleave": "in-progress", "finished": "finished",
                "cancelled": "cancelled", "entered-in-error": "entered-in-error"}
_FHIR_FIELDS = ("patient_key", "patient_class", "location_point_of_care", "admitted_at")  # FHIR has no room/bed
_HL7_FIELDS = {"patient_class": "patient_class", "location_point_of_care": "location_point_of_care",
               "location_room": "location_room", "location_bed": "location_bed",
               "location_facility": "location_facility", "admit_at": "admitted_at"}


def visit_identity(p: Params, system: str | None, visit: str) -> dict[str, Any]:
    """Key and identity columns of a visit number."""
    canonical = p.canonical(system)
    return {"encounter_key": identity_key(p.secret, ENCOUNTER, canonical, visit), "identity_kind": ENCOUNTER,
            "visit_system": canonical, "visit_number": visit}


def _fhir_identity(p: Params, reference: str | None) -> dict[str, Any] | None:
    """Key and identity columns of an Encounter reference (Encounter/<id> or a urn:uuid fullUrl)."""
    ref = reference_identity(reference)
    if ref is None or ref[0] not in (FHIR_ENCOUNTER, FHIR_FULLURL):
        return None
    kind, value = ref
    return {"encounter_key": identity_key(p.secret, kind, None, value), "identity_kind": kind,
            "fhir_reference": value if kind == FHIR_FULLURL else f"Encounter/{value}"}


# -- HL7 v2 ---------------------------------------------------------------------------------------
def _hl7(out: EntityRows, src: dict, payload: bytes, tz: tzinfo) -> None:
    try:
        message = hl7_parse.extract(payload, default_tz=tz)
    except hl7_parse.Hl7ParseError:
        return  # silver.observations quarantines unreadable messages
    version, at = hl7_version(message.header, "ADT")
    for pv1 in message.encounters:
        _hl7_pv1(out, src, pv1, version, at)


def _hl7_pv1(out: EntityRows, src: dict, pv1: dict, version: str, at: datetime | None) -> None:
    p, event = out.p, pv1["event_code"]
    if not pv1["visit_number"]:
        if event in _VISIT_EVENTS:
            out.quarantine(src, f"PV1[{pv1['record_index']}]", "missing_visit_number",
                           f"ADT^{event} PV1-19 holds no visit number")
        return
    identity = visit_identity(p, pv1["visit_authority"] or pv1["patient_source_system"], pv1["visit_number"])
    patient = pv1["patient_mrn"] and mrn_identity(p, pv1["patient_source_system"], pv1["patient_mrn"])
    values = {col: pv1[key] for key, col in _HL7_FIELDS.items()}
    values["patient_key"] = patient["patient_key"] if patient else None
    row = {**identity, **values, "nulled_fields": [col for key, col in _HL7_FIELDS.items() if key in pv1["nulled"]],
           "source_feed": "hl7", "source_version": version, "source_record": lineage(src),
           "received_at": src["received_at"]}
    if event:
        row.update(last_event=event, last_event_at=at)
    status = _STATUS_EVENTS.get(event or "")
    if status:
        row.update(_hl7_status(pv1, status, at), status_version=version)
        if status == "in-progress" and event != "A13":
            row["admitted_at"] = pv1["admit_at"] or at
    out.entity(src, row)
    alias = visit_identity(p, pv1["patient_source_system"], pv1["visit_number"])
    if alias["encounter_key"] != identity["encounter_key"]:
        out.entity(src, {**alias, **link(identity["encounter_key"], version, src)})


def _hl7_status(pv1: dict, status: str, at: datetime | None) -> dict[str, Any]:
    """The status columns an ADT event sets (see the table above)."""
    return {"status": status, "discharged_at": (pv1["discharge_at"] or at) if status == "finished" else None,
            "cancelled_at": at if status == "cancelled" else None}


# -- FHIR R4 --------------------------------------------------------------------------------------
def _fhir(out: EntityRows, src: dict, payload: bytes, tz: tzinfo) -> None:
    if src.get("resource_type") != "Encounter":
        return
    if src.get("request_method") == "DELETE":
        identity = _fhir_identity(out.p, f"Encounter/{src['resource_id']}")
        if identity:
            out.entity(src, {**identity, "deleted_at": src["received_at"]})
        return
    extracted = fhir_resource(out, src, payload, tz)
    if extracted is not None:
        for encounter in extracted.encounters:
            _fhir_encounter(out, src, encounter)


def _visit_identifier(p: Params, identifiers: list[dict]) -> dict[str, Any] | None:
    """The visit-number identity of an Encounter: its identifier of type VN, else the first with a system."""
    usable = [i for i in identifiers if i["system"] and i["value"]]
    chosen = next((i for i in usable if i["type_code"] == "VN"), usable[0] if usable else None)
    return visit_identity(p, chosen["system"], chosen["value"]) if chosen else None


def _fhir_encounter(out: EntityRows, src: dict, enc: dict) -> None:
    p = out.p
    patient_key = fhir_patient_key(p, enc)
    if patient_key is None:
        out.quarantine(src, "Encounter", "missing_subject", "Encounter.subject names no Patient")
        return
    resource_id = enc["id"] or src.get("resource_id")
    self_ref = _fhir_identity(p, f"Encounter/{resource_id}") if resource_id else None
    identity = _visit_identifier(p, enc["identifiers"]) or self_ref
    if identity is None:
        out.quarantine(src, "Encounter", "missing_visit_number", "Encounter has neither an identifier nor an id")
        return
    version, at = fhir_version(enc, src["received_at"])
    values = {"patient_key": patient_key, "patient_class": enc["class_code"],
              "location_point_of_care": _fhir_location(enc["locations"]), "admitted_at": enc["period_start"]}
    row = {**identity, **values, "nulled_fields": nulled(values, _FHIR_FIELDS), "last_event": f"fhir:{enc['status']}",
           "last_event_at": at, "source_feed": "fhir", "source_version": version, "source_record": lineage(src),
           "received_at": src["received_at"]}
    status = _FHIR_STATUS.get(enc["status"] or "")
    if status:
        row.update(status=status, status_version=version, cancelled_at=at if status == "cancelled" else None,
                   discharged_at=enc["period_end"] if status == "finished" else None)
    out.entity(src, row)
    full_url = src.get("full_url") or ""
    bundle_ref = _fhir_identity(p, full_url) if full_url.startswith("urn:") else None
    for alias in (self_ref, bundle_ref):
        if alias and alias["encounter_key"] != identity["encounter_key"]:
            out.entity(src, {**alias, **link(identity["encounter_key"], version, src)})


def _fhir_location(locations: list[dict]) -> str | None:
    """The current location (the active one, else the last listed): its display, else its reference."""
    current = next((loc for loc in locations if loc["status"] == "active"), locations[-1] if locations else {})
    return current.get("display") or current.get("reference")


# -- the job's transform --------------------------------------------------------------------------
def encounters(changes: DataFrame, *, processed_at: datetime, secret: str, timezone: str, mrn_system: str,
               system_aliases: tuple[tuple[str, str], ...], fhir_validation: str) -> DataFrame:
    """HL7 and FHIR bronze changes -> one row per encounter identity (routed with its quarantine rows)."""
    p = Params(secret, timezone, mrn_system, system_aliases, fhir_validation, ENCOUNTERS)
    return MERGING.combine(parsed_rows(changes, p, processed_at, ROUTED, _hl7, _fhir))

