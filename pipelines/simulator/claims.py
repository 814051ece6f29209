"""Claims for every admission (final after discharge, interim at the window's end) with labelled fraud.

Lines follow what happened: initial and subsequent hospital care per day (more complex on unwell days), critical
care per ICU day, each lab draw, each imaging study. Fraud patterns are injected per claim at the configured
rates and every injected line is labelled; upcoding, a provider's habit, only by the UPCODERS hospitalist: it carries
the whole pattern (its share of all claims stays the configured rate), so it stands out against its peers the way the
upcoding rule judges a provider (gold.claims_rules: at least claims.upcoding_min_lines lines of an E/M family and a
top-level share claims.upcoding_min_excess above its peers'). Spread over several hospitalists at a few percent of
the claims, no one of them would stand out.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import date, timedelta

from pipelines.simulator import fhir
from pipelines.simulator.clinical import IMAGING
from pipelines.simulator.observations import Draw
from pipelines.simulator.params import SimParams
from pipelines.simulator.population import HOUR, Census, Encounter
from pipelines.simulator.timeline import ImagingOrder

HOSPITAL_NPI_BODY = "124308512"
PAYERS = ("Medicare Part A", "Blue Cross PPO", "Aetna HMO", "Medicaid")
PRICES = {"99222": 210.0, "99223": 290.0, "99231": 80.0, "99232": 125.0, "99233": 180.0, "99238": 110.0,
          "99239": 160.0, "99291": 420.0, "99292": 210.0, "83605": 38.0, "85025": 24.0, "85027": 19.0,
          "85004": 16.0, "82565": 14.0, "71046": 95.0, "71250": 380.0, "74176": 520.0, "70450": 340.0,
          "71275": 450.0, "76705": 150.0, "70551": 610.0}
DESCRIPTIONS = {"99222": "Initial hospital care, moderate", "99223": "Initial hospital care, high",
                "99231": "Subsequent hospital care, low", "99232": "Subsequent hospital care, moderate",
                "99233": "Subsequent hospital care, high", "99238": "Discharge day management, 30 min or less",
                "99239": "Discharge day management, more than 30 min", "99291": "Critical care, first 30-74 min",
                "99292": "Critical care, each additional 30 min", "83605": "Lactate (lactic acid)",
                "85025": "Complete blood count with automated differential",
                "85027": "Complete blood count, automated", "85004": "Automated differential WBC count",
                "82565": "Creatinine, blood", **{p.cpt: p.display for p in IMAGING.values()}}
CSV_COLUMNS = ("claim_id", "line", "bill_type", "patient_mrn", "visit_number", "payer", "billing_npi",
               "rendering_npi", "service_date", "procedure_code", "procedure_system", "description", "units",
               "unit_charge", "line_charge", "diagnosis_code", "submitted_date")


def npi(body: str) -> str:
    """A 10-digit NPI: 9 digits and the Luhn check digit computed with the 80840 prefix."""
    digits = [int(d) for d in "80840" + body]
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2 == 0:
            d *= 2
            d = d - 9 if d > 9 else d
        total += d
    return body + str((10 - total % 10) % 10)


HOSPITALISTS = tuple(npi(f"1{n:08d}") for n in range(3001, 3011))
UPCODERS = HOSPITALISTS[:1]  # upcoding is a provider's habit: only this hospitalist upcodes
INTENSIVISTS = tuple(npi(f"1{n:08d}") for n in range(4001, 4005))
RADIOLOGISTS = tuple(npi(f"1{n:08d}") for n in range(5001, 5004))
LAB_NPI = npi("155501234")
HOSPITAL_NPI = npi(HOSPITAL_NPI_BODY)


@dataclass(frozen=True)
class Line:
    code: str
    service_date: date
    rendering_npi: str
    units: int = 1

    @property
    def charge(self) -> float:
        return round(PRICES[self.code] * self.units, 2)


@dataclass
class Claim:
    claim_id: str
    enc: Encounter
    bill_type: str
    payer: str
    lines: list[Line]
    submitted: date
    start: date
    end: date


@dataclass(frozen=True)
class FraudLabel:
    claim_id: str
    line: int
    pattern: str
    detail: str


def build_claims(census: Census, params: SimParams, draws: list[Draw],
                 orders: list[ImagingOrder]) -> tuple[list[Claim], list[FraudLabel]]:
    labs: dict[int, list[int]] = {}
    for d in draws:
        if d.kind == "labs":
            labs.setdefault(d.visit_no, []).append(d.t)
    studies: dict[int, list[ImagingOrder]] = {}
    for o in orders:
        if o.study_s is not None:
            studies.setdefault(o.enc.visit_no, []).append(o)
    claims, labels = [], []
    for enc in census.active:
        claim = _claim(enc, params, labs.get(enc.visit_no, []), studies.get(enc.visit_no, []))
        extra, found = _inject_fraud(claim, params)
        claims += [claim, *extra]
        labels += found
    claims.sort(key=lambda c: (c.submitted, c.claim_id))
    return claims, labels


def _claim(enc: Encounter, params: SimParams, lab_times: list[int], studies: list[ImagingOrder]) -> Claim:
    day = lambda s: (params.start + timedelta(seconds=s)).date()  # noqa: E731
    final = enc.discharge_s is not None
    last_s = enc.discharge_s if final else params.window_s - 1
    first, last = day(enc.admit_s), day(last_s)
    hospitalist = HOSPITALISTS[enc.visit_no % len(HOSPITALISTS)]
    intensivist = INTENSIVISTS[enc.visit_no % len(INTENSIVISTS)]
    lines = [Line("99223" if enc.deterioration or enc.stays[0].icu else "99222", first, hospitalist)]
    for n in range(1, (last - first).days + (0 if final else 1)):
        when = first + timedelta(days=n)
        lines.append(Line("99233" if _unwell_on(enc, when, params) else "99232", when, hospitalist))
    if final and last > first:
        lines.append(Line("99239" if (last - first).days > 3 else "99238", last, hospitalist))
    icu_days = sorted({day(stay.start_s) + timedelta(days=k) for stay in enc.stays if stay.icu
                       for k in range((day(min(stay.end_s, last_s)) - day(stay.start_s)).days + 1)})
    lines += [Line("99291", d, intensivist) for d in icu_days]
    for t in sorted(lab_times):
        lines += [Line(code, day(t), LAB_NPI) for code in ("83605", "85025", "82565")]
    for o in studies:
        lines.append(Line(IMAGING[o.procedure_key].cpt, day(o.study_s),
                          RADIOLOGISTS[o.enc.visit_no % len(RADIOLOGISTS)]))
    rng = random.Random(f"{params.seed}:claim:{enc.visit_no}")
    return Claim(f"CLM{params.seed % 100:02d}{enc.visit_no:08d}", enc, "111" if final else "112",
                 PAYERS[int(enc.draws["u_misc"] * len(PAYERS))], lines,
                 last + timedelta(days=rng.randint(2, 5)), first, last)


def _unwell_on(enc: Encounter, when: date, params: SimParams) -> bool:
    d = enc.deterioration
    if d is None:
        return False
    day_start = int((when - params.start.date()).days * 24 * HOUR - params.start.hour * HOUR)
    end = d.recovered_s if d.recovered_s is not None else 10**12
    return d.onset_s < day_start + 24 * HOUR and end > day_start


def _inject_fraud(claim: Claim, params: SimParams) -> tuple[list[Claim], list[FraudLabel]]:
    """Alter the claim in place for each pattern drawn; a duplicate billing adds a second claim."""
    rng = random.Random(f"{params.seed}:fraud:{claim.claim_id}")
    draws = {p: rng.random() for p in ("upcoding", "unbundling", "phantom_services", "impossible_volume",
                                       "duplicate_billing")}
    rates = params.fraud
    marks: list[tuple[Line, str, str]] = []
    if _upcodes(claim, draws["upcoding"], rates["upcoding"], params.deterioration_fraction):
        marks += _upcode(claim)
    if draws["unbundling"] < rates["unbundling"]:
        marks += _unbundle(claim)
    if draws["phantom_services"] < rates["phantom_services"]:
        marks += _phantom(claim, rng)
    if draws["impossible_volume"] < rates["impossible_volume"]:
        line = Line("99292", claim.start, INTENSIVISTS[0], units=50)
        claim.lines.append(line)
        marks.append((line, "impossible_volume", "99292 x 50 units = 25 h of critical care in one day"))
    labels = [FraudLabel(claim.claim_id, claim.lines.index(line) + 1, pattern, detail)
              for line, pattern, detail in marks]
    if draws["duplicate_billing"] >= rates["duplicate_billing"]:
        return [], labels
    copy = replace(claim, claim_id=claim.claim_id + "R", lines=list(claim.lines),
                   submitted=claim.submitted + timedelta(days=rng.randint(7, 20)))
    labels += [FraudLabel(copy.claim_id, n + 1, "duplicate_billing", f"duplicate of {claim.claim_id} line {n + 1}")
               for n in range(len(copy.lines))]
    return [copy], labels


def _upcodes(claim: Claim, draw: float, rate: float, deteriorating: float) -> bool:
    """Whether the claim is upcoded: only by an upcoding hospitalist, for a stay without a deterioration (one with
    can bear the top levels), at a rate that keeps `rate` the share of all claims (the hospitalists share the stays
    evenly; `deteriorating`, the share of stays with a deterioration, are left alone)."""
    if claim.enc.deterioration is not None or claim.lines[0].rendering_npi not in UPCODERS:
        return False
    return draw < rate * len(HOSPITALISTS) / len(UPCODERS) / max(1.0 - deteriorating, 0.05)


def _upcode(claim: Claim) -> list[tuple[Line, str, str]]:
    up = {"99222": "99223", "99232": "99233", "99238": "99239"}
    marks = []
    for i, line in enumerate(claim.lines):
        if line.code in up:
            claim.lines[i] = replace(line, code=up[line.code])
            marks.append((claim.lines[i], "upcoding", f"{line.code} billed as {up[line.code]}"))
    return marks


def _unbundle(claim: Claim) -> list[tuple[Line, str, str]]:
    out, marks = [], []
    for line in claim.lines:
        if line.code != "85025":
            out.append(line)
            continue
        parts = [replace(line, code="85027"), replace(line, code="85004")]
        out += parts
        marks += [(p, "unbundling", "85025 billed as 85027 + 85004") for p in parts]
    claim.lines[:] = out
    return marks


def _phantom(claim: Claim, rng: random.Random) -> list[tuple[Line, str, str]]:
    when = claim.start - timedelta(days=rng.randint(2, 6))
    line = Line("71250", when, RADIOLOGISTS[0])
    claim.lines.append(line)
    return [(line, "phantom_services", f"CT chest on {when.isoformat()}, before the admission on "
                                       f"{claim.start.isoformat()}")]


def csv_rows(claims: Iterable[Claim]) -> list[tuple]:
    rows = []
    for c in claims:
        mrn = c.enc.person.mrn
        for n, line in enumerate(c.lines):
            rows.append((c.claim_id, n + 1, c.bill_type, mrn, c.enc.visit, c.payer, HOSPITAL_NPI, line.rendering_npi,
                         line.service_date.isoformat(), line.code, "CPT", DESCRIPTIONS[line.code], line.units,
                         f"{PRICES[line.code]:.2f}", f"{line.charge:.2f}", c.enc.diagnosis[0],
                         c.submitted.isoformat()))
    return rows


def _money(value: float) -> dict:
    return {"value": round(value, 2), "currency": "USD"}


def _items(c: Claim, eob: bool) -> list[dict]:
    items = []
    for n, line in enumerate(c.lines):
        item = {"sequence": n + 1, "careTeamSequence": [n + 1],
                "productOrService": {"coding": [{"system": fhir.CPT, "code": line.code,
                                                 "display": DESCRIPTIONS[line.code]}]},
                "servicedDate": line.service_date.isoformat(), "quantity": {"value": line.units},
                "unitPrice": _money(PRICES[line.code]), "net": _money(line.charge)}
        if eob:
            item["adjudication"] = [_adjudication("submitted", line.charge),
                                    _adjudication("eligible", line.charge * 0.8),
                                    _adjudication("benefit", line.charge * 0.64)]
        items.append(item)
    return items


def _adjudication(category: str, amount: float) -> dict:
    return {"category": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/adjudication",
                                     "code": category}]}, "amount": _money(amount)}


def _common(c: Claim, eob: bool) -> dict:
    total = sum(line.charge for line in c.lines)
    out = {
        "status": "active",
        "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/claim-type", "code": "institutional"}]},
        "use": "claim", "patient": fhir.reference("Patient", fhir.patient_id(c.enc.person.mrn)),
        "billablePeriod": {"start": c.start.isoformat(), "end": c.end.isoformat()},
        "created": c.submitted.isoformat(),
        "provider": {"identifier": {"system": "http://hl7.org/fhir/sid/us-npi", "value": HOSPITAL_NPI}},
        "careTeam": [{"sequence": n + 1, "provider": {"identifier": {"system": "http://hl7.org/fhir/sid/us-npi",
                                                                       "value": line.rendering_npi}}}
                     for n, line in enumerate(c.lines)],
        "diagnosis": [{"sequence": 1, "diagnosisCodeableConcept": {"coding": [
            {"system": fhir.ICD10, "code": c.enc.diagnosis[0], "display": c.enc.diagnosis[1]}]}}],
        "insurance": [{"sequence": 1, "focal": True, "coverage": {"display": c.payer}}],
        "item": _items(c, eob),
    }
    if eob:
        out["total"] = [_adjudication("submitted", total), _adjudication("benefit", total * 0.64)]
    else:
        out["total"] = _money(total)
    return out


def claim_resource(c: Claim) -> dict:
    body = _common(c, eob=False)
    body["priority"] = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/processpriority",
                                    "code": "normal"}]}
    body["extension"] = [{"url": "http://carelake.example/fhir/StructureDefinition/bill-type",
                          "valueString": c.bill_type}]
    return {"resourceType": "Claim", "id": c.claim_id.lower(),
            "identifier": [{"system": "http://carelake.example/fhir/sid/claim", "value": c.claim_id}], **body}


def eob_resource(c: Claim) -> dict:
    body = _common(c, eob=True)
    return {"resourceType": "ExplanationOfBenefit", "id": f"eob-{c.claim_id.lower()}",
            "identifier": [{"system": "http://carelake.example/fhir/sid/claim", "value": c.claim_id}],
            **{k: v for k, v in body.items() if k not in ("item", "total", "insurance")},
            "insurer": {"display": c.payer}, "outcome": "complete",
            "insurance": [{"focal": True, "coverage": {"display": c.payer}}],
            "claim": fhir.reference("Claim", c.claim_id.lower()), "item": body["item"], "total": body["total"]}
