"""What the hospital's systems send, in event-time order: HL7 v2 events, FHIR bundles and imaging orders.

Each encounter contributes its ADT history (A01/A02/A08/A40/A03/A11), ward observation rounds (HL7 ORU or
FHIR Observations), lab results (ORU) and imaging orders (ORM + ServiceRequest, then the study). The events are
clean here; dirt.py decides what goes wrong in transit.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from pipelines.simulator import fhir, hl7
from pipelines.simulator.acuity import WardCharts
from pipelines.simulator.clinical import (
    BY_KEY,
    DETERIORATION_IMAGING,
    DETERIORATION_PRIORITY,
    ED_CASES,
    IMAGING,
    INDICATIONS,
    ORDER_CANCEL_FRACTION,
    OUTPATIENT_CASES,
    PRIORITY_DELAY_H,
    RADIOLOGISTS,
    READ_DELAY_H,
    acvpu_letter,
    critical_chance,
    oxygen_device,
)
from pipelines.simulator.hl7 import Header, Result
from pipelines.simulator.observations import Draw
from pipelines.simulator.params import SimParams
from pipelines.simulator.population import (
    CITIES,
    FAMILY,
    FEMALE,
    HOUR,
    STREETS,
    Census,
    Encounter,
    Stay,
    make_person,
    visit_number,
)

LAB_PANEL = ("SEPSCR", "Lactate, leukocytes and creatinine", "L")


@dataclass
class Hl7Event:
    at_s: int
    rank: int                                    # tie-break inside one second
    message_type: str                            # MSH-9, e.g. ADT^A01^ADT_A01
    visit: str
    build: Callable[[Header, list[Result]], list[str]]
    results: list[Result] = field(default_factory=list)

    @property
    def short_type(self) -> str:
        return "^".join(self.message_type.split("^")[:2])


@dataclass
class FhirEvent:
    at_s: int
    rank: int
    resources: list[dict]


@dataclass(frozen=True)
class ImagingOrder:
    order_no: str
    accession: str
    enc: Encounter
    procedure_key: str
    priority: str
    at_s: int
    study_s: int | None        # None: not performed inside the window / stay
    indication: str = "admission_film"  # key of INDICATIONS
    location_class: str = "WARD"  # ED, ICU, WARD, OUTPATIENT: where the patient was when it was ordered
    critical: bool = False     # the ground truth: the study holds a critical finding
    read_s: int | None = None  # when a radiologist read it (None: not performed, or read after the window)
    reader: tuple[str, str, str] | None = None  # (id, family, given)
    communicated_s: int | None = None  # a critical finding phoned to the ordering team (during the read)
    cancelled_s: int | None = None  # cancelled before the study was done

    @property
    def finding(self) -> str:
        return INDICATIONS[self.indication].finding if self.critical else ""


@dataclass
class Timeline:
    hl7: list[Hl7Event] = field(default_factory=list)
    fhir: list[FhirEvent] = field(default_factory=list)
    orders: list[ImagingOrder] = field(default_factory=list)
    charts: WardCharts = field(default_factory=lambda: WardCharts({}))

    def sort(self) -> None:
        self.hl7.sort(key=lambda e: (e.at_s, e.rank))
        self.fhir.sort(key=lambda e: (e.at_s, e.rank))
        self.orders.sort(key=lambda o: (o.at_s, o.order_no))


class _Versions:
    """FHIR versionId per resource id: each new write of a resource is the next version."""

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}

    def next(self, rid: str) -> int:
        self.seen[rid] = self.seen.get(rid, 0) + 1
        return self.seen[rid]


def build_timeline(census: Census, params: SimParams, draws: list[Draw],
                   values: dict[tuple[int, int], dict[str, float]]) -> Timeline:
    tl = Timeline()
    versions = _Versions()
    clock = _Clock(params)
    for enc in census.encounters:
        _adt(tl, enc, params, clock, versions)
    by_visit = {e.visit_no: e for e in census.active}
    for d in draws:
        if d.kind == "monitor":  # sent by the bedside monitor (devices feed), kept for acuity only
            continue
        enc = by_visit[d.visit_no]
        got = values.get((d.visit_no, d.t), {})
        if d.kind == "labs":
            _labs(tl, enc, d, got, clock)
        elif enc.fhir_vitals:
            _fhir_vitals(tl, enc, d, got, clock)
        else:
            _hl7_vitals(tl, enc, d, got, clock)
    tl.charts = WardCharts.of(draws, values)
    tl.orders = _imaging_orders(census, params, tl.charts)
    for order in tl.orders:
        _order_events(tl, order, clock)
    tl.sort()
    return tl


class _Clock:
    def __init__(self, params: SimParams):
        self.start = params.start
        self.window_s = params.window_s
        self.rank = 0

    def at(self, s: int) -> datetime:
        return self.start + timedelta(seconds=s)

    def next_rank(self) -> int:
        self.rank += 1
        return self.rank


def _adt(tl: Timeline, enc: Encounter, params: SimParams, clock: _Clock, versions: _Versions) -> None:
    """ADT messages and the matching Patient/Encounter FHIR writes for one encounter."""
    admit_at = clock.at(enc.admit_s)
    send_admit = enc.admit_s if enc.admit_s >= 0 else enc.visit_no  # census load: in-house patients at the start
    first = enc.stays[0] if enc.stays else None
    person = enc.person_at(max(enc.admit_s, 0))

    def emit(at_s: int, event: str, *, stay: Stay | None, who=None, prior=None, discharge_s=None, merged=None,
             status: str = "in-progress", resources: list[dict] | None = None) -> None:
        who = who or enc.person_at(at_s)
        structure = {"A01": "ADT_A01", "A02": "ADT_A02", "A03": "ADT_A03", "A08": "ADT_A01", "A11": "ADT_A09",
                     "A40": "ADT_A39"}[event]
        discharge = clock.at(discharge_s) if discharge_s is not None else None
        occurred = admit_at if event == "A01" else clock.at(at_s)

        def build(h: Header, _results: list[Result]) -> list[str]:
            return hl7.adt(h, event, enc, who, stay, occurred=occurred, prior=prior, admit=admit_at,
                           discharge=discharge, merged_mrn=merged)

        tl.hl7.append(Hl7Event(at_s, clock.next_rank(), f"ADT^{event}^{structure}", enc.visit, build))
        enc_resource = fhir.encounter(enc, enc.mrn_at(at_s), stay, status=status,
                                      version=versions.next(f"enc-{enc.visit.lower()}"), at=clock.at(at_s),
                                      start=admit_at, end=discharge)
        tl.fhir.append(FhirEvent(at_s, clock.next_rank(), [*(resources or []), enc_resource]))

    def patient(p, at_s: int, replaced_by: str | None = None) -> dict:
        return fhir.patient(p, version=versions.next(fhir.patient_id(p.mrn)), at=clock.at(at_s),
                            replaced_by=replaced_by)

    emit(send_admit, "A01", stay=first, who=person, resources=[patient(person, send_admit)])
    if enc.cancelled_s is not None:
        emit(enc.cancelled_s, "A11", stay=first, status="cancelled")
        return
    for before, after in zip(enc.stays, enc.stays[1:], strict=False):
        moved = (before.unit, before.room, before.bed) != (after.unit, after.room, after.bed)
        if moved and 0 <= after.start_s < clock.window_s:
            emit(after.start_s, "A02", stay=after, prior=before)
    if enc.update_s is not None:
        emit(enc.update_s, "A08", stay=enc.stay_at(enc.update_s),
             resources=[patient(enc.person_at(enc.update_s), enc.update_s)])
    if enc.merge_s is not None:
        survivor = enc.person_at(enc.merge_s)
        emit(enc.merge_s, "A40", stay=enc.stay_at(enc.merge_s), who=survivor, merged=enc.duplicate.mrn,
             resources=[patient(survivor, enc.merge_s),
                        patient(enc.duplicate, enc.merge_s, replaced_by=survivor.mrn)])
    if enc.discharge_s is not None and 0 <= enc.discharge_s < clock.window_s:
        emit(enc.discharge_s, "A03", stay=enc.stays[-1], discharge_s=enc.discharge_s, status="finished")


def _hl7_vitals(tl: Timeline, enc: Encounter, d: Draw, got: dict[str, float], clock: _Clock) -> None:
    results = ward_results(got)
    at = clock.at(d.t)
    stay, person = enc.stay_at(d.t), enc.person_at(d.t)

    def build(h: Header, res: list[Result]) -> list[str]:
        return hl7.oru(h, enc, person, stay, res, at)

    tl.hl7.append(Hl7Event(d.t, clock.next_rank(), "ORU^R01^ORU_R01", enc.visit, build, results))


def ward_results(got: dict[str, float]) -> list[Result]:
    """A nurse's observation set as OBX content: NM vitals, ST oxygen device, CWE consciousness."""
    out = [Result(k, got[k], BY_KEY[k].unit) for k in ("hr", "rr", "spo2", "sbp", "dbp", "temp", "fio2")]
    flow = got.get("o2flow", 0.0)
    if flow > 0:
        out.append(Result("o2flow", flow, BY_KEY["o2flow"].unit))
    out.append(Result("o2flow", None, "", text=oxygen_device(flow)))
    letter = acvpu_letter(got["acvpu"])
    out.append(Result("acvpu", None, "", coded=(letter, dict(_acvpu_names())[letter])))
    if "weight" in got:
        out.append(Result("weight", got["weight"], BY_KEY["weight"].unit))
    return out


