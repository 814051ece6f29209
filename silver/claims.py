"""silver.claims, silver.claim_lines, silver.providers, silver.members: every claims format in one model.

One job reads bronze.claim_files' new files, reads each with its format's reader (X12 837/835: silver.x12_claims;
FHIR Claim/ExplanationOfBenefit/Coverage: silver.fhir_claims; CMS RIF and the simulator's CSV: silver.rif_claims)
into silver.claim_docs objects, then checks, keys and routes them here, once for all formats:

- keys: `claim_key` is the keyed hash (silver.identity) of who billed the claim and the claim's own id (CLM01, the
  FHIR identifier, CMS CLM_ID), so an 837 replacement, a void and the 835 remittance of the claim all land on one
  row; `member_key` of the payer and member id (a dependent adds name and birth date); `patient_key` links a member
  to silver.patients when the claim carries the hospital's MRN (837 REF*EA, the simulator's patient_mrn) or a FHIR
  Patient reference. Providers are keyed by NPI (public), else by the sender's id.
- versions: `claim_version` = creation time | frequency rank (original < replacement < void) | control numbers.
  Per column the newest version that sent a value wins (in the batch and in the MERGE), and a value is never blanked
  by a document that does not carry it: an 835 adds paid and allowed amounts to its 837 claim, a replacement (CLM05-3
  = 7) overwrites what it restates, a void (8) marks the claim `status = 'void'`. A replacement or void also marks
  every line number it does not restate `line_status = 'removed'` (up to the format's line limit: 50 for 837P, 999
  for 837I), and these rows stay, so an older version resent later cannot bring a withdrawn line back: a replaced
  claim counts once, and its current lines are those not removed.
- checks: the billing NPI must pass the Luhn check (else the claim is quarantined, claim_bad_npi, as a payer's
  front end rejects it); another role's bad NPI is dropped and quarantined as a part; diagnoses must be shaped like
  ICD-10-CM (or ICD-9-CM in files that say so), procedure codes like CPT/HCPCS, NDCs like an NDC (silver.claim_codes).
  42 CFR Part 2 claims are flagged `part2`.
"""

from __future__ import annotations

import contextlib
import gc
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, tzinfo
from typing import Any
from zoneinfo import ZoneInfo

