"""The population: people (dbldatagen, seeded) and what happens to them during the window (plain Python).

dbldatagen draws every random attribute a person needs in one seeded Spark pass (fixed partitions, so the
same seed gives the same people on any machine); `build_census` then turns those draws into encounters,
bed stays, transfers, deteriorations, cancellations and merges, deterministically.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace
from datetime import date, timedelta
from typing import TYPE_CHECKING

from pipelines.simulator.clinical import (
    BENIGN_COURSES,
    BENIGN_EPISODE_CHANCE,
    BENIGN_PLATEAU_H,
    COURSE,
    COURSES,
    DETERIORATION_SEVERITY,
    DETERIORATION_SPEED,
    DIAGNOSES,
    PHENOTYPES,
)
from pipelines.simulator.params import SimParams

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

AUTHORITY = "CARELAKE"
FACILITY = "GENERAL"
MRN_BASE = 1_000_000
DUPLICATE_MRN_BASE = 9_000_000
WARDS = ("MED4W", "MED5E", "SURG6N", "CARD7S")
WARD_ROOMS = 16  # two beds a room
HOUR = 3600

FEMALE = ("Mary", "Patricia", "Jennifer", "Linda", "Elizabeth", "Barbara", "Susan", "Jessica", "Sarah", "Karen",
          "Nancy", "Lisa", "Margaret", "Sandra", "Ashley", "Dorothy", "Emily", "Donna", "Michelle", "Carol",
          "Amanda", "Melissa", "Deborah", "Stephanie", "Rebecca", "Laura", "Helen", "Sharon", "Cynthia", "Kathleen",
          "Amy", "Angela", "Anna", "Ruth", "Brenda", "Pamela", "Nicole", "Katherine", "Virginia", "Catherine")
MALE = ("James", "Robert", "John", "Michael", "David", "William", "Richard", "Joseph", "Thomas", "Charles",
        "Christopher", "Daniel", "Matthew", "Anthony", "Mark", "Donald", "Steven", "Paul", "Andrew", "Joshua",
        "Kenneth", "Kevin", "Brian", "George", "Timothy", "Ronald", "Edward", "Jason", "Jeffrey", "Ryan",
        "Jacob", "Gary", "Nicholas", "Eric", "Jonathan", "Stephen", "Larry", "Justin", "Scott", "Frank")
FAMILY = ("Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis", "Rodriguez", "Martinez",
          "Hernandez", "Lopez", "Gonzalez", "Wilson", "Anderson", "Thomas", "Taylor", "Moore", "Jackson", "Martin",
          "Lee", "Perez", "Thompson", "White", "Harris", "Sanchez", "Clark", "Ramirez", "Lewis", "Robinson",
          "Walker", "Young", "Allen", "King", "Wright", "Scott", "Torres", "Nguyen", "Hill", "Flores",
          "Green", "Adams", "Nelson", "Baker", "Hall", "Rivera", "Campbell", "Mitchell", "Carter", "O'Brien")
STREETS = ("Main St", "Oak Ave", "Maple Dr", "Cedar Ln", "Pine St", "Elm St", "Washington Ave", "Lake Rd",
           "Hill St", "Park Ave", "River Rd", "Church St", "Highland Ave", "Sunset Blvd", "Mill Rd", "Forest Dr")
CITIES = (("Springfield", "IL", "62701", "217"), ("Riverton", "IL", "62561", "217"),
          ("Decatur", "IL", "62521", "217"), ("Champaign", "IL", "61820", "217"),
          ("Peoria", "IL", "61602", "309"), ("Bloomington", "IL", "61701", "309"),
          ("Jacksonville", "IL", "62650", "217"), ("Lincoln", "IL", "62656", "217"))
MONITOR_INTERVALS_S = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600)


@dataclass(frozen=True)
class Person:
    mrn: str
    family: str
    given: str
    middle: str
    sex: str
    birth_date: date
    street: str
    city: str
    state: str
    zip: str
    phone: str


@dataclass(frozen=True)
class Stay:
    """A stretch in one bed under one MRN; ICU beds carry the bedside monitor's device id."""

    unit: str
    room: str
    bed: str
    start_s: int
    end_s: int
    mrn: str
    device_id: str | None = None

    @property
    def icu(self) -> bool:
        return self.device_id is not None


