"""silver.patients: one row per patient identity, with demographics and the links that make one person of them.

Identities (`patient_key`, silver.identity): an MRN (`patient`: canonical system + PID-3 or the FHIR identifier
of type MR), a FHIR resource id (`fhir-patient`) and a Bundle `urn:uuid:` fullUrl (`fhir-fullurl`). A FHIR
Patient with an MRN keeps its demographics on the MRN row; its resource id and fullUrl rows point there through
`merged_into`, so an Observation keyed by either reference resolves to the same person. HL7 A40 (MRG) and FHIR
`replaced-by`/`replaces` links set `merged_into` of the prior identity. `resolved()` follows the chains.

Versions order every change: `rank|UTC event time|tiebreak` (entity_version). Rank 1 for what is authoritative
for the entity (ADT messages, FHIR resources), 0 for other HL7 messages (an ORU's PID registers a patient but
never overrides an ADT); event time is EVN-2 (else MSH-7) or meta.lastUpdated; the tiebreak is MSH-10 or the
zero-padded versionId. So a resend (same version) changes nothing and a late, older message never overwrites.

Merge rules (in-batch combination and MERGE apply the same ones; `s` = incoming, `t` = stored):

| columns                                   | change when                         | to                                |
|-------------------------------------------|-------------------------------------|-----------------------------------|
| identity (kind, system, mrn, reference)   | never                               | first seen                        |
| demographics (family_name .. deceased_at) | s.source_version > t.source_version | s; HL7 empty keeps t, `""` clears |
|                                           | else: t lacks it (not cleared)      | s (a late, older row fills a gap) |
| nulled_fields, source_*, updated_at, ...  | s.source_version > t.source_version | s                                 |
| merged_into, link_version, link_record    | s.link_version > t.link_version     | s (never touches demographics)    |
| deleted_at (FHIR DELETE)                  | s.deleted_at > t.deleted_at         | s                                 |

A FHIR version replaces the whole resource: every demographic it lacks is listed in nulled_fields (cleared).
In one batch the rows of a key are folded first: per column the newest row that sent (or cleared) it.
Versions are kept per row, not per field, so a late older row may only fill a field the stored row lacks:
it never overwrites a value and never undoes a clearing (`nulled_fields` of the applied update).

The HL7/FHIR parse runs once per batch in mapInArrow and yields rows routed (`_output`) to this table or to
silver.quarantine; records that cannot be parsed at all are quarantined once, by silver.observations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, tzinfo
from typing import Any
from zoneinfo import ZoneInfo

import pyarrow as pa
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import to_arrow_schema
from pyspark.sql.types import (
    ArrayType,
    BooleanType,
    DateType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

from silver import fhir_parse, hl7_parse
from silver.identity import FHIR_FULLURL, PATIENT, identity_key, reference_identity
from silver.quarantine import QUARANTINE
from silver.routing import (
    BRONZE_TABLES,
    OUTPUT,
    SOURCE_RECORD,
    Params,
    RoutedRows,
    clean,
    iso,
    lineage,
    routed_schema,
)

PATIENTS = "silver.patients"

DEMOGRAPHICS = ("family_name", "given_name", "birth_date", "sex", "address_line", "city", "state", "postal_code",
                "country", "phone", "deceased", "deceased_at")

SCHEMA = StructType([
    StructField("patient_key", StringType(), False),
    StructField("identity_kind", StringType(), False),  # patient (MRN), fhir-patient, fhir-fullurl
    StructField("source_system", StringType(), True),  # canonical identifier system (kind patient)
    StructField("mrn", StringType(), True),  # the identifier value (kind patient)
    StructField("fhir_reference", StringType(), True),  # Patient/<id> or the urn:uuid fullUrl (FHIR kinds)
    StructField("merged_into", StringType(), True),  # the patient_key this identity continues as
    StructField("family_name", StringType(), True),
    StructField("given_name", StringType(), True),  # given and middle names, space-separated
    StructField("birth_date", DateType(), True),
    StructField("sex", StringType(), True),  # male, female, other, unknown
    StructField("address_line", StringType(), True),
    StructField("city", StringType(), True),
    StructField("state", StringType(), True),
    StructField("postal_code", StringType(), True),
    StructField("country", StringType(), True),
    StructField("phone", StringType(), True),
    StructField("deceased", BooleanType(), True),
    StructField("deceased_at", TimestampType(), True),
    StructField("nulled_fields", ArrayType(StringType()), True),  # demographics the applied update cleared
    StructField("source_feed", StringType(), True),  # hl7 or fhir, of the applied demographics
    StructField("source_version", StringType(), True),  # rank|event time|tiebreak: the larger one wins
    StructField("updated_at", TimestampType(), True),  # event time of the applied demographics
    StructField("source_record", SOURCE_RECORD, True),  # the bronze row of the applied demographics
    StructField("link_version", StringType(), True),  # version of the applied link (merged_into)
    StructField("link_record", SOURCE_RECORD, True),  # the bronze row of the applied link
    StructField("deleted_at", TimestampType(), True),  # when a FHIR DELETE of this Patient was received
    StructField("received_at", TimestampType(), True),  # when the gateway received the applied demographics
    StructField("ingested_at", TimestampType(), False),
])


ROUTED = routed_schema(SCHEMA)


# -- routed rows, versions and the Python pass (shared with silver.encounters) ------------------------
class EntityRows(RoutedRows):
    """Collects the routed rows of one Arrow batch for one entity table and silver.quarantine."""

    def __init__(self, p: Params, processed_at: datetime, table: str, schema: pa.Schema):
        super().__init__(p, processed_at)
        self.table = table
        self.schema = schema

    def entity(self, src: dict[str, Any], row: dict[str, Any]) -> None:
        """One row for the entity table, stamped with ingestion time."""
        self.rows.append({OUTPUT: self.table, **row, "ingested_at": self.processed_at})

    def batch(self) -> pa.RecordBatch:
        return pa.RecordBatch.from_pylist(self.rows, schema=self.schema)


def entity_version(authoritative: bool, at: datetime | None, tiebreak: str | None) -> str:
    """The sortable version of one update: authority rank, UTC event time, then the source's own order."""
    return f"{int(authoritative)}|{iso(at)}|{tiebreak or ''}"


