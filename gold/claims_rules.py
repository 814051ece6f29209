"""The fraud rules that look past one claim: upcoding against peers, service after death, excluded providers and the
bill against the chart (phantom services).

Each rule is a feature and a threshold: it returns one row per (claim, rule) with the feature's `value` (what the
model reads, gold.claims_fraud_scores.features) and a `reason` only where the value passes the rule's threshold.
A value depends on the claim's own lines, its member's claims or its provider-days' claims, and on the peer shares
(gold.claims_fraud.batch_inputs reads exactly those).

- upcoding: value = the provider's top-level share of an E/M family minus its peers' (same taxonomy), on the claims
  with a top-level line of the family; fires at claims.upcoding_min_excess, both with claims.upcoding_min_lines lines.
  The shares (peer_stats) are computed once per batch over every current line; a stored claim is rescored when its
  outcome flips (upcoding_flips), not each time a share moves.
- after_death: value = days between the member's death and the latest service after it; fires above 0.
- excluded_provider: value = lines rendered or billed by an NPI of the exclusion list between its exclusion and
  reinstatement dates; fires above 0.
- phantom_service: value = lines of a claims.chart_codes category without the chart's evidence that day (a stay
  covering it; critical care also vital signs, imaging also a study, when the day lies within the span of the
  patient's rows in that table); fires above 0, for members linked to a patient in silver.patients.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import date

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

NEVER = date(9999, 12, 31)
DROPPED_ENCOUNTER = ("cancelled", "entered-in-error")
DROPPED_OBSERVATION = ("entered-in-error", "deleted", "cancelled")
MAX_DETAIL_LINES = 5


def reason(code: str, detail: Column, lines: Column) -> Column:
    """A reason struct (code, detail, lines) as gold.claims_fraud_scores stores it."""
    return F.struct(F.lit(code).alias("code"), detail.alias("detail"), lines.alias("lines"))


def signal(frame: DataFrame, code: str, value: Column, fires: Column, detail: Column, lines: Column) -> DataFrame:
    """(claim_key, rule, value, reason): the rule's feature value, and its reason where it fires."""
    return frame.select("claim_key", F.lit(code).alias("rule"), value.cast("double").alias("value"),
                        F.when(fires, reason(code, detail, lines)).alias("reason"))


# -- upcoding ----------------------------------------------------------------------------------------------------
def _em_codes(spark, families: Mapping[str, Sequence[str]]) -> DataFrame:
    rows = [(code, family, level + 1, codes[-1], f"{codes[0]}-{codes[-1]}")
            for family, codes in families.items() for level, code in enumerate(codes)]
    return spark.createDataFrame(rows, "procedure_code string, family string, level int, top_code string, "
                                       "family_codes string")


def em_lines(lines: DataFrame, families: Mapping[str, Sequence[str]]) -> DataFrame:
    """The E/M lines of `lines` with their family, level and whether they are the family's top level (_top)."""
    return lines.join(F.broadcast(_em_codes(lines.sparkSession, families)), "procedure_code").withColumn(
        "_top", (F.col("procedure_code") == F.col("top_code")).cast("int"))


def peer_stats(em: DataFrame, providers: DataFrame, *, min_lines: int, min_excess: float) -> DataFrame:
    """Per provider and E/M family (em_lines of every current line): its lines, top-level share, its specialty
    peers' share (the provider left out), the excess and whether it `fires`; only pairs with min_lines each side."""
    peer_of = providers.select(F.col("provider_key").alias("provider"),
                               F.coalesce("taxonomy", F.lit("")).alias("peer_group"))
    mine = em.groupBy("provider", "family", "family_codes").agg(
        F.count(F.lit(1)).alias("n"), F.sum("_top").alias("top")).join(F.broadcast(peer_of), "provider", "left"
                                                                     ).withColumn(
        "peer_group", F.coalesce("peer_group", F.lit("")))
    peers = mine.groupBy("peer_group", "family").agg(F.sum("n").alias("peer_n"), F.sum("top").alias("peer_top"))
    stats = mine.join(F.broadcast(peers), ["peer_group", "family"]).select(
        "provider", "family", "family_codes", "n", "peer_group", (F.col("top") / F.col("n")).alias("share"),
        (F.col("peer_n") - F.col("n")).alias("others_n"),
        ((F.col("peer_top") - F.col("top")) / (F.col("peer_n") - F.col("n"))).alias("others_share")).where(
        (F.col("n") >= min_lines) & (F.col("others_n") >= min_lines))
    excess = F.col("share") - F.col("others_share")
    return stats.withColumn("excess", excess).withColumn("fires", excess >= min_excess)


