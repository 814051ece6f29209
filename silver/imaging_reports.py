"""silver.imaging_reports: one row per imaging report (HL7 ORU^R01 radiology OBR, FHIR DiagnosticReport), current.

Which reports: an ORU OBR whose diagnostic service section (OBR-24, HL7 table 0074) is an imaging one (RAD, RX,
CT, NMR, NMS, RUS, OUS, CUS, VUS, XRC, or a DICOM modality); a DiagnosticReport with an imaging category (v2-0074
RAD and the sections above, LOINC LP29684-5 Radiology, SNOMED 363679005 Imaging, or `imaging`). Lab and vital-sign
results are not read here (silver.observations keeps every OBX, these included).

Identity (`report_key`, silver.identity kind `imaging-report-<by>`): the accession number (OBR-18; the
DiagnosticReport identifier of type ACSN) in its canonical system, else the filler order number (OBR-3; identifier
of type FILL), else the placer number (OBR-2), else (FHIR) the resource id. One accession, one report: a
preliminary read, its final and later amendments are versions of one row, and HL7 and FHIR copies meet.

| column                   | HL7 v2                                          | FHIR DiagnosticReport                 |
|--------------------------|-------------------------------------------------|---------------------------------------|
| status                   | OBR-25 (P, F, C, A, X, W ...; imaging_codes)    | status (registered/partial: prelim.)  |
| read_at                  | OBR-22 results time, else MSH-7                 | issued, else meta.lastUpdated         |
| reader, reader_name      | OBR-32 principal result interpreter: ID, name   | resultsInterpreter[0]: identifier or  |
|                          |                                                 | reference, display                    |
| critical                 | an OBX of the report with OBX-8 AA, HH or LL    | a conclusionCode AA, HH or LL (v3     |
|                          |                                                 | ObservationInterpretation)            |
| critical_communicated_at | the OBX coded CRITCOMM (99CARELAKE): its DTM    | the IHE IDR idrCommunication          |
|                          | value, else OBX-14                              | extension: dateTime or the contained  |
|                          |                                                 | Communication's `sent`                |
| conclusion               | OBX 19005-8 (impression) texts, else every text | conclusion                            |
|                          | OBX of the report                               |                                       |
| study_instance_uid       | OBX coded 113014 (DICOM Study)                  | imagingStudy identifier (urn:dicom:uid)|

HL7 v2 has no standard element saying a critical result was communicated (the ACR practice parameter asks that
the report document it); carelake reads an OBX with the local code CRITCOMM^...^99CARELAKE (HL7's local-code
convention), value type DTM: when it was communicated. A feed that documents it differently needs its code there.

Versions (silver.patients.Merging): rank 1, UTC event time (OBR-22, else MSH-7; lastUpdated, else issued), then
MSH-10 / versionId. The newest version sets every column it sends; a field an HL7 report leaves empty keeps the
stored value (a FHIR version replaces the report), and `critical_communicated_at`, once known, stays unless a
newer version sends another. A replay changes nothing.

Quarantined (item `OBR[i]` or `DiagnosticReport`): `missing_report_identifier` (no accession, filler or placer
number), `missing_patient_id` (no PID-3 / subject), `missing_report_status` (an ORU OBR without OBR-25: not a
result, e.g. an order's OBR that lost its own MSH and was read as part of the message before it) and
`unknown_report_status` (OBR-25 outside table 0123).
"""

from __future__ import annotations

from datetime import datetime, tzinfo
from typing import Any

from pyspark.sql import DataFrame
from pyspark.sql.types import BooleanType, StringType, StructField, StructType, TimestampType

from silver import hl7_parse
from silver import imaging_codes as codes
from silver.identity import identity_key
from silver.imaging_orders import fhir_items
from silver.patients import EntityRows, Merging, fhir_version, hl7_version, mrn_identity, nulled
from silver.patients import parsed_rows as parsed_clinical_rows
from silver.routing import Params, applied_version_columns, fhir_patient_key, lineage, routed_schema

REPORTS = "silver.imaging_reports"
IMPRESSION = "19005-8"  # LOINC: Radiology Imaging study [Impression]
STUDY_UID_CODE = "113014"  # DICOM DCM: Study (the Study Instance UID in an OBX)
IMAGING_CATEGORIES = frozenset({*codes.RADIOLOGY_SECTIONS, "LP29684-5", "363679005", "imaging"})

FIELDS = ("accession_number", "order_number", "filler_order_number", "study_instance_uid", "patient_key",
          "procedure_code", "procedure_display", "status", "read_at", "reader", "reader_name", "critical",
          "critical_communicated_at", "conclusion")

