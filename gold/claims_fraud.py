"""gold.claims_fraud_scores: one row per current claim with a score, a band and reason codes an analyst can act on.

Rules (conf `claims.fraud_*`, `claims.unbundling_pairs`, `claims.timed_minutes`), each a reason with its detail:

| code              | when                                                                                      |
|-------------------|-------------------------------------------------------------------------------------------|
| duplicate         | another current claim, created earlier, has the same member, billing provider, dates of  |
|                   | service and procedures (codes and units): "duplicate of claim X"                          |
| unbundling        | two or more components of one comprehensive code (the pair table) billed for the member  |
|                   | on one day, or a component billed with its comprehensive code                            |
| impossible_volume | the claim's rendering provider billed more timed minutes on one of its days than a day   |
|                   | allows (units x the code's typical minutes)                                               |

Score = the sum of the rules' weights (at most 100); band none (0), low, medium, high. Void claims, claims known
only from a remittance and (unless `claims.part2_in_gold`) 42 CFR Part 2 claims have no row: a batch that voids a
claim withdraws its score. Each batch rescores the claims it changed and every claim sharing a rule's group with
them (the same provider-day, member-day or duplicate signature), judged against the current silver tables; rows
carry the silver versions they were computed from.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import (
    ArrayType,
    DateType,
    DecimalType,
    IntegerType,
    LongType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

SCORES = "gold.claims_fraud_scores"
CLAIMS, LINES = "silver.claims", "silver.claim_lines"
WITHDRAWN = "withdrawn"  # a claim voided (or no longer scored): its score row is deleted

# Nested fields are nullable: delta-rs checks a non-null nested field even where its parent (reasons) is null.
REASON = StructType([
    StructField("code", StringType(), True),  # duplicate | unbundling | impossible_volume
    StructField("detail", StringType(), True),  # what was found, in words an analyst can check
    StructField("lines", ArrayType(IntegerType()), True),  # the claim's line numbers that drive it
])

SCHEMA = StructType([
    StructField("claim_key", StringType(), False),
    StructField("claim_id", StringType(), True),
    StructField("billing_npi", StringType(), True),
    StructField("rendering_npi", StringType(), True),
    StructField("member_key", StringType(), True),
    StructField("service_from", DateType(), True),
    StructField("service_to", DateType(), True),
    StructField("billed_amount", DecimalType(14, 2), True),
    StructField("score", IntegerType(), False),  # 0-100: the sum of the weights of the rules that fired
    StructField("band", StringType(), False),  # none | low | medium | high (withdrawn: only in a batch, deletes)
    StructField("reasons", ArrayType(REASON), True),
    StructField("claim_version", StringType(), True),
    StructField("silver_claims_version", LongType(), True),
    StructField("silver_claim_lines_version", LongType(), True),
    StructField("scored_at", TimestampType(), False),
])


@dataclass(frozen=True)
class Rules:
    """The rules' settings (from conf claims.*)."""

    weights: Mapping[str, int]
    medium_from: int
    high_from: int
    pairs: tuple[tuple[str, ...], ...]  # (comprehensive, component, component, ...)
    minutes: Mapping[str, int]
    max_minutes_per_day: int
    include_part2: bool

    @classmethod
    def of(cls, claims_cfg) -> Rules:
        return cls(dict(claims_cfg.fraud_weights), claims_cfg.fraud_medium_from, claims_cfg.fraud_high_from,
                   tuple(claims_cfg.unbundling_pairs), claims_cfg.minutes, claims_cfg.fraud_max_minutes_per_day,
                   claims_cfg.part2_in_gold)


def scored_claims(claims: DataFrame, rules: Rules) -> DataFrame:
    """The claims that get a score: current (active), not Part 2 unless configured."""
    current = claims.where("status = 'active'")
    return current if rules.include_part2 else current.where("part2 IS NULL OR NOT part2")


def current_lines(lines: DataFrame, claims: DataFrame) -> DataFrame:
    """Lines of scored claims that stand (not withdrawn by a replacement), with the claim's member and provider."""
    kept = lines.where("line_status = 'active'")
    return kept.join(claims.select("claim_key", "member_key", F.col("rendering_npi").alias("_claim_rendering"),
                                   "billing_provider_key"), "claim_key").withColumn(
        "provider", F.coalesce("rendering_npi", "_claim_rendering", "billing_provider_key"))


