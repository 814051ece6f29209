"""silver.observations: one row per measured value, from HL7 OBX, FHIR Observation and device readings.

Every value is normalized (LOINC code, canonical UCUM unit, ACVPU letter, UTC event time; silver.vitals)
and keyed by a stable `observation_id` built from what identifies the measurement at its source, so a
resent message, the same FHIR version twice or a duplicated device line lands once (MERGE), and a
correction (a later HL7 message for the same OBX, a newer FHIR versionId) replaces what it corrects.
A FHIR DELETE marks the rows it deletes (`status = 'deleted'`), keeping them for audit. What cannot be
used goes to silver.quarantine with its bronze lineage, a reason code and a readable detail.

HL7 and FHIR are parsed in Python (silver.hl7_parse, silver.fhir_parse) inside one mapInArrow pass;
device readings, the bulk, stay in Spark columns. Both produce one routed DataFrame: each row says
which table it belongs to (`_output`), so the batch is computed once and split by the runner.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import datetime, tzinfo
from typing import Any
from zoneinfo import ZoneInfo

import pyarrow as pa
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import to_arrow_schema
from pyspark.sql.types import (
    DoubleType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

from pipelines import sqltext as sql
from silver import fhir_parse, hl7_parse
from silver.identity import ENCOUNTER, PATIENT, identity_key, identity_key_column, reference_identity
from silver.quarantine import QUARANTINE, quarantine_id_column
from silver.routing import (
    BRONZE_TABLES,
    OUTPUT,
    SOURCE_RECORD,
    Params,
    RoutedRows,
    clean,
    fhir_patient_key,
    iso,
    lineage,
    routed_schema,
)
from silver.vitals import normalize, normalized

OBSERVATIONS = "silver.observations"
DELETED = "deleted"

SCHEMA = StructType([
    StructField("observation_id", StringType(), False),
    StructField("patient_key", StringType(), True),
    StructField("encounter_key", StringType(), True),
    StructField("code", StringType(), True),  # LOINC for vital signs; as sent otherwise
    StructField("code_system", StringType(), True),
    StructField("display", StringType(), True),
    StructField("concept", StringType(), True),  # scoring concept (hr, rr, spo2, sbp, ...) for vital signs
    StructField("value", DoubleType(), True),  # in `unit`
    StructField("value_text", StringType(), True),  # coded or text values (ACVPU letter for consciousness)
    StructField("unit", StringType(), True),  # canonical UCUM
    StructField("effective_at", TimestampType(), True),  # UTC event time
    StructField("status", StringType(), True),  # final, corrected, preliminary, entered-in-error, deleted, ...
    StructField("source_feed", StringType(), False),
    StructField("source_system", StringType(), True),  # HL7 sending facility, FHIR, or the device
    StructField("source_id", StringType(), True),  # MSH-10#OBX-1, Observation/<id>, device id
    StructField("source_version", StringType(), False),  # orders corrections: the larger one wins
    StructField("original_code", StringType(), True),
    StructField("original_unit", StringType(), True),
    StructField("original_value", DoubleType(), True),
    StructField("source_record", SOURCE_RECORD, False),  # the bronze row it came from
    StructField("received_at", TimestampType(), True),  # when the gateway (or the file drop) received it
    StructField("ingested_at", TimestampType(), False),  # when this job wrote it
])

ROUTED = routed_schema(SCHEMA)
_ROUTED_ARROW = to_arrow_schema(ROUTED)

# What silver models today; anything else is quarantined as not_modelled (its bytes stay in bronze) unless its
# patient segment feeds silver.patients, so every bronze record ends in a silver table or in silver.quarantine.
MODELLED_HL7 = frozenset({"ADT", "ORU"})
MODELLED_FHIR = frozenset({"Patient", "Encounter", "Observation", "ServiceRequest", "DiagnosticReport"})
NOT_MODELLED = "not_modelled"



# Feeds whose observation_id includes the event time (HL7: the OBX's time; devices: the reading's), so one id
# always has one effective_at and the MERGE may read only the files of the batch's time range. A FHIR
# Observation's id is its resource id: a new version may move its time.
ID_HAS_TIME = ("hl7", "devices")


def _observation_id(*parts: Any) -> str:
    return hashlib.sha256("|".join("" if p is None else str(p) for p in parts).encode()).hexdigest()[:32]


class _Rows(RoutedRows):
    """Routed rows for silver.observations and silver.quarantine."""

    def observation(self, src: dict[str, Any], row: dict[str, Any]) -> None:
        self.rows.append({OUTPUT: OBSERVATIONS, **row, "source_record": lineage(src),
                          "received_at": src["received_at"], "ingested_at": self.processed_at})

    def batch(self) -> pa.RecordBatch:
        return pa.RecordBatch.from_pylist(self.rows, schema=_ROUTED_ARROW)


# -- HL7 v2 ----------------------------------------------------------------------------------------
def _hl7(out: _Rows, src: dict, payload: bytes, tz: tzinfo) -> None:
    try:
        message = hl7_parse.extract(payload, default_tz=tz)
    except hl7_parse.Hl7ParseError as exc:
        out.quarantine(src, "message", exc.code, exc.detail)
        return
    h = message.header
    if h.get("message_code") not in MODELLED_HL7:
        if not message.patients:  # a PID still feeds silver.patients / silver.encounters from any message type
            out.quarantine(src, "message", NOT_MODELLED, f"no silver table takes {h.get('message_code')} messages "
                                                         f"yet (modelled: {', '.join(sorted(MODELLED_HL7))}); "
                                                         "kept in bronze")
        return
    if not message.patients and not message.observations:
        out.quarantine(src, "message", "missing_patient_id", f"{h.get('message_code')} message has no PID segment "
                                                             "and no results: nothing in it can be attached to a "
                                                             "patient")
        return
    version = f"{iso(clean(h.get('sent_at')))}|{h.get('control_id') or ''}"
    for obx in message.observations:
        _hl7_obx(out, src, h, obx, version)


def _hl7_obx(out: _Rows, src: dict, h: dict, obx: dict, version: str) -> None:
    p = out.p
    item = f"OBX[{obx.get('set_id') or obx['record_index']}]"
    mrn = clean(obx.get("patient_mrn"))
    if not mrn:
        out.quarantine(src, item, "missing_patient", "no PID-3 patient identifier in the message")
        return
    if obx.get("value_error"):
        out.quarantine(src, item, "bad_value", str(obx["value_error"]))
        return
    effective = clean(obx.get("effective_at"))
    if effective is None:
        out.quarantine(src, item, "missing_effective_time", "no OBX-14, OBR-7 or MSH-7 time")
        return
    system = p.canonical(clean(obx.get("patient_source_system")))
    visit = clean(obx.get("visit_number"))
    unit = clean(obx.get("units_code")) or clean(obx.get("units_text"))
    value_text = clean(obx.get("value_code")) or clean(obx.get("value_text"))
    base = {"patient_key": identity_key(p.secret, PATIENT, system, mrn),
            "encounter_key": identity_key(p.secret, ENCOUNTER, system, visit) if visit else None,
            "effective_at": effective, "status": clean(obx.get("status")) or "final", "source_feed": "hl7",
            "source_system": h.get("sending_facility"), "source_id": f"{h.get('control_id')}#{item}",
            "source_version": version}
    n = normalize(clean(obx.get("code")), clean(obx.get("code_system")), clean(obx.get("display")),
                  clean(obx.get("value_num")), value_text, unit, clean(obx.get("units_system")))
    if n.problem:
        out.quarantine(src, item, n.problem, _detail(n))
        return
    base["observation_id"] = _observation_id(
        "hl7", system, mrn, n.code, iso(effective), clean(obx.get("sub_id")),
        clean(obx.get("filler_order_number")) or clean(obx.get("placer_order_number")))
    out.observation(src, {**base, **_normalized(n)})


def _detail(n) -> str:
    """The normalizer's reason, with the value as sent so the quarantine row can be checked by eye."""
    sent = " ".join(str(x) for x in (n.original_value, n.original_unit) if x not in (None, ""))
    return f"{n.problem_detail} (sent: {sent})" if sent else str(n.problem_detail)