def upcoding(em: DataFrame, stats: DataFrame) -> DataFrame:
    """The provider's share of each E/M family's top level against its specialty peers' (peer_stats), on the claims
    billing it (em: em_lines of the claims to score)."""
    top_lines = em.where("_top = 1").groupBy("claim_key", "provider", "family", "procedure_code").agg(
        F.array_sort(F.collect_list("line_number")).alias("_lines"))
    hit = top_lines.join(F.broadcast(stats), ["provider", "family"])
    peers_named = F.when(F.col("peer_group") == "", F.lit("peers without a taxonomy")).otherwise(
        F.concat(F.lit("peers of taxonomy "), F.col("peer_group")))
    detail = F.format_string("provider %s billed the top level %s on %.0f%% of its %d %s lines (%s); %s: %.0f%% "
                             "of %d", "provider", "procedure_code", F.col("share") * 100, "n", "family",
                             "family_codes", peers_named, F.col("others_share") * 100, "others_n")
    return signal(hit, "upcoding", F.col("excess"), F.col("fires"), detail, F.col("_lines"))


def upcoding_flips(em: DataFrame, stats: DataFrame, stored: DataFrame) -> DataFrame:
    """(claim_key) of claims whose stored upcoding outcome no longer holds: a top-level line of a (provider, family)
    that fires now, not named by a stored upcoding reason (or not stored at all: a new claim), or a line a stored
    reason names of a pair that no longer fires. `em`: em_lines of every current line; `stored`:
    gold.claims_fraud_scores (claim_key, reasons)."""
    named = stored.where(F.exists("reasons", lambda r: r["code"] == "upcoding")).select(
        "claim_key", F.explode(F.filter("reasons", lambda r: r["code"] == "upcoding")).alias("_r")).select(
        "claim_key", F.explode("_r.lines").alias("line_number")).withColumn("_was", F.lit(True))
    now = F.broadcast(stats.where("fires").select("provider", "family", F.lit(True).alias("_now")))
    top = em.where("_top = 1").select("claim_key", "line_number", "provider", "family").join(
        now, ["provider", "family"], "left")
    judged = top.join(F.broadcast(named), ["claim_key", "line_number"], "left")
    return judged.where(F.coalesce("_now", F.lit(False)) != F.coalesce("_was", F.lit(False))).select(
        "claim_key").distinct()


# -- after death -------------------------------------------------------------------------------------------------
def canonical_patients(patients: DataFrame) -> DataFrame:
    """(patient_key, person): each patient identity and the identity holding its data (merges resolved)."""
    return patients.where("deleted_at IS NULL").select(
        "patient_key", F.coalesce("merged_into", "patient_key").alias("person"))


