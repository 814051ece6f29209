"""When observations are taken (ward rounds, ICU monitors' hourly sets, lab draws) and what they read (the Spark
trajectory expressions).

Schedules are small and built in Python; values for every schedule row, ward and ICU alike, come from the one
closed-form expression in trajectory.py, so a patient's ward readings and monitor numerics agree.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipelines.simulator.clinical import (
    BENIGN_NO,
    CODE_NO,
    KIND_NO,
    LAB_KEYS,
    LONG_TERM_O2,
    MEASURES,
    MONITOR_KEYS,
    PHENOTYPE,
    WARD_KEYS,
)
from pipelines.simulator.params import SimParams
from pipelines.simulator.population import HOUR, Census, Encounter
from pipelines.simulator.trajectory import NEVER_S

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

PARAM_COLUMNS = ("visit_no", "bases", "kind_no", "onset_s", "ramp_s", "recovery_start_s", "recovery_s", "gains",
                 "episode")
PARAM_SCHEMA = ("visit_no long, bases array<double>, kind_no int, onset_s double, ramp_s double, "
                "recovery_start_s double, recovery_s double, gains array<double>, episode array<double>")
UNWELL_AT = 0.4  # share of the way to the peak at which nurses notice and observe hourly


@dataclass(frozen=True)
class Draw:
    """A scheduled observation set: ward vitals (`kind` "vitals"), a lab draw ("labs"), or an ICU monitor's hourly
    set ("monitor": the values the bedside monitor sends at that tick, through the devices feed; kept for the
    patient's acuity, not sent again as charted vitals)."""

    visit_no: int
    t: int
    kind: str
    keys: tuple[str, ...]


def encounter_params(enc: Encounter, seed: int) -> tuple:
    """(visit_no, baselines per measure, kind_no, onset, ramp, recovery start, recovery length, gains per measure,
    episode) for Spark (trajectory.measure_value's inputs)."""
    rng = random.Random(f"{seed}:baseline:{enc.visit_no}")
    bases = [round(rng.uniform(m.base_low, m.base_high), 3) for m in MEASURES]
    gains = [1.0] * len(MEASURES)
    traits = random.Random(f"{seed}:trait-baseline:{enc.visit_no}")
    for name in enc.phenotypes:
        p = PHENOTYPE[name]
        for key, (low, high) in p.bases.items():
            bases[CODE_NO[key]] = round(traits.uniform(low, high), 3)
        for key, gain in p.gains.items():
            gains[CODE_NO[key]] *= gain
    if "chronic_hypoxia" in enc.phenotypes and traits.random() < LONG_TERM_O2:
        flow = traits.choice((1.0, 2.0))
        bases[CODE_NO["o2flow"]], bases[CODE_NO["fio2"]] = flow, 20.0 + 4.0 * flow  # nasal cannula: ~4 % per L
    e = enc.episode
    episode = [0.0, float(NEVER_S), 3600.0, float(NEVER_S), 3600.0] if e is None else [
        float(BENIGN_NO[e.kind]), float(e.onset_s), float(e.plateau_s - e.onset_s), float(e.resolving_s),
        float(e.resolved_s - e.resolving_s)]
    d = enc.deterioration
    if d is None:
        return enc.visit_no, bases, 0, float(NEVER_S), 3600.0, float(NEVER_S), 3600.0, gains, episode
    gains = [g * d.severity for g in gains]
    ramp = float(d.peak_s - d.onset_s)
    if not d.recovers:
        return enc.visit_no, bases, KIND_NO[d.kind], float(d.onset_s), ramp, float(NEVER_S), 3600.0, gains, episode
    return (enc.visit_no, bases, KIND_NO[d.kind], float(d.onset_s), ramp, float(d.recovery_start_s),
            float(d.recovered_s - d.recovery_start_s), gains, episode)


def params_frame(spark: SparkSession, census: Census, seed: int) -> DataFrame:
    rows = [encounter_params(e, seed) for e in census.active]
    return spark.createDataFrame(rows, PARAM_SCHEMA)


def unwell_spans(enc: Encounter) -> list[tuple[int, int]]:
    """When nurses observe hourly: from a deterioration's UNWELL_AT on, and while a transient episode is at its
    height (it looks the same at the bedside: NEWS2 drives the frequency, not the diagnosis)."""
    spans = []
    if enc.deterioration is not None:
        d = enc.deterioration
        spans.append((d.onset_s + int((d.peak_s - d.onset_s) * UNWELL_AT), NEVER_S))
    if enc.episode is not None:
        spans.append((enc.episode.plateau_s, enc.episode.resolved_s))
    return spans


def ward_rounds(enc: Encounter, params: SimParams) -> list[Draw]:
    """Nurse observation sets on ward stays every ward_cadence_min_h-max_h hours (the minimum once unwell)."""
    rng = random.Random(f"{params.seed}:ward:{enc.visit_no}")
    lo_s, hi_s = int(params.ward_cadence_min_h * HOUR), int(params.ward_cadence_max_h * HOUR)
    unwell = unwell_spans(enc)
    draws, first = [], True
    for stay in (s for s in enc.stays if not s.icu):
        t = max(stay.start_s, 0) + rng.randrange(5, 30) * 60
        while t < min(stay.end_s, params.window_s):
            keys = WARD_KEYS + (("weight",) if first and enc.admit_s >= 0 else ())
            draws.append(Draw(enc.visit_no, t, "vitals", keys))
            first = False
            step = lo_s if any(a <= t < b for a, b in unwell) else rng.randrange(lo_s // 60, hi_s // 60 + 1) * 60
            t += step
    return draws


def icu_hourly(enc: Encounter, params: SimParams) -> list[Draw]:
    """An ICU stay's monitor set each hour from its start (the tick at which the monitor also sends ACVPU; every
    standard monitor interval divides the hour), inside the window: what gold scores NEWS2 from on the ICU."""
    keys = (*MONITOR_KEYS, "acvpu")
    return [Draw(enc.visit_no, t, "monitor", keys) for stay in enc.stays if stay.icu
            for t in range(stay.start_s, min(stay.end_s, params.window_s), HOUR) if t >= 0]


def lab_draws(enc: Encounter, params: SimParams) -> list[Draw]:
    """Admission bloods, a 06:00 round each day, a screen and repeat when a patient deteriorates, and a screen when a
    transient episode is at its height (bloods are taken for what looks like illness, not for the diagnosis)."""
    times = set()
    if enc.admit_s >= 0:
        times.add(enc.admit_s + HOUR)
    start_hour = params.start.hour + params.start.minute / 60
    first_six = int(((6 - start_hour) % 24) * HOUR)
    times.update(range(first_six, params.window_s, 24 * HOUR))
    if enc.deterioration is not None:
        d = enc.deterioration
        times.update({d.onset_s + (d.peak_s - d.onset_s) // 2, d.peak_s})
    if enc.episode is not None:
        times.add(enc.episode.plateau_s)
    end = min(enc.discharge_s if enc.discharge_s is not None else params.window_s, params.window_s)
    return [Draw(enc.visit_no, t, "labs", LAB_KEYS) for t in sorted(times) if max(enc.admit_s, 0) <= t < end]


def schedule(census: Census, params: SimParams) -> list[Draw]:
    out = []
    for enc in census.active:
        out += ward_rounds(enc, params) + icu_hourly(enc, params) + lab_draws(enc, params)
    return out


def read_values(spark: SparkSession, census: Census, params: SimParams,
                draws: list[Draw]) -> dict[tuple[int, int], dict[str, float]]:
    """Values for every (visit_no, t) of the draws: {measure key: value}."""
    from pyspark.sql import functions as F

    from pipelines.simulator.trajectory import measure_value

    rows = [(d.visit_no, d.t, CODE_NO[k]) for d in draws for k in d.keys]
    if not rows:
        return {}
    wanted = spark.createDataFrame(rows, "visit_no long, t long, code_no int").repartition(params.partitions)
    joined = wanted.join(F.broadcast(params_frame(spark, census, params.seed)), "visit_no")
    c = F.col
    value = measure_value(seed=params.seed, start_hour=params.start.hour + params.start.minute / 60,
                          visit_no=c("visit_no"), t=c("t"), code_no=c("code_no"),
                          base=F.element_at(c("bases"), c("code_no") + 1), kind_no=c("kind_no"),
                          onset_s=c("onset_s"), ramp_s=c("ramp_s"), recovery_start_s=c("recovery_start_s"),
                          recovery_s=c("recovery_s"), gains=c("gains"), episode=c("episode"))
    table = joined.select("visit_no", "t", "code_no", value.alias("value")).toArrow().to_pydict()
    out: dict[tuple[int, int], dict[str, float]] = defaultdict(dict)
    for v, t, code, val in zip(table["visit_no"], table["t"], table["code_no"], table["value"], strict=True):
        out[(v, t)][MEASURES[code].key] = val
    return dict(out)
