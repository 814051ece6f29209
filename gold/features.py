"""gold.vitals_features: at each scoring point, each vital's last value and age, and its change, slope and count
over each window. Pure: DataFrame -> DataFrame.

Monitors send a reading a second, so nothing here joins points to readings by time range or uses rangeBetween
over raw rows. Instead, the as-of trick: every point becomes probe rows (one per concept, at scored_at and at
scored_at - w for each window w), the probes are unioned with the readings, the union is sorted per (patient,
concept) by time with a probe after a reading at the same instant, and one running window forward-fills the last
value and its time and counts the readings so far. A probe then knows "the last reading at or before me" and "how
many readings up to me"; the count in (scored_at - w, scored_at] is the difference of two probes' counts. The cost
is one sort of readings + probes, whatever the reading rate.

Ties: a reading exactly at scored_at counts as the last value and in every window; a reading exactly at
scored_at - w is the value as of the window start and is not counted in the window. Several readings of one
concept at the same instant: the largest value is the last one (deterministic; the count counts them all).
"""

from __future__ import annotations

from collections.abc import Sequence

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

# Scored vitals plus the labs the simulated (and real) deteriorations move: lactate and white cells for sepsis,
# creatinine for the kidney injury that follows shock (sepsis, haemorrhage). MAP is left out (derived from
# sbp/dbp), so are ACVPU (a letter, scored by NEWS2) and weight (no short-term signal).
FEATURE_CONCEPTS = ("hr", "rr", "spo2", "sbp", "dbp", "temp", "fio2", "o2flow", "lactate", "wbc", "creatinine")

KEYS = ("patient_key", "scored_at")
_T, _PROBE, _SLOT, _LAST, _LAST_T, _N, _W = "_t", "_probe", "_slot", "_last", "_last_t", "_n", "_w"
# An observations column saying how many readings a row stands for (a rolled-up minute); absent: each row is one.
WEIGHT = "_n"
_UNITS = (("h", 3_600_000), ("m", 60_000), ("s", 1_000), ("ms", 1))
_US_PER_HOUR = 3_600_000_000


def window_name(ms: int) -> str:
    """A window's name in column names: 3600000 -> '1h', 1800000 -> '30m', 90000 -> '90s'."""
    unit, scale = next((u, s) for u, s in _UNITS if ms % s == 0)
    return f"{ms // scale}{unit}"


def _checked_windows(windows_ms: Sequence[int]) -> list[int]:
    windows = [int(w) for w in windows_ms]
    if not windows or any(w <= 0 for w in windows) or len({window_name(w) for w in windows}) != len(windows):
        raise ValueError(f"feature windows must be distinct positive durations in ms, got {list(windows_ms)!r}")
    return windows


def feature_columns(windows_ms: Sequence[int]) -> list[str]:
    """The feature names in model input order: per concept, last and age, then change, slope, count per window."""
    names = [window_name(w) for w in _checked_windows(windows_ms)]
    columns: list[str] = []
    for c in FEATURE_CONCEPTS:
        columns += [f"{c}_last", f"{c}_age_s"]
        for w in names:
            columns += [f"{c}_change_{w}", f"{c}_slope_{w}", f"{c}_count_{w}"]
    return columns


def _readings(observations: DataFrame) -> DataFrame:
    """Numeric readings of the feature concepts, in the union's shape."""
    value = F.col("value").cast("double")
    usable = (F.col("concept").isin(*FEATURE_CONCEPTS) & value.isNotNull() & ~F.isnan(value)
              & F.col("effective_at").isNotNull() & F.col("patient_key").isNotNull())
    weight = F.col(WEIGHT).cast("long") if WEIGHT in observations.columns else F.lit(1).cast("long")
    return observations.where(usable).select(
        "patient_key", "concept", value.alias("value"), F.unix_micros("effective_at").alias(_T),
        F.lit(None).cast("timestamp").alias("scored_at"), F.lit(None).cast("int").alias(_SLOT),
        F.lit(0).alias(_PROBE), weight.alias(_W),
    )