def _acvpu_names():
    from pipelines.simulator.clinical import ACVPU

    return ACVPU


def _labs(tl: Timeline, enc: Encounter, d: Draw, got: dict[str, float], clock: _Clock) -> None:
    results = [Result(k, got[k], BY_KEY[k].unit) for k in ("lactate", "wbc", "creatinine")]
    at = clock.at(d.t)
    stay, person = enc.stay_at(d.t), enc.person_at(d.t)
    order_no = f"LAB{enc.visit_no:07d}{d.t // 60:06d}"

    def build(h: Header, res: list[Result]) -> list[str]:
        return hl7.oru(h, enc, person, stay, res, at, panel=LAB_PANEL, order_no=order_no)

    tl.hl7.append(Hl7Event(d.t, clock.next_rank(), "ORU^R01^ORU_R01", enc.visit, build, results))


def _fhir_vitals(tl: Timeline, enc: Encounter, d: Draw, got: dict[str, float], clock: _Clock) -> None:
    at, mrn = clock.at(d.t), enc.mrn_at(d.t)
    prefix = f"obs-{enc.visit.lower()}-{d.t}"

    def obs(key: str, **kw) -> dict:
        return fhir.observation(f"{prefix}-{key}", mrn=mrn, visit=enc.visit, key=key, at=at,
                                category="vital-signs", **kw)

    resources = [obs(k, value=got[k], unit=BY_KEY[k].unit) for k in ("hr", "rr", "spo2", "temp", "fio2")]
    resources.append(obs("bp", systolic=got["sbp"], diastolic=got["dbp"]))
    if got.get("o2flow", 0.0) > 0:
        resources.append(obs("o2flow", value=got["o2flow"], unit=BY_KEY["o2flow"].unit))
    resources.append(obs("acvpu", letter=acvpu_letter(got["acvpu"])))
    if "weight" in got:
        resources.append(obs("weight", value=got["weight"], unit=BY_KEY["weight"].unit))
    tl.fhir.append(FhirEvent(d.t, clock.next_rank(), resources))


