"""NEWS2 early-warning score (Royal College of Physicians, 2017), qSOFA and SIRS: pure scoring, no storage I/O.

Inputs are silver's canonical units (silver/vitals.py): respiratory rate and pulse in /min, SpO2 and inhaled O2
concentration in %, O2 flow in L/min, systolic BP in mm[Hg], temperature in Cel, WBC in 10*3/uL, consciousness as
one ACVPU letter ('A', 'C', 'V', 'P', 'U'). The chart lives once, as data (the *_CHART tables below), and is read
by both implementations that give the same answer on the same inputs: `news2`, `qsofa`, `sirs`, `on_oxygen` (pure
Python, the reference) and `news2_columns`, `qsofa_columns`, `sirs_column`, `on_oxygen_column` (native Spark
Column expressions, no UDFs).

Rounding rule: the chart prints whole numbers (temperature: one decimal), so a value between two printed numbers
is first rounded half-up to the chart's precision and then banded: respiratory rate, SpO2, systolic BP and pulse
to whole numbers (20.5 -> 21, 20.49 -> 20), temperature to one decimal (35.05 -> 35.1, 38.04 -> 38.0). Half-up
is computed as floor(x * 10**d + 0.5 + 1e-9) in units of 10**-d, the same double operations in Python and Spark,
so a binary float a few ulps under a half (35.04999999999999, what arithmetic such as a unit conversion can leave
of 35.05) still rounds up; the rounded integer is compared with the chart bound in the same units, never a float
with a float. qSOFA and SIRS round respiratory
rate, systolic BP, pulse and temperature by the same rule (one reading gives one answer in every score); WBC, FiO2
and O2 flow are compared as given.

Missing inputs: None (null in Spark), NaN and +-infinity are missing, as is a consciousness value that is not an
ACVPU letter. A component whose input is missing is None; the total and band are computed from the components
present and flagged `partial`, with the missing component names in `missing` (never silently scored as normal).
Oxygen: on oxygen when FiO2 > 21 % or O2 flow > 0 L/min; either one saying oxygen is enough; unknown when neither
is known. SpO2 scale 2 (a recorded hypercapnic target; null/None means scale 1) needs the oxygen status only at
93 % and above, where air and oxygen score differently: there an unknown oxygen status leaves the SpO2 component
missing.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import reduce

from pyspark.sql import Column
from pyspark.sql import functions as F

INF = math.inf

COMPONENTS = ("news2_respiratory_rate", "news2_spo2", "news2_supplemental_o2", "news2_systolic_bp",
              "news2_pulse", "news2_consciousness", "news2_temperature")
BANDS = ("low", "low-medium", "medium", "high")  # ascending severity


@dataclass(frozen=True)
class Chart:
    """One numeric NEWS2 parameter: chart precision (decimals) and (upper bound inclusive, points), ascending."""

    decimals: int
    bands: tuple[tuple[float, int], ...]  # the last bound is INF

    def __post_init__(self) -> None:
        bounds = [b for b, _ in self.bands]
        if bounds != sorted(set(bounds)) or bounds[-1] != INF:
            raise ValueError(f"chart bounds must be strictly ascending and end with INF, got {bounds}")

    def unit_bands(self) -> tuple[tuple[int | float, int], ...]:
        """The bands with each bound in units of 10**-decimals (integers; INF stays INF)."""
        return tuple((b if b == INF else round(b * 10**self.decimals), p) for b, p in self.bands)


RESPIRATORY_RATE_CHART = Chart(0, ((8, 3), (11, 1), (20, 0), (24, 2), (INF, 3)))
SPO2_SCALE1_CHART = Chart(0, ((91, 3), (93, 2), (95, 1), (INF, 0)))
SPO2_SCALE2_AIR_CHART = Chart(0, ((83, 3), (85, 2), (87, 1), (INF, 0)))
SPO2_SCALE2_OXYGEN_CHART = Chart(0, ((83, 3), (85, 2), (87, 1), (92, 0), (94, 1), (96, 2), (INF, 3)))
SYSTOLIC_BP_CHART = Chart(0, ((90, 3), (100, 2), (110, 1), (219, 0), (INF, 3)))
PULSE_CHART = Chart(0, ((40, 3), (50, 1), (90, 0), (110, 1), (130, 2), (INF, 3)))
TEMPERATURE_CHART = Chart(1, ((35.0, 3), (36.0, 1), (38.0, 0), (39.0, 1), (INF, 2)))
SUPPLEMENTAL_O2_POINTS: Mapping[bool, int] = {True: 2, False: 0}
CONSCIOUSNESS_POINTS: Mapping[str, int] = {"A": 0, "C": 3, "V": 3, "P": 3, "U": 3}
AIR_FIO2_PCT = 21.0       # on oxygen when FiO2 is above this
MEDIUM_FROM, HIGH_FROM = 5, 7  # total score bands; below MEDIUM_FROM a single 3 makes it low-medium

QSOFA_RR_FROM = 22        # /min, inclusive
QSOFA_SBP_UPTO = 100      # mm[Hg], inclusive
ALTERED_MENTATION = ("C", "V", "P", "U")
SIRS_TEMP_CEL = (36.0, 38.0)   # outside (strictly) meets the criterion
SIRS_PULSE_ABOVE = 90
SIRS_RR_ABOVE = 20
SIRS_WBC = (4.0, 12.0)         # 10*3/uL, outside (strictly)

_EPSILON = 1e-9  # absorbs binary representation error below a half (35.05 -> 35.04999...)


@dataclass(frozen=True)
class News2:
    """A NEWS2 result: the seven component scores (None when missing), total, band, and what was missing."""

    news2_respiratory_rate: int | None
    news2_spo2: int | None
    news2_supplemental_o2: int | None
    news2_systolic_bp: int | None
    news2_pulse: int | None
    news2_consciousness: int | None
    news2_temperature: int | None
    score: int
    band: str
    partial: bool
    missing: tuple[str, ...]

    @property
    def components(self) -> dict[str, int | None]:
        """The seven component scores by name, in COMPONENTS order."""
        return {name: getattr(self, name) for name in COMPONENTS}


# ---------------------------------------------------------------------------------------------------------------
# Python reference


def _value(x: float | None) -> float | None:
    """x as a float, or None when missing (None, NaN, +-infinity)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _units(x: float | None, decimals: int) -> int | None:
    """x rounded half-up to `decimals`, as an integer count of 10**-decimals; None when missing."""
    x = _value(x)
    return None if x is None else math.floor(x * float(10**decimals) + 0.5 + _EPSILON)


