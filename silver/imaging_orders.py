"""silver.imaging_orders: one row per imaging order (HL7 ORM^O01 / OMI^O23, FHIR ServiceRequest), its current state.

Identity (`order_key`, silver.identity kind `imaging-order`): the placer order number (ORC-2, else OBR-2; the
ServiceRequest identifier of type PLAC) in its system (the number's universal id or namespace; the identifier's
system; else the hospital's default system), canonicalized by `silver.system_aliases`. So the ORM and the
ServiceRequest of one order, and every later message about it, are one row. A ServiceRequest without a placer
identifier is keyed by its resource id (kind `fhir-servicerequest`).

Which messages are imaging orders: OMI; an ORM/OML order with a DICOM modality (IPC-5, OBR-24), a radiology
section (OBR-24) or a procedure silver knows the modality of (silver.imaging_codes); a ServiceRequest with the
SNOMED category 363679005 (Imaging) or such a procedure. Other orders (labs) are not read here.

Columns (HL7 v2 / FHIR ServiceRequest):
- priority: TQ1-9, ORC-7.6, OBR-27.6, OBR-5 (silver.imaging_codes; a new order without one is ROUTINE) /
  priority (urgent -> ASAP).
- procedure_*: OBR-4 / code (CPT preferred). modality: IPC-5, else OBR-24 when a DICOM modality, else the
  procedure's; body_part: the procedure's.
- indication_codes and indication_text: OBR-31 (CWE, repeating) and DG1-3, texts OBR-31.2 else OBR-13 /
  reasonCode codes and texts.
- ordered_at: ORC-9 of a new order (NW), else the message's time / authoredOn.
- location_class, ordering_location: PV1-2 and PV1-3 / locationCode, else the location's name.
- status: ORC-1 CA/OC/DC/OD/CR cancelled, HD/OH on-hold; else ORC-5 CM completed, CA/DC cancelled, HD on-hold,
  IP/SC/A active; else NW/RL/OE/SN active / status as sent (revoked: cancelled); draft and unknown leave it.

Versions and MERGE work as in silver.encounters (silver.patients.Merging): fields by `source_version`
(rank 1, UTC event time, MSH-10 / versionId), an HL7 message that leaves a field empty keeps it, a FHIR version
replaces the whole order; the status by `status_version`, so a cancel stays a cancel against an older message
arriving late, and a replay changes nothing.

Quarantined (silver.quarantine, item `ORC[i]`/`OBR[i]` or `ServiceRequest`): `missing_order_number` (no placer
number: ask the sender to fill ORC-2 or OBR-2), `missing_patient_id` (no PID-3 / subject), `unknown_priority`
(a priority code outside HL7 table 0027 or FHIR request-priority; the detail lists the accepted codes).
"""

from __future__ import annotations

from datetime import datetime, tzinfo
from typing import Any

from pyspark.sql import DataFrame
from pyspark.sql.types import ArrayType, StringType, StructField, StructType, TimestampType

from silver import hl7_parse
from silver import imaging_codes as codes
from silver.encounters import _fhir_identity as encounter_reference_identity
from silver.encounters import visit_identity
from silver.identity import identity_key
from silver.patients import EntityRows, Merging, fhir_resource, fhir_version, hl7_version, mrn_identity, nulled
from silver.patients import parsed_rows as parsed_clinical_rows
from silver.routing import Params, applied_version_columns, fhir_patient_key, lineage, routed_schema

ORDERS = "silver.imaging_orders"
ORDER, FHIR_ORDER = "imaging-order", "fhir-servicerequest"
IMAGING_CATEGORY = "363679005"  # SNOMED CT: Imaging (procedure)

FIELDS = ("patient_key", "encounter_key", "filler_order_number", "accession_number", "procedure_code",
          "procedure_system", "procedure_display", "modality", "body_part", "priority", "priority_raw",
          "indication_text", "indication_codes", "ordered_at", "location_class", "ordering_location")

