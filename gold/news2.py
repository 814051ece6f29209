"""NEWS2 early-warning score (Royal College of Physicians, 2017), qSOFA and SIRS: pure scoring, no storage I/O.

Inputs are silver's canonical units (silver/vitals.py): respiratory rate and pulse in /min, SpO2 and inhaled O2
concentration in %, O2 flow in L/min, systolic BP in mm[Hg], temperature in Cel, WBC in 10*3/uL, consciousness as
one ACVPU letter ('A', 'C', 'V', 'P', 'U'). The chart lives once, as data (the *_CHART tables below), and is read
by both implementations that give the same answer on the same inputs: `news2`, `qsofa`, `sirs`, `on_oxygen` (pure
Python, the reference) and `news2_arrays`, `qsofa_arrays`, `sirs_arrays`, `on_oxygen_array` (NumPy, what the
scoring kernel gold.scoring runs over a person's points).

Rounding rule: the chart prints whole numbers (temperature: one decimal), so a value between two printed numbers
is first rounded half-up to the chart's precision and then banded: respiratory rate, SpO2, systolic BP and pulse
to whole numbers (20.5 -> 21, 20.49 -> 20), temperature to one decimal (35.05 -> 35.1, 38.04 -> 38.0). Half-up
is computed as floor(x * 10**d + 0.5 + 1e-9) in units of 10**-d, the same double operations in Python and NumPy,
so a binary float a few ulps under a half (35.04999999999999, what arithmetic such as a unit conversion can leave
of 35.05) still rounds up; the rounded integer is compared with the chart bound in the same units, never a float
with a float. qSOFA and SIRS round respiratory
rate, systolic BP, pulse and temperature by the same rule (one reading gives one answer in every score); WBC, FiO2
and O2 flow are compared as given.

Missing inputs: None (NaN in an array), NaN and +-infinity are missing, as is a consciousness value that is not an
ACVPU letter. A component whose input is missing is None; the total and band are computed from the components
present and flagged `partial`, with the missing component names in `missing` (never silently scored as normal).
Oxygen: on oxygen when FiO2 > 21 % or O2 flow > 0 L/min; either one saying oxygen is enough; unknown when neither
is known. SpO2 scale 2 (a recorded hypercapnic target; null/None means scale 1) needs the oxygen status only at
93 % and above, where air and oxygen score differently: there an unknown oxygen status leaves the SpO2 component
missing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

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


@dataclass(frozen=True)
class Charts:
    """The NEWS2 chart a hospital scores with: each numeric parameter's bands, the points for supplemental oxygen
    and for any altered consciousness (C, V, P, U), and where the total's medium and high bands start. RCP_2017
    (the defaults) is the published chart; `gold.news2` in the configuration may adjust it (a local variation
    must be a clinical governance decision, recorded there)."""

    respiratory_rate: Chart = RESPIRATORY_RATE_CHART
    spo2_scale1: Chart = SPO2_SCALE1_CHART
    spo2_scale2_air: Chart = SPO2_SCALE2_AIR_CHART
    spo2_scale2_oxygen: Chart = SPO2_SCALE2_OXYGEN_CHART
    systolic_bp: Chart = SYSTOLIC_BP_CHART
    pulse: Chart = PULSE_CHART
    temperature: Chart = TEMPERATURE_CHART
    supplemental_o2: int = SUPPLEMENTAL_O2_POINTS[True]
    altered_consciousness: int = CONSCIOUSNESS_POINTS["C"]
    medium_from: int = 5
    high_from: int = 7

    def __post_init__(self) -> None:
        if not 0 < self.medium_from < self.high_from:
            raise ValueError(f"medium_from ({self.medium_from}) must be positive and below high_from "
                             f"({self.high_from})")

    @classmethod
    def of(cls, settings: Mapping[str, object]) -> Charts:
        """Charts from configuration: a parameter as [[upper bound, points], ...] (ascending, the last bound
        .inf), keeping the default chart's precision; the other keys as whole numbers."""
        fields = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(settings) - fields)
        if unknown:
            raise ValueError(f"unknown NEWS2 chart keys {unknown}; known: {sorted(fields)}")
        kw: dict[str, object] = {}
        for name, value in settings.items():
            default = getattr(cls, name)
            if isinstance(default, Chart):
                try:
                    kw[name] = Chart(default.decimals, tuple((float(b), int(p)) for b, p in value))
                except (TypeError, ValueError) as exc:
                    raise ValueError(f"{name}: expected [[upper bound, points], ...] ascending and ending with .inf "
                                     f"({exc})") from None
            else:
                kw[name] = int(value)
        return cls(**kw)


