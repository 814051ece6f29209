"""FHIR R4 Claim, ExplanationOfBenefit (incl. CMS Blue Button 2.0 / CARIN BB) and Coverage into claims and members.

A body is a resource, a Bundle of them (searchset, collection, transaction) or NDJSON. Claim is the bill as submitted;
ExplanationOfBenefit the payer's adjudication (an adjudicated record: a bad NPI is quarantined as a part, the claim
kept). A Blue Button EOB names its claim by the CMS CLM_ID (identifier system .../clm_id), so it meets the RIF rows
of the same claim; other claims are keyed by their first identifier (else the resource id) and billing NPI.
`status` cancelled or entered-in-error voids the claim. Coverage gives a member (subscriberId, payor).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import date, datetime
from typing import Any

from silver.claim_docs import ClaimDoc, Enrollment, Line, Member, Party, Problem, money, number
from silver.rif_claims import BENE, CMS_SCOPE

NOT_JSON = "fhir_invalid_json"
NOT_CLAIM = "fhir_not_a_claim_resource"
CLAIM_INCOMPLETE = "fhir_claim_incomplete"
NPI_SYSTEMS = ("http://hl7.org/fhir/sid/us-npi",)
_BB = "bluebutton.cms.gov"
_CLAIM_TYPES = {"professional", "institutional", "pharmacy", "oral", "vision"}
_VOID = {"cancelled", "entered-in-error"}
_ICD9 = "http://hl7.org/fhir/sid/icd-9-cm"
_PAID = ("paidtoprovider", "paidbypatient", "benefit", "payment")
_ROLE = {"performing": "rendering", "rendering": "rendering", "attending": "attending", "operating": "operating",
         "referring": "referring", "prescribing": "prescriber", "primary": "rendering", "otheroperating": "operating"}


def resources(payload: bytes) -> Iterator[tuple[str, dict | Problem]]:
    """(where, resource) for each resource of a body: one, a Bundle's entries, or NDJSON lines."""
    text = payload.decode("utf-8-sig", errors="replace")
    try:
        docs = [json.loads(text)]
    except ValueError:
        docs = []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    docs.append(json.loads(line))
                except ValueError as exc:
                    yield f"line {n}", Problem(f"line {n}", NOT_JSON, f"not JSON ({exc}); send one resource per line")
    for doc in docs:
        if isinstance(doc, dict) and doc.get("resourceType") == "Bundle":
            for i, entry in enumerate(doc.get("entry") or []):
                res = entry.get("resource") if isinstance(entry, dict) else None
                if isinstance(res, dict):
                    yield f"Bundle.entry[{i}]", res
        elif isinstance(doc, dict):
            yield "resource", doc
        else:
            yield "body", Problem("body", NOT_JSON, "a JSON value that is not a resource")


def read_fhir(payload: bytes) -> Iterator[ClaimDoc | Enrollment | Problem]:
    for where, res in resources(payload):
        if isinstance(res, Problem):
            yield res
            continue
        kind = res.get("resourceType")
        item = f"{where}/{kind}/{res.get('id')}"
        if kind in ("Claim", "ExplanationOfBenefit"):
            yield _claim(res, item)
        elif kind == "Coverage":
            yield _coverage(res, item)
        else:
            yield Problem(item, NOT_CLAIM, f"{kind} is not a claims resource; send it to the fhir feed "
                                           "(carelake ingest --feed fhir) where silver reads clinical resources")


def _codings(concept: Any) -> list[dict]:
    return [c for c in (concept or {}).get("coding", []) if isinstance(c, dict)] if isinstance(concept, dict) else []


def _code(concept: Any, *, system_has: str | None = None) -> str | None:
    for c in _codings(concept):
        if system_has is None or system_has in (c.get("system") or ""):
            return c.get("code")
    return None


def _day(text: Any) -> date | None:
    try:
        return date.fromisoformat(str(text)[:10]) if text else None
    except ValueError:
        return None