def _threshold(bound: float, decimals: int) -> int:
    """A qSOFA/SIRS threshold in units of 10**-decimals."""
    return round(bound * 10**decimals)


def _letter(acvpu: str | None) -> str | None:
    """The ACVPU letter, or None when missing or not a letter of the scale."""
    return acvpu if isinstance(acvpu, str) and acvpu in CONSCIOUSNESS_POINTS else None


def _chart_points(chart: Chart, x: float | None) -> int | None:
    """Points for x on a numeric chart, after rounding; None when x is missing."""
    u = _units(x, chart.decimals)
    return None if u is None else next(p for b, p in chart.unit_bands() if u <= b)


def _spo2_points(spo2: float | None, on_o2: bool | None, scale2: bool) -> int | None:
    """SpO2 points on scale 1, or on scale 2 where oxygen matters only when air and oxygen score differently."""
    if not scale2:
        return _chart_points(SPO2_SCALE1_CHART, spo2)
    air, oxygen = _chart_points(SPO2_SCALE2_AIR_CHART, spo2), _chart_points(SPO2_SCALE2_OXYGEN_CHART, spo2)
    if on_o2 is None:
        return air if air == oxygen else None
    return oxygen if on_o2 else air


def on_oxygen(fio2: float | None, o2flow: float | None) -> bool | None:
    """True when FiO2 > 21 % or O2 flow > 0 L/min, False when the known ones say air, None when neither is known."""
    fio2, o2flow = _value(fio2), _value(o2flow)
    if (fio2 is not None and fio2 > AIR_FIO2_PCT) or (o2flow is not None and o2flow > 0):
        return True
    return None if fio2 is None and o2flow is None else False


def band(total: int, any_three: bool) -> str:
    """The NEWS2 clinical risk band of a total score (any_three: some single parameter scored 3)."""
    if total >= HIGH_FROM:
        return "high"
    if total >= MEDIUM_FROM:
        return "medium"
    return "low-medium" if any_three else "low"


def news2(rr, spo2, on_o2, sbp, pulse, acvpu, temp, *, scale2: bool = False) -> News2:
    """NEWS2 from one set of observations (the Python reference for `news2_columns`)."""
    scores = (
        _chart_points(RESPIRATORY_RATE_CHART, rr),
        _spo2_points(spo2, on_o2, bool(scale2)),
        None if on_o2 is None else SUPPLEMENTAL_O2_POINTS[bool(on_o2)],
        _chart_points(SYSTOLIC_BP_CHART, sbp),
        _chart_points(PULSE_CHART, pulse),
        None if _letter(acvpu) is None else CONSCIOUSNESS_POINTS[acvpu],
        _chart_points(TEMPERATURE_CHART, temp),
    )
    present = [s for s in scores if s is not None]
    missing = tuple(name for name, s in zip(COMPONENTS, scores, strict=True) if s is None)
    total = sum(present)
    return News2(*scores, score=total, band=band(total, 3 in present), partial=bool(missing), missing=missing)


