"""NEWS2 early-warning score (Royal College of Physicians, 2017), qSOFA and SIRS: pure scoring, no storage I/O.

Inputs are silver's canonical units (silver/vitals.py): respiratory rate and pulse in /min, SpO2 and inhaled O2
concentration in %, O2 flow in L/min, systolic BP in mm[Hg], temperature in Cel, WBC in 10*3/uL, consciousness as
one ACVPU letter ('A', 'C', 'V', 'P', 'U'). The chart lives once, as data (the *_CHART tables below), and is read
by both implementations that give the same answer on the same inputs: `news2`, `qsofa`, `sirs`, `on_oxygen` (pure
Python, the reference) and `news2_sql`, `qsofa_sql`, `sirs_sql`, `on_oxygen_sql` (Spark SQL expressions, no UDFs;
`*_columns` wrap them as Columns).

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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from pyspark.sql import Column
from pyspark.sql import functions as F

from pipelines import sqltext as sql

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
# NumPy: the same tables and rules over arrays, for the per-person scoring state (gold.scoring), where one batch
# scores a few points of one person and a recompute scores a person's whole stay. Missing is NaN in a float array
# (None in an object array of letters); a component that is missing is NaN in the float array it returns.


def _units_array(x: np.ndarray, decimals: int) -> np.ndarray:
    """`_units` over an array: floats holding whole numbers of 10**-decimals, NaN when missing."""
    x = np.asarray(x, dtype="float64")
    with np.errstate(invalid="ignore"):
        u = np.floor(x * float(10**decimals) + 0.5 + _EPSILON)
    return np.where(np.isfinite(x), u, np.nan)


def _chart_array(chart: Chart, x: np.ndarray) -> np.ndarray:
    """`_chart_points` over an array (NaN when missing)."""
    bands = chart.unit_bands()
    bounds = np.array([b for b, _ in bands], dtype="float64")
    points = np.array([p for _, p in bands], dtype="float64")
    u = _units_array(x, chart.decimals)
    idx = np.searchsorted(bounds, np.where(np.isnan(u), 0.0, u), side="left")
    return np.where(np.isnan(u), np.nan, points[np.minimum(idx, len(points) - 1)])


def _letters(acvpu: np.ndarray) -> np.ndarray:
    """The ACVPU letters of an object array, None where missing or not a letter of the scale."""
    return np.array([_letter(a) for a in acvpu], dtype=object)


def on_oxygen_array(fio2: np.ndarray, o2flow: np.ndarray) -> np.ndarray:
    """`on_oxygen` over arrays: 1.0 on oxygen, 0.0 on air, NaN when neither input is known."""
    f, o = (np.asarray(a, dtype="float64") for a in (fio2, o2flow))
    f, o = np.where(np.isfinite(f), f, np.nan), np.where(np.isfinite(o), o, np.nan)
    with np.errstate(invalid="ignore"):
        oxygen = (f > AIR_FIO2_PCT) | (o > 0)
    return np.where(oxygen, 1.0, np.where(np.isnan(f) & np.isnan(o), np.nan, 0.0))


def news2_arrays(rr, spo2, on_o2, sbp, pulse, acvpu, temp, scale2) -> dict[str, np.ndarray]:
    """`news2` over arrays: the seven COMPONENTS (float, NaN when missing), news2_score (int), news2_band,
    news2_partial (bool) and news2_missing (a tuple of component names per row). `on_o2` as `on_oxygen_array`
    gives it; `scale2` a boolean array."""
    on_o2 = np.asarray(on_o2, dtype="float64")
    scale2 = np.asarray(scale2, dtype=bool)
    air = _chart_array(SPO2_SCALE2_AIR_CHART, spo2)
    oxygen = _chart_array(SPO2_SCALE2_OXYGEN_CHART, spo2)
    unknown = np.where(air == oxygen, air, np.nan)
    scale2_points = np.where(np.isnan(on_o2), unknown, np.where(on_o2 == 1.0, oxygen, air))
    letters = _letters(np.asarray(acvpu, dtype=object))
    scores = (
        _chart_array(RESPIRATORY_RATE_CHART, rr),
        np.where(scale2, scale2_points, _chart_array(SPO2_SCALE1_CHART, spo2)),
        np.where(np.isnan(on_o2), np.nan, np.where(on_o2 == 1.0, SUPPLEMENTAL_O2_POINTS[True],
                                                   SUPPLEMENTAL_O2_POINTS[False])),
        _chart_array(SYSTOLIC_BP_CHART, sbp),
        _chart_array(PULSE_CHART, pulse),
        np.array([np.nan if a is None else CONSCIOUSNESS_POINTS[a] for a in letters], dtype="float64"),
        _chart_array(TEMPERATURE_CHART, temp),
    )
    stacked = np.vstack(scores) if len(letters) else np.zeros((len(COMPONENTS), 0))
    present = np.nan_to_num(stacked, nan=0.0)
    total = present.sum(axis=0).astype("int64")
    any_three = (present == 3).any(axis=0)
    missing_mask = np.isnan(stacked)
    return {
        **dict(zip(COMPONENTS, scores, strict=True)),
        "news2_score": total,
        "news2_band": np.array([band(int(t), bool(a)) for t, a in zip(total, any_three, strict=True)], dtype=object),
        "news2_partial": missing_mask.any(axis=0),
        "news2_missing": [tuple(n for n, m in zip(COMPONENTS, col, strict=True) if m) for col in missing_mask.T],
    }


def qsofa_arrays(rr, sbp, acvpu) -> tuple[np.ndarray, np.ndarray]:
    """`qsofa` over arrays: (points as int, whether any of the three inputs is missing)."""
    rr_u, sbp_u = _units_array(rr, 0), _units_array(sbp, 0)
    letters = _letters(np.asarray(acvpu, dtype=object))
    altered = np.array([a in ALTERED_MENTATION for a in letters], dtype=bool)
    with np.errstate(invalid="ignore"):
        points = (rr_u >= QSOFA_RR_FROM).astype("int64") + (sbp_u <= QSOFA_SBP_UPTO) + altered
    no_letter = np.array([a is None for a in letters], dtype=bool)
    return points.astype("int64"), np.isnan(rr_u) | np.isnan(sbp_u) | no_letter


def sirs_arrays(temp, pulse, rr, wbc) -> np.ndarray:
    """`sirs` over arrays: criteria met (float), NaN when none of the four inputs is present."""
    temp_u, pulse_u, rr_u = _units_array(temp, 1), _units_array(pulse, 0), _units_array(rr, 0)
    w = np.asarray(wbc, dtype="float64")
    w = np.where(np.isfinite(w), w, np.nan)
    low_t, high_t = (_threshold(t, 1) for t in SIRS_TEMP_CEL)
    with np.errstate(invalid="ignore"):
        met = ((temp_u > high_t) | (temp_u < low_t)).astype("int64") + (pulse_u > SIRS_PULSE_ABOVE) \
            + (rr_u > SIRS_RR_ABOVE) + ((w > SIRS_WBC[1]) | (w < SIRS_WBC[0]))
    none = np.isnan(temp_u) & np.isnan(pulse_u) & np.isnan(rr_u) & np.isnan(w)
    return np.where(none, np.nan, met.astype("float64"))


# ---------------------------------------------------------------------------------------------------------------
# Spark: the same tables and rules as Spark SQL expressions (text), and as Columns built from that text
#
# The scorer puts these in selectExpr: a streaming job plans them every micro-batch, and one SQL string per output
# column costs one JVM call where the same tree built from Column objects costs hundreds. The arguments are SQL
# expressions over the input row, usually column names.


def _value_sql(x: str) -> str:
    """x as a double, null when missing (null, NaN, +-infinity): Spark orders NaN above +infinity."""
    return f"CASE WHEN abs(CAST(({x}) AS DOUBLE)) < {sql.double(INF)} THEN CAST(({x}) AS DOUBLE) END"


def _units_sql(x: str, decimals: int) -> str:
    """`_units` in SQL: the same double operations, then floor (bigint); null when missing."""
    return f"floor(({_value_sql(x)}) * {sql.double(10**decimals)} + {sql.double(0.5)} + {sql.double(_EPSILON)})"


def _count_sql(conditions: Iterable[str]) -> str:
    """How many of the conditions are true (a null condition counts as not met), as an int."""
    return "CAST(" + " + ".join(f"(CASE WHEN {c} THEN 1 ELSE 0 END)" for c in conditions) + " AS INT)"


def _letter_sql(acvpu: str) -> str:
    """The ACVPU letter, null when missing or not a letter of the scale."""
    return f"CASE WHEN ({acvpu}) IN ({sql.strings(CONSCIOUSNESS_POINTS)}) THEN ({acvpu}) END"


def _intervals(charts: Sequence[Chart]) -> list[tuple[int | float, tuple[int, ...]]]:
    """The union of the charts' bounds (in units), each with every chart's points up to it, ascending."""
    bands = [chart.unit_bands() for chart in charts]
    bounds = sorted({b for chart_bands in bands for b, _ in chart_bands})
    return [(b, tuple(next(p for cb, p in chart_bands if b <= cb) for chart_bands in bands)) for b in bounds]


def _banded_sql(x: str, charts: Sequence[Chart], points: Callable[[tuple[int, ...]], str]) -> str:
    """One CASE over the rounded value for charts of one precision; `points` picks from the charts' points."""
    u = _units_sql(x, charts[0].decimals)
    *bounded, (_, top) = _intervals(charts)
    branches = " ".join(f"WHEN {u} <= {bound} THEN {points(p)}" for bound, p in bounded)
    return f"CAST(CASE WHEN {u} IS NULL THEN NULL {branches} ELSE {points(top)} END AS INT)"


