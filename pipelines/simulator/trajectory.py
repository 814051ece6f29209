"""Vital-sign and lab trajectories as closed-form Spark columns: computable for any (encounter, time, measure).

value(t) = baseline + circadian cosine + seeded noise + severity(t) x shift, clipped and rounded, where
severity(t) is a smooth ramp from onset (later for later signs) to peak, times a ramp back down on recovery.
Every random number is a hash of (seed, visit, t, measure), so values do not depend on partitioning or order.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from pipelines.simulator.clinical import COURSES, MEASURES

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


def _per_course(index: int, kind_no: Column, code_no: Column) -> Column:
    """delta (index 0) or stage (index 1) for (kind, measure); kind 0 (stable) shifts nothing."""
    from pyspark.sql import functions as F

    table = [0.0] * len(MEASURES)
    for course in COURSES:
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


def measure_value(*, seed: int, start_hour: float, visit_no: Column, t: Column, code_no: Column, base: Column,
                  kind_no: Column, onset_s: Column, ramp_s: Column, recovery_start_s: Column,
                  recovery_s: Column) -> Column:
    """The value of measure `code_no` for an encounter at `t` seconds after the window start."""
    from pyspark.sql import functions as F

    hour_of_day = F.lit(start_hour) + t / 3600.0
    circadian = _per_measure("circadian_amp", code_no) * F.cos(
        (hour_of_day - _per_measure("circadian_peak_h", code_no)) * (2 * math.pi / 24))
    noise = _per_measure("noise_sd", code_no) * standard_normal(F.xxhash64(F.lit(seed), visit_no, t, code_no))
    shift = _per_course(0, kind_no, code_no) * severity(
        t, onset_s, ramp_s, _per_course(1, kind_no, code_no), recovery_start_s, recovery_s)
    raw = base + circadian + noise + shift
    clipped = F.least(F.greatest(raw, _per_measure("low", code_no)), _per_measure("high", code_no))
    scale = F.pow(F.lit(10.0), _per_measure("decimals", code_no))
    return F.round(clipped * scale, 0) / scale