import pyarrow as pa
from pyspark.sql import DataFrame
from pyspark.sql.pandas.types import to_arrow_schema
from pyspark.sql.types import (
    ArrayType,
    BooleanType,
    DateType,
    DecimalType,
    DoubleType,
    IntegerType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

from silver import claim_codes as codes
from silver.claim_docs import ClaimDoc, Enrollment, Line, Member, Party, Problem
from silver.identity import PATIENT, identity_key, reference_identity
from silver.quarantine import QUARANTINE
from silver.routing import OUTPUT, SOURCE_RECORD, Params, RoutedRows, iso, lineage, routed_schema

CLAIMS, CLAIM_LINES, PROVIDERS, MEMBERS = "silver.claims", "silver.claim_lines", "silver.providers", "silver.members"
BRONZE = "bronze.claim_files"
CLAIM, MEMBER = "claim", "member"
REMOVED, VOID, ACTIVE = "removed", "void", "active"
UNRECOGNIZED = "claims_unrecognized_format"
NO_SERVICE_CODE = "claim_line_no_service_code"
_FREQUENCY_RANK = {"8": 3, "7": 2}
MONEY = DecimalType(14, 2)

SCHEMA = StructType([
    StructField("claim_key", StringType(), False),
    StructField("claim_id", StringType(), True),  # the submitter's claim id (837 CLM01, FHIR identifier, CLM_ID)
    StructField("payer_claim_id", StringType(), True),  # the payer's control number (REF*F8, CLP07, FI_DOC_CLM_CNTL)
    StructField("source_format", StringType(), True),  # of the newest version: x12-837P, fhir-Claim, rif-carrier ...
    StructField("claim_type", StringType(), True),  # professional | institutional | pharmacy
    StructField("setting", StringType(), True),  # inpatient, outpatient, snf, hha, hospice, carrier, dme, pde
    StructField("status", StringType(), True),  # active | void; null: known only from a remittance so far
    StructField("adjudication_status", StringType(), True),  # paid | denied | reversed | pended (835, EOB)
    StructField("frequency_code", StringType(), True),  # 1 original, 7 replacement, 8 void
    StructField("payer_id", StringType(), True),
    StructField("payer_name", StringType(), True),
    StructField("billing_provider_key", StringType(), True),
    StructField("billing_npi", StringType(), True),
    StructField("rendering_npi", StringType(), True),
    StructField("attending_npi", StringType(), True),
    StructField("member_key", StringType(), True),
    StructField("patient_key", StringType(), True),  # silver.patients' key of the member, when identifiers allow
    StructField("bill_type", StringType(), True),
    StructField("place_of_service", StringType(), True),
    StructField("service_from", DateType(), True),
    StructField("service_to", DateType(), True),
    StructField("admitted_on", DateType(), True),
    StructField("discharged_on", DateType(), True),
    StructField("discharge_status", StringType(), True),
    StructField("drg", StringType(), True),
    StructField("diagnoses", ArrayType(StringType()), True),  # principal first
    StructField("diagnosis_system", StringType(), True),  # ICD-10-CM | ICD-9-CM
    StructField("procedures", ArrayType(StringType()), True),  # ICD-10-PCS (institutional)
    StructField("billed_amount", MONEY, True),
    StructField("allowed_amount", MONEY, True),
    StructField("paid_amount", MONEY, True),
    StructField("line_count", IntegerType(), True),
    StructField("part2", BooleanType(), True),  # 42 CFR Part 2 (substance-use disorder treatment)
    StructField("claim_version", StringType(), False),  # created time | frequency rank | control numbers
    StructField("source_feed", StringType(), True),
    StructField("source_record", SOURCE_RECORD, True),  # the bronze file of the newest version
    StructField("received_at", TimestampType(), True),
    StructField("ingested_at", TimestampType(), False),
])

LINES_SCHEMA = StructType([
    StructField("claim_key", StringType(), False),
    StructField("line_number", IntegerType(), False),
    StructField("line_status", StringType(), True),  # active | void | removed (withdrawn by a replacement or void);
    # null: known only from a remittance
    StructField("procedure_code", StringType(), True),
    StructField("procedure_system", StringType(), True),  # CPT/HCPCS, HCPCS, ...
    StructField("modifiers", ArrayType(StringType()), True),
    StructField("revenue_code", StringType(), True),
    StructField("ndc", StringType(), True),  # 11-digit billing form
    StructField("units", DoubleType(), True),
    StructField("unit_type", StringType(), True),  # UN units, MJ minutes
    StructField("service_from", DateType(), True),
    StructField("service_to", DateType(), True),
    StructField("diagnoses", ArrayType(StringType()), True),  # by the line's pointers into the claim's diagnoses
    StructField("billed_amount", MONEY, True),
    StructField("allowed_amount", MONEY, True),
    StructField("paid_amount", MONEY, True),
    StructField("rendering_npi", StringType(), True),
    StructField("place_of_service", StringType(), True),
    StructField("claim_version", StringType(), False),
    StructField("source_format", StringType(), True),
    StructField("source_record", SOURCE_RECORD, True),
    StructField("ingested_at", TimestampType(), False),
])

PROVIDERS_SCHEMA = StructType([
    StructField("provider_key", StringType(), False),  # the NPI, else "<sender scope>:<id>"
    StructField("npi", StringType(), True),
    StructField("other_id", StringType(), True),
    StructField("name", StringType(), True),
    StructField("entity", StringType(), True),  # person | organization
    StructField("taxonomy", StringType(), True),
    StructField("city", StringType(), True),
    StructField("state", StringType(), True),
    StructField("postal_code", StringType(), True),
    StructField("role", StringType(), True),  # billing, rendering, attending, ... in the newest claim naming it
    StructField("source_version", StringType(), False),
    StructField("source_record", SOURCE_RECORD, True),
    StructField("ingested_at", TimestampType(), False),
])

MEMBERS_SCHEMA = StructType([
    StructField("member_key", StringType(), False),
    StructField("member_system", StringType(), True),  # who issued member_id: payer id, CMS-BENE_ID, ...
    StructField("member_id", StringType(), True),  # direct identifier: silver only
    StructField("relationship", StringType(), True),  # self | dependent
    StructField("family_name", StringType(), True),
    StructField("given_name", StringType(), True),
    StructField("birth_date", DateType(), True),
    StructField("sex", StringType(), True),
    StructField("postal_code", StringType(), True),
    StructField("state", StringType(), True),
    StructField("death_date", DateType(), True),
    StructField("payer_name", StringType(), True),
    StructField("patient_key", StringType(), True),
    StructField("source_version", StringType(), False),
    StructField("source_record", SOURCE_RECORD, True),
    StructField("ingested_at", TimestampType(), False),
])

_TABLES = {CLAIMS: (SCHEMA, ("claim_key",), "claim_version"),
           CLAIM_LINES: (LINES_SCHEMA, ("claim_key", "line_number"), "claim_version"),
           PROVIDERS: (PROVIDERS_SCHEMA, ("provider_key",), "source_version"),
           MEMBERS: (MEMBERS_SCHEMA, ("member_key",), "source_version")}
_GROUP, _VERSION = "_group", "_version"
FLUSH_ROWS = 20_000  # routed rows a Python worker holds before it hands them to Spark as one Arrow batch
ROUTED = StructType([*routed_schema(StructType([
    *{f.name: f for s in (SCHEMA, LINES_SCHEMA, PROVIDERS_SCHEMA, MEMBERS_SCHEMA) for f in s.fields}.values()])).fields,
    StructField(_GROUP, StringType(), True), StructField(_VERSION, StringType(), True)])


@dataclass(frozen=True)
class Settings:
    """What the claims job takes from configuration besides the silver parameters."""

    x12_versions: tuple[str, ...]
    x12_validation: str
    part2: codes.Part2Codes


class ClaimRows(RoutedRows):
    """The routed rows of one Arrow batch: the four claims tables and silver.quarantine."""

    def __init__(self, p: Params, processed_at: datetime, schema: pa.Schema):
        super().__init__(p, processed_at)
        self.schema = schema
        self.current_lineage: dict[str, Any] | None = None  # the bronze file being read
        self.parties: dict[str, dict[str, Any]] = {}  # providers and members of the batch, by key, folded

    def add(self, table: str, row: dict[str, Any], version: str) -> None:
        key = "|".join(str(row[k]) for k in _TABLES[table][1])
        full = {OUTPUT: table, **row, _GROUP: f"{table}|{key}", _VERSION: version, "ingested_at": self.processed_at}
        if table not in (PROVIDERS, MEMBERS):
            self.rows.append(full)
            return
        # Every claim names its providers and member again: fold them here, so a batch carries one row for each.
        seen = self.parties.get(full[_GROUP])
        if seen is None:
            self.parties[full[_GROUP]] = full
        elif version >= seen[_VERSION]:
            self.parties[full[_GROUP]] = fold_rows([seen, full])
        else:
            self.parties[full[_GROUP]] = fold_rows([full, seen])

    def problem(self, src: dict[str, Any], problem: Problem) -> None:
        self.quarantine(src, problem.item, problem.reason, problem.detail)
        self.rows[-1].update({_GROUP: f"{QUARANTINE}|{self.rows[-1]['quarantine_id']}", _VERSION: ""})

    def take(self, final: bool = False) -> pa.RecordBatch:
        """The rows so far as an Arrow batch, and a fresh start (the folded providers and members only when final):
        a partition's rows never pile up as Python objects, whose garbage collection would grow with them."""
        rows, self.rows = self.rows, []
        if final:
            rows, self.parties = [*rows, *self.parties.values()], {}
        return self._arrow(rows)

    def batch(self) -> pa.RecordBatch:
        return self._arrow([*self.rows, *self.parties.values()])

    def _arrow(self, rows: list[dict[str, Any]]) -> pa.RecordBatch:
        """Rows as one Arrow batch, built per output table from that table's columns only (a row of one table
        leaves most routed columns null; converting them one by one costs more than the parse)."""
        by_table: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            by_table.setdefault(row[OUTPUT], []).append(row)
        parts = [self._part(rows) for rows in by_table.values()]
        table = pa.concat_tables(parts) if parts else self.schema.empty_table()
        return table.combine_chunks().to_batches()[0] if table.num_rows else pa.RecordBatch.from_pylist([], self.schema)

    def _part(self, rows: list[dict[str, Any]]) -> pa.Table:
        present = set().union(*(row.keys() for row in rows))
        names = [n for n in self.schema.names if n in present]
        narrow = pa.Table.from_pylist(rows, schema=pa.schema([self.schema.field(n) for n in names]))
        arrays = [narrow[f.name] if f.name in present else pa.nulls(len(rows), f.type) for f in self.schema]
        return pa.Table.from_arrays(arrays, schema=self.schema)


def claim_version(doc: ClaimDoc, tz: tzinfo) -> str:
    at = doc.version_at.replace(tzinfo=tz) if doc.version_at and doc.version_at.tzinfo is None else doc.version_at
    rank = 0 if doc.status is None else _FREQUENCY_RANK.get(doc.frequency_code or "", 1)
    return f"{iso(at)}|{rank}|{doc.version_tiebreak}"


def _party_id(party: Party, scope: str) -> str | None:
    return party.npi or (f"{scope}:{party.other_id}" if party.other_id else None)


def claim_key(secret: str, doc: ClaimDoc) -> str:
    """The claim's key: its id within the CMS scope, or within its billing provider (NPI, else the sender's id)."""
    scope = doc.key_scope or _party_id(doc.billing, doc.source_format.split("-")[0])
    return identity_key(secret, CLAIM, scope, doc.claim_id)


def member_key(secret: str, m: Member) -> str:
    ident = m.member_id
    if m.relationship == "dependent":
        ident = "|".join((m.member_id, "dependent", m.family_name or "", m.given_name or "", iso_date(m.birth_date)))
    return identity_key(secret, MEMBER, m.system, ident)


def iso_date(d: date | None) -> str:
    return d.isoformat() if d else ""


def patient_key(p: Params, m: Member) -> str | None:
    """silver.patients' key for the member: the hospital MRN, else the FHIR Patient reference."""
    if m.mrn:
        return identity_key(p.secret, PATIENT, p.mrn_system, m.mrn)
    ref = reference_identity(m.fhir_patient)
    return identity_key(p.secret, ref[0], None, ref[1]) if ref else None


def _checked_npi(out: ClaimRows, src: dict, item: str, role: str, npi: str | None) -> str | None:
    """The NPI when it passes the Luhn check; else None, with the part quarantined."""
    if npi is None or codes.npi_valid(npi):
        return npi
    out.problem(src, Problem(f"{item}/{role} NPI", codes.BAD_NPI,
                             f"{role} NPI {npi!r} is not 10 digits with a valid Luhn check digit (prefix 80840); "
                             "the sender must correct it"))
    return None


_ICD9 = re.compile(r"^(?:[0-9]{3,5}|V[0-9]{2,4}|E[0-9]{3,4})$")


def _diagnosis(system: str, code: str) -> str | None:
    if system == "ICD-9-CM":
        bare = code.replace(".", "").upper()
        return bare if _ICD9.match(bare) else None
    return codes.icd10(code)


def _diagnoses(out: ClaimRows, src: dict, doc: ClaimDoc) -> list[str | None]:
    """The claim's diagnoses in their positions (pointers count on them); a badly shaped one is None, quarantined."""
    checked = []
    for n, code in enumerate(doc.diagnoses, start=1):
        good = _diagnosis(doc.diagnosis_system, code)
        if good is None:
            out.problem(src, Problem(f"{doc.item}/diagnosis {n}", codes.BAD_DIAGNOSIS,
                                     f"{code!r} is not shaped like an {doc.diagnosis_system} code"))
        checked.append(good)
    return checked


def emit(out: ClaimRows, src: dict, doc: ClaimDoc, s: Settings, tz: tzinfo) -> None:
    """One claim document: its claim row, lines, providers, member (and quarantine rows for what fails).

    A submitted claim whose billing NPI fails the Luhn check is quarantined whole (a payer rejects it at the front
    end); an adjudicated record (RIF, EOB) keeps the claim and loses only the bad NPI (quarantined as a part)."""
    scope = doc.key_scope or doc.source_format.split("-")[0]
    if doc.billing.npi is not None and not codes.npi_valid(doc.billing.npi):
        if not doc.adjudicated:
            out.problem(src, Problem(doc.item, codes.BAD_NPI,
                                     f"billing NPI {doc.billing.npi!r} is not 10 digits with a valid Luhn check digit "
                                     "(prefix 80840): the claim cannot be paid; the sender must correct and resend it"))
            return
        doc.billing.npi = _checked_npi(out, src, doc.item, "billing", doc.billing.npi)
    billing_id = _party_id(doc.billing, scope)
    if not (doc.key_scope or billing_id):
        out.problem(src, Problem(doc.item, codes.BAD_NPI, "the billing provider has no usable NPI or other id, so "
                                                          "the claim cannot be keyed; the sender must correct it"))
        return
    key = claim_key(out.p.secret, doc)
    version = claim_version(doc, tz)
    diagnoses = _diagnoses(out, src, doc)
    roles = {p.role: _checked_npi(out, src, doc.item, p.role, p.npi) for p in reversed(doc.parties)}
    member = _member(out, src, doc.member, version)
    lines = [_line(out, src, doc, ln, key, version, diagnoses) for ln in doc.lines]
    _tombstones(out, doc, key, version, {ln.number for ln in doc.lines})
    procedures = [ln.procedure_code for ln in doc.lines if ln.procedure_code]
    part2 = s.part2.flags([d for d in diagnoses if d], procedures, doc.drg)
    row = {**_claim_row(doc, key, billing_id, version, diagnoses), "member_key": member,
           "patient_key": patient_key(out.p, doc.member) if doc.member else None,
           "rendering_npi": roles.get("rendering"), "attending_npi": roles.get("attending"),
           "line_count": (lines.count(True) or None) if doc.status is not None else None,
           # a remittance only ever adds the flag (its codes are a subset of the claim's)
           "part2": part2 if doc.status is not None else (part2 or None),
           "source_feed": src["feed"], "source_record": lineage(src), "received_at": src["received_at"]}
    out.add(CLAIMS, row, version)
    for party in [doc.billing, *doc.parties]:
        _provider(out, src, party, scope, version)


def _claim_row(doc: ClaimDoc, key: str, billing_id: str | None, version: str, diagnoses: list[str | None]
               ) -> dict[str, Any]:
    """The claim's own columns, as the document states them."""
    return {
        "claim_key": key, "claim_id": doc.claim_id, "payer_claim_id": doc.payer_claim_id,
        "source_format": doc.source_format, "claim_type": doc.claim_type, "setting": doc.setting,
        "status": doc.status, "adjudication_status": doc.adjudication_status, "frequency_code": doc.frequency_code,
        "payer_id": doc.payer_id, "payer_name": doc.payer_name, "billing_provider_key": billing_id,
        "billing_npi": doc.billing.npi, "bill_type": doc.bill_type, "place_of_service": doc.place_of_service,
        "service_from": doc.service_from, "service_to": doc.service_to, "admitted_on": doc.admitted_on,
        "discharged_on": doc.discharged_on, "discharge_status": doc.discharge_status, "drg": doc.drg,
        "diagnoses": [d for d in diagnoses if d] or None,
        "diagnosis_system": doc.diagnosis_system if diagnoses else None, "procedures": doc.procedures or None,
        "billed_amount": doc.billed, "allowed_amount": doc.allowed, "paid_amount": doc.paid, "claim_version": version}


def enrollment(out: ClaimRows, src: dict, doc: Enrollment, tz: tzinfo) -> None:
    """A member without a claim (RIF beneficiary, FHIR Coverage)."""
    at = doc.version_at.replace(tzinfo=tz) if doc.version_at and doc.version_at.tzinfo is None else doc.version_at
    _member(out, src, doc.member, f"{iso(at)}|1|{doc.version_tiebreak}")


def _member(out: ClaimRows, src: dict, m: Member | None, version: str) -> str | None:
    if m is None or not m.member_id:
        return None
    key = member_key(out.p.secret, m)
    out.add(MEMBERS, {"member_key": key, "member_system": m.system, "member_id": m.member_id,
                      "relationship": m.relationship, "family_name": m.family_name, "given_name": m.given_name,
                      "birth_date": m.birth_date, "sex": m.sex, "postal_code": m.postal_code, "state": m.state,
                      "death_date": m.death_date, "payer_name": m.payer_name, "patient_key": patient_key(out.p, m),
                      "source_version": version, "source_record": lineage(src)}, version)
    return key


def _provider(out: ClaimRows, src: dict, party: Party, scope: str, version: str) -> None:
    if party.npi is not None and not codes.npi_valid(party.npi):
        return  # quarantined with its claim (billing) or as a part (_checked_npi)
    key = _party_id(party, scope)
    if key is None:
        return
    out.add(PROVIDERS, {"provider_key": key, "npi": party.npi, "other_id": party.other_id, "name": party.name,
                        "entity": party.entity, "taxonomy": party.taxonomy, "city": party.city, "state": party.state,
                        "postal_code": party.postal_code, "role": party.role, "source_version": version,
                        "source_record": lineage(src)}, version)


def _line(out: ClaimRows, src: dict, doc: ClaimDoc, ln: Line, key: str, version: str,
          diagnoses: list[str | None]) -> bool:
    """One service line (True), or a quarantined one (False)."""
    item = f"{doc.item}/line {ln.number}"
    if ln.procedure_code is not None and not codes.procedure_valid(ln.procedure_code):
        out.problem(src, Problem(item, codes.BAD_PROCEDURE, f"{ln.procedure_code!r} is not shaped like a CPT (5 "
                                                           "characters) or HCPCS Level II (a letter, 4 digits) code"))
        return False
    if ln.procedure_code is None and ln.revenue_code is None and ln.ndc is None and not doc.adjudicated:
        sent = f" (sent {ln.procedure_sent!r})" if ln.procedure_sent else ""
        out.problem(src, Problem(item, NO_SERVICE_CODE, f"the line names no procedure, revenue code or NDC{sent}; "
                                                        "a composite needs its qualifier, the ISA16 separator and the "
                                                        "code (HC:99213)"))
        return False
    if ln.procedure_code is None and ln.procedure_sent:  # an adjudicated line: kept, its unreadable code set aside
        out.problem(src, Problem(f"{item}/procedure", codes.BAD_PROCEDURE,
                                 f"{ln.procedure_sent!r} is not a procedure composite (qualifier, the ISA16 component "
                                 "separator, code: HC:99213)"))
    ndc = codes.ndc11(ln.ndc)
    if ln.ndc and ndc is None and set(ln.ndc.strip()) != {"0"}:
        out.problem(src, Problem(f"{item}/NDC", codes.BAD_NDC, f"{ln.ndc!r} is not an NDC (11 digits, or 10 "
                                                               "written 4-4-2, 5-3-2 or 5-4-1)"))
    pointed = [diagnoses[p - 1] for p in ln.diagnosis_pointers if 0 < p <= len(diagnoses)]
    own = [c for c in (_diagnosis(doc.diagnosis_system, d) for d in ln.diagnoses) if c]
    out.add(CLAIM_LINES, {
        "claim_key": key, "line_number": ln.number, "line_status": VOID if doc.status == VOID else ln.status,
        "procedure_code": ln.procedure_code, "procedure_system": ln.procedure_system,
        "modifiers": ln.modifiers or None, "revenue_code": ln.revenue_code, "ndc": ndc, "units": ln.units,
        "unit_type": ln.unit_type, "service_from": ln.service_from, "service_to": ln.service_to,
        "diagnoses": [d for d in [*pointed, *own] if d] or None, "billed_amount": ln.billed,
        "allowed_amount": ln.allowed, "paid_amount": ln.paid,
        "rendering_npi": ln.rendering_npi if codes.npi_valid(ln.rendering_npi) else None,
        "place_of_service": ln.place_of_service or doc.place_of_service, "claim_version": version,
        "source_format": doc.source_format, "source_record": out.current_lineage}, version)
    return True


def _tombstones(out: ClaimRows, doc: ClaimDoc, key: str, version: str, kept: set[int]) -> None:
    """A replacement or void: every line number it does not restate, up to the format's limit, is marked removed."""
    for n in range(1, doc.max_lines + 1):
        if n not in kept:
            out.add(CLAIM_LINES, {"claim_key": key, "line_number": n, "line_status": REMOVED, "claim_version": version,
                                  "source_format": doc.source_format, "source_record": out.current_lineage}, version)


def read_file(src: dict[str, Any], payload: bytes, s: Settings) -> Iterator[ClaimDoc | Problem]:
    """The documents of one bronze file, by the format bronze recognized."""
    from silver import fhir_claims, rif_claims, x12_claims

    fmt = src.get("format")
    if fmt == "x12":
        return x12_claims.read_x12(payload, versions=s.x12_versions, validation=s.x12_validation)
    if fmt == "fhir":
        return fhir_claims.read_fhir(payload)
    if fmt in ("rif", "csv"):
        return rif_claims.read_delimited(payload, fmt)
    return iter([Problem("file", UNRECOGNIZED, src.get("parse_detail") or "not X12, FHIR JSON, CMS RIF or a "
                                                                          "known CSV layout")])


def parsed(changes: DataFrame, p: Params, s: Settings, processed_at: datetime) -> DataFrame:
    """Inserted bronze.claim_files rows -> routed rows (one mapInArrow pass)."""
    inserted = changes.where("_change_type = 'insert'")
    cols = ["feed", "landing_file", "landing_position", "sha256", "payload", "received_at", "format",
            "parse_status", "parse_detail"]
    arrow_schema = to_arrow_schema(ROUTED)

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        tz = ZoneInfo(p.timezone)
        out = ClaimRows(p, processed_at, arrow_schema)
        for batch in batches:
            for n in range(batch.num_rows):  # one file at a time: its payload and rows are freed before the next
                src = batch.slice(n, 1).to_pylist()[0]
                src["table"] = BRONZE
                with _collector_paused():
                    _file(out, src, src.pop("payload"), s, tz)
                if len(out.rows) >= FLUSH_ROWS:
                    yield out.take()
        yield out.take(final=True)

    return inserted.select(*cols).mapInArrow(run, ROUTED)


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cycle collector off while one file is read: reading allocates a few objects per element, none in a
    cycle, and each full collection would walk every row the worker holds (a third of the reading time)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _file(out: ClaimRows, src: dict, payload: bytes, s: Settings, tz: tzinfo) -> None:
    out.current_lineage = lineage(src)
    if src["parse_status"] != "ok":
        out.problem(src, Problem("file", src["parse_status"], src.get("parse_detail") or ""))
        return
    for doc in read_file(src, payload, s):
        if isinstance(doc, Problem):
            out.problem(src, doc)
        elif isinstance(doc, Enrollment):
            enrollment(out, src, doc, tz)
        else:
            emit(out, src, doc, s, tz)


def fold_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Rows of one key, oldest version first -> one row: per column the value of the newest version that sent one."""
    out = dict(rows[0])
    for row in rows[1:]:
        out.update({k: v for k, v in row.items() if v is not None})
    return out


def fold_table(table: pa.Table) -> pa.Table:
    """One row per `_group` of an Arrow table; rows of a group that occurs once pass through untouched (the bulk),
    the others are folded by `fold_rows` in version order."""
    import pyarrow.compute as pc

    if table.num_rows == 0:
        return table
    counts = table.group_by(_GROUP).aggregate([(_GROUP, "count")])
    repeated = counts.filter(pc.greater(counts[f"{_GROUP}_count"], 1)).column(_GROUP)
    if len(repeated) == 0:
        return table
    dup = pc.is_in(table[_GROUP], value_set=repeated)
    single, multi = table.filter(pc.invert(dup)), table.filter(dup).sort_by([(_GROUP, "ascending"),
                                                                             (_VERSION, "ascending")])
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in multi.to_pylist():
        groups.setdefault(row[_GROUP], []).append(row)
    merged = pa.Table.from_pylist([fold_rows(rows) for rows in groups.values()], schema=table.schema)
    return pa.concat_tables([single, merged])


def folded(routed: DataFrame) -> DataFrame:
    """One row per table key (and per quarantine id): per column, the value of the newest version that sent one.

    The rows are hashed to partitions by key and folded there in Arrow: a key seen once (nearly every row) passes
    through, only repeated keys (a replacement beside its original, an 837 beside its 835) are folded in Python."""
    schema = routed.schema

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        table = pa.Table.from_batches(list(batches), schema=to_arrow_schema(schema))
        yield from fold_table(table).to_batches()

    return routed.repartition(_GROUP).mapInArrow(run, schema)


def claims(changes: DataFrame, *, processed_at: datetime, secret: str, timezone: str, mrn_system: str,
           system_aliases: tuple[tuple[str, str], ...], fhir_validation: str, x12_versions: tuple[str, ...],
           x12_validation: str, part2: codes.Part2Codes) -> DataFrame:
    """bronze.claim_files changes -> rows routed to the four claims tables and silver.quarantine, folded by key."""
    p = Params(secret, timezone, mrn_system, system_aliases, fhir_validation, CLAIMS)
    return folded(parsed(changes, p, Settings(x12_versions, x12_validation, part2), processed_at))


def newest_fills(schema: StructType, keys: tuple[str, ...], version: str) -> dict[str, str]:
    """MERGE update: the newer version's values, and what it leaves out kept from the stored row (never blanked)."""
    out = {}
    for f in schema.fields:
        if f.name in keys:
            continue
        c = f"`{f.name}`"
        if f.name == version:
            out[f.name] = f"greatest(s.{c}, t.{c})"
        else:
            out[f.name] = f"CASE WHEN s.`{version}` > t.`{version}` THEN coalesce(s.{c}, t.{c}) " \
                          f"ELSE coalesce(t.{c}, s.{c}) END"
    return out


def changed(schema: StructType, keys: tuple[str, ...], version: str) -> str:
    """MERGE update condition: a newer version, or an older one that fills a column the stored row lacks."""
    fills = " OR ".join(f"(t.`{f.name}` IS NULL AND s.`{f.name}` IS NOT NULL)" for f in schema.fields
                        if f.name not in keys and f.name != version)
    return f"s.`{version}` > t.`{version}` OR {fills}"
