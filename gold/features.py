"""gold.vitals_features: at each scoring point, each vital's last value and age, and its change, slope and count
over each window (gold.scoring computes them with the scores, from the person's state).

Per concept: `<c>_last` (the last reading at or before the point; of several at one instant, the largest value) and
`<c>_age_s`; per window w, from the window's start to the point: `<c>_change_<w>` (last value minus the value as of
the start), `<c>_slope_<w>` (that change per hour between the two readings; null when they are one reading) and
`<c>_count_<w>` (readings after the start up to the point; 0 when none). The start is `ceil((point - w) / g) * g`
on a fixed grid of g = w / 12 (5 min for 1 h), so the window is w long or up to one step shorter: that grid is
what lets a person's state keep a dozen numbers per window and concept instead of every reading of the window.
A reading exactly at the start is the value as of the start and is not counted. Readings older than `gold.history`
before the point are not used.
"""

from __future__ import annotations

# Scored vitals plus the labs the simulated (and real) deteriorations move: lactate and white cells for sepsis,
# creatinine for the kidney injury that follows shock (sepsis, haemorrhage). MAP is left out (derived from
# sbp/dbp), so are ACVPU (a letter, scored by NEWS2) and weight (no short-term signal).
FEATURE_CONCEPTS = ("hr", "rr", "spo2", "sbp", "dbp", "temp", "fio2", "o2flow", "lactate", "wbc", "creatinine")

_UNITS = (("h", 3_600_000), ("m", 60_000), ("s", 1_000), ("ms", 1))


def window_name(ms: int) -> str:
    """A window's name in column names: 3600000 -> '1h', 1800000 -> '30m', 90000 -> '90s'."""
    unit, scale = next((u, s) for u, s in _UNITS if ms % s == 0)
    return f"{ms // scale}{unit}"


def feature_columns(windows_ms) -> list[str]:
    """The feature names in model input order: per concept, last and age, then change, slope, count per window."""
    windows = [int(w) for w in windows_ms]
    if not windows or any(w <= 0 for w in windows) or len({window_name(w) for w in windows}) != len(windows):
        raise ValueError(f"feature windows must be distinct positive durations in ms, got {list(windows_ms)!r}")
    columns: list[str] = []
    for c in FEATURE_CONCEPTS:
        columns += [f"{c}_last", f"{c}_age_s"]
        for w in windows:
            columns += [f"{c}_change_{window_name(w)}", f"{c}_slope_{window_name(w)}", f"{c}_count_{window_name(w)}"]
    return columns
