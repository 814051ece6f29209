"""Vital-sign and lab trajectories as closed-form Spark columns: computable for any (encounter, time, measure).

value(t) = baseline + circadian cosine + noise x (1 + severity(t)) + gain x severity(t) x shift
           + episode(t) x benign shift + artefact(t), clipped and rounded, where
severity(t) is a smooth ramp from onset (later for later signs) to peak, times a ramp back down on recovery; `gain`
is the patient's response (deterioration severity x phenotype, e.g. 0.35 on heart rate when beta-blocked); the
episode is a transient, self-limiting illness (clinical.BENIGN_COURSES) shaped the same way; an artefact is a reading
that is off for seconds to minutes and then reads true again (clinical.ARTEFACTS). docs/simulator.md has the physiology.
Every random number is a hash of (seed, visit, t, measure), so values do not depend on partitioning or order.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from pipelines.simulator.clinical import ARTEFACT_BLOCK_S, ARTEFACTS, BENIGN_COURSES, CODE_NO, COURSES, MEASURES

if TYPE_CHECKING:
    from pyspark.sql import Column

NEVER_S = 10**12  # onset / recovery time for encounters that never deteriorate / never recover
_U16 = 65536.0


def _lit_array(values):
    from pyspark.sql import functions as F

    return F.array(*[F.lit(float(v)) for v in values])


def _per_measure(attr: str, code_no: Column) -> Column:
    from pyspark.sql import functions as F

    return F.element_at(_lit_array([getattr(m, attr) for m in MEASURES]), code_no + 1)


def _per_course(index: int, kind_no: Column, code_no: Column, courses=COURSES) -> Column:
    """delta (index 0) or stage (index 1) for (kind, measure); kind 0 (stable) shifts nothing."""
    from pyspark.sql import functions as F

    table = [0.0] * len(MEASURES)
    for course in courses:
        table += [course.shifts.get(m.key, (0.0, 0.0))[index] for m in MEASURES]
    return F.element_at(_lit_array(table), kind_no * len(MEASURES) + code_no + 1)


def standard_normal(h: Column) -> Column:
    """An approximately N(0, 1) draw from a 64-bit hash: the sum of four 16-bit uniforms (Irwin-Hall)."""
    from pyspark.sql import functions as F

    parts = [F.shiftrightunsigned(h, 16 * k).bitwiseAND(0xFFFF) / _U16 for k in range(4)]
    return (parts[0] + parts[1] + parts[2] + parts[3] - 2.0) * math.sqrt(3.0)


def uniform(h: Column, slot: int) -> Column:
    """One of three independent [0, 1) uniforms (20 bits each) from a 64-bit hash."""
    from pyspark.sql import functions as F

    return F.shiftrightunsigned(h, 20 * slot).bitwiseAND(0xFFFFF) / float(1 << 20)


def _ramp(x: Column) -> Column:
    from pyspark.sql import functions as F

    r = F.least(F.greatest(x, F.lit(0.0)), F.lit(1.0))
    return r * r * (3.0 - 2.0 * r)  # smoothstep: physiology does not move in straight lines


def severity(t: Column, onset_s: Column, ramp_s: Column, stage: Column, recovery_start_s: Column,
             recovery_s: Column) -> Column:
    """0 before this measure starts moving, 1 at the peak, back towards 0 as the patient recovers."""
    begin = onset_s + stage * ramp_s
    rise = _ramp((t - begin) / ((1.0 - stage) * ramp_s))
    return rise * (1.0 - _ramp((t - recovery_start_s) / recovery_s))


def _per_artefact(attr: str, code_no: Column) -> Column:
    """An artefact setting for a measure (0 for measures without artefacts)."""
    from pyspark.sql import functions as F

    by_code = {CODE_NO[a.key]: a for a in ARTEFACTS}
    return F.element_at(_lit_array([getattr(by_code[i], attr) if i in by_code else 0.0
                                    for i in range(len(MEASURES))]), code_no + 1)


def artefact(*, seed: int, visit_no: Column, t: Column, code_no: Column) -> Column:
    """How far off the reading at `t` is (0 outside an artefact): at most one artefact per measure and 30-min block,
    its start, length and size drawn from a hash of (seed, visit, block, measure)."""
    from pyspark.sql import functions as F

    block = F.floor(t / ARTEFACT_BLOCK_S)
    h = F.xxhash64(F.lit(seed), visit_no, block, code_no, F.lit("artefact"))
    low_s, high_s = _per_artefact("min_s", code_no), _per_artefact("max_s", code_no)
    length = low_s + (high_s - low_s) * uniform(h, 1)
    begin = block * ARTEFACT_BLOCK_S + (ARTEFACT_BLOCK_S - length) * uniform(h, 2)
    size = F.shiftrightunsigned(h, 60).bitwiseAND(15) / 15.0
    delta = _per_artefact("delta_low", code_no) + (_per_artefact("delta_high", code_no)
                                                    - _per_artefact("delta_low", code_no)) * size
    on = (uniform(h, 0) < _per_artefact("chance", code_no)) & (t >= begin) & (t < begin + length)
    return F.when(on, delta).otherwise(F.lit(0.0))


def measure_value(*, seed: int, start_hour: float, visit_no: Column, t: Column, code_no: Column, base: Column,
                  kind_no: Column, onset_s: Column, ramp_s: Column, recovery_start_s: Column,
                  recovery_s: Column, gains: Column | None = None, episode: Column | None = None,
                  artefacts: bool = True) -> Column:
    """The value of measure `code_no` for an encounter at `t` seconds after the window start.

    `gains` (array per measure, default 1) scales the deterioration's shifts; `episode` is the benign episode as
    array [benign kind no (0 = none), onset_s, ramp_s, plateau end s, recovery_s]; `artefacts` adds clinical.ARTEFACTS.
    """
    from pyspark.sql import functions as F

    hour_of_day = F.lit(start_hour) + t / 3600.0
    circadian = _per_measure("circadian_amp", code_no) * F.cos(
        (hour_of_day - _per_measure("circadian_peak_h", code_no)) * (2 * math.pi / 24))
    sick = severity(t, onset_s, ramp_s, _per_course(1, kind_no, code_no), recovery_start_s, recovery_s)
    noise = _per_measure("noise_sd", code_no) * (1.0 + sick) * standard_normal(
        F.xxhash64(F.lit(seed), visit_no, t, code_no))
    gain = F.lit(1.0) if gains is None else F.element_at(gains, code_no + 1)
    raw = base + circadian + noise + gain * _per_course(0, kind_no, code_no) * sick
    if episode is not None:
        benign_no = F.element_at(episode, 1).cast("int")
        shape = severity(t, F.element_at(episode, 2), F.element_at(episode, 3),
                         _per_course(1, benign_no, code_no, BENIGN_COURSES), F.element_at(episode, 4),
                         F.element_at(episode, 5))
        raw = raw + _per_course(0, benign_no, code_no, BENIGN_COURSES) * shape
    if artefacts:
        raw = raw + artefact(seed=seed, visit_no=visit_no, t=t, code_no=code_no)
    clipped = F.least(F.greatest(raw, _per_measure("low", code_no)), _per_measure("high", code_no))
    scale = F.pow(F.lit(10.0), _per_measure("decimals", code_no))
    return F.round(clipped * scale, 0) / scale