def _normalized(n) -> dict[str, Any]:
    return {"code": n.code, "code_system": n.system, "display": n.display, "concept": n.concept, "value": n.value,
            "value_text": n.value_text, "unit": n.unit, "original_code": n.original_code,
            "original_unit": n.original_unit, "original_value": n.original_value}


# -- FHIR R4 ---------------------------------------------------------------------------------------
def _fhir_version(version_id: str | None, last_updated: str | None) -> str:
    if version_id and version_id.isdigit():
        return f"{int(version_id):012d}"
    return version_id or last_updated or "000000000000"


def _imaging(payload: bytes, tz: tzinfo) -> bool:
    """A ServiceRequest or DiagnosticReport the imaging tables take (or quarantine themselves: unreadable ones)."""
    from silver.imaging_orders import is_imaging_request
    from silver.imaging_reports import is_imaging_report

    try:
        found = fhir_parse.extract(fhir_parse.parse_payload(payload), default_tz=tz)
    except fhir_parse.FhirParseError:
        return True
    return any(map(is_imaging_request, found.service_requests)) or any(map(is_imaging_report,
                                                                          found.diagnostic_reports))


def _fhir(out: _Rows, src: dict, payload: bytes, tz: tzinfo) -> None:
    kind = src.get("resource_type")
    if kind not in MODELLED_FHIR:
        out.quarantine(src, "resource", NOT_MODELLED, f"no silver table takes {kind} resources yet "
                                                      f"(modelled: {', '.join(sorted(MODELLED_FHIR))}); kept in bronze")
        return
    if kind in ("ServiceRequest", "DiagnosticReport") and not _imaging(payload, tz):
        out.quarantine(src, "resource", NOT_MODELLED, f"no silver table takes {kind} resources other than imaging "
                                                      "ones yet (silver.imaging_orders, silver.imaging_reports); kept "
                                                      "in bronze")
        return
    if kind != "Observation":
        return  # Patient, Encounter, ServiceRequest, DiagnosticReport feed silver.patients, .encounters, .imaging_*
    if src.get("request_method") == "DELETE":
        _fhir_delete(out, src)
        return
    try:
        resource = fhir_parse.parse_payload(payload)
    except fhir_parse.FhirParseError as exc:
        out.quarantine(src, "resource", exc.code, exc.detail)
        return
    problems = fhir_parse.validate(resource) if out.p.fhir_validation == "full" else fhir_parse.check(resource)
    if problems:
        out.quarantine(src, "resource", "validation_failed", "; ".join(problems[:5]))
        return
    extracted = fhir_parse.extract(resource, default_tz=tz)
    for obs in extracted.observations:
        _fhir_value(out, src, obs)


