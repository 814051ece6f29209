"""gold.provider_risk: per provider and month, the claims' volume against specialty peers, the share flagged by the
fraud rules (and the model), and the trend against the provider's previous month.

A provider is gold.claims_fraud_scores.provider_npi (the claim's rendering NPI, else its first line's, else the
billing NPI); a month is the calendar month of the claim's first service day; peers are the providers of the same
taxonomy (silver.providers; providers without one are peers of each other) billing in that month. Each batch
recomputes every month of the providers whose scores changed (their trends follow from the month before); a
provider-month left without claims (all voided) is withdrawn.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql.types import DateType, DoubleType, LongType, StringType, StructField, StructType, TimestampType

RISK = "gold.provider_risk"
SCORES, PROVIDERS = "gold.claims_fraud_scores", "silver.providers"
WITHDRAWN = -1  # claims = -1 in a batch row: the provider-month has no claims left; the merge deletes it
MODEL_FLAG = 0.5  # a claim counts as model-flagged at this probability or more

SCHEMA = StructType([
    StructField("provider_npi", StringType(), False),
    StructField("month", DateType(), False),  # the first day of the calendar month
    StructField("peer_group", StringType(), True),  # taxonomy; "" = providers without one
    StructField("claims", LongType(), False),
    StructField("billed_amount", DoubleType(), True),
    StructField("peer_providers", LongType(), True),  # providers of the peer group billing that month (incl. this one)
    StructField("peer_median_claims", DoubleType(), True),
    StructField("claims_vs_peers", DoubleType(), True),  # claims / the peers' median claims
    StructField("flagged_claims", LongType(), True),  # claims with a rules' reason (score > 0)
    StructField("flagged_share", DoubleType(), True),
    StructField("high_claims", LongType(), True),  # band high
    StructField("mean_score", DoubleType(), True),
    StructField("model_flagged_share", DoubleType(), True),  # model probability >= 0.5; null without a model
    StructField("peer_flagged_share", DoubleType(), True),  # flagged share over the peer group's claims that month
    StructField("previous_claims", LongType(), True),  # the provider's previous month with claims
    StructField("claims_change", DoubleType(), True),  # claims / previous_claims - 1
    StructField("flagged_share_change", DoubleType(), True),  # flagged_share - the previous month's
    StructField("top_reasons", StringType(), True),  # the reason codes on its claims, most frequent first, counted
    StructField("computed_at", TimestampType(), False),
])


def monthly(scores: DataFrame, providers: DataFrame) -> DataFrame:
    """Per provider and month: volumes, flagged shares and reason counts, with the peer group."""
    peer_of = providers.select(F.col("provider_key").alias("provider_npi"), F.col("taxonomy").alias("_taxonomy"))
    rows = scores.where("provider_npi IS NOT NULL AND service_from IS NOT NULL").withColumn(
        "month", F.trunc("service_from", "month"))
    reason_counts = rows.select("provider_npi", "month", F.explode("reasons.code").alias("code")).groupBy(
        "provider_npi", "month", "code").count().groupBy("provider_npi", "month").agg(F.array_join(F.transform(
            F.sort_array(F.collect_list(F.struct((-F.col("count")).alias("n"), F.col("code").alias("code")))),
            lambda s: F.format_string("%s %d", s["code"], -s["n"])), ", ").alias("top_reasons"))
    model_flag = F.when(F.col("model_probability").isNotNull(), (F.col("model_probability") >= MODEL_FLAG)
                        .cast("int"))
    per = rows.groupBy("provider_npi", "month").agg(
        F.count(F.lit(1)).alias("claims"), F.sum(F.col("billed_amount").cast("double")).alias("billed_amount"),
        F.sum((F.col("score") > 0).cast("int")).cast("long").alias("flagged_claims"),
        F.sum((F.col("band") == "high").cast("int")).cast("long").alias("high_claims"),
        F.avg("score").alias("mean_score"), F.avg(model_flag).alias("model_flagged_share"))
    return per.join(peer_of, "provider_npi", "left").join(reason_counts, ["provider_npi", "month"], "left").select(
        "*", F.coalesce("_taxonomy", F.lit("")).alias("peer_group")).drop("_taxonomy")


def against_peers_and_past(per: DataFrame) -> DataFrame:
    """Add the peers' median volume and flagged share that month and the change from the provider's month before."""
    peers = per.groupBy("peer_group", "month").agg(
        F.count(F.lit(1)).alias("peer_providers"), F.median("claims").alias("peer_median_claims"),
        (F.sum("flagged_claims") / F.sum("claims")).alias("peer_flagged_share"))
    share = F.col("flagged_claims") / F.col("claims")
    before = Window.partitionBy("provider_npi").orderBy("month")
    out = per.join(peers, ["peer_group", "month"]).withColumn("flagged_share", share).withColumn(
        "previous_claims", F.lag("claims").over(before)).withColumn(
        "_previous_share", F.lag(share).over(before))
    return out.withColumn("claims_vs_peers", F.col("claims") / F.col("peer_median_claims")).withColumn(
        "claims_change", F.col("claims") / F.col("previous_claims") - 1).withColumn(
        "flagged_share_change", F.col("flagged_share") - F.col("_previous_share"))


def provider_risk(changes: DataFrame, *, processed_at: datetime, read_table: Callable[..., DataFrame],
                  table_version: Callable[[str], int | None]) -> DataFrame:
    """gold.claims_fraud_scores changes -> every month of the providers they touch, and withdrawals of the
    provider-months left without claims."""
    from silver.claims import PROVIDERS_SCHEMA

    touched = changes.where("provider_npi IS NOT NULL").select("provider_npi").distinct()
    spark = changes.sparkSession
    providers = read_table(PROVIDERS) if table_version(PROVIDERS) is not None else spark.createDataFrame(
        [], PROVIDERS_SCHEMA)
    # Peers need every provider's months; the output is only the touched providers'.
    current = against_peers_and_past(monthly(read_table(SCORES), providers))
    mine = current.join(touched, "provider_npi", "left_semi")
    gone = changes.where("provider_npi IS NOT NULL AND service_from IS NOT NULL").select(
        "provider_npi", F.trunc("service_from", "month").alias("month")).distinct().join(
        mine.select("provider_npi", "month"), ["provider_npi", "month"], "left_anti").withColumn(
        "claims", F.lit(WITHDRAWN).cast("long"))
    out = mine.unionByName(gone, allowMissingColumns=True).withColumn(
        "computed_at", F.lit(processed_at).cast("timestamp"))
    return out.select(*[F.col(f.name).cast(f.dataType).alias(f.name) for f in SCHEMA.fields])