def fhir_version(head: dict[str, Any], received_at: datetime) -> tuple[str, datetime]:
    """Version and event time of a FHIR resource: lastUpdated and the zero-padded versionId.

    Without either, the time it was received orders it (a later PUT wins).
    """
    version_id, updated = head.get("version_id"), head.get("last_updated")
    tiebreak = f"{int(version_id):012d}" if version_id and version_id.isdigit() else version_id
    at = updated if updated or version_id else received_at
    return entity_version(True, at, tiebreak), updated or received_at


def hl7_version(header: dict[str, Any], authoritative_code: str) -> tuple[str, datetime | None]:
    """Version and event time of an HL7 message: EVN-2 (else MSH-7) and MSH-10; rank 1 for `authoritative_code`."""
    at = clean(header.get("event_at"))
    return entity_version(header.get("message_code") == authoritative_code, at, header.get("control_id")), at


def fhir_resource(out: RoutedRows, src: dict[str, Any], payload: bytes, tz: tzinfo) -> fhir_parse.Extracted | None:
    """The extracted FHIR resource, or None after quarantining it as unreadable or invalid."""
    try:
        resource = fhir_parse.parse_payload(payload)
    except fhir_parse.FhirParseError as exc:
        out.quarantine(src, src["resource_type"], exc.code, exc.detail)
        return None
    problems = fhir_parse.validate(resource) if out.p.fhir_validation == "full" else fhir_parse.check(resource)
    if problems:
        out.quarantine(src, src["resource_type"], fhir_parse.VALIDATION_FAILED, "; ".join(problems[:5]))
        return None
    return fhir_parse.extract(resource, default_tz=tz)


def nulled(row: dict[str, Any], fields: tuple[str, ...]) -> list[str]:
    """A FHIR version replaces the resource: every field it leaves out is cleared."""
    return [f for f in fields if row.get(f) is None]


Handler = Callable[[EntityRows, dict[str, Any], bytes, tzinfo], None]
_INPUT = ("feed", "landing_file", "landing_position", "sha256", "payload", "parse_status", "received_at",
          "resource_type", "resource_id", "request_method", "full_url")


def parsed_rows(changes: DataFrame, p: Params, processed_at: datetime, routed: StructType, hl7: Handler,
                fhir: Handler) -> DataFrame:
    """Inserted HL7/FHIR bronze rows -> routed rows, through `hl7` or `fhir` per record (bad records skipped)."""
    inserted = changes.where("_change_type = 'insert' AND feed IN ('hl7', 'fhir') AND parse_status = 'ok'")
    cols = [F.col(c) if c in changes.columns else F.lit(None).cast("string").alias(c) for c in _INPUT]
    arrow_schema = to_arrow_schema(routed)

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        tz = ZoneInfo(p.timezone)
        for batch in batches:
            out = EntityRows(p, processed_at, p.job, arrow_schema)
            for src in batch.to_pylist():
                src["table"] = BRONZE_TABLES[src["feed"]]
                (hl7 if src["feed"] == "hl7" else fhir)(out, src, src.pop("payload"), tz)
            yield out.batch()

    return inserted.select(*cols).mapInArrow(run, routed)