def _fhir_value(out: _Rows, src: dict, obs: dict) -> None:
    p = out.p
    component = obs.get("component_index")
    item = "Observation" if component is None else f"Observation.component[{component}]"
    patient_key = fhir_patient_key(p, obs)
    if patient_key is None:
        out.quarantine(src, item, "missing_patient", "Observation.subject names no Patient")
        return
    if obs.get("missing_value"):
        out.quarantine(src, item, "missing_value", f"no value ({obs.get('absent_reason') or 'not sent'})")
        return
    if obs.get("effective_at") is None:
        out.quarantine(src, item, "missing_effective_time", "no effective[x]")
        return
    enc = reference_identity(obs.get("encounter_reference"))
    unit = obs.get("value_unit_code") or obs.get("value_unit")
    n = normalize(obs.get("code"), obs.get("code_system"), obs.get("code_display"), obs.get("value_num"),
                  obs.get("value_code") or obs.get("value_text"), unit, obs.get("value_unit_system"))
    if n.problem:
        out.quarantine(src, item, n.problem, _detail(n))
        return
    out.observation(src, {
        "observation_id": _observation_id("fhir", obs.get("id"), component),
        "patient_key": patient_key,
        "encounter_key": identity_key(p.secret, enc[0], None, enc[1]) if enc else None,
        "effective_at": obs["effective_at"], "status": obs.get("status") or "final", "source_feed": "fhir",
        "source_system": "fhir", "source_id": f"Observation/{obs.get('id')}",
        "source_version": _fhir_version(obs.get("version_id"), obs.get("last_updated")), **_normalized(n)})