SCHEMA = StructType([
    StructField("order_key", StringType(), False),
    StructField("order_system", StringType(), True),  # canonical system of the placer number
    StructField("order_number", StringType(), True),  # the placer order number
    StructField("fhir_reference", StringType(), True),  # ServiceRequest/<id> when keyed by the resource id
    StructField("filler_order_number", StringType(), True),
    StructField("accession_number", StringType(), True),
    StructField("patient_key", StringType(), True),
    StructField("encounter_key", StringType(), True),
    StructField("procedure_code", StringType(), True),
    StructField("procedure_system", StringType(), True),
    StructField("procedure_display", StringType(), True),
    StructField("modality", StringType(), True),  # DICOM modality: sent, else the procedure's
    StructField("body_part", StringType(), True),  # upper-case DICOM-style body part of the procedure
    StructField("priority", StringType(), True),  # STAT, ASAP, ROUTINE
    StructField("priority_raw", StringType(), True),  # the priority code as sent
    StructField("indication_text", StringType(), True),
    StructField("indication_codes", ArrayType(StringType()), True),  # "system|code" (ICD-10-CM, SNOMED, ...)
    StructField("ordered_at", TimestampType(), True),
    StructField("location_class", StringType(), True),  # ED, ICU, WARD, OUTPATIENT; null when unknown
    StructField("ordering_location", StringType(), True),  # the point of care as sent
    StructField("status", StringType(), True),  # active, completed, cancelled, on-hold, entered-in-error
    StructField("last_event", StringType(), True),  # ORC-1 order control (NW, CA, ...) or fhir:<status>
    *applied_version_columns("status_version"),
])
ROUTED = routed_schema(SCHEMA)

MERGING = Merging(
    key="order_key",
    identity=("order_system", "order_number", "fhir_reference"),
    fields=FIELDS,
    groups=(("source_version", ("nulled_fields", "last_event", "source_feed", "source_record", "received_at")),
            ("status_version", ("status",))),
    later=(),
)
UPDATE = MERGING.update(SCHEMA)
UPDATE_WHEN = MERGING.update_when

_CANCEL_CONTROLS = frozenset({"CA", "OC", "DC", "OD", "CR"})
_HOLD_CONTROLS = frozenset({"HD", "OH"})
_ACTIVE_CONTROLS = frozenset({"NW", "RL", "OE", "SN"})
_ORC_STATUS = {"CM": "completed", "CA": "cancelled", "DC": "cancelled", "HD": "on-hold", "IP": "active",
               "SC": "active", "A": "active"}
_FHIR_STATUS = {"active": "active", "on-hold": "on-hold", "revoked": "cancelled", "completed": "completed",
                "entered-in-error": "entered-in-error"}


def order_identity(p: Params, system: str | None, number: str) -> dict[str, Any]:
    """Key and identity columns of a placer order number."""
    canonical = p.canonical(system)
    return {"order_key": identity_key(p.secret, ORDER, canonical, number), "order_system": canonical,
            "order_number": number}


def _procedure(code: str | None, system: str | None, display: str | None, modality: str | None) -> dict[str, Any]:
    """procedure_*, modality (sent, else the procedure's) and body_part."""
    return {"procedure_code": code, "procedure_system": system, "procedure_display": display,
            "modality": modality or codes.procedure_modality(code, display),
            "body_part": codes.procedure_body_part(code, display)}


def _indication_codes(reasons: list[dict]) -> list[str] | None:
    found = [c for r in reasons if (c := codes.code_text(r.get("system"), r.get("code")))]
    return list(dict.fromkeys(found)) or None


# -- HL7 v2 ---------------------------------------------------------------------------------------
def hl7_status(control: str | None, order_status: str | None) -> str | None:
    """The order status an ORC sets (table in the module docstring); None: it leaves the status as it is."""
    control = (control or "").upper()
    if control in _CANCEL_CONTROLS:
        return "cancelled"
    if control in _HOLD_CONTROLS:
        return "on-hold"
    status = _ORC_STATUS.get((order_status or "").upper())
    return status or ("active" if control in _ACTIVE_CONTROLS or not control else None)