def after_death(lines: DataFrame, members: DataFrame, patients: DataFrame) -> DataFrame:
    """Lines serviced after the member's death (silver.members death date, or the linked patient's)."""
    died = canonical_patients(patients).join(patients.where("deceased_at IS NOT NULL").select(
        F.col("patient_key").alias("person"), F.to_date("deceased_at").alias("_patient_died")), "person")
    # Only the dead are joined: a small table beside the lines (the lines are never shuffled for it).
    known = lines.join(members.where("death_date IS NOT NULL").select(
        "member_key", F.col("death_date").alias("_member_died")), "member_key", "left").join(
        died.select("patient_key", "_patient_died"), "patient_key", "left")
    death = F.least("_member_died", "_patient_died")
    source = F.when(F.col("_member_died") == death, "silver.members").otherwise("silver.patients")
    late = known.withColumn("_died", death).withColumn("_source", source).where(
        F.col("service_from") > F.col("_died"))
    per_claim = late.groupBy("claim_key", "member_key", "_died", "_source").agg(
        F.max("service_from").alias("_last"), F.array_sort(F.collect_list("line_number")).alias("_lines"))
    days = F.datediff("_last", "_died")
    detail = F.format_string("%d line(s) serviced after the member's death on %s (%s), the latest on %s, %d days "
                             "after", F.size("_lines"), F.col("_died").cast("string"), "_source",
                             F.col("_last").cast("string"), days)
    return signal(per_claim, "after_death", days, days > 0, detail, F.col("_lines"))


# -- exclusion list ----------------------------------------------------------------------------------------------
def excluded_provider(lines: DataFrame, exclusions: DataFrame) -> DataFrame:
    """Lines rendered or billed by a provider on the exclusion list, on a day its exclusion was in force."""
    roles = lines.select("claim_key", "line_number", "service_from", F.col("provider").alias("npi"),
                         F.lit("rendering").alias("_role")).unionByName(lines.select(
                             "claim_key", "line_number", "service_from", F.col("billing_npi").alias("npi"),
                             F.lit("billing").alias("_role")))
    hit = roles.join(F.broadcast(exclusions), "npi").where(
        (F.col("service_from") >= F.col("excluded_on"))
        & (F.col("reinstated_on").isNull() | (F.col("service_from") < F.col("reinstated_on"))))
    per_claim = hit.groupBy("claim_key", "npi", "name", "excl_type", "excluded_on", "reinstated_on").agg(
        F.array_sort(F.collect_set("line_number")).alias("_lines"), F.min("service_from").alias("_first"),
        F.array_join(F.array_sort(F.collect_set("_role")), " and ").alias("_roles"))
    until = F.when(F.col("reinstated_on").isNull(), F.lit("not reinstated")).otherwise(
        F.concat(F.lit("reinstated "), F.col("reinstated_on").cast("string")))
    detail = F.format_string("%s provider NPI %s (%s) is on the exclusion list (%s) from %s, %s; service on %s",
                             "_roles", "npi", "name", "excl_type", F.col("excluded_on").cast("string"), until,
                             F.col("_first").cast("string"))
    return signal(per_claim, "excluded_provider", F.size("_lines"), F.lit(True), detail, F.col("_lines"))


# -- the bill against the chart ----------------------------------------------------------------------------------
def _any(tests) -> Column:
    out = F.lit(False)
    for t in tests:
        out = out | t
    return out


def _in_range(column: str, spec: str) -> Column:
    low, _, high = spec.partition("-")
    col = F.col(column)
    return (col >= low) & (col <= (high or low)) & (F.length(col) == len(low))


def code_category(chart_codes: Mapping[str, Sequence[str]], category: str) -> Column:
    """Whether a line's procedure or revenue code falls in one of claims.chart_codes' categories."""
    return _any(F.coalesce(_in_range("revenue_code", s[4:]) if s.startswith("rev:") else
                           _in_range("procedure_code", s), F.lit(False)) for s in chart_codes.get(category, ()))


def _days(frame: DataFrame, people: DataFrame, time_column: str) -> DataFrame:
    return frame.join(people, "patient_key").select("person", F.to_date(time_column).alias("day")).where(
        "day IS NOT NULL").distinct()