def _reason(code: str, detail: Column, lines: Column) -> Column:
    return F.struct(F.lit(code).alias("code"), detail.alias("detail"), lines.alias("lines"))


def duplicates(claims: DataFrame, lines: DataFrame) -> DataFrame:
    """(claim_key, reason): claims repeating an earlier claim's member, provider, dates and procedures."""
    signature = lines.groupBy("claim_key").agg(F.array_sort(F.collect_list(F.concat_ws(
        "x", F.coalesce("procedure_code", "revenue_code", "ndc"), F.col("units").cast("string")))).alias("_sig"),
        F.collect_list("line_number").alias("_lines"))
    keyed = claims.join(signature, "claim_key").withColumn("_group", F.sha2(F.concat_ws(
        "|", "member_key", "billing_provider_key", F.col("service_from").cast("string"),
        F.col("service_to").cast("string"), F.concat_ws(",", "_sig")), 256))
    first = keyed.groupBy("_group").agg(F.min_by(F.struct("claim_key", "claim_id"),
                                                 F.struct("claim_version", "claim_key")).alias("_first"))
    later = keyed.join(first, "_group").where(F.col("_first.claim_key") != F.col("claim_key"))
    detail = F.format_string("duplicate of claim %s: same member, billing provider, dates of service and "
                             "procedures", F.col("_first.claim_id"))
    return later.select("claim_key", _reason("duplicate", detail, F.array_sort("_lines")).alias("reason"),
                        F.col("_group").alias("group"))


def _pairs(spark, rules: Rules) -> DataFrame:
    rows = [(row[0], component) for row in rules.pairs for component in row[1:]]
    return spark.createDataFrame(rows, "comprehensive string, component string")


def unbundling(lines: DataFrame, rules: Rules) -> DataFrame:
    """(claim_key, reason): components of one comprehensive code billed for a member on one day (or with it)."""
    pairs = _pairs(lines.sparkSession, rules)
    day = lines.select("claim_key", "line_number", "member_key", "procedure_code",
                       F.col("service_from").alias("day"))
    parts = day.join(pairs, day["procedure_code"] == pairs["component"])
    whole = day.select("member_key", "day", F.col("procedure_code").alias("comprehensive")).distinct()
    grouped = parts.groupBy("member_key", "day", "comprehensive").agg(
        F.array_sort(F.collect_set("component")).alias("_components"),
        F.collect_list(F.struct("claim_key", "line_number")).alias("_where"))
    found = grouped.join(whole.withColumn("_billed", F.lit(True)), ["member_key", "day", "comprehensive"], "left")
    found = found.where((F.size("_components") >= 2) | F.col("_billed").isNotNull())
    detail = F.when(F.col("_billed").isNotNull(), F.format_string(
        "%s billed with its comprehensive code %s on %s", F.array_join("_components", " + "), "comprehensive",
        F.col("day").cast("string"))).otherwise(F.format_string(
            "%s billed on %s: together they are %s (comprehensive code)", F.array_join("_components", " + "),
            F.col("day").cast("string"), "comprehensive"))
    exploded = found.select(detail.alias("_detail"), F.explode("_where").alias("_w"), "member_key", "day",
                            "comprehensive")
    per_claim = exploded.groupBy("_w.claim_key", "_detail", "member_key", "day", "comprehensive").agg(
        F.array_sort(F.collect_list("_w.line_number")).alias("_lines"))
    return per_claim.select("claim_key", _reason("unbundling", F.col("_detail"), F.col("_lines")).alias("reason"),
                            F.concat_ws("|", "member_key", F.col("day").cast("string")).alias("group"))


