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
| upcoding, after_death, excluded_provider, phantom_service: gold/claims_rules.py                                |

Every rule is a feature and a threshold: its value for the claim goes into `features` (the model's inputs, with the
claim's own descriptors), its reason into `reasons` where the threshold is passed. With a registered champion
(`carelake train fraud`) the row also carries the model's probability and version beside the rules' score.

Score = the sum of the rules' weights (at most 100); band none (0), low, medium, high. Void claims, claims known
only from a remittance and (unless `claims.part2_in_gold`) 42 CFR Part 2 claims have no row: a batch that voids a
claim withdraws its score. Each batch rescores the claims it changed, every claim sharing a member or a
provider-day with them (every rule's group lies within one: member-day, provider-day, duplicate signature, member)
and the claims whose upcoding outcome the batch's peer shares flip, judged against the current silver tables: the
groups are found in a narrow index of every line (line_index, one pass over the history, persisted for the batch;
the peer shares come from it too) and only the lines of the claims judged are read whole (batch_inputs). A batch
changing a quarter of the claims or more reads them whole and rescores them all, unless gold already holds what it
would write (already_scored: the next batch of a backlog that an earlier batch rescored whole, or a replay).
Rows carry the silver versions they were computed from.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import (
    ArrayType,
    DateType,
    DecimalType,
    DoubleType,
    IntegerType,
    LongType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

from gold.claims_rules import (
    after_death,
    em_lines,
    excluded_provider,
    peer_stats,
    phantom_service,
    signal,
    upcoding,
    upcoding_flips,
)

SCORES = "gold.claims_fraud_scores"
CLAIMS, LINES = "silver.claims", "silver.claim_lines"
MEMBERS, PROVIDERS = "silver.members", "silver.providers"
PATIENTS, ENCOUNTERS, OBSERVATIONS, STUDIES = ("silver.patients", "silver.encounters", "silver.observations",
                                               "silver.imaging_studies")
CONTEXT = (MEMBERS, PROVIDERS, PATIENTS, ENCOUNTERS, OBSERVATIONS, STUDIES)
RULE_CODES = ("duplicate", "unbundling", "impossible_volume", "upcoding", "after_death", "excluded_provider",
              "phantom_service")
# The model's inputs: each rule's value (rule_<code>, 0 when the rule has nothing on the claim) and the claim's own
# descriptors. The model and the rules read this one definition.
DESCRIPTORS = ("line_count", "billed_amount", "units_total", "units_max", "distinct_codes", "em_top_share",
               "days_billed")
FEATURES = (*(f"rule_{c}" for c in RULE_CODES), *DESCRIPTORS)
FEATURE_STRUCT = StructType([StructField(f, DoubleType(), True) for f in FEATURES])
WITHDRAWN = "withdrawn"  # a claim voided (or no longer scored): its score row is deleted
WHOLE_SHARE = 0.25  # a batch changing this share of the scored claims or more reads them whole and rescores all
STORED = ("claim_key string, reasons array<struct<code:string,detail:string,lines:array<int>>>, "
          "silver_claims_version long, silver_claim_lines_version long")  # what a batch reads of the stored scores

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
    StructField("provider_npi", StringType(), True),  # the claim's rendering NPI, else its first line's, else billing
    StructField("member_key", StringType(), True),
    StructField("service_from", DateType(), True),
    StructField("service_to", DateType(), True),
    StructField("billed_amount", DecimalType(14, 2), True),
    StructField("score", IntegerType(), False),  # 0-100: the sum of the weights of the rules that fired
    StructField("band", StringType(), False),  # none | low | medium | high (withdrawn: only in a batch, deletes)
    StructField("reasons", ArrayType(REASON), True),
    StructField("features", FEATURE_STRUCT, True),  # the rules' values and the claim's descriptors: the model's inputs
    StructField("model_probability", DoubleType(), True),  # the champion's fraud probability (null: no champion)
    StructField("model_version", StringType(), True),  # carelake-claims-fraud version that gave it
    StructField("claim_version", StringType(), True),
    StructField("silver_claims_version", LongType(), True),
    StructField("silver_claim_lines_version", LongType(), True),
    StructField("scored_at", TimestampType(), False),
])


@dataclass(frozen=True)
class Rules:
    """The rules' settings (from conf claims.*) and the exclusion list."""

    weights: Mapping[str, int]
    medium_from: int
    high_from: int
    pairs: tuple[tuple[str, ...], ...]  # (comprehensive, component, component, ...)
    minutes: Mapping[str, int]
    max_minutes_per_day: int
    include_part2: bool
    em_families: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    upcoding_min_lines: int = 20
    upcoding_min_excess: float = 0.25
    chart_codes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    exclusions: tuple = ()  # pipelines.exclusions.Exclusion rows

    @classmethod
    def of(cls, claims_cfg, exclusions: tuple = ()) -> Rules:
        k = claims_cfg
        return cls(dict(k.fraud_weights), k.fraud_medium_from, k.fraud_high_from, tuple(k.unbundling_pairs), k.minutes,
                   k.fraud_max_minutes_per_day, k.part2_in_gold, dict(k.em_families), k.upcoding_min_lines,
                   k.upcoding_min_excess, dict(k.chart_codes), tuple(exclusions))


def is_scored(rules: Rules) -> Column:
    """Whether a claim gets a score: current (active), not Part 2 unless configured."""
    current = F.col("status") == "active"
    return current if rules.include_part2 else current & (F.col("part2").isNull() | ~F.col("part2"))


def scored_claims(claims: DataFrame, rules: Rules) -> DataFrame:
    """The claims that get a score (is_scored)."""
    return claims.where(is_scored(rules))


def current_lines(lines: DataFrame, claims: DataFrame, *, removed: bool = False) -> DataFrame:
    """Lines of scored claims that stand (not withdrawn by a replacement; `removed` keeps those too), with the claim's
    member, patient and providers; a line without its own dates takes the claim's."""
    kept = lines if removed else lines.where("line_status = 'active'")
    return kept.join(claims.select("claim_key", "member_key", "patient_key", "billing_npi", "billing_provider_key",
                                   F.col("rendering_npi").alias("_claim_rendering"),
                                   F.col("service_from").alias("_claim_from")), "claim_key").withColumn(
        "provider", F.coalesce("rendering_npi", "_claim_rendering", "billing_provider_key")).withColumn(
        "service_from", F.coalesce("service_from", "_claim_from")).drop("_claim_from")


def duplicates(claims: DataFrame, lines: DataFrame) -> DataFrame:
    """Claims repeating an earlier claim's member, provider, dates and procedures (value 1)."""
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
    return signal(later, "duplicate", F.lit(1.0), F.lit(True), detail, F.array_sort("_lines"))


def _pairs(spark, rules: Rules) -> DataFrame:
    rows = [(row[0], component) for row in rules.pairs for component in row[1:]]
    return spark.createDataFrame(rows, "comprehensive string, component string")


def unbundling(lines: DataFrame, rules: Rules) -> DataFrame:
    """Components of one comprehensive code billed for a member on one day (or with it)."""
    pairs = F.broadcast(_pairs(lines.sparkSession, rules))
    day = lines.select("claim_key", "line_number", "member_key", "procedure_code",
                       F.col("service_from").alias("day"))
    parts = day.join(pairs, day["procedure_code"] == pairs["component"])
    whole = day.join(pairs.select(F.col("comprehensive").alias("procedure_code")).distinct(), "procedure_code",
                     "left_semi").select("member_key", "day", F.col("procedure_code").alias("comprehensive")).distinct()
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
    return signal(per_claim, "unbundling", F.size("_lines"), F.lit(True), F.col("_detail"), F.col("_lines"))


def impossible_volume(lines: DataFrame, rules: Rules) -> DataFrame:
    """The rendering provider's timed minutes on the claim's days as a share of a day's limit; fires above 1."""
    minutes = lines.sparkSession.createDataFrame(list(rules.minutes.items()), "procedure_code string, minutes int")
    timed = lines.join(F.broadcast(minutes), "procedure_code").withColumn(
        "_minutes", F.coalesce("units", F.lit(1.0)) * F.col("minutes"))
    totals = timed.groupBy("provider", "service_from").agg(F.sum("_minutes").alias("_total"))
    hit = timed.join(totals, ["provider", "service_from"])
    detail = F.format_string("provider %s billed %,.0f minutes of timed services on %s (more than %d in a day)",
                             "provider", "_total", F.col("service_from").cast("string"),
                             F.lit(rules.max_minutes_per_day))
    per_claim = hit.groupBy("claim_key", "provider", "service_from", "_total").agg(
        F.array_sort(F.collect_list("line_number")).alias("_lines"))
    return signal(per_claim, "impossible_volume", F.col("_total") / rules.max_minutes_per_day,
                  F.col("_total") > rules.max_minutes_per_day, detail, F.col("_lines"))


def exclusions_frame(spark, rules: Rules) -> DataFrame:
    """The exclusion list as a small table (npi, name, excl_type, excluded_on, reinstated_on)."""
    return spark.createDataFrame([(e.npi, e.name, e.excl_type, e.excluded_on, e.reinstated_on)
                                  for e in rules.exclusions],
                                 "npi string, name string, excl_type string, excluded_on date, reinstated_on date")


def signals(claims: DataFrame, lines: DataFrame, tables: Mapping[str, DataFrame], rules: Rules,
            stats: DataFrame) -> DataFrame:
    """Every rule's (claim_key, rule, value, reason) over the scored claims and their current lines; `stats`
    the batch's peer_stats."""
    spark = claims.sparkSession
    return (duplicates(claims, lines).unionByName(unbundling(lines, rules)).unionByName(
        impossible_volume(lines, rules)).unionByName(upcoding(em_lines(lines, rules.em_families), stats)).unionByName(
        after_death(lines, tables[MEMBERS], tables[PATIENTS])).unionByName(
        excluded_provider(lines, exclusions_frame(spark, rules))).unionByName(
        phantom_service(lines, tables[PATIENTS], tables[ENCOUNTERS], tables[OBSERVATIONS], tables[STUDIES],
                        rules.chart_codes)))


def _top_level(rules: Rules) -> Column:
    tops = [codes[-1] for codes in rules.em_families.values()]
    return F.col("procedure_code").isin(*tops) if tops else F.lit(False)


def claim_features(claims: DataFrame, lines: DataFrame, found: DataFrame, rules: Rules) -> DataFrame:
    """(claim_key, provider_npi, features): each rule's value on the claim (its largest; 0 when none) and the claim's
    descriptors."""
    em = F.col("procedure_code").isin(*[c for codes in rules.em_families.values() for c in codes])
    described = lines.groupBy("claim_key").agg(
        F.count(F.lit(1)).alias("line_count"), F.sum(F.coalesce("units", F.lit(1.0))).alias("units_total"),
        F.max("units").alias("units_max"), F.size(F.collect_set("procedure_code")).alias("distinct_codes"),
        F.try_divide(F.sum(_top_level(rules).cast("int")), F.sum(em.cast("int"))).alias("em_top_share"),
        F.size(F.collect_set("service_from")).alias("days_billed"),  # sets, not countDistinct: no Expand x3
        F.min_by("rendering_npi", F.when(F.col("rendering_npi").isNotNull(), F.col("line_number"))).alias("_first"))
    values = found.groupBy("claim_key").pivot("rule", list(RULE_CODES)).agg(F.max("value"))
    joined = claims.select("claim_key", F.col("billed_amount").cast("double").alias("billed_amount"),
                           F.col("rendering_npi").alias("_claim_rendering"), "billing_npi").join(
        described, "claim_key", "left").join(values, "claim_key", "left")
    columns = [F.coalesce(F.col(c), F.lit(0.0)).cast("double").alias(f"rule_{c}") for c in RULE_CODES]
    columns += [F.coalesce(F.col(d).cast("double"), F.lit(0.0)).alias(d) for d in DESCRIPTORS]
    return joined.select("claim_key", F.coalesce("_claim_rendering", "_first", "billing_npi").alias("provider_npi"),
                         F.struct(*columns).alias("features"))


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


def model_scores(features: DataFrame, champion: Any | None) -> DataFrame:
    """(claim_key, model_probability, model_version) from the champion (nulls when there is none)."""
    if champion is None:
        return features.select("claim_key", F.lit(None).cast("double").alias("model_probability"),
                               F.lit(None).cast("string").alias("model_version"))
    flat = features.select("claim_key", *[F.col(f"features.{f}").alias(f) for f in FEATURES])

    def predict(batches):
        import pandas as pd

        for batch in batches:
            yield pd.DataFrame({"claim_key": batch["claim_key"], "model_probability": champion.predict(batch)})

    scored = flat.mapInPandas(predict, "claim_key string, model_probability double")
    return scored.withColumn("model_version", F.lit(str(champion.version)))


def _optional(read_table: Callable[..., DataFrame], table_version: Callable[[str], int | None], spark, name: str,
              schema: StructType) -> DataFrame:
    """A table the rules read if the lakehouse has it; an empty one of its schema otherwise (feed not connected)."""
    return read_table(name) if table_version(name) is not None else spark.createDataFrame([], schema)


def context_tables(spark, read_table: Callable[..., DataFrame],
                   table_version: Callable[[str], int | None]) -> dict[str, DataFrame]:
    """The silver tables beyond claims the rules hold a claim against (members, providers, the chart)."""
    from silver.claims import MEMBERS_SCHEMA, PROVIDERS_SCHEMA
    from silver.encounters import SCHEMA as ENCOUNTERS_SCHEMA
    from silver.imaging_studies import SCHEMA as STUDIES_SCHEMA
    from silver.observations import SCHEMA as OBSERVATIONS_SCHEMA
    from silver.patients import SCHEMA as PATIENTS_SCHEMA

    schemas = (MEMBERS_SCHEMA, PROVIDERS_SCHEMA, PATIENTS_SCHEMA, ENCOUNTERS_SCHEMA, OBSERVATIONS_SCHEMA,
               STUDIES_SCHEMA)
    return {name: _optional(read_table, table_version, spark, name, schema)
            for name, schema in zip(CONTEXT, schemas, strict=True)}


def _among(frame: DataFrame, keys: DataFrame) -> DataFrame:
    return frame.join(keys, "claim_key", "left_semi")


def _keys(spark, frame: DataFrame, columns: tuple[str, ...] = ("claim_key",)) -> DataFrame:
    """`frame`'s distinct `columns`, computed now and handed back as a small local frame: later steps start from
    these rows, not from the plan that found them (no checkpoint to write, no plan growing round after round)."""
    return spark.createDataFrame(frame.select(*columns).distinct().toArrow())


def line_index(every: DataFrame, lines: DataFrame, rules: Rules) -> DataFrame:
    """Every line of silver.claim_lines (any status), narrow: its claim's member (any status), the provider and day
    it counts for (current_lines' rule: its own rendering NPI and day, else its claim's), whether its claim is known
    (`_known`) and scored (`_scored`), and whether it marks a provider-day for the neighbour search (`_marks`: a line
    with its own rendering NPI and day, whatever its status, or a current line of a scored claim). One pass over the
    history per batch: the neighbour rounds and the peer shares read this, persisted, not the tables again."""
    claims = every.select("claim_key", "member_key", F.col("rendering_npi").alias("_claim_rendering"),
                          "billing_provider_key", F.col("service_from").alias("_claim_from"),
                          F.coalesce(is_scored(rules), F.lit(False)).alias("_scored"), F.lit(True).alias("_known"))
    own = F.col("rendering_npi").isNotNull() & F.col("_line_from").isNotNull()
    return lines.select("claim_key", "line_number", "line_status", "procedure_code", "rendering_npi",
                        F.col("service_from").alias("_line_from")).join(claims, "claim_key", "left").select(
        "claim_key", "line_number", "line_status", "procedure_code", "member_key",
        F.coalesce("rendering_npi", "_claim_rendering", "billing_provider_key").alias("provider"),
        F.coalesce("_line_from", "_claim_from").alias("service_from"),
        F.coalesce("_known", F.lit(False)).alias("_known"), F.coalesce("_scored", F.lit(False)).alias("_scored"),
        (own | (F.coalesce("_scored", F.lit(False)) & (F.col("line_status") == "active"))).alias("_marks"))


def neighbours(claims: DataFrame, index: DataFrame, seed: DataFrame) -> DataFrame:
    """(claim_key) of the claims sharing a member or a provider-day with the lines `seed` (rows of line_index): every
    rule's group lies within one of the two. `claims`: the scored claims."""
    spark = claims.sparkSession
    found = _keys(spark, seed, ("member_key", "provider", "service_from"))
    members = found.where("member_key IS NOT NULL").select("member_key").distinct()
    days = found.select(F.col("provider").alias("_p"), F.col("service_from").alias("_d")).distinct()
    on_day = (F.col("provider") == F.col("_p")) & (F.col("service_from") == F.col("_d"))
    return _keys(spark, claims.join(members, "member_key", "left_semi").select("claim_key").unionByName(
        index.where("_marks").join(F.broadcast(days), on_day, "left_semi").select("claim_key")))


def batch_inputs(claims: DataFrame, index: DataFrame, seeds: DataFrame) -> tuple[DataFrame, DataFrame]:
    """(claims to rescore, the claims whose lines the rules need to judge them), found in the line index, never the
    tables' whole rows. Rescored: the seeds and their neighbours (by every line the seeds ever had, so a void or a
    replacement frees the claims it stood beside); judged with their own neighbours, so each group is complete.
    `claims`: the scored ones."""
    first = _among(index.where("_known"), seeds)
    rescored = _keys(claims.sparkSession, seeds.unionByName(neighbours(claims, index, first)))
    current = _among(index.where("_scored AND line_status = 'active'"), rescored)
    return rescored, _keys(claims.sparkSession, rescored.unionByName(neighbours(claims, index, current)))


def _shares(spark, em: DataFrame, providers: DataFrame, rules: Rules) -> DataFrame:
    """The peer shares (peer_stats) over every current E/M line, computed now: a small table (providers x
    families) the rules broadcast."""
    stats = peer_stats(em, providers, min_lines=rules.upcoding_min_lines, min_excess=rules.upcoding_min_excess)
    return spark.createDataFrame(stats.toArrow(), stats.schema)


def already_scored(stored: DataFrame, changed: DataFrame, gone: DataFrame, versions: tuple[int | None, int | None]
                   ) -> bool:
    """Whether gold already holds what the batch would write: every stored row computed from the silver versions of
    now (an earlier batch of the same backlog rescored everything), each changed claim that is scored (`changed`)
    stored, none to withdraw (`gone`). A backlog longer than one batch, or a replay, is then scored once."""
    if None in versions:
        return False
    low = stored.agg(F.min("silver_claims_version").alias("c"), F.min("silver_claim_lines_version").alias("l")).first()
    if (low["c"], low["l"]) != versions:
        return False
    return changed.select("claim_key").join(stored, "claim_key", "left_anti").unionByName(gone).isEmpty()


def claims_fraud_scores(changes: DataFrame, *, processed_at: datetime, read_table: Callable[..., DataFrame],
                        table_version: Callable[[str], int | None], rules: Rules,
                        model: Callable[[], Any] | None = None) -> DataFrame:
    """silver.claims changes -> score rows for the changed claims, those sharing a rule's group with them and those
    whose upcoding outcome flipped with the batch's peer shares, and a withdrawal row for each changed claim that is
    no longer scored (void, Part 2)."""
    spark = changes.sparkSession
    # The keys leave the micro-batch's plan (a local checkpoint of a frame derived from the streaming source overflowed
    # the stream thread's stack at 50k lines): every later materialization starts from these keys, not the batch.
    touched_keys = changes.where("_change_type IN ('insert', 'update_postimage')").select(
        "claim_key").distinct().toArrow()
    touched = spark.createDataFrame(touched_keys)
    silver_claims, every_line = read_table(CLAIMS), read_table(LINES)
    every_claim = scored_claims(silver_claims, rules)
    tables = context_tables(spark, read_table, table_version)
    versions = (table_version(CLAIMS), table_version(LINES))
    stored = read_table(SCORES).select("claim_key", "reasons", "silver_claims_version", "silver_claim_lines_version") \
        if table_version(SCORES) is not None else spark.createDataFrame([], STORED)
    # A withdrawal deletes a stored score; one for a claim never scored would be a row the merge neither matches nor
    # inserts (delta-rs still checks it against the table's NOT NULL columns), so only stored scores are withdrawn.
    unscored = touched.join(_among(every_claim, touched).select("claim_key"), "claim_key", "left_anti")
    gone = stored.select("claim_key").join(unscored, "claim_key", "left_semi")

    index = None
    if len(touched_keys) >= WHOLE_SHARE * every_claim.count():
        if already_scored(stored, _among(every_claim, touched), gone, versions):
            return spark.createDataFrame([], SCHEMA)
        claims, lines = every_claim, current_lines(every_line, every_claim).localCheckpoint()
        mine, stats = every_claim, _shares(spark, em_lines(lines, rules.em_families), tables[PROVIDERS], rules)
        rescored = lines
    else:
        index = line_index(silver_claims, every_line, rules).persist()
        em = em_lines(index.where("_scored AND line_status = 'active'"), rules.em_families)
        stats = _shares(spark, em, tables[PROVIDERS], rules)
        seeds = _keys(spark, touched.unionByName(upcoding_flips(em, stats, stored)))
        affected, ring = batch_inputs(every_claim.select("claim_key", "member_key"), index, seeds)
        claims = _among(every_claim, ring)
        lines = current_lines(_among(every_line, ring), claims).localCheckpoint()
        mine, rescored = _among(claims, affected), _among(lines, affected)
    # Materialized once: the reasons and the features both read the signals.
    found = signals(claims, lines, tables, rules, stats).localCheckpoint()
    if index is not None:
        index.unpersist()
    reasons = found.where("reason IS NOT NULL").select("claim_key", "reason")
    features = claim_features(mine, rescored, found, rules)
    scored = score_rows(mine, reasons, rules).join(features, "claim_key", "left").join(
        model_scores(features.drop("provider_npi"), model() if model else None), "claim_key", "left")
    withdrawn = gone.select(
        "claim_key", *[F.lit(None).cast(f.dataType).alias(f.name) for f in SCHEMA.fields
                       if f.name not in ("claim_key", "score", "band", "scored_at", "silver_claims_version",
                                         "silver_claim_lines_version")],
        F.lit(0).alias("score"), F.lit(WITHDRAWN).alias("band"))
    stamped = scored.unionByName(withdrawn, allowMissingColumns=True).select(
        *[c for c in scored.columns],
        F.lit(versions[0]).cast("long").alias("silver_claims_version"),
        F.lit(versions[1]).cast("long").alias("silver_claim_lines_version"),
        F.lit(processed_at).cast("timestamp").alias("scored_at"))
    return stamped.select(*[F.col(f.name).cast(f.dataType).alias(f.name) for f in SCHEMA.fields])