def _probes(keys: DataFrame, windows: Sequence[int]) -> DataFrame:
    """Per point and concept: slot 0 at scored_at, slot i at scored_at - windows[i-1]."""
    concepts = F.array(*[F.lit(c) for c in FEATURE_CONCEPTS])
    offsets_us = F.array(F.lit(0).cast("long"), *[F.lit(w * 1000).cast("long") for w in windows])
    per_concept = keys.select(*KEYS, F.explode(concepts).alias("concept"))
    per_slot = per_concept.select(*KEYS, "concept", F.posexplode(offsets_us).alias(_SLOT, "_offset_us"))
    return per_slot.select(
        "patient_key", "concept", F.lit(None).cast("double").alias("value"),
        (F.unix_micros("scored_at") - F.col("_offset_us")).alias(_T), "scored_at", F.col(_SLOT).cast("int"),
        F.lit(1).alias(_PROBE), F.lit(0).cast("long").alias(_W),
    )


def _as_of(rows: DataFrame) -> DataFrame:
    """Probe rows with the last reading's value and time at or before them, and the running reading count."""
    so_far = (Window.partitionBy("patient_key", "concept").orderBy(_T, _PROBE, "value")
              .rowsBetween(Window.unboundedPreceding, Window.currentRow))
    return rows.select(
        *KEYS, "concept", _SLOT, _PROBE,
        F.last("value", ignorenulls=True).over(so_far).alias(_LAST),
        F.last(F.when(F.col(_PROBE) == 0, F.col(_T)), ignorenulls=True).over(so_far).alias(_LAST_T),
        F.sum(_W).over(so_far).alias(_N),
    ).where(F.col(_PROBE) == 1)


def _by_point(probes: DataFrame) -> DataFrame:
    """One row per point: a map 'concept#slot' -> (last value, its time, running count)."""
    entry = F.struct(F.concat_ws("#", "concept", F.col(_SLOT).cast("string")),
                     F.struct(F.col(_LAST).alias("v"), F.col(_LAST_T).alias("t"), F.col(_N).alias("n")))
    return probes.groupBy(*KEYS).agg(F.map_from_entries(F.collect_list(entry)).alias("_slots"))


def _concept_features(concept: str, windows: Sequence[int]) -> list[str]:
    """The features of one concept from its slots (slot 0 = scored_at, slot i = start of window i), as SQL.

    SQL text rather than Column objects: a hundred-odd output columns built through py4j cost seconds per batch.
    """
    def at(slot: int, field: str) -> str:
        return f"_slots['{concept}#{slot}'].{field}"

    out = [f"{at(0, 'v')} AS `{concept}_last`",
           f"(unix_micros(scored_at) - {at(0, 't')}) / 1e6 AS `{concept}_age_s`"]
    for slot, w in enumerate(windows, start=1):
        name, change = window_name(w), f"({at(0, 'v')} - {at(slot, 'v')})"
        hours = f"(({at(0, 't')} - {at(slot, 't')}) / {_US_PER_HOUR})"
        out += [
            f"{change} AS `{concept}_change_{name}`",
            f"CASE WHEN {hours} > 0 THEN {change} / {hours} END AS `{concept}_slope_{name}`",
            f"{at(0, 'n')} - {at(slot, 'n')} AS `{concept}_count_{name}`",
        ]
    return out


def vitals_features(observations: DataFrame, points: DataFrame, windows_ms: Sequence[int]) -> DataFrame:
    """Points (patient_key, scored_at, ...) with their vitals features (feature_columns) appended.

    observations: patient_key, concept, value, effective_at (numeric, non-deleted rows; other columns ignored),
    and optionally `_n`: how many readings a row stands for (a rolled-up minute: its newest reading, see
    gold.early_warning_scores), 1 without it.
    Last, age, change and slope are null when there is no reading to compute them from; a count with no
    readings is 0. Slope is per hour between the two readings, null when they are the same reading.
    """
    windows = _checked_windows(windows_ms)
    keys = points.where(F.col("patient_key").isNotNull() & F.col("scored_at").isNotNull()).select(*KEYS).distinct()
    union = _readings(observations).unionByName(_probes(keys, windows))
    # One shuffle by patient serves the running window, the regrouping by point and the join back to the points.
    union = union.repartition(int(union.sparkSession.conf.get("spark.sql.shuffle.partitions")), "patient_key")
    features = _by_point(_as_of(union)).selectExpr(
        *KEYS, *[sql for c in FEATURE_CONCEPTS for sql in _concept_features(c, windows)])
    joined = points.alias("p").join(features.alias("f"), list(KEYS), "left")
    return joined.selectExpr(*[f"p.`{c}`" for c in points.columns], *[f"f.`{c}`" for c in feature_columns(windows)])