SCHEMA = StructType([
    StructField("report_key", StringType(), False),
    StructField("identity_kind", StringType(), True),  # accession, filler, placer, fhir-diagnosticreport
    StructField("identity_system", StringType(), True),
    StructField("identity_value", StringType(), True),
    StructField("accession_number", StringType(), True),
    StructField("order_number", StringType(), True),  # the placer order number
    StructField("filler_order_number", StringType(), True),
    StructField("study_instance_uid", StringType(), True),
    StructField("patient_key", StringType(), True),
    StructField("procedure_code", StringType(), True),
    StructField("procedure_display", StringType(), True),
    StructField("status", StringType(), True),  # preliminary, final, amended, corrected, cancelled, entered-in-error
    StructField("read_at", TimestampType(), True),
    StructField("reader", StringType(), True),  # the interpreting radiologist's identifier as sent (else name)
    StructField("reader_name", StringType(), True),
    StructField("critical", BooleanType(), True),
    StructField("critical_communicated_at", TimestampType(), True),
    StructField("conclusion", StringType(), True),
    *applied_version_columns(),
])
ROUTED = routed_schema(SCHEMA)

MERGING = Merging(
    key="report_key",
    identity=("identity_kind", "identity_system", "identity_value"),
    fields=FIELDS,
    groups=(("source_version", ("nulled_fields", "source_feed", "source_record", "received_at")),),
    later=(),
)
UPDATE = MERGING.update(SCHEMA)
UPDATE_WHEN = MERGING.update_when


def report_identity(p: Params, by: str, system: str | None, value: str) -> dict[str, Any]:
    """Key and identity columns of a report named by its accession, filler or placer number (or FHIR id)."""
    canonical = None if by == "fhir-diagnosticreport" else p.canonical(system)
    return {"report_key": identity_key(p.secret, f"imaging-report-{by}", canonical, value), "identity_kind": by,
            "identity_system": canonical, "identity_value": value}


# -- HL7 v2 ---------------------------------------------------------------------------------------
def _hl7(out: EntityRows, src: dict, payload: bytes, tz: tzinfo) -> None:
    try:
        message = hl7_parse.extract(payload, default_tz=tz)
    except hl7_parse.Hl7ParseError:
        return  # silver.observations quarantines unreadable messages
    if message.header["message_code"] != "ORU":
        return
    version_base = message.header
    ends = [r["record_index"] for r in message.reports[1:]] + [10 ** 9]  # an ORU may have no OBR at all
    for report, end in zip(message.reports, ends[:len(message.reports)], strict=True):
        if (report["diagnostic_service"] or "").upper() in codes.RADIOLOGY_SECTIONS:
            obx = [o for o in message.observations if report["record_index"] < o["record_index"] < end]
            _hl7_report(out, src, report, obx, version_base, tz)


def _hl7_identity(p: Params, report: dict) -> dict[str, Any] | None:
    for by, value, system in (("accession", report["accession_number"], None),
                              ("filler", report["filler_order_number"], report["filler_system"]),
                              ("placer", report["placer_order_number"], report["placer_system"])):
        if value:
            return report_identity(p, by, system, value)
    return None


def _communicated_at(obx: dict, tz: tzinfo) -> datetime | None:
    """The time a critical-result-communicated OBX records: its DTM value, else OBX-14."""
    try:
        return hl7_parse.parse_ts(obx["value_text"], tz) if obx["value_text"] else obx["effective_at"]
    except hl7_parse.Hl7ParseError:
        return obx["effective_at"]


def _hl7_findings(obx: list[dict], tz: tzinfo) -> dict[str, Any]:
    """critical, critical_communicated_at, conclusion and study_instance_uid from a report's OBX."""
    comm = [o for o in obx if (o["code"], o["code_system"]) == codes.CRITICAL_COMMUNICATED]
    uid = next((o["value_text"] for o in obx if o["code"] == STUDY_UID_CODE and o["value_text"]), None)
    texts = [o for o in obx if o["value_text"] and o not in comm and o["code"] != STUDY_UID_CODE]
    impression = [o["value_text"] for o in texts if o["code"] == IMPRESSION]
    times = [t for o in comm if (t := _communicated_at(o, tz)) is not None]
    return {"critical": any(codes.CRITICAL_FLAGS & {f.upper() for f in o["abnormal_flags"]} for o in obx),
            "critical_communicated_at": min(times) if times else None, "study_instance_uid": uid,
            "conclusion": "\n".join(impression or [o["value_text"] for o in texts]) or None}