RCP_2017 = Charts()
AIR_FIO2_PCT = 21.0       # on oxygen when FiO2 is above this

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


def _spo2_points(spo2: float | None, on_o2: bool | None, scale2: bool, charts: Charts) -> int | None:
    """SpO2 points on scale 1, or on scale 2 where oxygen matters only when air and oxygen score differently."""
    if not scale2:
        return _chart_points(charts.spo2_scale1, spo2)
    air, oxygen = _chart_points(charts.spo2_scale2_air, spo2), _chart_points(charts.spo2_scale2_oxygen, spo2)
    if on_o2 is None:
        return air if air == oxygen else None
    return oxygen if on_o2 else air


def on_oxygen(fio2: float | None, o2flow: float | None) -> bool | None:
    """True when FiO2 > 21 % or O2 flow > 0 L/min, False when the known ones say air, None when neither is known."""
    fio2, o2flow = _value(fio2), _value(o2flow)
    if (fio2 is not None and fio2 > AIR_FIO2_PCT) or (o2flow is not None and o2flow > 0):
        return True
    return None if fio2 is None and o2flow is None else False


def band(total: int, any_three: bool, charts: Charts = RCP_2017) -> str:
    """The NEWS2 clinical risk band of a total score (any_three: some single parameter scored 3)."""
    if total >= charts.high_from:
        return "high"
    if total >= charts.medium_from:
        return "medium"
    return "low-medium" if any_three else "low"


def _consciousness(letter: str, charts: Charts) -> int:
    return 0 if letter == "A" else charts.altered_consciousness


def news2(rr, spo2, on_o2, sbp, pulse, acvpu, temp, *, scale2: bool = False, charts: Charts = RCP_2017) -> News2:
    """NEWS2 from one set of observations (the Python reference for `news2_arrays`)."""
    scores = (
        _chart_points(charts.respiratory_rate, rr),
        _spo2_points(spo2, on_o2, bool(scale2), charts),
        None if on_o2 is None else (charts.supplemental_o2 if on_o2 else 0),
        _chart_points(charts.systolic_bp, sbp),
        _chart_points(charts.pulse, pulse),
        None if _letter(acvpu) is None else _consciousness(acvpu, charts),
        _chart_points(charts.temperature, temp),
    )
    present = [s for s in scores if s is not None]
    missing = tuple(name for name, s in zip(COMPONENTS, scores, strict=True) if s is None)
    total = sum(present)
    return News2(*scores, score=total, band=band(total, 3 in present, charts), partial=bool(missing),
                 missing=missing)


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
# (None in an object array of letters); a component that is missing is NaN in the float array it returns. NumPy is
# imported in each function, not with the module: every carelake process (the gateway too) reads this module's
# charts through its configuration, and most have no other use for NumPy.


def _units_array(x: np.ndarray, decimals: int) -> np.ndarray:
    """`_units` over an array: floats holding whole numbers of 10**-decimals, NaN when missing."""
    import numpy as np

    x = np.asarray(x, dtype="float64")
    with np.errstate(invalid="ignore"):
        u = np.floor(x * float(10**decimals) + 0.5 + _EPSILON)
    return np.where(np.isfinite(x), u, np.nan)


def _chart_array(chart: Chart, x: np.ndarray) -> np.ndarray:
    """`_chart_points` over an array (NaN when missing)."""
    import numpy as np

    bands = chart.unit_bands()
    bounds = np.array([b for b, _ in bands], dtype="float64")
    points = np.array([p for _, p in bands], dtype="float64")
    u = _units_array(x, chart.decimals)
    idx = np.searchsorted(bounds, np.where(np.isnan(u), 0.0, u), side="left")
    return np.where(np.isnan(u), np.nan, points[np.minimum(idx, len(points) - 1)])


def _letters(acvpu: np.ndarray) -> np.ndarray:
    """The ACVPU letters of an object array, None where missing or not a letter of the scale."""
    import numpy as np

    return np.array([_letter(a) for a in acvpu], dtype=object)


def on_oxygen_array(fio2: np.ndarray, o2flow: np.ndarray) -> np.ndarray:
    """`on_oxygen` over arrays: 1.0 on oxygen, 0.0 on air, NaN when neither input is known."""
    import numpy as np

    f, o = (np.asarray(a, dtype="float64") for a in (fio2, o2flow))
    f, o = np.where(np.isfinite(f), f, np.nan), np.where(np.isfinite(o), o, np.nan)
    with np.errstate(invalid="ignore"):
        oxygen = (f > AIR_FIO2_PCT) | (o > 0)
    return np.where(oxygen, 1.0, np.where(np.isnan(f) & np.isnan(o), np.nan, 0.0))