@dataclass(frozen=True)
class Deterioration:
    kind: str
    onset_s: int
    peak_s: int
    recovers: bool
    recovery_start_s: int | None
    recovered_s: int | None
    speed: float = 1.0       # the course's ramp_hours times this (clinical.DETERIORATION_SPEED)
    severity: float = 1.0    # every shift times this (clinical.DETERIORATION_SEVERITY)


@dataclass(frozen=True)
class Episode:
    """A transient, self-limiting illness (clinical.BENIGN_COURSES): rises, holds, resolves; never labelled."""

    kind: str
    onset_s: int
    plateau_s: int       # when it is at its height
    resolving_s: int     # when it starts to resolve
    resolved_s: int


@dataclass
class Encounter:
    visit: str
    visit_no: int
    person: Person
    admit_s: int
    discharge_s: int | None            # None: still in hospital when the window ends
    diagnosis: tuple[str, str]
    draws: dict[str, float]
    stays: list[Stay] = field(default_factory=list)
    deterioration: Deterioration | None = None
    cancelled_s: int | None = None     # cancelled admissions (A11) have no stays
    duplicate: Person | None = None    # registered under a second MRN, merged at merge_s
    merge_s: int | None = None
    update_s: int | None = None        # A08 demographic correction
    updated: Person | None = None
    fhir_vitals: bool = False
    age: int = 60
    phenotypes: tuple[str, ...] = ()   # clinical.PHENOTYPES names
    episode: Episode | None = None
    patient_class: str = "I"           # PV1-2: I inpatient, E emergency, O outpatient

    def mrn_at(self, t: int) -> str:
        if self.duplicate is not None and (self.merge_s is None or t < self.merge_s):
            return self.duplicate.mrn
        return self.person.mrn

    def person_at(self, t: int) -> Person:
        if self.duplicate is not None and (self.merge_s is None or t < self.merge_s):
            return self.duplicate
        return self.updated if self.updated is not None and self.update_s is not None and t >= self.update_s \
            else self.person

    def stay_at(self, t: int) -> Stay | None:
        return next((s for s in self.stays if s.start_s <= t < s.end_s), None)


@dataclass
class Census:
    encounters: list[Encounter]
    icu_beds: int

    @property
    def active(self) -> list[Encounter]:
        return [e for e in self.encounters if e.cancelled_s is None]


# dbldatagen 0.4 turns Arrow on with `spark.sql.execution.arrow.enabled` on any Spark that is not 3.x: a key Spark
# deprecated in 3.0, which Spark 4 answers with a deprecation warning in the simulator's output. The session it is
# handed writes the current key instead; everything else passes through.
_DEPRECATED_CONF = {"spark.sql.execution.arrow.enabled": "spark.sql.execution.arrow.pyspark.enabled"}


class _CurrentConf:
    def __init__(self, conf):
        self._conf = conf

    def set(self, key: str, value) -> None:
        self._conf.set(_DEPRECATED_CONF.get(key, key), value)

    def __getattr__(self, name: str):
        return getattr(self._conf, name)


class _CurrentArrowKey:
    """A SparkSession whose `conf.set` writes the current name of a deprecated key (see _DEPRECATED_CONF)."""

    def __init__(self, spark: SparkSession):
        self._spark = spark
        self.conf = _CurrentConf(spark.conf)

    def __getattr__(self, name: str):
        return getattr(self._spark, name)