def qsofa(rr, sbp, acvpu) -> tuple[int, bool]:
    """(qSOFA points from the inputs present, whether any of the three inputs is missing)."""
    rr_u, sbp_u, letter = _units(rr, 0), _units(sbp, 0), _letter(acvpu)
    points = ((rr_u is not None and rr_u >= QSOFA_RR_FROM) + (sbp_u is not None and sbp_u <= QSOFA_SBP_UPTO)
              + (letter in ALTERED_MENTATION))
    return int(points), None in (rr_u, sbp_u, letter)


def sirs(temp, pulse, rr, wbc) -> int | None:
    """SIRS criteria met among the inputs present; None when none of the four is present."""
    temp_u, pulse_u, rr_u, wbc = _units(temp, 1), _units(pulse, 0), _units(rr, 0), _value(wbc)
    if temp_u is None and pulse_u is None and rr_u is None and wbc is None:
        return None
    low_t, high_t = (_threshold(t, 1) for t in SIRS_TEMP_CEL)
    met = (
        temp_u is not None and (temp_u > high_t or temp_u < low_t),
        pulse_u is not None and pulse_u > SIRS_PULSE_ABOVE,
        rr_u is not None and rr_u > SIRS_RR_ABOVE,
        wbc is not None and (wbc > SIRS_WBC[1] or wbc < SIRS_WBC[0]),
    )
    return sum(met)


# ---------------------------------------------------------------------------------------------------------------
# Spark: the same tables and rules as native Column expressions


def _col(c: Column | str) -> Column:
    """A Column from a Column or a column name."""
    return F.col(c) if isinstance(c, str) else c


def _value_column(c: Column | str) -> Column:
    """c as a double, null when missing (null, NaN, +-infinity)."""
    x = _col(c).cast("double")
    return F.when(F.abs(x) < F.lit(INF), x)  # Spark orders NaN above +infinity: NaN fails the test too


def _units_column(c: Column | str, decimals: int) -> Column:
    """`_units` as a Column: the same double operations, then floor (bigint); null when missing."""
    scaled = _value_column(c) * F.lit(float(10**decimals)) + F.lit(0.5) + F.lit(_EPSILON)
    return F.floor(scaled)


def _count_column(conditions: Iterable[Column]) -> Column:
    """How many of the conditions are true (a null condition counts as not met), as an int Column."""
    return reduce(operator.add, (F.when(c, F.lit(1)).otherwise(F.lit(0)) for c in conditions)).cast("int")


def _any_column(conditions: Iterable[Column]) -> Column:
    """OR of conditions that are never null."""
    return reduce(operator.or_, conditions)


def _letter_column(acvpu: Column | str) -> Column:
    """The ACVPU letter, null when missing or not a letter of the scale."""
    a = _col(acvpu)
    return F.when(a.isin(*CONSCIOUSNESS_POINTS), a)


def _intervals(charts: Sequence[Chart]) -> list[tuple[int | float, tuple[int, ...]]]:
    """The union of the charts' bounds (in units), each with every chart's points up to it, ascending."""
    bands = [chart.unit_bands() for chart in charts]
    bounds = sorted({b for chart_bands in bands for b, _ in chart_bands})
    return [(b, tuple(next(p for cb, p in chart_bands if b <= cb) for chart_bands in bands)) for b in bounds]


def _banded_column(c: Column | str, charts: Sequence[Chart], points: Callable[[tuple[int, ...]], Column]) -> Column:
    """One CASE over the rounded value for charts of one precision; `points` picks from the charts' points."""
    u = _units_column(c, charts[0].decimals)
    *bounded, (_, top) = _intervals(charts)
    expr = F.when(u.isNull(), F.lit(None))
    for bound, chart_points in bounded:
        expr = expr.when(u <= F.lit(bound), points(chart_points))
    return expr.otherwise(points(top)).cast("int")


def _chart_column(chart: Chart, c: Column | str) -> Column:
    """`_chart_points` as a Column (int, null when missing)."""
    return _banded_column(c, (chart,), lambda p: F.lit(p[0]))


def _spo2_column(spo2: Column | str, on_o2: Column, scale2: Column) -> Column:
    """`_spo2_points` as a Column: scale 2 is one CASE that reads the oxygen status where air and oxygen differ."""

    def air_or_oxygen(p: tuple[int, ...]) -> Column:
        air, oxygen = p
        return F.lit(air) if air == oxygen else F.when(on_o2, F.lit(oxygen)).when(~on_o2, F.lit(air))

    scale2_points = _banded_column(spo2, (SPO2_SCALE2_AIR_CHART, SPO2_SCALE2_OXYGEN_CHART), air_or_oxygen)
    return F.when(F.coalesce(scale2, F.lit(False)), scale2_points).otherwise(_chart_column(SPO2_SCALE1_CHART, spo2))