# -- combining the rows of one key: in the batch (Spark) and against the table (MERGE SQL) --------------
def _newer(version: str) -> str:
    """SQL: the incoming `version` is set and greater than the stored one."""
    return f"(s.`{version}` IS NOT NULL AND (t.`{version}` IS NULL OR s.`{version}` > t.`{version}`))"


def _fills(field: str, strict: bool = True) -> str:
    """SQL: the incoming row sends `field`, which the stored row lacks (strict: and was not told to clear).

    delta-rs cannot write function calls in a MERGE predicate, so update_when uses the loose form.
    """
    cleared = f" AND (t.nulled_fields IS NULL OR NOT array_contains(t.nulled_fields, '{field}'))" if strict else ""
    return f"(s.`{field}` IS NOT NULL AND t.`{field}` IS NULL{cleared})"


@dataclass(frozen=True)
class Merging:
    """How rows of one key combine: within a batch (`combine`) and with the stored row (`update`)."""

    key: str
    identity: tuple[str, ...]  # never change once stored
    fields: tuple[str, ...]  # by `fields_version`: sent wins, HL7 empty keeps, nulled clears; older fills gaps
    groups: tuple[tuple[str, tuple[str, ...]], ...]  # (version column, the columns the newest version brings)
    later: tuple[str, ...] = ("deleted_at",)  # the greatest value wins
    fields_version: str = "source_version"

    def _agg(self, name: str) -> Column:
        """The in-batch aggregate of one column (quarantine rows pass through: one row per quarantine id)."""
        if name in self.fields:
            sent = F.col(name).isNotNull() | F.array_contains("nulled_fields", name)
            return F.max_by(F.struct(F.col(name).alias("v"), F.col(name).isNull().alias("cleared")),
                            F.when(sent, F.col(self.fields_version))).alias(name)
        for version, cols in self.groups:
            if name == version:
                return F.max(name).alias(name)
            if name in cols:
                return F.max_by(name, version).alias(name)
        if name in self.later or name == "ingested_at":
            return F.max(name).alias(name)
        return F.first(name, ignorenulls=True).alias(name)

    def combine(self, routed: DataFrame) -> DataFrame:
        """One row per key (and per quarantine id), columns folded by the rules `update` applies."""
        names = [c for c in routed.columns if c != "nulled_fields"]
        group = F.coalesce(F.col(self.key), F.col("quarantine_id")).alias("_group")
        folded = routed.groupBy(group).agg(*(self._agg(c) for c in names if c != self.key),
                                            F.first(self.key, ignorenulls=True).alias(self.key))
        cleared = F.array_compact(F.array(*(F.when(F.col(f"{f}.cleared"), F.lit(f)) for f in self.fields)))
        out = {c: F.col(f"{c}.v") if c in self.fields else F.col(c) for c in names}
        out["nulled_fields"] = F.when(F.col(OUTPUT) != F.lit(QUARANTINE), cleared)
        return folded.select(*(out[c].alias(c) for c in routed.columns))

    def update(self, schema: StructType) -> dict[str, str]:
        """MERGE update expressions for every non-key column of `schema`."""
        fields_newer = _newer(self.fields_version)
        out = {}
        for f in schema.fields:
            c = f"`{f.name}`"
            if f.name == self.key:
                continue
            if f.name in self.identity:
                out[f.name] = f"COALESCE(t.{c}, s.{c})"
            elif f.name in self.fields:
                out[f.name] = (f"CASE WHEN {fields_newer} AND s.{c} IS NOT NULL THEN s.{c} WHEN {fields_newer} AND "
                               f"array_contains(s.nulled_fields, '{f.name}') THEN NULL "
                               f"WHEN {_fills(f.name)} THEN s.{c} ELSE t.{c} END")
            elif f.name in self.later:
                out[f.name] = f"CASE WHEN {_newer(f.name)} THEN s.{c} ELSE t.{c} END"
            elif f.name == "ingested_at":
                out[f.name] = f"CASE WHEN {self._changes(strict=True)} THEN s.{c} ELSE t.{c} END"
            else:
                version = next(v for v, cols in self.groups if f.name == v or f.name in cols)
                out[f.name] = f"CASE WHEN {_newer(version)} THEN s.{c} ELSE t.{c} END"
        return out

    def _changes(self, strict: bool) -> str:
        """SQL: some group of the incoming row is newer, or it fills a field the stored row lacks."""
        return " OR ".join([*(_newer(c) for c in (*(v for v, _ in self.groups), *self.later)),
                            *(_fills(c, strict) for c in self.fields)])

    @property
    def update_when(self) -> str:
        """Matched rows are rewritten only when they may change (a replay leaves them as they are)."""
        return self._changes(strict=False)