def person_draws(spark: SparkSession, params: SimParams) -> DataFrame:
    """One seeded row of random attributes per person (dbldatagen; partitions fixed for reproducibility)."""
    import dbldatagen as dg

    uniforms = ("u_census", "u_admit", "u_los", "u_det", "u_kind", "u_onset", "u_recover", "u_plateau",
                "u_recovery", "u_icu", "u_cancel", "u_dup", "u_update", "u_fhir", "u_imaging", "u_imaging_at",
                "u_ward", "u_merge", "u_cadence", "u_misc")
    spec = (dg.DataGenerator(_CurrentArrowKey(spark), name="carelake_people", rows=params.patients,
                             partitions=params.partitions, randomSeedMethod="hash_fieldname", randomSeed=params.seed)
            .withColumn("sex", "string", values=["F", "M"], random=True)
            .withColumn("given_no", "int", minValue=0, maxValue=len(FEMALE) - 1, random=True)
            .withColumn("middle_no", "int", minValue=0, maxValue=25, random=True)
            .withColumn("family_no", "int", minValue=0, maxValue=len(FAMILY) - 1, random=True)
            .withColumn("age", "int", values=list(range(18, 100)), random=True,
                        weights=[1 + (a - 18) // 10 for a in range(18, 100)])
            .withColumn("birth_day", "int", minValue=0, maxValue=364, random=True)
            .withColumn("house_no", "int", minValue=1, maxValue=9899, random=True)
            .withColumn("street_no", "int", minValue=0, maxValue=len(STREETS) - 1, random=True)
            .withColumn("city_no", "int", minValue=0, maxValue=len(CITIES) - 1, random=True)
            .withColumn("phone_no", "int", minValue=100, maxValue=199, random=True)
            .withColumn("diagnosis_no", "int", minValue=0, maxValue=len(DIAGNOSES) - 1, random=True))
    for name in uniforms:
        spec = spec.withColumn(name, "double", minValue=0.0, maxValue=0.999999, step=0.000001, random=True)
    return spec.build().orderBy("id")


def make_person(row: dict, mrn: str, start: date) -> Person:
    given = (FEMALE if row["sex"] == "F" else MALE)[row["given_no"]]
    city, state, zipcode, area = CITIES[row["city_no"]]
    born = date(start.year - row["age"], 1, 1) + timedelta(days=row["birth_day"])
    return Person(mrn=mrn, family=FAMILY[row["family_no"]], given=given, middle=chr(ord("A") + row["middle_no"]),
                  sex=row["sex"], birth_date=born, street=f"{row['house_no']} {STREETS[row['street_no']]}",
                  city=city, state=state, zip=zipcode, phone=f"({area})555-0{row['phone_no']:03d}")


def build_census(rows: list[dict], params: SimParams) -> Census:
    """People's draws -> encounters with timelines, beds, deteriorations, cancellations and merges."""
    start_day = params.start.date()
    encounters = [_encounter(i, row, params, start_day) for i, row in enumerate(rows)]
    icu_beds = params.icu_beds or max(1, round(params.patients * params.icu_bed_fraction))
    _assign_beds(encounters, params, icu_beds)
    for enc in encounters:
        _add_corrections(enc, params)
    chosen = [enc for enc in encounters if enc.draws["u_cancel"] < params.cancelled_admission_fraction]
    cancelled = [_cancelled_admission(enc, params, params.patients + k + 1) for k, enc in enumerate(chosen)]
    every = encounters + cancelled
    every.sort(key=lambda e: (e.cancelled_s is not None, e.visit_no))
    return Census(every, icu_beds)


def _encounter(i: int, row: dict, params: SimParams, start_day: date) -> Encounter:
    window = params.hours * HOUR
    person = make_person(row, f"MRN{MRN_BASE + i + 1}", start_day)
    los = _lognormal_hours(row["u_los"], median_h=72, sigma=0.6)
    if row["u_census"] < params.census_at_start:
        admit = -int(row["u_admit"] * 96 * HOUR) - 600
        discharge = max(HOUR, int(_lognormal_hours(row["u_los"], median_h=48, sigma=0.8) * HOUR))
    else:
        admit = int(row["u_admit"] * window * 0.9)
        discharge = admit + max(2 * HOUR, int(los * HOUR))
    draws = {k: v for k, v in row.items() if k.startswith("u_")}
    enc = Encounter(visit=visit_number(i + 1), visit_no=i + 1, person=person, admit_s=admit,
                    discharge_s=discharge, diagnosis=DIAGNOSES[row["diagnosis_no"]], draws=draws,
                    fhir_vitals=row["u_fhir"] < params.fhir_vitals_fraction, age=row["age"])
    enc.phenotypes = phenotypes(enc, params.seed)
    enc.deterioration = _deterioration(enc, params)
    if enc.deterioration is not None:
        d = enc.deterioration
        enc.diagnosis = (COURSE[d.kind].icd10, COURSE[d.kind].icd10_display)
        tail = d.recovered_s + 24 * HOUR if d.recovered_s is not None else window + 24 * HOUR
        enc.discharge_s = max(enc.discharge_s or 0, tail)
    if enc.discharge_s is not None and enc.discharge_s >= window:
        enc.discharge_s = None
    enc.episode = _episode(enc, params)
    if row["u_dup"] < params.duplicate_record_fraction:
        enc.duplicate = replace(person, mrn=f"MRN{DUPLICATE_MRN_BASE + i + 1}", middle="", phone="")
    return enc


def _lognormal_hours(u: float, *, median_h: float, sigma: float) -> float:
    z = _normal_quantile(min(max(u, 1e-6), 1 - 1e-6))
    return median_h * math.exp(sigma * z)


def _normal_quantile(p: float) -> float:
    """Inverse standard normal CDF (Acklam's rational approximation, |error| < 1.2e-9)."""
    a = (-3.969683028665376e01, 2.209460984245205e02, -2.759285104469687e02, 1.383577518672690e02,
         -3.066479806614716e01, 2.506628277459239e00)
    b = (-5.447609879822406e01, 1.615858368580409e02, -1.556989798598866e02, 6.680131188771972e01,
         -1.328068155288572e01)
    c = (-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e00, -2.549732539343734e00,
         4.374664141464968e00, 2.938163982698783e00)
    d = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e00, 3.754408661907416e00)
    if p < 0.02425 or p > 1 - 0.02425:
        q = math.sqrt(-2 * math.log(p if p < 0.5 else 1 - p))
        x = (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) / \
            ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1)
        return x if p < 0.5 else -x
    q = p - 0.5
    r = q * q
    return (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q / \
        (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1)


def _deterioration(enc: Encounter, params: SimParams) -> Deterioration | None:
    """A labelled deterioration for a share of admissions, when the stay inside the window allows one."""
    u = enc.draws
    if u["u_det"] >= params.deterioration_fraction:
        return None
    lo = max(enc.admit_s, 0) + HOUR
    hi = min(enc.discharge_s or params.hours * HOUR, params.hours * HOUR) - HOUR
    if enc.discharge_s is not None and enc.discharge_s - max(enc.admit_s, 0) < 4 * HOUR:
        hi = params.hours * HOUR - HOUR  # a short planned stay is extended by the deterioration
    if hi <= lo:
        return None
    kind = _pick(params.deterioration_mix, u["u_kind"])
    course = COURSE[kind]
    rng = random.Random(f"{params.seed}:course:{enc.visit_no}")
    speed = round(rng.uniform(*DETERIORATION_SPEED), 3)
    depth = round(rng.uniform(*DETERIORATION_SEVERITY), 3)
    onset = lo + int(u["u_onset"] * (hi - lo)) // 60 * 60
    peak = onset + int(course.ramp_hours * speed * HOUR)
    if u["u_recover"] >= params.recovery_fraction:
        return Deterioration(kind, onset, peak, False, None, None, speed, depth)
    rec_start = peak + int((2 + 4 * u["u_plateau"]) * HOUR)
    recovered = rec_start + int((6 + 6 * u["u_recovery"]) * HOUR)
    return Deterioration(kind, onset, peak, True, rec_start, recovered, speed, depth)


def phenotypes(enc: Encounter, seed: int) -> tuple[str, ...]:
    """The baseline traits of this admission (clinical.PHENOTYPES), seeded by visit; at most one per measure."""
    rng = random.Random(f"{seed}:phenotype:{enc.visit_no}")
    out: list[str] = []
    taken: set[str] = set()
    for p in PHENOTYPES:
        likely = enc.diagnosis[0] in p.diagnoses or enc.age >= p.min_age
        if rng.random() < (p.chance_if if likely else p.chance) and not taken & set(p.bases):
            out.append(p.name)
            taken |= set(p.bases)
    return tuple(out)


def _episode(enc: Encounter, params: SimParams) -> Episode | None:
    """A transient illness for a share of admissions, somewhere in the part of the stay inside the window."""
    rng = random.Random(f"{params.seed}:episode:{enc.visit_no}")
    lo = max(enc.admit_s, 0)
    hi = min(enc.discharge_s if enc.discharge_s is not None else params.hours * HOUR, params.hours * HOUR)
    if rng.random() >= BENIGN_EPISODE_CHANCE or hi - lo < 2 * HOUR:
        return None
    course = BENIGN_COURSES[rng.randrange(len(BENIGN_COURSES))]
    onset = lo + int(rng.random() * (hi - lo - HOUR)) // 60 * 60
    plateau = onset + int(course.ramp_hours * rng.uniform(0.6, 1.5) * HOUR)
    resolving = plateau + int(rng.uniform(*BENIGN_PLATEAU_H) * HOUR)
    return Episode(course.kind, onset, plateau, resolving, resolving + int(rng.uniform(0.5, 3.0) * HOUR))


def _pick(weights: dict[str, float], u: float) -> str:
    total = sum(weights.values())
    acc = 0.0
    for c in COURSES:
        acc += weights.get(c.kind, 0.0) / total
        if u < acc:
            return c.kind
    return [c.kind for c in COURSES if weights.get(c.kind, 0) > 0][-1]


def _icu_window(enc: Encounter, params: SimParams) -> tuple[int, int] | None:
    """When this encounter needs an ICU bed: straight from admission, or once a deterioration is obvious."""
    end = enc.discharge_s if enc.discharge_s is not None else params.hours * HOUR + 7 * 24 * HOUR
    d = enc.deterioration
    if d is not None:  # the escalation to ICU is the deterioration becoming manifest (its peak)
        begin = d.peak_s
        leave = d.recovered_s + 4 * HOUR if d.recovered_s is not None else end
        return (begin, min(leave, end)) if begin < min(leave, end) else None
    if enc.draws["u_icu"] < params.icu_admission_fraction:
        return enc.admit_s, min(end, enc.admit_s + int((24 + 48 * enc.draws["u_misc"]) * HOUR))
    return None


class BedPool:
    """Beds of one unit, handed out lowest-numbered first to whoever asks at a time the bed is free."""

    def __init__(self, beds: list[tuple[str, str]]):
        self.beds = beds
        self.busy: list[list[tuple[int, int]]] = [[] for _ in beds]

    def take(self, start: int, end: int) -> tuple[str, str] | None:
        for i, spans in enumerate(self.busy):
            if all(end <= s or start >= e for s, e in spans):
                spans.append((start, end))
                return self.beds[i]
        return None


def _assign_beds(encounters: list[Encounter], params: SimParams, icu_beds: int) -> None:
    icu = BedPool([("ICU", f"{n:02d}") for n in range(1, icu_beds + 1)])
    wards = {w: BedPool([(f"{100 * (k + 4) + r + 1}", b) for r in range(WARD_ROOMS) for b in "AB"])
             for k, w in enumerate(WARDS)}
    order = sorted(encounters, key=lambda e: (e.admit_s, e.visit_no))
    # ICU beds go to whoever needs one first (a deterioration escalates at its peak, perhaps long after admission)
    wants = {e.visit_no: w for e in encounters if (w := _icu_window(e, params)) is not None}
    granted = {v: icu.take(*wants[v]) for v in sorted(wants, key=lambda v: (wants[v][0], v))}
    for enc in order:
        end = enc.discharge_s if enc.discharge_s is not None else params.hours * HOUR + 7 * 24 * HOUR
        spans = _care_spans(enc, wants.get(enc.visit_no), granted.get(enc.visit_no), end)
        ward_name = WARDS[int(enc.draws["u_ward"] * len(WARDS))]
        for begin, finish, icu_bed in spans:
            if icu_bed is not None:
                enc.stays.append(Stay("ICU", "ICU", icu_bed, begin, finish, enc.person.mrn,
                                      device_id=f"icu-bed-{icu_bed}"))
                continue
            room, bed = _ward_bed(wards, ward_name, begin, finish)
            enc.stays.append(Stay(ward_name, room, bed, begin, finish, enc.person.mrn))


def _care_spans(enc: Encounter, want: tuple[int, int] | None, got: tuple[str, str] | None,
                end: int) -> list[tuple[int, int, str | None]]:
    """The encounter's stay split into ward and ICU spans (ICU only when a bed was free: `got`)."""
    if want is None or got is None:
        return [(enc.admit_s, end, None)]
    spans: list[tuple[int, int, str | None]] = []
    if want[0] > enc.admit_s:
        spans.append((enc.admit_s, want[0], None))
    spans.append((want[0], want[1], got[1]))
    if want[1] < end:
        spans.append((want[1], end, None))
    return spans


def _ward_bed(wards: dict[str, BedPool], preferred: str, begin: int, finish: int) -> tuple[str, str]:
    for name in (preferred, *[w for w in WARDS if w != preferred]):
        got = wards[name].take(begin, finish)
        if got is not None:
            return got
    return "OVERFLOW", "A"  # every ward bed taken: the corridor trolley a full hospital uses


def _add_corrections(enc: Encounter, params: SimParams) -> None:
    """A08 demographic corrections and A40 merges happen inside the window, during the stay."""
    window = params.hours * HOUR
    first = max(enc.admit_s, 0)
    last = min(enc.discharge_s if enc.discharge_s is not None else window, window)
    if last - first < 20 * 60:
        enc.duplicate = None
        return
    if enc.draws["u_update"] < params.demographic_update_fraction:
        enc.update_s = first + 600 + int((last - first - 600) * enc.draws["u_misc"] * 0.8)
        p = enc.person
        enc.updated = replace(p, phone=p.phone[:-4] + f"{(int(p.phone[-4:]) + 37) % 100 + 100:04d}",
                              street=f"{int(p.street.split()[0]) + 12} {p.street.split(' ', 1)[1]}")
    if enc.duplicate is not None:
        enc.merge_s = first + 300 + int((last - first - 300) * enc.draws["u_merge"] * 0.9)
    enc.stays = _split_stays_at_merge(enc)


def _split_stays_at_merge(enc: Encounter) -> list[Stay]:
    out = []
    for stay in enc.stays:
        if enc.duplicate is None:
            out.append(stay)
            continue
        cut = enc.merge_s
        if stay.start_s < cut < stay.end_s:
            out.append(replace(stay, end_s=cut, mrn=enc.duplicate.mrn))
            out.append(replace(stay, start_s=cut, mrn=enc.person.mrn))
        else:
            out.append(replace(stay, mrn=enc.duplicate.mrn if stay.start_s < cut else enc.person.mrn))
    return out


def _cancelled_admission(enc: Encounter, params: SimParams, visit_no: int) -> Encounter:
    """An admission entered in error and cancelled (A01 then A11); it never gets a bed of its own."""
    window = params.hours * HOUR
    at = int(enc.draws["u_misc"] * window * 0.9) // 60 * 60
    cancel = at + 1200 + int(1800 * enc.draws["u_cadence"]) // 60 * 60
    ward = WARDS[int(enc.draws["u_ward"] * len(WARDS))]
    return Encounter(visit=visit_number(visit_no), visit_no=visit_no, person=enc.person, admit_s=at,
                     discharge_s=None, diagnosis=enc.diagnosis, draws=enc.draws, cancelled_s=cancel,
                     stays=[Stay(ward, "ADM", "1", at, cancel, enc.person.mrn)])


def visit_number(visit_no: int) -> str:
    """The visit (account) number in PV1-19 and Encounter.identifier."""
    return f"V{visit_no:08d}"


def icu_cadence_s(enc: Encounter, params: SimParams) -> int:
    """This encounter's monitor interval: a standard interval in [icu_cadence_min_s, icu_cadence_max_s]."""
    allowed = [c for c in MONITOR_INTERVALS_S if params.icu_cadence_min_s <= c <= params.icu_cadence_max_s]
    if not allowed:
        allowed = [params.icu_cadence_min_s]
    return allowed[int(enc.draws["u_cadence"] * len(allowed))]
