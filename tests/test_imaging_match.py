"""silver.imaging_match: accession first, then patient + modality + body part + window, nearest first, once each."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pyspark.sql.types import StringType, StructField, StructType, TimestampType

from silver.imaging_match import match_orders_to_studies

ORDERS = StructType([StructField(n, TimestampType() if n == "ordered_at" else StringType()) for n in (
    "order_key", "accession_number", "patient_key", "modality", "body_part", "ordered_at", "status")])
STUDIES = StructType([StructField(n, TimestampType() if n == "study_time_utc" else StringType()) for n in (
    "study_instance_uid", "accession_number", "patient_key", "modality", "body_part", "study_time_utc")])
H = timedelta(hours=1)


def t(hour: float) -> datetime:
    return datetime(2026, 1, 5, tzinfo=UTC) + hour * H


def match(spark, orders, studies, window=6 * H):
    got = match_orders_to_studies(spark.createDataFrame(orders, ORDERS), spark.createDataFrame(studies, STUDIES),
                                  window=window)
    return ordered(tuple(r) for r in got.collect())


def ordered(pairs) -> list[tuple]:
    return sorted(pairs, key=lambda r: tuple(v or "" for v in r))


def test_accession_first_then_patient_modality_window(spark):
    orders = [("o1", "A1", "p1", "CT", "HEAD", t(1), "active"),
              ("o2", None, "p1", "CR", "CHEST", t(2), "active"),  # CR order, DX study: one family
              ("o3", None, "p2", "CT", "CHEST", t(2), "active")]  # no study within the window
    studies = [("s1", "A1", "p1", "CT", "HEAD", t(9)),  # accession matches, far outside the window: still matched
               ("s2", None, "p1", "DX", "CHEST", t(3)),
               ("s3", None, "p2", "CT", "CHEST", t(9)),  # 7 h after o3
               ("s4", None, "p3", "US", None, t(1))]
    assert match(spark, orders, studies) == ordered([
        ("o1", "s1", "accession"), ("o2", "s2", "patient_procedure_time"), ("o3", None, None), (None, "s3", None),
        (None, "s4", None)])


def test_nearest_order_wins_and_each_side_is_used_once(spark):
    orders = [("o1", None, "p1", "CT", "HEAD", t(1), "active"), ("o2", None, "p1", "CT", "HEAD", t(2), "active")]
    studies = [("s1", None, "p1", "CT", "HEAD", t(2.5))]
    assert match(spark, orders, studies) == ordered([("o2", "s1", "patient_procedure_time"), ("o1", None, None)])
    two = [*studies, ("s2", None, "p1", "CT", None, t(4))]  # study without a body part matches any body part
    assert match(spark, orders, two) == ordered([("o2", "s1", "patient_procedure_time"),
                                                ("o1", "s2", "patient_procedure_time")])


def test_body_part_modality_time_order_and_status_rules(spark):
    orders = [("o1", None, "p1", "CT", "HEAD", t(5), "active"), ("o2", None, "p1", "CT", "CHEST", t(1), "cancelled"),
              ("o3", None, "p1", "MR", "HEAD", t(1), "active")]
    studies = [("s1", None, "p1", "CT", "CHEST", t(5.5)),  # o1 is HEAD; o2 cancelled
               ("s2", None, "p1", "CT", "HEAD", t(4))]  # before o1 was ordered; o3 is MR
    assert match(spark, orders, studies) == ordered([
        ("o1", None, None), ("o2", None, None), ("o3", None, None), (None, "s1", None), (None, "s2", None)])


def test_duplicate_accessions_pair_nearest_and_the_rest_stay_visible(spark):
    orders = [("o1", "A1", "p1", "CT", "HEAD", t(1), "active")]
    studies = [("s1", "A1", "p1", "CT", "HEAD", t(5)), ("s2", "A1", "p1", "CT", "HEAD", t(2))]
    assert match(spark, orders, studies) == ordered([("o1", "s2", "accession"), (None, "s1", None)])


def test_a_window_must_be_positive(spark):
    with pytest.raises(ValueError, match="window must be positive"):
        match(spark, [], [], window=timedelta(0))


def _mutual_best_rounds(pairs):
    """The rule as first written (Spark rounds): each round takes every pair that is the nearest for its order (ties:
    study UID) and for its study (ties: order_key), until no pair is left."""
    left, taken = list(pairs), []
    while left:
        best_o = {o: min((d, s) for d, o2, s in left if o2 == o) for _, o, _ in left}
        best_s = {s: min((d, o) for d, o, s2 in left if s2 == s) for _, _, s in left}
        now = [(o, s) for d, o, s in left if best_o[o] == (d, s) and best_s[s] == (d, o)]
        taken += now
        used_o, used_s = {o for o, _ in now}, {s for _, s in now}
        left = [(d, o, s) for d, o, s in left if o not in used_o and s not in used_s]
    return taken


def test_one_pass_nearest_first_takes_what_rounds_of_mutual_best_pairs_take(spark):
    """Random candidate pairs, 150 groups in one frame: each group's pairs as the rounds take them."""
    import random

    from silver.imaging_match import _nearest_first

    rng, rows, want = random.Random(7), [], set()
    for g in range(150):
        unique = {}
        for _ in range(rng.randint(0, 25)):  # one distance per (order, study), as a join gives
            unique.setdefault((f"o{g}.{rng.randint(0, 6)}", f"s{g}.{rng.randint(0, 6)}"), rng.randint(0, 5))
        pairs = [(d, o, s) for (o, s), d in unique.items()]
        rows += [(f"g{g}", d, o, s) for d, o, s in pairs]
        want |= set(_mutual_best_rounds(pairs))
    frame = spark.createDataFrame(rows, "g string, d long, order_key string, study_instance_uid string")
    assert {tuple(r) for r in _nearest_first(frame, "g").collect()} == want


def test_the_python_rule_matches_what_spark_matches(spark):
    """match_rows (the worklist's driver path) against match_orders_to_studies on random orders and studies: shared
    and missing accession numbers, three patients, CR/DX families, body parts, statuses, times in and out of the
    window, unknown times and sub-second offsets (the rule compares whole seconds)."""
    import random

    from silver.imaging_match import match_rows

    rng = random.Random(11)

    def pick(*values):
        return rng.choice(values)

    def at():
        return None if rng.random() < 0.05 else t(rng.uniform(0, 12)) + timedelta(microseconds=rng.randint(0, 999999))

    orders = [(f"o{k}", pick(None, None, "A1", "A2", "A3", f"U{k}"), pick("p1", "p2", "p3", None),
               pick("CT", "CR", "DX", "MR", None), pick("HEAD", "CHEST", None, "head"), at(),
               pick("active", "active", "cancelled", "entered-in-error", None)) for k in range(70)]
    studies = [(f"s{k}", pick(None, None, "A1", "A2", "A3", f"U{k}"), pick("p1", "p2", "p3", None),
                pick("CT", "CR", "DX", "MR", None), pick("HEAD", "CHEST", None), at()) for k in range(70)]
    rows = match_rows([dict(zip(ORDERS.names, o, strict=True)) for o in orders],
                      [dict(zip(STUDIES.names, s, strict=True)) for s in studies], window=6 * H)
    assert ordered(rows) == match(spark, orders, studies)
    assert sum(1 for _, s, m in rows if m == "patient_procedure_time") >= 5  # both steps took part