def _lookup_column(points: Mapping, key: Column) -> Column:
    """points[key] as a Column (int), null when the key is null or absent."""
    expr = F.when(key.isNull(), F.lit(None))
    for k, p in points.items():
        expr = expr.when(key == F.lit(k), F.lit(p))
    return expr.cast("int")


def on_oxygen_column(fio2: Column | str, o2flow: Column | str) -> Column:
    """`on_oxygen` as a Column (boolean): true if either says oxygen, null if neither is known, else false."""
    f, o = _value_column(fio2), _value_column(o2flow)
    oxygen = F.coalesce(f > F.lit(AIR_FIO2_PCT), F.lit(False)) | F.coalesce(o > F.lit(0.0), F.lit(False))
    return F.when(f.isNull() & o.isNull(), F.lit(None).cast("boolean")).otherwise(oxygen)


def _band_column(total: Column, any_three: Column) -> Column:
    """`band` as a Column, read from a literal table of band(t, any_three) for t = 0..HIGH_FROM.

    The total is a large expression: a table indexed once keeps it from being repeated in each CASE branch.
    Totals above HIGH_FROM band as HIGH_FROM does.
    """
    table = F.array(*(F.lit(band(t, a)) for t in range(HIGH_FROM + 1) for a in (False, True)))
    index = F.least(total, F.lit(HIGH_FROM)) * F.lit(2) + F.when(any_three, F.lit(1)).otherwise(F.lit(0))
    return F.element_at(table, index + F.lit(1))


def news2_columns(rr: Column | str, spo2: Column | str, on_o2: Column | str, sbp: Column | str,
                  pulse: Column | str, acvpu: Column | str, temp: Column | str,
                  scale2: Column | str | None = None) -> dict[str, Column]:
    """`news2` as Columns: the 7 COMPONENTS, news2_score, news2_band, news2_partial, news2_missing (array<string>).

    on_o2 is a boolean Column (see `on_oxygen_column`); a null scale2 (or none given) means SpO2 scale 1.
    """
    o2 = _col(on_o2).cast("boolean")
    s2 = F.lit(False) if scale2 is None else _col(scale2).cast("boolean")
    scores = (
        _chart_column(RESPIRATORY_RATE_CHART, rr),
        _spo2_column(spo2, o2, s2),
        _lookup_column(SUPPLEMENTAL_O2_POINTS, o2),
        _chart_column(SYSTOLIC_BP_CHART, sbp),
        _chart_column(PULSE_CHART, pulse),
        _lookup_column(CONSCIOUSNESS_POINTS, _letter_column(acvpu)),
        _chart_column(TEMPERATURE_CHART, temp),
    )
    present = [F.coalesce(s, F.lit(0)) for s in scores]
    total = reduce(operator.add, present).cast("int")
    named = dict(zip(COMPONENTS, scores, strict=True))
    missing = F.array_compact(F.array(*(F.when(s.isNull(), F.lit(name)) for name, s in named.items())))
    return {
        **named,
        "news2_score": total,
        "news2_band": _band_column(total, F.greatest(*present) == F.lit(3)),
        "news2_partial": _any_column(s.isNull() for s in scores),
        "news2_missing": missing.cast("array<string>"),
    }


def qsofa_columns(rr: Column | str, sbp: Column | str, acvpu: Column | str) -> dict[str, Column]:
    """`qsofa` as Columns: qsofa_score (int) and qsofa_partial (boolean)."""
    rr_u, sbp_u, letter = _units_column(rr, 0), _units_column(sbp, 0), _letter_column(acvpu)
    met = (rr_u >= F.lit(QSOFA_RR_FROM), sbp_u <= F.lit(QSOFA_SBP_UPTO), letter.isin(*ALTERED_MENTATION))
    return {
        "qsofa_score": _count_column(met),
        "qsofa_partial": _any_column(c.isNull() for c in (rr_u, sbp_u, letter)),
    }


def sirs_column(temp: Column | str, pulse: Column | str, rr: Column | str, wbc: Column | str) -> Column:
    """`sirs` as a Column: int, null when none of the four inputs is present."""
    temp_u, pulse_u, rr_u = _units_column(temp, 1), _units_column(pulse, 0), _units_column(rr, 0)
    w = _value_column(wbc)
    low_t, high_t = (_threshold(t, 1) for t in SIRS_TEMP_CEL)
    met = (
        (temp_u > F.lit(high_t)) | (temp_u < F.lit(low_t)),
        pulse_u > F.lit(SIRS_PULSE_ABOVE),
        rr_u > F.lit(SIRS_RR_ABOVE),
        (w > F.lit(SIRS_WBC[1])) | (w < F.lit(SIRS_WBC[0])),
    )
    any_present = _any_column(c.isNotNull() for c in (temp_u, pulse_u, rr_u, w))
    return F.when(any_present, _count_column(met)).cast("int")