def _moment(text: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00")) if text else None
    except ValueError:
        return None


def _npi(ref: Any, contained: dict[str, dict]) -> str | None:
    """The NPI of a provider Reference: its identifier, or the identifier of the contained resource it points at."""
    if not isinstance(ref, dict):
        return None
    ident = ref.get("identifier")
    if isinstance(ident, dict) and ident.get("value"):
        return ident["value"]
    target = contained.get(str(ref.get("reference", "")).lstrip("#"))
    for ident in (target or {}).get("identifier", []):
        if (ident.get("system") in NPI_SYSTEMS or _code(ident.get("type")) == "npi") and ident.get("value"):
            return ident["value"]
    return None


def _claim_id(res: dict) -> tuple[str, str | None]:
    """(claim id, key scope): the CMS CLM_ID for Blue Button, else the first identifier, else the resource id."""
    idents = [i for i in res.get("identifier", []) if isinstance(i, dict) and i.get("value")]
    for ident in idents:
        if str(ident.get("system", "")).endswith("/clm_id"):
            return ident["value"], CMS_SCOPE
    for ident in idents:
        if str(ident.get("system", "")).endswith("/pde_id"):
            return ident["value"], CMS_SCOPE
    return (idents[0]["value"] if idents else str(res.get("id") or "")), None


def _member(res: dict) -> Member | None:
    ref = (res.get("patient") or res.get("beneficiary") or {}).get("reference")
    if not ref:
        return None
    bb = _BB in json.dumps(res.get("identifier", []))
    return Member(system=BENE if bb else "fhir", member_id=ref.rsplit("/", 1)[-1], fhir_patient=None if bb else ref,
                  relationship="self", payer_name="Medicare" if bb else None)


def _claim(res: dict, item: str) -> ClaimDoc | Problem:
    contained = {c.get("id"): c for c in res.get("contained", []) if isinstance(c, dict)}
    claim_id, scope = _claim_id(res)
    eob = res["resourceType"] == "ExplanationOfBenefit"
    period = res.get("billablePeriod") or {}
    doc = ClaimDoc(
        item=item, source_format=f"fhir-{res['resourceType']}", claim_id=claim_id,
        billing=Party("billing", npi=_npi(res.get("provider"), contained), entity="organization"),
        version_at=_moment((res.get("meta") or {}).get("lastUpdated")) or _moment(res.get("created")),
        version_tiebreak=f"{int(eob)}|{(res.get('meta') or {}).get('versionId') or ''}|{res.get('id')}",
        key_scope=scope, adjudicated=eob, claim_type=_claim_type(res), status="void" if res.get("status") in _VOID
        else "active", adjudication_status=_outcome(res) if eob else None,
        payer_name=(res.get("insurer") or {}).get("display") or (res.get("insurer") or {}).get("identifier", {})
        .get("value"), member=_member(res), service_from=_day(period.get("start")), service_to=_day(period.get("end")),
        bill_type=_extension(res, "bill-type") or _info(res, "typeofbill"))
    doc.setting = _code(res.get("type"), system_has="eob-type")
    doc.payer_id = doc.payer_name
    doc.frequency_code = "8" if doc.status == "void" else None
    doc.parties = _care_team(res, contained)
    _diagnoses(doc, res)
    _totals(doc, res)
    doc.drg = _info(res, "drg")
    doc.lines = [_item(it, doc) for it in res.get("item", []) if isinstance(it, dict)]
    if not claim_id or not (doc.billing.npi or scope):
        return Problem(item, CLAIM_INCOMPLETE, "the claim has no identifier or id, or no provider NPI "
                                               "(provider.identifier): it cannot be keyed; the sender must add them")
    return doc


def _claim_type(res: dict) -> str | None:
    code = _code(res.get("type"), system_has="claim-type")
    return code if code in _CLAIM_TYPES else None


def _outcome(res: dict) -> str | None:
    return {"complete": "paid", "error": "denied", "partial": "paid", "queued": "pended"}.get(res.get("outcome"))


def _extension(res: dict, name: str) -> str | None:
    for ext in res.get("extension", []):
        if isinstance(ext, dict) and str(ext.get("url", "")).endswith(name):
            return ext.get("valueString") or _code(ext.get("valueCoding") and {"coding": [ext["valueCoding"]]})
    return None


def _info(res: dict, category: str) -> str | None:
    """A supportingInfo code by its category code (typeofbill, drg, discharge status ...)."""
    for info in res.get("supportingInfo", []):
        if isinstance(info, dict) and any(c.get("code") == category for c in _codings(info.get("category"))):
            return _code(info.get("code")) or info.get("valueString")
    return None


def _care_team(res: dict, contained: dict[str, dict]) -> list[Party]:
    out = []
    for member in res.get("careTeam", []):
        if not isinstance(member, dict):
            continue
        role = _ROLE.get(_code(member.get("role")) or "", "other")
        npi = _npi(member.get("provider"), contained)
        if npi:
            out.append(Party(role, npi=npi, entity="person"))
    return out


def _diagnoses(doc: ClaimDoc, res: dict) -> None:
    ordered = sorted((d for d in res.get("diagnosis", []) if isinstance(d, dict)),
                     key=lambda d: d.get("sequence") or 0)
    codes = []
    for d in ordered:
        coding = _codings(d.get("diagnosisCodeableConcept"))
        if coding and coding[0].get("code"):
            codes.append(coding[0]["code"])
            if coding[0].get("system") == _ICD9:
                doc.diagnosis_system = "ICD-9-CM"
    doc.diagnoses = codes
    doc.diagnosis_sequences = [d.get("sequence") for d in ordered if _codings(d.get("diagnosisCodeableConcept"))]


def _amount(value: Any) -> Any:
    return money(str(value.get("value"))) if isinstance(value, dict) and value.get("value") is not None else None


def _totals(doc: ClaimDoc, res: dict) -> None:
    if isinstance(res.get("total"), dict):  # Claim.total is Money
        doc.billed = _amount(res["total"])
        return
    for total in res.get("total", []):
        codes = {c.get("code") for c in _codings(total.get("category"))}
        if "submitted" in codes or any(str(c).endswith("clm_tot_chrg_amt") for c in codes):
            doc.billed = doc.billed or _amount(total.get("amount"))
        elif "eligible" in codes:
            doc.allowed = _amount(total.get("amount"))
        elif codes & set(_PAID):
            doc.paid = _amount(total.get("amount"))
    doc.paid = _amount((res.get("payment") or {}).get("amount")) or doc.paid


def _item(it: dict, doc: ClaimDoc) -> Line:
    product = it.get("productOrService") or {}
    coding = _codings(product)
    code = next((c.get("code") for c in coding if "ndc" not in (c.get("system") or "")), None)
    ndc = next((c.get("code") for c in coding if "ndc" in (c.get("system") or "")), None) or \
        next((e.get("valueCoding", {}).get("code") for e in product.get("extension", []) if "ndc" in e.get("url", "")),
             None)
    period = it.get("servicedPeriod") or {}
    start = _day(it.get("servicedDate") or period.get("start"))
    pointers = [doc.diagnosis_sequences.index(s) + 1 for s in it.get("diagnosisSequence", [])
                if s in doc.diagnosis_sequences]
    line = Line(number=int(it.get("sequence") or 0), procedure_code=code, procedure_sent=code,
                procedure_system="CPT/HCPCS" if code else ("NDC" if ndc else None),
                modifiers=[m for m in (_code(x) for x in it.get("modifier", [])) if m], revenue_code=_code(
                    it.get("revenue")), ndc=ndc, units=number((it.get("quantity") or {}).get("value")),
                service_from=start, service_to=_day(period.get("end")) or start, diagnosis_pointers=pointers,
                billed=_amount(it.get("net")), place_of_service=_code(it.get("locationCodeableConcept")))
    for adj in it.get("adjudication", []):
        codes = {c.get("code") for c in _codings(adj.get("category"))}
        if "submitted" in codes and line.billed is None:
            line.billed = _amount(adj.get("amount"))
        elif "eligible" in codes:
            line.allowed = _amount(adj.get("amount"))
        elif codes & set(_PAID):
            line.paid = _amount(adj.get("amount"))
    return line


def _coverage(res: dict, item: str) -> Enrollment | Problem:
    subscriber = res.get("subscriberId") or next((i.get("value") for i in res.get("identifier", [])
                                                  if isinstance(i, dict) and i.get("value")), None)
    beneficiary = (res.get("beneficiary") or {}).get("reference")
    if not subscriber and not beneficiary:
        return Problem(item, CLAIM_INCOMPLETE, "Coverage has no subscriberId, identifier or beneficiary")
    payor = next((p.get("display") or (p.get("identifier") or {}).get("value") for p in res.get("payor", [])
                  if isinstance(p, dict)), None)
    member = Member(system=payor or "fhir", member_id=subscriber or beneficiary.rsplit("/", 1)[-1],
                    fhir_patient=beneficiary, relationship="self" if _code(res.get("relationship")) in (None, "self")
                    else "dependent", payer_name=payor)
    at = _moment((res.get("meta") or {}).get("lastUpdated"))
    return Enrollment(item, member, at, str((res.get("meta") or {}).get("versionId") or res.get("id") or ""))