def _chart_sql(chart: Chart, x: str) -> str:
    """`_chart_points` in SQL (int, null when missing)."""
    return _banded_sql(x, (chart,), lambda p: str(p[0]))


def _spo2_sql(spo2: str, on_o2: str, scale2: str) -> str:
    """`_spo2_points` in SQL: scale 2 is one CASE that reads the oxygen status where air and oxygen differ."""

    def air_or_oxygen(p: tuple[int, ...]) -> str:
        air, oxygen = p
        return str(air) if air == oxygen else f"(CASE WHEN {on_o2} THEN {oxygen} WHEN NOT ({on_o2}) THEN {air} END)"

    scale2_points = _banded_sql(spo2, (SPO2_SCALE2_AIR_CHART, SPO2_SCALE2_OXYGEN_CHART), air_or_oxygen)
    return (f"CASE WHEN coalesce({scale2}, false) THEN {scale2_points} "
            f"ELSE {_chart_sql(SPO2_SCALE1_CHART, spo2)} END")


def _lookup_sql(points: Mapping, key: str) -> str:
    """points[key] in SQL (int), null when the key is null or absent."""
    def literal(k) -> str:
        return ("true" if k else "false") if isinstance(k, bool) else sql.string(k)

    branches = " ".join(f"WHEN ({key}) = {literal(k)} THEN {p}" for k, p in points.items())
    return f"CAST(CASE WHEN ({key}) IS NULL THEN NULL {branches} END AS INT)"