# A deleted Observation's rows: one per possible component position, applied only where they exist.
MAX_COMPONENTS = 8


def _fhir_delete(out: _Rows, src: dict) -> None:
    version = f"DELETE@{iso(src['received_at'])}"  # sorts after every versionId and lastUpdated
    for component in (None, *range(MAX_COMPONENTS)):
        out.observation(src, {"observation_id": _observation_id("fhir", src.get("resource_id"), component),
                              "status": DELETED, "source_feed": "fhir", "source_system": "fhir",
                              "source_id": f"Observation/{src.get('resource_id')}", "source_version": version})


# -- the Python pass over HL7 and FHIR rows ---------------------------------------------------------
_INPUT = ("feed", "landing_file", "landing_position", "sha256", "payload", "parse_status", "parse_detail",
          "received_at", "resource_type", "resource_id", "request_method")


def _parse_batches(p: Params, processed_at: datetime):
    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        tz = ZoneInfo(p.timezone)
        for batch in batches:
            out = _Rows(p, processed_at)
            for src in batch.to_pylist():
                src["table"] = BRONZE_TABLES[src["feed"]]
                payload = src.pop("payload")
                if src["parse_status"] != "ok":
                    out.quarantine(src, "record", src["parse_status"], src["parse_detail"])
                elif src["feed"] == "hl7":
                    _hl7(out, src, payload, tz)
                else:
                    _fhir(out, src, payload, tz)
            yield out.batch()

    return run


def parsed_clinical(rows: DataFrame, p: Params, processed_at: datetime) -> DataFrame:
    """HL7 and FHIR bronze rows -> routed observation / quarantine rows."""
    cols = [F.col(c) if c in rows.columns else F.lit(None).cast("string").alias(c) for c in _INPUT]
    return rows.select(*cols).mapInArrow(_parse_batches(p, processed_at), ROUTED)


# -- device readings, in Spark columns --------------------------------------------------------------
READING = StructType([
    StructField("device_id", StringType()), StructField("patient_mrn", StringType()),
    StructField("time", StringType()), StructField("code", StringType()), StructField("code_system", StringType()),
    StructField("value", StringType()), StructField("value_text", StringType()), StructField("unit", StringType()),
])


def device_rows(rows: DataFrame, p: Params, processed_at: datetime) -> DataFrame:
    """Device bronze rows -> routed observation / quarantine rows, without leaving the JVM.

    Built in stages (parse, normalize, judge, route) so each stage's columns are computed once and
    referenced by name: one flat expression would repeat the normalization tables in every column.
    """
    reading = F.from_json(F.make_valid_utf8(F.col("payload").cast("string")), READING, {"mode": "PERMISSIVE"})
    parsed = rows.select("landing_file", "landing_position", "sha256", "received_at", "parse_status",
                         reading.alias("r")).select(
        "*", *(F.col(f"r.{k}").alias(f"r_{k}") for k in ("code", "code_system", "value_text", "unit")),
        F.expr("try_cast(r.value as double)").alias("value_num"),
        F.try_to_timestamp(F.col("r.time")).alias("effective"))  # try_: one bad line must never fail the batch
    normed = parsed.transform(normalized(code="r_code", code_system="r_code_system", value_num="value_num",
                                         value_text="r_value_text", unit="r_unit"))
    return normed.select("*", _reason().alias("reason")).select(*_device_route(p, processed_at))


# The device columns routed as they are: normalized values and bronze lineage.
_AS_IS = frozenset({"code", "display", "concept", "value", "value_text", "unit", "original_code", "original_unit",
                    "original_value", "landing_file", "landing_position", "sha256", "received_at"})


def _bad_number() -> Column:
    return F.col("r.value").isNotNull() & F.col("value_num").isNull()


def _no_mrn() -> Column:
    return F.col("r.patient_mrn").isNull() | (F.trim(F.col("r.patient_mrn")) == "")


def _reason() -> Column:
    """Why a normalized device reading cannot be used (null when it can)."""
    return (F.when(F.col("parse_status") != "ok", F.col("parse_status"))
            .when(_bad_number(), F.lit("bad_value"))
            .when(_no_mrn(), F.lit("missing_patient"))
            .when(F.col("effective").isNull(), F.lit("bad_timestamp"))
            .otherwise(F.col("problem")))