def impossible_volume(lines: DataFrame, rules: Rules) -> DataFrame:
    """(claim_key, reason): the rendering provider's timed minutes on one of the claim's days exceed a day."""
    minutes = lines.sparkSession.createDataFrame(list(rules.minutes.items()), "procedure_code string, minutes int")
    timed = lines.join(F.broadcast(minutes), "procedure_code").withColumn(
        "_minutes", F.coalesce("units", F.lit(1.0)) * F.col("minutes"))
    totals = timed.groupBy("provider", "service_from").agg(F.sum("_minutes").alias("_total"))
    over = totals.where(F.col("_total") > rules.max_minutes_per_day)
    hit = timed.join(over, ["provider", "service_from"])
    detail = F.format_string("provider %s billed %,.0f minutes of timed services on %s (more than %d in a day)",
                             "provider", "_total", F.col("service_from").cast("string"),
                             F.lit(rules.max_minutes_per_day))
    per_claim = hit.groupBy("claim_key", "provider", "service_from", "_total").agg(
        F.array_sort(F.collect_list("line_number")).alias("_lines"))
    return per_claim.select("claim_key", _reason("impossible_volume", detail.alias("d"), F.col("_lines"))
                            .alias("reason"), F.concat_ws("|", "provider", F.col("service_from").cast("string"))
                            .alias("group"))


def _band(score: Column, rules: Rules) -> Column:
    return (F.when(score >= rules.high_from, "high").when(score >= rules.medium_from, "medium")
            .when(score > 0, "low").otherwise("none"))


def score_rows(claims: DataFrame, reasons: DataFrame, rules: Rules) -> DataFrame:
    """One row per claim of `claims`: its reasons, score and band."""
    weight = F.create_map(*[x for code, w in rules.weights.items() for x in (F.lit(code), F.lit(w))])
    per_claim = reasons.groupBy("claim_key").agg(F.array_sort(F.collect_set("reason")).alias("reasons"))
    joined = claims.join(per_claim, "claim_key", "left")
    codes = F.array_distinct(F.transform(F.coalesce("reasons", F.array()), lambda r: r["code"]))
    total = F.aggregate(codes, F.lit(0), lambda acc, c: acc + F.coalesce(weight[c], F.lit(0)))
    score = F.least(total, F.lit(100)).cast("int")
    return joined.select("claim_key", "claim_id", "billing_npi", "rendering_npi", "member_key", "service_from",
                         "service_to", "billed_amount", score.alias("score"), _band(score, rules).alias("band"),
                         "reasons", "claim_version")


def claims_fraud_scores(changes: DataFrame, *, processed_at: datetime, read_table: Callable[..., DataFrame],
                        table_version: Callable[[str], int | None], rules: Rules) -> DataFrame:
    """silver.claims changes -> score rows for the changed claims and those sharing a rule's group with them, and a
    withdrawal row for each changed claim that is no longer scored (void, Part 2)."""
    touched = changes.where("_change_type IN ('insert', 'update_postimage')").select("claim_key").distinct()
    claims = scored_claims(read_table(CLAIMS), rules)
    lines = current_lines(read_table(LINES), claims)
    reasons = duplicates(claims, lines).unionByName(unbundling(lines, rules)).unionByName(
        impossible_volume(lines, rules))
    groups = reasons.join(touched, "claim_key").select("group").distinct()
    affected = touched.unionByName(reasons.join(groups, "group").select("claim_key")).distinct()
    scored = score_rows(claims.join(affected, "claim_key"), reasons.drop("group"), rules)
    # A withdrawal deletes a stored score; one for a claim never scored would be a row the merge neither matches nor
    # inserts (delta-rs still checks it against the table's NOT NULL columns), so only stored scores are withdrawn.
    stored = read_table(SCORES).select("claim_key") if table_version(SCORES) is not None else touched.limit(0)
    gone = touched.join(claims, "claim_key", "left_anti").join(stored, "claim_key", "left_semi").select(
        "claim_key", *[F.lit(None).cast(f.dataType).alias(f.name) for f in SCHEMA.fields
                       if f.name not in ("claim_key", "score", "band", "scored_at", "silver_claims_version",
                                         "silver_claim_lines_version")],
        F.lit(0).alias("score"), F.lit(WITHDRAWN).alias("band"))
    stamped = scored.unionByName(gone, allowMissingColumns=True).select(
        *[c for c in scored.columns],
        F.lit(table_version(CLAIMS)).cast("long").alias("silver_claims_version"),
        F.lit(table_version(LINES)).cast("long").alias("silver_claim_lines_version"),
        F.lit(processed_at).cast("timestamp").alias("scored_at"))
    return stamped.select(*[F.col(f.name).cast(f.dataType).alias(f.name) for f in SCHEMA.fields])