def on_oxygen_sql(fio2: str, o2flow: str) -> str:
    """`on_oxygen` in SQL (boolean): true if either says oxygen, null if neither is known, else false."""
    f, o = _value_sql(fio2), _value_sql(o2flow)
    return (f"CASE WHEN ({f}) IS NULL AND ({o}) IS NULL THEN CAST(NULL AS BOOLEAN) "
            f"ELSE coalesce(({f}) > {sql.double(AIR_FIO2_PCT)}, false)"
            f" OR coalesce(({o}) > {sql.double(0.0)}, false) END")


def news2_component_sql(rr: str, spo2: str, on_o2: str, sbp: str, pulse: str, acvpu: str, temp: str,
                        scale2: str | None = None) -> dict[str, str]:
    """The seven NEWS2 COMPONENTS in SQL (int, null when the input is missing).

    on_o2 is a boolean expression (see `on_oxygen_sql`); a null scale2 (or none given) means SpO2 scale 1.
    """
    o2 = f"CAST(({on_o2}) AS BOOLEAN)"
    s2 = "false" if scale2 is None else f"CAST(({scale2}) AS BOOLEAN)"
    scores = (
        _chart_sql(RESPIRATORY_RATE_CHART, rr),
        _spo2_sql(spo2, o2, s2),
        _lookup_sql(SUPPLEMENTAL_O2_POINTS, o2),
        _chart_sql(SYSTOLIC_BP_CHART, sbp),
        _chart_sql(PULSE_CHART, pulse),
        _lookup_sql(CONSCIOUSNESS_POINTS, _letter_sql(acvpu)),
        _chart_sql(TEMPERATURE_CHART, temp),
    )
    return dict(zip(COMPONENTS, scores, strict=True))