def _device_detail() -> Column:
    """The readable detail of a quarantined reading (same order of checks as `_reason`)."""
    return (F.when(F.col("parse_status") != "ok", F.lit("bronze could not key this line"))
            .when(_bad_number(), F.concat(F.lit("value is not a number: "), F.col("r.value")))
            .when(_no_mrn(), F.lit("reading has no patient_mrn"))
            .when(F.col("effective").isNull(), F.concat(F.lit("unreadable time: "), F.coalesce("r.time", F.lit("-"))))
            .otherwise(F.concat_ws("", F.col("problem_detail"), F.lit(" (sent: "),
                                   F.concat_ws(" ", F.col("original_value").cast("string"), F.col("original_unit")),
                                   F.lit(")"))))


def _device_route(p: Params, processed_at: datetime) -> list[Column]:
    """The routed columns of a judged device row: observation columns, or quarantine columns.

    The runner keeps only its table's columns of each row, so a column of the other table is left as computed
    (nothing spent on nulling it); only what costs per row (the keys, the detail) is computed for the rows
    that need it. One small expression per column keeps the generated code JIT-compilable.
    """
    good = F.col("reason").isNull()
    table = F.lit(BRONZE_TABLES["devices"])
    obs = {
        "observation_id": F.when(good, F.substring(F.sha2(F.concat_ws("|", F.lit("devices"), F.col("r.device_id"),
                                                                       F.col("r.time"), F.col("code")), 256), 1, 32)),
        "patient_key": F.when(good, identity_key_column(p.secret, PATIENT, F.lit(p.mrn_system),
                                                        F.col("r.patient_mrn"))),
        "code_system": F.col("system"), "effective_at": F.col("effective"), "status": F.lit("final"),
        "source_feed": F.lit("devices"), "source_system": F.col("r.device_id"), "source_id": F.col("r.device_id"),
        "source_version": F.lit("0"),
        "source_record": F.struct(table.alias("table"), "landing_file", "landing_position", "sha256"),
        "ingested_at": F.lit(processed_at),
    }
    item = F.lit("reading")
    quarantined = {
        "quarantine_id": F.when(~good, quarantine_id_column(p.job, table, F.col("landing_file"),
                                                            F.col("landing_position"), item, F.col("reason"))),
        "feed": F.lit("devices"), "source_table": table, "item": item, "reason": F.col("reason"),
        "detail": F.when(~good, _device_detail()), "job": F.lit(p.job), "quarantined_at": F.lit(processed_at)}
    # Normalized columns already carry the observation's names (code, value, unit, ...): referenced as they are.
    cols = []
    for f in ROUTED.fields:
        if f.name == OUTPUT:
            expr = F.when(good, F.lit(OBSERVATIONS)).otherwise(F.lit(QUARANTINE))
        elif f.name in obs:
            expr = obs[f.name]
        elif f.name in quarantined:
            expr = quarantined[f.name]
        elif f.name in _AS_IS:
            expr = F.col(f.name)
        else:
            expr = F.lit(None)
        cols.append(expr.cast(sql.type_text(f.dataType)).alias(f.name))  # a type string: one JVM call, no JSON
    return cols


# -- the job's transform ---------------------------------------------------------------------------
def observations(changes: DataFrame, *, processed_at: datetime, secret: str, timezone: str, mrn_system: str,
                 system_aliases: tuple[tuple[str, str], ...], fhir_validation: str) -> DataFrame:
    """Bronze changes of all three feeds -> rows routed to silver.observations or silver.quarantine.

    Computed once and split by the runner. Within a batch the same observation may come twice (a resend,
    a correction right behind the original): the merge keeps the largest source_version per id.
    """
    p = Params(secret, timezone, mrn_system, system_aliases, fhir_validation, OBSERVATIONS)
    inserted = changes.where("_change_type = 'insert'")
    devices = device_rows(inserted.where("feed = 'devices'"), p, processed_at)
    clinical = parsed_clinical(inserted.where("feed IN ('hl7', 'fhir')"), p, processed_at)
    return devices.unionByName(clinical)