MERGING = Merging(
    key="patient_key",
    identity=("identity_kind", "source_system", "mrn", "fhir_reference"),
    fields=DEMOGRAPHICS,
    groups=(("source_version", ("nulled_fields", "source_feed", "updated_at", "source_record", "received_at")),
            ("link_version", ("merged_into", "link_record"))),
)
UPDATE = MERGING.update(SCHEMA)
UPDATE_WHEN = MERGING.update_when


# -- HL7 v2 ---------------------------------------------------------------------------------------
_HL7_FIELDS = {"family_name": "family_name", "given_name": "given_name", "birth_date": "birth_date", "sex": "sex",
               "address_line": "address_line", "address_city": "city", "address_state": "state",
               "address_postal_code": "postal_code", "address_country": "country", "phone": "phone",
               "deceased": "deceased", "deceased_at": "deceased_at"}


def mrn_identity(p: Params, system: str | None, mrn: str) -> dict[str, Any]:
    """Key and identity columns of an MRN."""
    canonical = p.canonical(system)
    return {"patient_key": identity_key(p.secret, PATIENT, canonical, mrn), "identity_kind": PATIENT,
            "source_system": canonical, "mrn": mrn}


def _joined(*parts: Any, sep: str = " ") -> str | None:
    return sep.join(x for x in parts if x) or None


def _hl7(out: EntityRows, src: dict, payload: bytes, tz: tzinfo) -> None:
    try:
        message = hl7_parse.extract(payload, default_tz=tz)
    except hl7_parse.Hl7ParseError:
        return  # silver.observations quarantines unreadable messages
    version, at = hl7_version(message.header, "ADT")
    for pid in message.patients:
        _hl7_pid(out, src, pid, version, at)
    for merge in message.merges:
        if merge["surviving_mrn"]:
            _hl7_merge(out, src, merge, version)


def _hl7_pid(out: EntityRows, src: dict, pid: dict, version: str, at: datetime | None) -> None:
    if not pid["mrn"]:
        out.quarantine(src, f"PID[{pid['record_index']}]", "missing_patient_id", "PID-3 holds no patient identifier")
        return
    values = {col: pid[key] for key, col in _HL7_FIELDS.items()}
    values["given_name"] = _joined(pid["given_name"], pid["middle_name"])
    values["address_line"] = _joined(pid["address_line"], pid["address_line2"], sep=", ")
    cleared = [col for key, col in _HL7_FIELDS.items() if key in pid["nulled"]]
    out.entity(src, {**mrn_identity(out.p, pid["source_system"], pid["mrn"]), **values, "nulled_fields": cleared,
                     "source_feed": "hl7", "source_version": version, "updated_at": at,
                     "source_record": lineage(src), "received_at": src["received_at"]})


def _hl7_merge(out: EntityRows, src: dict, merge: dict, version: str) -> None:
    """A40 and friends: the prior MRN continues as the surviving one."""
    surviving = mrn_identity(out.p, merge["surviving_source_system"], merge["surviving_mrn"])["patient_key"]
    prior = mrn_identity(out.p, merge["prior_source_system"], merge["prior_mrn"])
    if prior["patient_key"] != surviving:
        out.entity(src, {**prior, **link(surviving, version, src)})


def link(target: str, version: str, src: dict) -> dict[str, Any]:
    """The link columns of a row whose identity continues as `target`."""
    return {"merged_into": target, "link_version": version, "link_record": lineage(src)}


# -- FHIR R4 --------------------------------------------------------------------------------------
def fhir_identity(p: Params, system: str | None, value: str | None, reference: str | None) -> dict[str, Any] | None:
    """Key and identity columns of a FHIR patient identity: by identifier when it has one, else by reference."""
    if value:
        return mrn_identity(p, system, value)
    ref = reference_identity(reference)
    if ref is None:
        return None
    kind, ref_value = ref
    reference_text = ref_value if kind == FHIR_FULLURL else f"Patient/{ref_value}"
    return {"patient_key": identity_key(p.secret, kind, None, ref_value), "identity_kind": kind,
            "fhir_reference": reference_text}