def _is_imaging_hl7(message_code: str, order: dict) -> bool:
    return (message_code == "OMI" or bool(order["modality"])
            or codes.procedure_modality(order["service_code"], order["service_display"]) is not None)


def _hl7(out: EntityRows, src: dict, payload: bytes, tz: tzinfo) -> None:
    try:
        message = hl7_parse.extract(payload, default_tz=tz)
    except hl7_parse.Hl7ParseError:
        return  # silver.observations quarantines unreadable messages
    code = message.header["message_code"]
    if code not in ("ORM", "OML", "OMI"):
        return
    version, at = hl7_version(message.header, code)
    pv1 = next((e for e in message.encounters if e["visit_number"] or e["patient_class"]), None)
    for order in message.orders:
        if _is_imaging_hl7(code, order):
            _hl7_order(out, src, order, pv1, version, at)


def _hl7_encounter(p: Params, pv1: dict | None) -> dict[str, Any]:
    """encounter_key, location_class and ordering_location from the message's PV1."""
    if pv1 is None:
        return {}
    visit = pv1["visit_number"] and visit_identity(p, pv1["visit_authority"] or pv1["patient_source_system"],
                                                   pv1["visit_number"])
    return {"encounter_key": visit["encounter_key"] if visit else None,
            "location_class": codes.hl7_location_class(pv1["patient_class"], pv1["location_point_of_care"]),
            "ordering_location": pv1["location_point_of_care"]}


def _hl7_order(out: EntityRows, src: dict, order: dict, pv1: dict | None, version: str, at: datetime | None) -> None:
    p, item = out.p, f"ORC[{order['record_index']}]"
    if not order["placer_order_number"]:
        out.quarantine(src, item, "missing_order_number", "the order has no placer number: fill ORC-2 (or OBR-2)")
        return
    if not order["patient_mrn"]:
        out.quarantine(src, item, "missing_patient_id", "the order's PID-3 holds no patient identifier")
        return
    control = order["order_control"]
    new = (control or "NW").upper() in _ACTIVE_CONTROLS
    priority = codes.hl7_priority(order["priority_code"]) if new or order["priority_code"] else None
    if order["priority_code"] and priority is None:
        out.quarantine(src, item, "unknown_priority", f"priority code {order['priority_code']!r} is not one of "
                       f"{', '.join(codes.HL7_PRIORITY_CODES)} (HL7 table 0027; TQ1-9, ORC-7.6 or OBR-27.6)")
        return
    values = {**_procedure(order["service_code"], order["service_code_system"], order["service_display"],
                           order["modality"]),
              "patient_key": mrn_identity(p, order["patient_source_system"], order["patient_mrn"])["patient_key"],
              "filler_order_number": order["filler_order_number"], "accession_number": order["accession_number"],
              "priority": priority, "priority_raw": order["priority_code"],
              "indication_text": order["reason_text"], "indication_codes": _indication_codes(order["reason_codes"]),
              "ordered_at": (order["transaction_at"] or at) if new else None, **_hl7_encounter(p, pv1)}
    row = {**order_identity(p, order["placer_system"], order["placer_order_number"]), **values,
           "nulled_fields": [], "last_event": control, "source_feed": "hl7", "source_version": version,
           "source_record": lineage(src), "received_at": src["received_at"]}
    status = hl7_status(control, order["order_status"])
    if status:
        row.update(status=status, status_version=version)
    out.entity(src, row)


# -- FHIR R4 --------------------------------------------------------------------------------------
def fhir_items(out: EntityRows, src: dict, payload: bytes, tz: tzinfo, resource_type: str, kind: str) -> list[dict]:
    """The extracted `kind` rows (fhir_parse.Extracted) of a written resource of `resource_type`; [] for others."""
    if src.get("resource_type") != resource_type or src.get("request_method") == "DELETE":
        return []
    extracted = fhir_resource(out, src, payload, tz)
    return getattr(extracted, kind) if extracted is not None else []


