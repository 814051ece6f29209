"""Which study answers which imaging order: silver.imaging_orders x silver.imaging_studies, pure DataFrame code.

`match_orders_to_studies(orders, studies, window=...)` gives one row per order and per study:

1. **accession**: an order and a study with the same accession number.
2. **patient_procedure_time**: otherwise, the same patient_key, the same modality (CR and DX, computed and digital
   radiography, count as one), the same body part when both name one, and the study's time within `window` after
   the order's (ordered_at <= study_time_utc <= ordered_at + window). Cancelled and entered-in-error orders are
   left out of this step (a `status` column, when the orders have one, says so).

In each step the nearest pair in time is taken first (ties: the smaller order_key, then study UID), then the
nearest of what is left, and so on: each order and each study is matched at most once, and where two orders
could take one study the nearer wins. Orders without a study and studies without an order stay in the result with
a null on the other side and `match_method` null, so neither is ever dropped.
"""

from __future__ import annotations

import math
from datetime import timedelta

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

ACCESSION, PATIENT_PROCEDURE_TIME = "accession", "patient_procedure_time"
UNMATCHABLE = ("cancelled", "entered-in-error")
_FAR = 10 ** 12  # the distance of a pair whose times are unknown: after every pair that has them


def _family(modality: Column) -> Column:
    """Modalities that are one for matching: CR and DX (both radiographs)."""
    upper = F.upper(modality)
    return F.when(upper.isin("CR", "DX"), F.lit("XR")).otherwise(upper)


def _distance(ordered_at: Column, study_time: Column) -> Column:
    """Seconds between order and study (absolute), far when either is unknown."""
    seconds = F.abs(F.unix_timestamp(study_time) - F.unix_timestamp(ordered_at))
    return F.coalesce(seconds, F.lit(_FAR)).cast("long")


def _nearest_first(candidates: DataFrame, group: str) -> DataFrame:
    """(order_key, study_instance_uid) from candidate pairs with distance `d`: nearest pair first, each side once.

    Pairs compete only within `group` (every pair of a step shares its accession number, or its patient), so each
    group is settled on its own in one pass, in the JVM: its pairs sorted by (d, order_key, study UID), a pair taken
    when neither its order nor its study is taken yet."""
    pairs = F.array_sort(F.collect_list(F.struct("d", "order_key", "study_instance_uid")))
    none = F.array().cast("array<string>")
    start = F.struct(none.alias("o"), none.alias("s"))

    def take(taken: Column, pair: Column) -> Column:
        free = ~F.array_contains(taken["o"], pair["order_key"]) & ~F.array_contains(taken["s"],
                                                                                     pair["study_instance_uid"])
        return F.when(free, F.struct(F.array_append(taken["o"], pair["order_key"]).alias("o"),
                                     F.array_append(taken["s"], pair["study_instance_uid"]).alias("s"))
                      ).otherwise(taken)

    settled = candidates.groupBy(group).agg(F.aggregate(pairs, start, take).alias("_t"))
    return settled.select(F.posexplode("_t.o").alias("_i", "order_key"), "_t").select(
        "order_key", F.element_at("_t.s", F.col("_i") + 1).alias("study_instance_uid"))


def _by_accession(orders: DataFrame, studies: DataFrame) -> DataFrame:
    o = orders.where(F.col("accession_number").isNotNull()).alias("o")
    s = studies.where(F.col("accession_number").isNotNull()).alias("s")
    pairs = o.join(s, F.col("o.accession_number") == F.col("s.accession_number"))
    return pairs.select("o.order_key", "s.study_instance_uid", F.col("o.accession_number").alias("accession_number"),
                        _distance(F.col("o.ordered_at"), F.col("s.study_time_utc")).alias("d"))


def _by_patient_procedure_time(orders: DataFrame, studies: DataFrame, window: timedelta) -> DataFrame:
    o = orders.where(~F.col("_status").isin(*UNMATCHABLE)).alias("o")
    s = studies.alias("s")
    body_ok = (F.col("o.body_part").isNull() | F.col("s.body_part").isNull()
               | (F.upper(F.col("o.body_part")) == F.upper(F.col("s.body_part"))))
    upper = F.col("o.ordered_at") + F.expr(f"INTERVAL {int(window.total_seconds())} SECONDS")
    on = ((F.col("o.patient_key") == F.col("s.patient_key"))
          & (_family(F.col("o.modality")) == _family(F.col("s.modality"))) & body_ok
          & (F.col("s.study_time_utc") >= F.col("o.ordered_at")) & (F.col("s.study_time_utc") <= upper))
    return o.join(s, on).select("o.order_key", "s.study_instance_uid", F.col("o.patient_key").alias("patient_key"),
                                _distance(F.col("o.ordered_at"), F.col("s.study_time_utc")).alias("d"))