ED_MRN_BASE, OUTPATIENT_MRN_BASE = 5_000_000, 6_000_000
ED_VISIT_BASE, OUTPATIENT_VISIT_BASE = 7_000_000, 8_000_000


def _imaging_orders(census: Census, params: SimParams, charts: WardCharts) -> list[ImagingOrder]:
    """Inpatient imaging (admission films, a study per deterioration) plus the ED's and outpatient clinics'; the
    critical finding is drawn with the indication's prevalence and the patient's NEWS2 band at the order."""
    wanted = [*_inpatient_cases(census, params), *_department_cases(params)]
    wanted.sort(key=lambda w: (w[0], w[1].visit_no, w[2]))
    orders = []
    for at_s, enc, indication, priority, location, study_at, rng in wanted:
        end = min(enc.discharge_s if enc.discharge_s is not None else params.window_s, params.window_s)
        if at_s >= end:
            continue
        lo, hi = PRIORITY_DELAY_H[priority]
        study = study_at if study_at is not None else at_s + int(rng.uniform(lo, hi) * HOUR)
        cancelled = at_s + int((study - at_s) * rng.uniform(0.2, 0.8)) \
            if rng.random() < ORDER_CANCEL_FRACTION and study < end else None
        n = len(orders) + 1
        orders.append(_with_read(ImagingOrder(
            f"ORD{params.seed % 100:02d}{n:07d}", f"ACC{params.seed % 100:02d}{n:07d}", enc,
            INDICATIONS[indication].procedure, priority, at_s, study if study < end and cancelled is None else None,
            indication, location,
            rng.random() < critical_chance(INDICATIONS[indication].critical_p, charts.band_at(enc.visit_no, at_s)),
            cancelled_s=cancelled),
            rng, params))
    return orders