def news2_summary_sql(components: Mapping[str, str]) -> dict[str, str]:
    """news2_score (int), news2_band, news2_partial, news2_missing (array<string>) from the seven components
    (SQL expressions, e.g. the names of columns holding `news2_component_sql`)."""
    present = [f"coalesce(({components[name]}), 0)" for name in COMPONENTS]
    total = "CAST(" + " + ".join(present) + " AS INT)"
    any_three = f"greatest({', '.join(present)}) = 3"
    # The band from a literal table of band(t, any_three) for t = 0..HIGH_FROM, indexed once: the total is not
    # repeated in each branch of a CASE. Totals above HIGH_FROM band as HIGH_FROM does.
    table = f"array({sql.strings(band(t, a) for t in range(HIGH_FROM + 1) for a in (False, True))})"
    index = f"least({total}, {HIGH_FROM}) * 2 + (CASE WHEN {any_three} THEN 1 ELSE 0 END) + 1"
    missing = ", ".join(f"CASE WHEN ({components[name]}) IS NULL THEN {sql.string(name)} END" for name in COMPONENTS)
    return {
        "news2_score": total,
        "news2_band": f"element_at({table}, {index})",
        "news2_partial": "(" + " OR ".join(f"({components[name]}) IS NULL" for name in COMPONENTS) + ")",
        "news2_missing": f"CAST(array_compact(array({missing})) AS ARRAY<STRING>)",
    }


def news2_sql(rr: str, spo2: str, on_o2: str, sbp: str, pulse: str, acvpu: str, temp: str,
              scale2: str | None = None) -> dict[str, str]:
    """`news2` in SQL: the 7 COMPONENTS, news2_score, news2_band, news2_partial, news2_missing, self-contained."""
    components = news2_component_sql(rr, spo2, on_o2, sbp, pulse, acvpu, temp, scale2)
    return {**components, **news2_summary_sql(components)}


def qsofa_sql(rr: str, sbp: str, acvpu: str) -> dict[str, str]:
    """`qsofa` in SQL: qsofa_score (int) and qsofa_partial (boolean)."""
    rr_u, sbp_u, letter = _units_sql(rr, 0), _units_sql(sbp, 0), _letter_sql(acvpu)
    met = (f"({rr_u}) >= {QSOFA_RR_FROM}", f"({sbp_u}) <= {QSOFA_SBP_UPTO}",
           f"({letter}) IN ({sql.strings(ALTERED_MENTATION)})")
    return {
        "qsofa_score": _count_sql(met),
        "qsofa_partial": "(" + " OR ".join(f"({x}) IS NULL" for x in (rr_u, sbp_u, letter)) + ")",
    }


def sirs_sql(temp: str, pulse: str, rr: str, wbc: str) -> str:
    """`sirs` in SQL: int, null when none of the four inputs is present."""
    temp_u, pulse_u, rr_u, w = _units_sql(temp, 1), _units_sql(pulse, 0), _units_sql(rr, 0), _value_sql(wbc)
    low_t, high_t = (_threshold(t, 1) for t in SIRS_TEMP_CEL)
    met = (
        f"(({temp_u}) > {high_t} OR ({temp_u}) < {low_t})",
        f"({pulse_u}) > {SIRS_PULSE_ABOVE}",
        f"({rr_u}) > {SIRS_RR_ABOVE}",
        f"(({w}) > {sql.double(SIRS_WBC[1])} OR ({w}) < {sql.double(SIRS_WBC[0])})",
    )
    any_present = " OR ".join(f"({x}) IS NOT NULL" for x in (temp_u, pulse_u, rr_u, w))
    return f"CAST(CASE WHEN {any_present} THEN {_count_sql(met)} END AS INT)"


# Columns, for DataFrame code that prefers them: the SQL above, parsed once each.
def on_oxygen_column(fio2: str, o2flow: str) -> Column:
    """`on_oxygen_sql` as a Column."""
    return F.expr(on_oxygen_sql(fio2, o2flow))


def news2_columns(rr: str, spo2: str, on_o2: str, sbp: str, pulse: str, acvpu: str, temp: str,
                  scale2: str | None = None) -> dict[str, Column]:
    """`news2_sql` as Columns."""
    return {name: F.expr(sql) for name, sql in news2_sql(rr, spo2, on_o2, sbp, pulse, acvpu, temp, scale2).items()}


def qsofa_columns(rr: str, sbp: str, acvpu: str) -> dict[str, Column]:
    """`qsofa_sql` as Columns."""
    return {name: F.expr(sql) for name, sql in qsofa_sql(rr, sbp, acvpu).items()}


def sirs_column(temp: str, pulse: str, rr: str, wbc: str) -> Column:
    """`sirs_sql` as a Column."""
    return F.expr(sirs_sql(temp, pulse, rr, wbc))
