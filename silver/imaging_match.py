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