def match_orders_to_studies(orders: DataFrame, studies: DataFrame, *, window: timedelta) -> DataFrame:
    """One row per order and per study: order_key, study_instance_uid, match_method (null: unmatched)."""
    if window <= timedelta(0):
        raise ValueError(f"window must be positive, got {window}; e.g. timedelta(hours=24)")
    status = F.col("status") if "status" in orders.columns else F.lit(None).cast("string")
    o = orders.select("order_key", "accession_number", "patient_key", "modality", "body_part", "ordered_at",
                      F.coalesce(status, F.lit("")).alias("_status"))
    s = studies.select("study_instance_uid", "accession_number", "patient_key", "modality", "body_part",
                       "study_time_utc")
    first = _nearest_first(_by_accession(o, s), "accession_number").withColumn("match_method", F.lit(ACCESSION))
    o_left = o.join(first.select("order_key"), "order_key", "left_anti")
    s_left = s.join(first.select("study_instance_uid"), "study_instance_uid", "left_anti")
    second = _nearest_first(_by_patient_procedure_time(o_left, s_left, window), "patient_key").withColumn(
        "match_method", F.lit(PATIENT_PROCEDURE_TIME))
    matched = first.unionByName(second)
    lone_orders = o.join(matched.select("order_key"), "order_key", "left_anti").select(
        "order_key", F.lit(None).cast("string").alias("study_instance_uid"),
        F.lit(None).cast("string").alias("match_method"))
    lone_studies = s.join(matched.select("study_instance_uid"), "study_instance_uid", "left_anti").select(
        F.lit(None).cast("string").alias("order_key"), "study_instance_uid",
        F.lit(None).cast("string").alias("match_method"))
    return matched.select("order_key", "study_instance_uid", "match_method").unionByName(lone_orders).unionByName(
        lone_studies)


def match_rows(orders: list[dict], studies: list[dict], *, window: timedelta) -> list[tuple[str | None, str | None,
                                                                                              str | None]]:
    """match_orders_to_studies on rows in Python (the worklist's driver path for small batches): the same rule and
    ties, held equal to the Spark one by tests/test_imaging_match.py. Rows are dicts of the same columns (times
    aware datetimes); returns (order_key, study_instance_uid, match_method) per order and per study."""
    if window <= timedelta(0):
        raise ValueError(f"window must be positive, got {window}; e.g. timedelta(hours=24)")
    taken_o: dict[str, tuple[str, str]] = {}
    taken_s: set[str] = set()

    def settle(pairs: list[tuple[int, str, str]], method: str) -> None:
        for _, o, s in sorted(pairs):  # nearest first, then order_key, then study UID, as array_sort does
            if o not in taken_o and s not in taken_s:
                taken_o[o] = (s, method)
                taken_s.add(s)

    settle([(_seconds_apart(o["ordered_at"], s["study_time_utc"]), o["order_key"], s["study_instance_uid"])
            for o, s in _same(orders, studies, "accession_number")], ACCESSION)
    step2 = [o for o in orders if o["order_key"] not in taken_o and (o.get("status") or "") not in UNMATCHABLE]
    rest = [s for s in studies if s["study_instance_uid"] not in taken_s]
    settle([(_seconds_apart(o["ordered_at"], s["study_time_utc"]), o["order_key"], s["study_instance_uid"])
            for o, s in _same(step2, rest, "patient_key") if _procedure_and_time_fit(o, s, window)],
           PATIENT_PROCEDURE_TIME)
    out: list[tuple[str | None, str | None, str | None]] = [(o, s, m) for o, (s, m) in taken_o.items()]
    out += [(o["order_key"], None, None) for o in orders if o["order_key"] not in taken_o]
    return out + [(None, s["study_instance_uid"], None) for s in studies if s["study_instance_uid"] not in taken_s]


def _same(orders: list[dict], studies: list[dict], key: str) -> list[tuple[dict, dict]]:
    """Every (order, study) pair sharing a non-null `key`."""
    by_key: dict[str, list[dict]] = {}
    for s in studies:
        if s.get(key) is not None:
            by_key.setdefault(s[key], []).append(s)
    return [(o, s) for o in orders if o.get(key) is not None for s in by_key.get(o[key], ())]


def _seconds_apart(ordered_at, study_time) -> int:
    """_distance in Python: whole seconds (unix_timestamp floors), far when either is unknown."""
    if ordered_at is None or study_time is None:
        return _FAR
    return abs(math.floor(study_time.timestamp()) - math.floor(ordered_at.timestamp()))


def _procedure_and_time_fit(o: dict, s: dict, window: timedelta) -> bool:
    """_by_patient_procedure_time's condition beside the patient: exam family, body part, time window."""
    def family(m):
        return None if m is None else ("XR" if m.upper() in ("CR", "DX") else m.upper())

    same_family = o.get("modality") is not None and s.get("modality") is not None and \
        family(o["modality"]) == family(s["modality"])
    body_ok = o.get("body_part") is None or s.get("body_part") is None or \
        o["body_part"].upper() == s["body_part"].upper()
    at, when = o.get("ordered_at"), s.get("study_time_utc")
    return same_family and body_ok and at is not None and when is not None and \
        at <= when <= at + timedelta(seconds=int(window.total_seconds()))