def _fhir(out: EntityRows, src: dict, payload: bytes, tz: tzinfo) -> None:
    if src.get("resource_type") != "Patient":
        return
    if src.get("request_method") == "DELETE":
        identity = fhir_identity(out.p, None, None, f"Patient/{src['resource_id']}")
        if identity:
            out.entity(src, {**identity, "deleted_at": src["received_at"]})
        return
    extracted = fhir_resource(out, src, payload, tz)
    if extracted is None:
        return
    for patient in extracted.patients:
        _fhir_patient(out, src, patient, extracted.merges)


def _fhir_patient(out: EntityRows, src: dict, patient: dict, merges: list[dict]) -> None:
    p = out.p
    version, at = fhir_version(patient, src["received_at"])
    resource_id = patient["id"] or src.get("resource_id")
    self_ref = fhir_identity(p, None, None, f"Patient/{resource_id}") if resource_id else None
    person = fhir_identity(p, patient["source_system"], patient["mrn"], None) or self_ref
    if person is None:
        out.quarantine(src, "Patient", "missing_patient_id", "Patient has neither an identifier nor an id")
        return
    values = {"family_name": patient["family"], "given_name": _joined(*patient["given"]),
              "birth_date": patient["birth_date"], "sex": patient["gender"],
              "address_line": _joined(*patient["address_lines"], sep=", "), "city": patient["city"],
              "state": patient["state"], "postal_code": patient["postal_code"], "country": patient["country"],
              "phone": patient["phone"], "deceased": patient["deceased"], "deceased_at": patient["deceased_at"]}
    replaced = _fhir_links(out, src, person, merges, version)
    out.entity(src, {**person, **values, "nulled_fields": nulled(values, DEMOGRAPHICS), "source_feed": "fhir",
                     "source_version": version, "updated_at": at, "source_record": lineage(src),
                     "received_at": src["received_at"], **(replaced or {})})
    full_url = src.get("full_url") or ""
    bundle_ref = fhir_identity(p, None, None, full_url) if full_url.startswith("urn:") else None
    for alias in (self_ref, bundle_ref):
        if alias and alias["patient_key"] != person["patient_key"]:
            out.entity(src, {**alias, **link(person["patient_key"], version, src)})


def _fhir_links(out: EntityRows, src: dict, person: dict, merges: list[dict], version: str) -> dict | None:
    """Rows for identities this Patient `replaces`; the link columns of the Patient itself when `replaced-by`."""
    own = None
    for m in merges:
        surviving = fhir_identity(out.p, m["surviving_identifier_system"], m["surviving_identifier_value"],
                                  m["surviving_reference"])
        prior = fhir_identity(out.p, m["prior_identifier_system"], m["prior_identifier_value"], m["prior_reference"])
        if surviving is None or prior is None or surviving["patient_key"] == prior["patient_key"]:
            continue
        if m["link_type"] == "replaced-by":
            own = link(surviving["patient_key"], version, src)
        else:
            out.entity(src, {**prior, **link(surviving["patient_key"], version, src)})
    return own


# -- the job's transform and key resolution -------------------------------------------------------
def patients(changes: DataFrame, *, processed_at: datetime, secret: str, timezone: str, mrn_system: str,
             system_aliases: tuple[tuple[str, str], ...], fhir_validation: str) -> DataFrame:
    """HL7 and FHIR bronze changes -> one row per patient identity (routed with its quarantine rows)."""
    p = Params(secret, timezone, mrn_system, system_aliases, fhir_validation, PATIENTS)
    return MERGING.combine(parsed_rows(changes, p, processed_at, ROUTED, _hl7, _fhir))


def resolved(identities: DataFrame, key: str = "patient_key", max_hops: int = 8) -> DataFrame:
    """(key, resolved_key): every identity with the identity its `merged_into` chain ends at (cycles stop)."""
    links = identities.select(F.col(key).alias("_from"), F.col("merged_into").alias("_to"))
    current = links.select(F.col("_from").alias(key), F.coalesce("_to", "_from").alias("resolved_key"))
    for _ in range(max_hops):
        step = current.join(links, current["resolved_key"] == links["_from"], "left")
        current = step.select(key, F.coalesce("_to", "resolved_key").alias("resolved_key"))
    return current