def _with_read(order: ImagingOrder, rng: random.Random, params: SimParams) -> ImagingOrder:
    """The order with its read (time and radiologist) and, for a critical finding, when it was phoned through."""
    from dataclasses import replace

    reader = RADIOLOGISTS[rng.randrange(len(RADIOLOGISTS))]
    delay = rng.uniform(*READ_DELAY_H[order.priority]) * HOUR
    if order.study_s is None or order.study_s + delay >= params.window_s:
        return order
    read = order.study_s + int(delay)
    called = read - rng.randint(2, 10) * 60 if order.critical else None
    return replace(order, read_s=read, reader=reader, communicated_s=called)


def _inpatient_cases(census: Census, params: SimParams) -> list[tuple]:
    """Admission imaging for a share of admissions (a chest film, or a CT head for new confusion), a study for each
    deterioration (mostly STAT), and the 06:00 chest film of every ICU patient."""
    wanted = []
    for enc in census.active:
        rng = random.Random(f"{params.seed}:imaging:{enc.visit_no}")
        for stay in (s for s in enc.stays if s.icu):
            mornings = range(max(0, stay.start_s) // (24 * HOUR), min(stay.end_s, params.window_s) // (24 * HOUR) + 1)
            wanted += [(at_s, enc, "icu_film", "routine", "ICU", None, rng) for day in mornings
                       if stay.start_s <= (at_s := day * 24 * HOUR + 6 * HOUR) < min(stay.end_s, params.window_s)]
        if enc.draws["u_imaging"] < params.imaging_fraction:
            indication, priority = ("admission_film", "routine") if rng.random() < 0.7 else ("confusion", "asap")
            at_s = max(enc.admit_s, 0) + int((1 + 6 * enc.draws["u_imaging_at"]) * HOUR)
            wanted.append((at_s, enc, indication, priority, _ward_or_icu(enc, at_s), None, rng))
        if enc.deterioration is not None:
            d = enc.deterioration
            at_s = d.onset_s + (d.peak_s - d.onset_s) // 2
            priority = rng.choices(list(DETERIORATION_PRIORITY), weights=list(DETERIORATION_PRIORITY.values()))[0]
            wanted.append((at_s, enc, DETERIORATION_IMAGING[d.kind], priority, _ward_or_icu(enc, at_s), None, rng))
    return wanted


def _ward_or_icu(enc: Encounter, at_s: int) -> str:
    stay = enc.stay_at(at_s)
    return "ICU" if stay is not None and stay.icu else "WARD"


def _department_cases(params: SimParams) -> list[tuple]:
    """Emergency-department and outpatient imaging: walk-in patients with a visit of their own."""
    cases = []
    for k in range(round(params.ed_imaging_per_day * params.hours / 24)):
        rng = random.Random(f"{params.seed}:ed-imaging:{k}")
        arrival = _arrival(rng, params.window_s)
        indication, priority = _case(rng, ED_CASES)
        enc = _walk_in(rng, params, ED_MRN_BASE + k + 1, ED_VISIT_BASE + k + 1, "E", "ED", arrival, indication)
        cases.append((arrival + int(rng.uniform(0.1, 0.6) * HOUR), enc, indication, priority, "ED", None, rng))
    days = max(1, -(-params.hours // 24))
    for k in range(round(params.outpatient_imaging_per_day * params.hours / 24)):
        rng = random.Random(f"{params.seed}:outpatient-imaging:{k}")
        slot = rng.randrange(days) * 24 * HOUR + int(rng.uniform(8, 18) * HOUR)
        indication, priority = _case(rng, OUTPATIENT_CASES)
        ordered = max(0, slot - int(rng.uniform(0.5, 3) * HOUR))
        enc = _walk_in(rng, params, OUTPATIENT_MRN_BASE + k + 1, OUTPATIENT_VISIT_BASE + k + 1, "O", "RADOP",
                       ordered, indication)
        cases.append((ordered, enc, indication, priority, "OUTPATIENT", slot, rng))
    return cases


def _arrival(rng: random.Random, window_s: int) -> int:
    """An ED arrival: busier by day (twice as likely at 14:00 as at 02:00)."""
    import math

    while True:
        t = rng.randrange(window_s)
        hour = (t / HOUR) % 24
        if rng.random() < (2 + math.cos((hour - 14) / 24 * 2 * math.pi)) / 3:
            return t


def _case(rng: random.Random, cases: tuple) -> tuple[str, str]:
    """(indication, priority) drawn from a case mix."""
    indication, _, priorities = rng.choices(cases, weights=[w for _, w, _ in cases])[0]
    return indication, rng.choices(list(priorities), weights=list(priorities.values()))[0]


def _walk_in(rng: random.Random, params: SimParams, mrn_no: int, visit_no: int, patient_class: str, unit: str,
             start_s: int, indication: str) -> Encounter:
    """A patient who comes for imaging (not in the inpatient census), with a short visit of their own."""
    row = {"sex": rng.choice("FM"), "given_no": rng.randrange(len(FEMALE)), "middle_no": rng.randrange(26),
           "family_no": rng.randrange(len(FAMILY)), "age": rng.randint(18, 95), "birth_day": rng.randrange(365),
           "house_no": rng.randint(1, 9899), "street_no": rng.randrange(len(STREETS)),
           "city_no": rng.randrange(len(CITIES)), "phone_no": rng.randint(100, 199)}
    person = make_person(row, f"MRN{mrn_no}", params.start.date())
    bay = f"{rng.randint(1, 30):02d}"
    ind = INDICATIONS[indication]
    return Encounter(visit=visit_number(visit_no), visit_no=visit_no, person=person, admit_s=start_s,
                     discharge_s=None, diagnosis=(ind.code, ind.text), draws={},
                     stays=[Stay(unit, unit, bay, start_s, params.window_s + 24 * HOUR, person.mrn)],
                     patient_class=patient_class)


def _order_events(tl: Timeline, order: ImagingOrder, clock: _Clock) -> None:
    enc, proc = order.enc, IMAGING[order.procedure_key]
    at = clock.at(order.at_s)
    stay, person = enc.stay_at(order.at_s), enc.person_at(order.at_s)

    indication = INDICATIONS[order.indication]
    location = (order.location_class, stay.unit if stay else None)
    sent = [(order.at_s, "NW", "active")]
    if order.cancelled_s is not None:
        sent.append((order.cancelled_s, "CA", "revoked"))
    for version, (at_s, control, status) in enumerate(sent, start=1):
        when = clock.at(at_s)

        def build(h: Header, _res: list[Result], when=when, control=control) -> list[str]:
            return hl7.orm(h, enc, person, stay, order_no=order.order_no, accession=order.accession, procedure=proc,
                           priority=order.priority, at=when, indication=indication, control=control)

        tl.hl7.append(Hl7Event(at_s, clock.next_rank(), "ORM^O01^ORM_O01", enc.visit, build))
        request = fhir.service_request(order.order_no, order.accession, mrn=enc.mrn_at(order.at_s), visit=enc.visit,
                                       procedure=proc, priority=order.priority, at=at, indication=indication,
                                       location=location, status=status, version=version, updated=when)
        tl.fhir.append(FhirEvent(at_s, clock.next_rank(), [request]))


def report_events(tl: Timeline, order: ImagingOrder, study_uid: str, start: datetime) -> None:
    """The radiologist's report of a read study: HL7 ORU^R01 and a FHIR DiagnosticReport, at the read time."""
    if order.read_s is None:
        return
    enc, proc, clock = order.enc, IMAGING[order.procedure_key], start + timedelta(seconds=order.read_s)
    stay, person = enc.stay_at(order.read_s), enc.person_at(order.read_s)
    read = hl7.Read(order.order_no, order.accession, proc, study_uid, start + timedelta(seconds=order.study_s),
                    clock, order.reader, order.finding,
                    None if order.communicated_s is None else start + timedelta(seconds=order.communicated_s))

    def build(h: Header, _res: list[Result]) -> list[str]:
        return hl7.oru_report(h, enc, person, stay, read)

    tl.hl7.append(Hl7Event(order.read_s, 10**9 + order.read_s, "ORU^R01^ORU_R01", enc.visit, build))
    tl.fhir.append(FhirEvent(order.read_s, 10**9 + order.read_s,
                             [fhir.diagnostic_report(read, mrn=enc.mrn_at(order.read_s), visit=enc.visit)]))