def news2_arrays(rr, spo2, on_o2, sbp, pulse, acvpu, temp, scale2,
                 charts: Charts = RCP_2017) -> dict[str, np.ndarray]:
    """`news2` over arrays: the seven COMPONENTS (float, NaN when missing), news2_score (int), news2_band,
    news2_partial (bool) and news2_missing (a tuple of component names per row). `on_o2` as `on_oxygen_array`
    gives it; `scale2` a boolean array."""
    import numpy as np

    on_o2 = np.asarray(on_o2, dtype="float64")
    scale2 = np.asarray(scale2, dtype=bool)
    air = _chart_array(charts.spo2_scale2_air, spo2)
    oxygen = _chart_array(charts.spo2_scale2_oxygen, spo2)
    unknown = np.where(air == oxygen, air, np.nan)
    scale2_points = np.where(np.isnan(on_o2), unknown, np.where(on_o2 == 1.0, oxygen, air))
    letters = _letters(np.asarray(acvpu, dtype=object))
    scores = (
        _chart_array(charts.respiratory_rate, rr),
        np.where(scale2, scale2_points, _chart_array(charts.spo2_scale1, spo2)),
        np.where(np.isnan(on_o2), np.nan, np.where(on_o2 == 1.0, float(charts.supplemental_o2), 0.0)),
        _chart_array(charts.systolic_bp, sbp),
        _chart_array(charts.pulse, pulse),
        np.array([np.nan if a is None else _consciousness(a, charts) for a in letters], dtype="float64"),
        _chart_array(charts.temperature, temp),
    )
    stacked = np.vstack(scores) if len(letters) else np.zeros((len(COMPONENTS), 0))
    present = np.nan_to_num(stacked, nan=0.0)
    total = present.sum(axis=0).astype("int64")
    any_three = (present == 3).any(axis=0)
    missing_mask = np.isnan(stacked)
    return {
        **dict(zip(COMPONENTS, scores, strict=True)),
        "news2_score": total,
        "news2_band": np.array([band(int(t), bool(a), charts) for t, a in zip(total, any_three, strict=True)],
                               dtype=object),
        "news2_partial": missing_mask.any(axis=0),
        "news2_missing": [tuple(n for n, m in zip(COMPONENTS, col, strict=True) if m) for col in missing_mask.T],
    }


def qsofa_arrays(rr, sbp, acvpu) -> tuple[np.ndarray, np.ndarray]:
    """`qsofa` over arrays: (points as int, whether any of the three inputs is missing)."""
    import numpy as np

    rr_u, sbp_u = _units_array(rr, 0), _units_array(sbp, 0)
    letters = _letters(np.asarray(acvpu, dtype=object))
    altered = np.array([a in ALTERED_MENTATION for a in letters], dtype=bool)
    with np.errstate(invalid="ignore"):
        points = (rr_u >= QSOFA_RR_FROM).astype("int64") + (sbp_u <= QSOFA_SBP_UPTO) + altered
    no_letter = np.array([a is None for a in letters], dtype=bool)
    return points.astype("int64"), np.isnan(rr_u) | np.isnan(sbp_u) | no_letter


def sirs_arrays(temp, pulse, rr, wbc) -> np.ndarray:
    """`sirs` over arrays: criteria met (float), NaN when none of the four inputs is present."""
    import numpy as np

    temp_u, pulse_u, rr_u = _units_array(temp, 1), _units_array(pulse, 0), _units_array(rr, 0)
    w = np.asarray(wbc, dtype="float64")
    w = np.where(np.isfinite(w), w, np.nan)
    low_t, high_t = (_threshold(t, 1) for t in SIRS_TEMP_CEL)
    with np.errstate(invalid="ignore"):
        met = ((temp_u > high_t) | (temp_u < low_t)).astype("int64") + (pulse_u > SIRS_PULSE_ABOVE) \
            + (rr_u > SIRS_RR_ABOVE) + ((w > SIRS_WBC[1]) | (w < SIRS_WBC[0]))
    none = np.isnan(temp_u) & np.isnan(pulse_u) & np.isnan(rr_u) & np.isnan(w)
    return np.where(none, np.nan, met.astype("float64"))