def chart_evidence(people: DataFrame, encounters: DataFrame, observations: DataFrame,
                   studies: DataFrame) -> tuple[DataFrame, DataFrame, DataFrame]:
    """(stays by stay_person, vitals days, study days by person): the chart the bill is held against."""
    stays = encounters.where(F.col("deleted_at").isNull() & ~F.coalesce(F.col("status").isin(*DROPPED_ENCOUNTER),
                                                                        F.lit(False))
                             & F.col("admitted_at").isNotNull() & F.col("merged_into").isNull()).join(
        people, "patient_key").select(F.col("person").alias("stay_person"), F.to_date("admitted_at").alias("stay_from"),
                                      F.coalesce(F.to_date("discharged_at"), F.lit(NEVER)).alias("stay_to"))
    kept = observations.where(~F.coalesce(F.col("status").isin(*DROPPED_OBSERVATION), F.lit(False)))
    return stays, _days(kept, people, "effective_at"), _days(studies, people, "study_time_utc")


def _flag(lines: DataFrame, days: DataFrame, name: str) -> DataFrame:
    """Mark each line with whether its person has `days` rows that day (`name`) and whether the day lies within the
    span those rows cover (`name`_covered: between the person's first and last day in that table)."""
    span = days.groupBy("person").agg(F.min("day").alias("_first_day"), F.max("day").alias("_last_day"))
    that_day = days.select("person", F.col("day").alias("service_from")).withColumn(name, F.lit(True))
    marked = lines.join(span, "person", "left").join(that_day, ["person", "service_from"], "left")
    covered = F.coalesce(F.col("service_from").between(F.col("_first_day"), F.col("_last_day")), F.lit(False))
    return marked.withColumn(f"{name}_covered", covered).drop("_first_day", "_last_day")


MISSING = {"stay": "no stay in silver.encounters covering the day",
           "vitals": "no vital signs in silver.observations that day",
           "study": "no study in silver.imaging_studies that day"}


def phantom_service(lines: DataFrame, patients: DataFrame, encounters: DataFrame, observations: DataFrame,
                    studies: DataFrame, chart_codes: Mapping[str, Sequence[str]]) -> DataFrame:
    """Lines billed for a linked patient that the chart does not bear out, with the evidence that was missing."""
    people = canonical_patients(patients)
    charted = lines.join(people, "patient_key")
    category = {c: code_category(chart_codes, c) for c in chart_codes}
    checked = charted.where(_any(category.values()))
    needed = people.join(checked.select("person").distinct(), "person", "left_semi")
    stays, vitals, imaged = chart_evidence(needed, encounters, observations, studies)
    covered = checked.join(stays, (F.col("person") == F.col("stay_person")) & F.col("service_from").between(
        F.col("stay_from"), F.col("stay_to")), "left_semi").select("claim_key", "line_number").withColumn(
        "stay", F.lit(True))
    marked = _flag(_flag(checked.join(covered, ["claim_key", "line_number"], "left"), vitals, "vitals"),
                   imaged, "study")
    needs = {"stay": F.lit(True), "vitals": category.get("critical_care", F.lit(False)) & F.col("vitals_covered"),
             "study": category.get("imaging", F.lit(False)) & F.col("study_covered")}
    missing = F.filter(F.array(*[F.when(need & F.col(k).isNull(), F.lit(MISSING[k])) for k, need in needs.items()]),
                       lambda m: m.isNotNull())
    short = marked.withColumn("_missing", missing).where(F.size("_missing") > 0).withColumn(
        "_what", F.format_string("%s on %s: %s", F.coalesce("procedure_code", F.concat(F.lit("rev "), "revenue_code")),
                                 F.col("service_from").cast("string"), F.array_join("_missing", ", ")))
    per_claim = short.groupBy("claim_key", "member_key").agg(
        F.array_sort(F.collect_list(F.struct("line_number", "_what"))).alias("_found"))
    shown = F.slice(F.transform("_found", lambda f: f["_what"]), 1, MAX_DETAIL_LINES)
    more = F.size("_found") - MAX_DETAIL_LINES
    detail = F.concat(F.lit("billed without the chart's evidence: "), F.array_join(shown, "; "),
                      F.when(more > 0, F.format_string(" (and %d more lines)", more)).otherwise(F.lit("")))
    return signal(per_claim, "phantom_service", F.size("_found"), F.lit(True), detail,
                  F.transform("_found", lambda f: f["line_number"]))