def _hl7_report(out: EntityRows, src: dict, report: dict, obx: list[dict], header: dict, tz: tzinfo) -> None:
    p, item = out.p, f"OBR[{report['record_index']}]"
    identity = _hl7_identity(p, report)
    if identity is None:
        out.quarantine(src, item, "missing_report_identifier", "the report has no accession (OBR-18), filler "
                       "(OBR-3) or placer (OBR-2) number")
        return
    if not report["patient_mrn"]:
        out.quarantine(src, item, "missing_patient_id", "the report's PID-3 holds no patient identifier")
        return
    status = codes.hl7_report_status(report["result_status"])
    if status is None:
        reason, what = ("unknown_report_status", f"OBR-25 {report['result_status']!r} is not") \
            if report["result_status"] else ("missing_report_status", "OBR-25 is empty; a report needs")
        out.quarantine(src, item, reason, f"{what} a result status of HL7 table 0123 (P, F, C, A, X, W, D, R, S, I)")
        return
    read_at = report["results_at"] or header["sent_at"]
    version, _ = hl7_version({**header, "event_at": read_at}, "ORU")
    values = {"accession_number": report["accession_number"], "order_number": report["placer_order_number"],
              "filler_order_number": report["filler_order_number"],
              "patient_key": mrn_identity(p, report["patient_source_system"], report["patient_mrn"])["patient_key"],
              "procedure_code": report["service_code"], "procedure_display": report["service_display"],
              "status": status, "read_at": read_at, "reader": report["interpreter_id"] or report["interpreter_name"],
              "reader_name": report["interpreter_name"], **_hl7_findings(obx, tz)}
    out.entity(src, {**identity, **values, "nulled_fields": [], "source_feed": "hl7", "source_version": version,
                     "source_record": lineage(src), "received_at": src["received_at"]})


# -- FHIR R4 --------------------------------------------------------------------------------------
def is_imaging_report(report: dict) -> bool:
    """A DiagnosticReport (fhir_parse row) this table takes: an imaging category."""
    return bool(IMAGING_CATEGORIES & set(report["category_codes"]))


def _fhir(out: EntityRows, src: dict, payload: bytes, tz: tzinfo) -> None:
    for report in fhir_items(out, src, payload, tz, "DiagnosticReport", "diagnostic_reports"):
        if is_imaging_report(report):
            _fhir_report(out, src, report)


def _fhir_identity(p: Params, report: dict, resource_id: str | None) -> dict[str, Any] | None:
    if report["accession"]:
        return report_identity(p, "accession", report["accession_system"], report["accession"])
    filler = next((i for i in report["identifiers"] if i["type_code"] == "FILL" and i["value"]), None)
    if filler:
        return report_identity(p, "filler", filler["system"], filler["value"])
    return report_identity(p, "fhir-diagnosticreport", None, resource_id) if resource_id else None


def _fhir_report(out: EntityRows, src: dict, report: dict) -> None:
    p = out.p
    identity = _fhir_identity(p, report, report["id"] or src.get("resource_id"))
    patient_key = fhir_patient_key(p, report)
    if identity is None or patient_key is None:
        reason, what = ("missing_report_identifier", "neither an identifier nor an id") if identity is None else (
            "missing_patient_id", "no subject naming a Patient")
        out.quarantine(src, "DiagnosticReport", reason, f"DiagnosticReport has {what}")
        return
    ids = {i["type_code"]: i["value"] for i in report["identifiers"] if i["type_code"] and i["value"]}
    critical = any(c["system"] == codes.V3_INTERPRETATION and c["code"] in codes.CRITICAL_FLAGS
                   for c in report["conclusion_codes"])
    version, updated = fhir_version(report, src["received_at"])
    values = {"accession_number": report["accession"], "order_number": ids.get("PLAC"),
              "filler_order_number": ids.get("FILL"), "study_instance_uid": next(iter(report["study_uids"]), None),
              "patient_key": patient_key, "procedure_code": report["code"], "procedure_display": report["code_display"],
              "status": codes.fhir_report_status(report["status"]), "read_at": report["issued_at"] or updated,
              "reader": report["interpreter_id"] or report["interpreter_name"],
              "reader_name": report["interpreter_name"], "critical": critical,
              "critical_communicated_at": report["communicated_at"], "conclusion": report["conclusion"]}
    out.entity(src, {**identity, **values, "nulled_fields": [f for f in nulled(values, FIELDS)
                                                             if f != "critical_communicated_at"],
                     "source_feed": "fhir", "source_version": version, "source_record": lineage(src),
                     "received_at": src["received_at"]})


# -- the job's transform --------------------------------------------------------------------------
def imaging_reports(changes: DataFrame, *, processed_at: datetime, secret: str, timezone: str, mrn_system: str,
                    system_aliases: tuple[tuple[str, str], ...], fhir_validation: str) -> DataFrame:
    """HL7 and FHIR bronze changes -> one row per imaging report (routed with its quarantine rows)."""
    p = Params(secret, timezone, mrn_system, system_aliases, fhir_validation, REPORTS)
    return MERGING.combine(parsed_clinical_rows(changes, p, processed_at, ROUTED, _hl7, _fhir))
