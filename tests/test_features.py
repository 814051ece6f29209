"""gold.features.vitals_features: the sort-based as-of answer equals a naive per-point reference, ties included."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime, timedelta

import pytest
from pyspark.sql.types import DoubleType, StringType, StructField, StructType, TimestampType

from gold.features import FEATURE_CONCEPTS, feature_columns, vitals_features, window_name

OBS = StructType([
    StructField("patient_key", StringType()),
    StructField("concept", StringType()),
    StructField("value", DoubleType()),
    StructField("effective_at", TimestampType()),
    StructField("status", StringType()),
])
POINTS = StructType([
    StructField("patient_key", StringType()),
    StructField("scored_at", TimestampType()),
    StructField("encounter_key", StringType()),
])
T0 = datetime(2026, 1, 5, tzinfo=UTC)
H, W1H, W4H = 3_600_000, 3_600_000, 4 * 3_600_000


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def reference(obs: list[tuple], points: list[tuple], windows_ms: list[int]) -> dict[tuple, dict[str, object]]:
    """Per point, every feature computed the slow obvious way (ties: the largest value at an instant is last)."""
    out = {}
    for patient, scored_at, _ in points:
        row: dict[str, object] = {}
        for c in FEATURE_CONCEPTS:
            mine = [(t, v) for p, cc, v, t, _ in obs if p == patient and cc == c and v is not None]

            def last_at(limit, readings=mine):
                before = [(t, v) for t, v in readings if t <= limit]
                return max(before) if before else (None, None)

            t0, v0 = last_at(scored_at)
            row[f"{c}_last"] = v0
            row[f"{c}_age_s"] = None if t0 is None else (scored_at - t0).total_seconds()
            for w in windows_ms:
                name, start = window_name(w), scored_at - timedelta(milliseconds=w)
                tw, vw = last_at(start)
                change = None if vw is None else v0 - vw
                hours = None if tw is None else (t0 - tw).total_seconds() / 3600
                row[f"{c}_change_{name}"] = change
                row[f"{c}_slope_{name}"] = change / hours if hours else None
                row[f"{c}_count_{name}"] = sum(1 for t, _ in mine if start < t <= scored_at)
        out[(patient, scored_at)] = row
    return out


def computed(spark, obs, points, windows_ms) -> dict[tuple, dict[str, object]]:
    result = vitals_features(spark.createDataFrame(obs, OBS), spark.createDataFrame(points, POINTS), windows_ms)
    assert result.columns == [f.name for f in POINTS.fields] + feature_columns(windows_ms)
    rows = result.toPandas()
    assert len(rows) == len(points)
    out = {}
    for r in rows.to_dict("records"):
        key = (r["patient_key"], r["scored_at"].tz_localize("UTC").to_pydatetime())
        out[key] = {c: (None if isinstance(r[c], float) and math.isnan(r[c]) else r[c])
                    for c in feature_columns(windows_ms)}
    return out


def assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key, row in want.items():
        for column, expected in row.items():
            actual = got[key][column]
            if expected is None:
                assert actual is None, (key, column, actual)
            else:
                assert actual == pytest.approx(expected, rel=1e-9, abs=1e-9), (key, column, actual, expected)


def random_case(seed: int) -> tuple[list[tuple], list[tuple]]:
    """Readings on a 15-minute grid (so ties with points and window starts happen), with gaps and duplicates."""
    rng = random.Random(seed)
    patients = ["p1", "p2", "p3", "p4"]
    concepts = ["hr", "rr", "spo2", "lactate"]
    obs = []
    for p in patients:
        for c in concepts:
            if p == "p3" and c != "hr":
                continue  # p3 only has heart rate: every other concept is null
            for _ in range(rng.randint(0, 25)):
                t = at(15 * rng.randint(0, 64))
                obs.append((p, c, float(rng.randint(50, 120)), t, "final"))
    obs.append(("p1", "hr", 77.0, at(15 * 8), "final"))
    obs.append(("p1", "hr", 79.0, at(15 * 8), "final"))  # a tie at one instant
    obs.append(("p1", "acvpu", None, at(30), "final"))  # not a feature concept
    points = [(p, at(15 * m), f"e-{p}") for p in [*patients, "nobody"] for m in rng.sample(range(0, 70), 12)]
    points.append(("p1", at(15 * 8), "e-p1"))  # exactly on the tie
    return obs, points


def test_matches_naive_reference_with_ties_and_gaps(spark):
    obs, points = random_case(seed=1)
    points = list(dict.fromkeys(points))
    windows = [W1H, W4H]
    assert_same(computed(spark, obs, points, windows), reference(obs, points, windows))


def test_hand_computed_cases(spark):
    obs = [
        ("p", "hr", 60.0, at(0), "final"),      # 00:00: superseded before either window starts
        ("p", "hr", 70.0, at(180), "final"),    # 03:00: the value as of the 4h window start (04:00)
        ("p", "hr", 80.0, at(240), "final"),    # 04:00 exactly: the 4h window start, not in the window
        ("p", "hr", 90.0, at(420), "final"),    # 07:00 exactly: the 1h window start
        ("p", "hr", 100.0, at(450), "final"),   # 07:30
        ("p", "hr", 110.0, at(480), "final"),   # 08:00 = scored_at: counts
        ("p", "hr", 999.0, at(481), "final"),   # after scored_at: ignored
        ("q", "spo2", 95.0, at(0), "final"),    # q: one old reading, nothing in the window
    ]
    got = computed(spark, obs, [("p", at(480), "e"), ("q", at(90), "e")], [W1H, W4H])
    p, q = got[("p", at(480))], got[("q", at(90))]
    assert p["hr_last"] == 110.0 and p["hr_age_s"] == 0.0
    assert p["hr_change_1h"] == 20.0 and p["hr_slope_1h"] == pytest.approx(20.0 / 1.0)
    assert p["hr_count_1h"] == 2
    assert p["hr_change_4h"] == 30.0 and p["hr_slope_4h"] == pytest.approx(30.0 / 4.0)
    assert p["hr_count_4h"] == 3
    assert p["rr_last"] is None and p["rr_change_1h"] is None and p["rr_count_1h"] == 0
    assert q["spo2_last"] == 95.0 and q["spo2_age_s"] == 5400.0
    assert q["spo2_change_1h"] == 0.0 and q["spo2_slope_1h"] is None and q["spo2_count_1h"] == 0
    assert q["spo2_change_4h"] is None and q["spo2_slope_4h"] is None and q["spo2_count_4h"] == 1


def test_feature_columns_order_and_names():
    cols = feature_columns([H, 30 * 60_000])
    assert cols[:8] == ["hr_last", "hr_age_s", "hr_change_1h", "hr_slope_1h", "hr_count_1h",
                        "hr_change_30m", "hr_slope_30m", "hr_count_30m"]
    assert len(cols) == len(FEATURE_CONCEPTS) * 8 and len(set(cols)) == len(cols)
    with pytest.raises(ValueError, match="distinct positive"):
        feature_columns([H, H])


def test_reference_self_check():
    """The reference itself on the hand case (guards the guard)."""
    obs = [("p", "hr", 1.0, at(0), "final"), ("p", "hr", 3.0, at(60), "final")]
    want = reference(obs, [("p", at(60), "e")], [W1H])[("p", at(60))]
    assert (want["hr_change_1h"], want["hr_slope_1h"], want["hr_count_1h"]) == (2.0, 2.0, 1)