def is_imaging_request(request: dict) -> bool:
    """A ServiceRequest (fhir_parse row) this table takes: the Imaging category, or a procedure with a modality."""
    return IMAGING_CATEGORY in request["category_codes"] or codes.procedure_modality(
        request["code"], request["code_display"]) is not None


def _fhir(out: EntityRows, src: dict, payload: bytes, tz: tzinfo) -> None:
    for request in fhir_items(out, src, payload, tz, "ServiceRequest", "service_requests"):
        if is_imaging_request(request):
            _fhir_order(out, src, request)


def _order_identity(p: Params, request: dict, resource_id: str | None) -> dict[str, Any] | None:
    """The placer identifier's identity, else the resource id's."""
    placer = next((i for i in request["identifiers"] if i["type_code"] == "PLAC" and i["value"]), None)
    if placer:
        return order_identity(p, placer["system"], placer["value"])
    if resource_id:
        return {"order_key": identity_key(p.secret, FHIR_ORDER, None, resource_id),
                "fhir_reference": f"ServiceRequest/{resource_id}"}
    return None


def _fhir_order(out: EntityRows, src: dict, request: dict) -> None:
    p = out.p
    identity = _order_identity(p, request, request["id"] or src.get("resource_id"))
    if identity is None:
        out.quarantine(src, "ServiceRequest", "missing_order_number",
                       "ServiceRequest has neither an identifier of type PLAC nor an id")
        return
    patient_key = fhir_patient_key(p, request)
    if patient_key is None:
        out.quarantine(src, "ServiceRequest", "missing_patient_id", "ServiceRequest.subject names no Patient")
        return
    priority = codes.fhir_priority(request["priority"])
    if priority is None:
        out.quarantine(src, "ServiceRequest", "unknown_priority", f"priority {request['priority']!r} is not one "
                       f"of {', '.join(codes.FHIR_PRIORITY_CODES)}")
        return
    filler = next((i["value"] for i in request["identifiers"] if i["type_code"] == "FILL"), None)
    encounter = encounter_reference_identity(p, request["encounter_reference"])
    values = {**_procedure(request["code"], request["code_system"], request["code_display"], None),
              "patient_key": patient_key, "encounter_key": encounter["encounter_key"] if encounter else None,
              "filler_order_number": filler, "accession_number": request["accession"], "priority": priority,
              "priority_raw": request["priority"], "indication_text": request["reason_text"],
              "indication_codes": _indication_codes(request["reason_codes"]), "ordered_at": request["authored_at"],
              "location_class": codes.fhir_location_class(request["location_codes"], request["location_display"]),
              "ordering_location": request["location_display"] or next(iter(request["location_codes"]), None)}
    version, _ = fhir_version(request, src["received_at"])
    row = {**identity, **values, "nulled_fields": nulled(values, FIELDS), "last_event": f"fhir:{request['status']}",
           "source_feed": "fhir", "source_version": version, "source_record": lineage(src),
           "received_at": src["received_at"]}
    status = _FHIR_STATUS.get(request["status"] or "")
    if status:
        row.update(status=status, status_version=version)
    out.entity(src, row)


# -- the job's transform --------------------------------------------------------------------------
def imaging_orders(changes: DataFrame, *, processed_at: datetime, secret: str, timezone: str, mrn_system: str,
                   system_aliases: tuple[tuple[str, str], ...], fhir_validation: str) -> DataFrame:
    """HL7 and FHIR bronze changes -> one row per imaging order (routed with its quarantine rows)."""
    p = Params(secret, timezone, mrn_system, system_aliases, fhir_validation, ORDERS)
    return MERGING.combine(parsed_clinical_rows(changes, p, processed_at, ROUTED, _hl7, _fhir))
