"""What every claims format is read into before silver keys, checks and routes it: claims, lines, parties, members.

The readers (silver.x12_claims, silver.fhir_claims, silver.rif_claims) turn their format into these plain objects,
or into a `Problem` for a part they cannot use; silver.claims does the rest once for all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal, InvalidOperation


@dataclass
class Party:
    """A provider in one role on one claim (billing, rendering, attending, operating, referring, payee, ...)."""

    role: str
    npi: str | None = None
    other_id: str | None = None  # a CMS provider number (CCN), a legacy or payer-assigned id, when no NPI
    name: str | None = None
    entity: str | None = None  # person | organization
    taxonomy: str | None = None
    city: str | None = None
    state: str | None = None
    postal_code: str | None = None


@dataclass
class Member:
    """The person a claim is for, as the payer knows them (direct identifiers: they stay in silver)."""

    system: str  # who issued member_id: the payer id, CMS-BENE_ID, a FHIR server
    member_id: str
    family_name: str | None = None
    given_name: str | None = None
    birth_date: date | None = None
    sex: str | None = None  # male | female | unknown
    postal_code: str | None = None
    state: str | None = None
    death_date: date | None = None
    mrn: str | None = None  # the hospital's medical record number when the claim carries it (837 REF*EA)
    fhir_patient: str | None = None  # Patient/<id> or urn:uuid:..., for FHIR claims
    relationship: str | None = None  # self | dependent
    payer_name: str | None = None


@dataclass
class Line:
    number: int
    procedure_code: str | None = None
    procedure_system: str | None = None  # CPT/HCPCS (HC), HCPCS, ICD-10-PCS, NDC-only
    procedure_sent: str | None = None  # the procedure element as sent, for a quarantine detail when unreadable
    modifiers: list[str] = field(default_factory=list)
    revenue_code: str | None = None
    ndc: str | None = None  # as sent; silver normalizes to 11 digits
    units: float | None = None
    unit_type: str | None = None  # UN units, MJ minutes, ...
    service_from: date | None = None
    service_to: date | None = None
    diagnosis_pointers: list[int] = field(default_factory=list)  # 1-based into the claim's diagnoses
    diagnoses: list[str] = field(default_factory=list)  # explicit line diagnoses (RIF LINE_ICD_DGNS_CD)
    billed: Decimal | None = None
    allowed: Decimal | None = None
    paid: Decimal | None = None
    rendering_npi: str | None = None
    place_of_service: str | None = None
    status: str | None = "active"  # active | void; None on a remittance's line (it only adds amounts)


@dataclass
class ClaimDoc:
    """One claim (or one remittance of a claim) as a format states it."""

    item: str  # where in the document: e.g. "ISA 000000907/GS 1/ST 0021/CLM 26463774", "row 3"
    source_format: str  # x12-837P, x12-837I, x12-835, fhir-Claim, fhir-ExplanationOfBenefit, rif-carrier, csv-carelake
    claim_id: str
    billing: Party
    version_at: datetime | None  # when the document was created: orders versions of one claim
    version_tiebreak: str = ""  # the document's own control numbers, after the time
    payer_claim_id: str | None = None
    claim_type: str | None = None  # professional | institutional | pharmacy
    setting: str | None = None  # inpatient | outpatient | snf | hha | hospice | carrier | dme | pde
    frequency_code: str | None = None  # 1 original, 7 replacement, 8 void (CLM05-3 / bill type 3rd digit)
    status: str | None = "active"  # active | void; None for a remittance (it never changes the claim's status)
    adjudication_status: str | None = None  # paid | denied | reversed | pended (835 CLP02, EOB outcome)
    payer_id: str | None = None
    payer_name: str | None = None
    parties: list[Party] = field(default_factory=list)  # every other provider role
    member: Member | None = None
    bill_type: str | None = None
    place_of_service: str | None = None
    service_from: date | None = None
    service_to: date | None = None
    admitted_on: date | None = None
    discharged_on: date | None = None
    discharge_status: str | None = None
    drg: str | None = None
    diagnoses: list[str] = field(default_factory=list)  # principal first
    diagnosis_system: str = "ICD-10-CM"  # or ICD-9-CM (5010 files from before October 2015)
    procedures: list[str] = field(default_factory=list)  # ICD-10-PCS on institutional claims
    billed: Decimal | None = None
    allowed: Decimal | None = None
    paid: Decimal | None = None
    lines: list[Line] = field(default_factory=list)
    max_lines: int = 0  # a replacement or void removes the claim's earlier lines numbered up to this
    key_scope: str | None = None  # what claim_id is unique within, when not the billing provider (CMS-CLM_ID)
    adjudicated: bool = False  # a payer's record (RIF, EOB): a bad NPI is dropped, never the claim
    diagnosis_sequences: list[int] = field(default_factory=list)  # FHIR diagnosis.sequence of each diagnosis


@dataclass
class Enrollment:
    """A member as an enrollment record states them (RIF beneficiary, FHIR Coverage), without a claim."""

    item: str
    member: Member
    version_at: datetime | None
    version_tiebreak: str = ""


@dataclass(frozen=True)
class Problem:
    """A part of a document silver cannot use: where it is, a stable reason code, and what is wrong and the fix."""

    item: str
    reason: str
    detail: str


def money(text: str | None) -> Decimal | None:
    """An amount as sent ("100", "89.95", "-12.5"), cents exact; None when absent or not a number."""
    if text is None or not str(text).strip():
        return None
    try:
        value = Decimal(str(text).strip())
    except InvalidOperation:
        return None
    return value.quantize(Decimal("0.01")) if value.is_finite() else None


def number(text: str | None) -> float | None:
    if text is None or not str(text).strip():
        return None
    try:
        return float(text)
    except ValueError:
        return None


def ccyymmdd(text: str | None) -> date | None:
    """A CCYYMMDD date (X12 D8, RIF's compact form); None when absent or impossible."""
    if not text or len(text) != 8 or not text.isdigit():
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None
