"""gold.deterioration_alerts: one alert per patient, level and episode, from gold.early_warning_scores.

The score job computes them in the same batch as the scores (a side output, committed before the score rows):
an alert is one hop, not one micro-batch, behind the reading that raised it.

Levels and when a score row is "in" them:

| level          | condition                           |
|----------------|-------------------------------------|
| `news2_medium` | NEWS2 band medium or high           |
| `news2_high`   | NEWS2 band high                     |
| `qsofa`        | qSOFA >= 2                          |
| `model`        | model risk >= the model's threshold |

An episode is a stretch of a patient's score rows (by event time) in a level. It opens at its first row in the
level (`opened_at`; the alert names that row's observations, scores and model version) and stays `open` while the
patient is in the level, and also while the patient is out of it for less than `gold.alert_resolve_after`
(1 h by default): a finding that returns within that time continues the same alert, so a score or a model risk
hovering around its threshold raises one alert, not one per crossing. The episode resolves once the patient has
stayed out that long, as shown by a later score (or by the next score back in the level coming that late);
`resolved_at` is the event time of the first score out of the level. A patient has at most one open alert per
level however many readings repeat the same finding (no alert storms). `news2_medium` alerts record an
escalation: `escalated_at` / `escalated_to` point at the `news2_high` alert raised during them.

Batches recompute the episodes of the patients whose scores changed, from the earliest changed score (or the
opening of an episode still running then) on, and MERGE them by `alert_id` = hash(patient, level, opened_at).
So replays and restarts change nothing, a late reading that extends an episode updates it, and an episode that
late or corrected data dissolves is kept as `withdrawn`, never silently deleted.

An identity merged into another person (ADT A40, a FHIR `replaced-by` link) scores no more under its own key:
its readings score under the surviving person's. Its alerts still open become `merged` in the next batch (the
finding, if it persists, raises or continues the survivor's alert); its resolved ones and its score rows stay.
An identity unlinked again scores under its own key once more, and a batch that touches it recomputes its
episodes like any patient's (a `merged` alert whose episode is found again is open or resolved again).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql.types import (
    ArrayType,
    DoubleType,
    IntegerType,
    LongType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

from pipelines import __version__ as CODE_VERSION
from pipelines import sqltext as sql

ALERTS = "gold.deterioration_alerts"
OPEN, RESOLVED, WITHDRAWN, MERGED = "open", "resolved", "withdrawn", "merged"
LEVELS = ("news2_medium", "news2_high", "qsofa", "model")


def level_conditions() -> dict[str, Column]:
    """Each level's condition on a score row (built on use: columns need a running Spark)."""
    return {
        "news2_medium": F.col("news2_band").isin("medium", "high"),
        "news2_high": F.col("news2_band") == "high",
        "qsofa": F.col("qsofa_score") >= 2,
        "model": F.coalesce(F.col("model_alert"), F.lit(False)),
    }

SCHEMA = StructType([
    StructField("alert_id", StringType(), False),
    StructField("patient_key", StringType(), False),
    StructField("encounter_key", StringType(), True),
    StructField("level", StringType(), False),
    StructField("status", StringType(), False),  # open, resolved, withdrawn, merged
    StructField("opened_at", TimestampType(), False),  # event time of the score row that raised it
    StructField("resolved_at", TimestampType(), True),  # event time of the first score row out of the level
    StructField("escalated_at", TimestampType(), True),  # news2_medium: when the patient reached high
    StructField("escalated_to", StringType(), True),  # news2_medium: the news2_high alert raised then
    StructField("news2_score", IntegerType(), True),  # at opening
    StructField("news2_band", StringType(), True),
    StructField("qsofa_score", IntegerType(), True),
    StructField("model_risk", DoubleType(), True),
    StructField("model_version", StringType(), True),  # the model that scored the opening row
    StructField("observation_ids", ArrayType(StringType()), True),  # silver.observations behind the opening row
    StructField("peak_news2_score", IntegerType(), True),
    StructField("last_scored_at", TimestampType(), True),  # newest score row inside the episode
    StructField("scores_version", LongType(), True),  # gold.early_warning_scores version the batch read
    StructField("code_version", StringType(), True),
    StructField("computed_by", StringType(), True),
    StructField("computed_at", TimestampType(), True),
])


_PROVENANCE = ("scores_version", "code_version", "computed_by", "computed_at")


def _recompute_from(starts: dict[str, datetime], known: list, resolve_after: timedelta) -> dict[str, datetime]:
    """Move each patient's start back to the opening of any episode still running at it (open, or resolved less
    than `resolve_after` before it: a row back in the level would continue it), so an episode is always
    recomputed whole."""
    by_patient: dict[str, list[tuple[datetime, datetime | None]]] = {}
    for row in known:  # times Spark gave back (naive local) as aware UTC, as the starts are
        resolved = row["resolved_at"]
        by_patient.setdefault(row["patient_key"], []).append(
            (row["opened_at"].astimezone(UTC), None if resolved is None else resolved.astimezone(UTC)))
    out = dict(starts)
    for patient, episodes in by_patient.items():
        start = out[patient]
        # Latest opening first: each may reach further back. By opening only: episodes of two levels opened at
        # the same instant, one resolved and one open, do not compare (None vs a time).
        for opened, resolved in sorted(episodes, key=lambda e: e[0], reverse=True):
            if opened < start and (resolved is None or resolved + resolve_after >= start):
                start = opened
        out[patient] = start
    return out


def _episodes(rows: DataFrame, resolve_after_ms: int) -> DataFrame:
    """Number the episodes of score rows exploded per level (`_in`: the row is in the level).

    Rows form runs (consecutive rows all in or all out). An out run ends its episode when it lasts at least
    `resolve_after_ms`: from its first row to the next row back in the level, or to its own last row when none
    follows yet. Such a run closes its episode (`_closing`; it stays in it) and the next row starts a new one.
    """
    w = Window.partitionBy("patient_key", "level").orderBy("scored_at")
    upto = w.rowsBetween(Window.unboundedPreceding, Window.currentRow)
    run = Window.partitionBy("patient_key", "level", "_run")
    rows = rows.select("*", F.coalesce(F.lag("_in").over(w) != F.col("_in"), F.lit(True)).alias("_run_start"),
                       F.coalesce(F.lead("scored_at").over(w), F.col("scored_at")).alias("_until"))
    rows = rows.select("*", F.sum(F.col("_run_start").cast("int")).over(upto).alias("_run"))
    lasted = F.unix_micros(F.max("_until").over(run)) - F.unix_micros(F.min("scored_at").over(run))
    rows = rows.select("*", (~F.col("_in") & (lasted >= F.lit(resolve_after_ms * 1000))).alias("_closing"))
    after_closing = F.col("_run_start") & F.coalesce(F.lag("_closing").over(w), F.lit(False))
    return rows.select("*", F.sum(after_closing.cast("int")).over(upto).alias("_episode"))


def _alert_id(patient: Column, level: Column, opened_at: Column) -> Column:
    text = F.concat_ws("|", patient, level, F.date_format(opened_at, "yyyy-MM-dd'T'HH:mm:ss.SSSSSS"))
    return F.substring(F.sha2(text, 256), 1, 32)


def _unproven(known: list, starts: Mapping[str, datetime], corrected: set[str],
              scores: Callable[[datetime], DataFrame], resolve_after: timedelta) -> set[str]:
    """The alert ids of `corrected` patients' episodes resolved before their start whose resolution no score row
    before the start proves any more. An episode resolves once the patient stays out of its level `resolve_after`,
    shown by a later row; when rows from the start on may have been withdrawn (a retracted or moved reading), a
    resolution is still proven only by a row in [resolved_at + resolve_after, start), which the batch leaves alone.
    (Resolutions within `resolve_after` of the start are recomputed anyway: `_recompute_from`.)"""
    spans = []
    for row in known:
        patient, resolved = row["patient_key"], row["resolved_at"]
        if patient in corrected and resolved is not None and resolved.astimezone(UTC) + resolve_after < starts[patient]:
            spans.append((row["alert_id"], patient, resolved.astimezone(UTC) + resolve_after, starts[patient]))
    if not spans:
        return set()
    rows = scores(min(lo for _, _, lo, _ in spans)).select("patient_key", "scored_at")
    wanted = rows.sparkSession.createDataFrame(spans, "alert_id string, patient_key string, _lo timestamp, "
                                                      "_hi timestamp")
    proven = (rows.join(F.broadcast(wanted), "patient_key")
              .where((F.col("scored_at") >= F.col("_lo")) & (F.col("scored_at") < F.col("_hi")))
              .select("alert_id").distinct().collect())
    return {a for a, _, _, _ in spans} - {r[0] for r in proven}


def deterioration_alerts(starts: Mapping[str, datetime], scores: Callable[[datetime], DataFrame], *,
                         read_table: Callable[..., DataFrame], table_version: Callable[[str], int | None],
                         scores_version: int | None, ingest_batch_id: str, processed_at: datetime,
                         resolve_after_ms: int, corrected: frozenset[str] | set[str] = frozenset(),
                         merged: Mapping[str, str] | None = None) -> DataFrame:
    """The alert rows to MERGE for the patients whose scores changed (at least one), each from `starts[patient]` on.

    `scores(since)` gives the score rows from `since` on as they stand once the batch commits (the stored rows
    with this batch's rows in place); `scores_version` is the gold.early_warning_scores version read, for
    provenance. `corrected`: the patients whose score rows from their start on may have been withdrawn, so a
    resolution shown only by such a row is recomputed too. `merged`: {identity: surviving person} of the identities
    merged into another; their open alerts become `merged`.
    """
    starts = dict(starts)
    resolve_after = timedelta(milliseconds=resolve_after_ms)
    known_alerts = table_version(ALERTS) is not None
    if known_alerts:  # episodes still running at a patient's start are recomputed whole
        known = (read_table(ALERTS).where(F.expr(f"patient_key IN ({sql.strings(sorted(starts))})")
                                          & (F.col("status") != WITHDRAWN))
                 .select("alert_id", "patient_key", "opened_at", "resolved_at").collect())
        unproven = _unproven(known, starts, set(corrected), scores, resolve_after)
        known = [{**r.asDict(), "resolved_at": None} if r["alert_id"] in unproven else r for r in known]
        starts = _recompute_from(starts, known, resolve_after)
    earliest = min(starts.values())
    recent = scores(earliest)
    touched = recent.sparkSession.createDataFrame(list(starts.items()), "patient_key string, _from timestamp")
    recent = recent.join(F.broadcast(touched), "patient_key").where(F.col("scored_at") >= F.col("_from"))
    existing = None
    if known_alerts:
        existing = (read_table(ALERTS).join(F.broadcast(touched), "patient_key")
                    .where((F.col("status") != WITHDRAWN) & (F.col("opened_at") >= F.col("_from"))))

    levels = F.array(*[F.struct(F.lit(name).alias("level"), cond.alias("_in"))
                       for name, cond in level_conditions().items()])
    rows = recent.select("*", F.explode(levels).alias("_l")).select("*", "_l.level", "_l._in").drop("_l")
    rows = _episodes(rows, resolve_after_ms)
    inside = F.col("_in")
    first = F.when(inside, F.col("scored_at"))  # the opening row: the episode's first row in the level

    def at_opening(column: str) -> Column:
        return F.min_by(F.when(inside, F.col(column)), first)

    episodes = rows.groupBy("patient_key", "level", "_episode").agg(
        F.min(first).alias("opened_at"),
        F.max(first).alias("last_scored_at"),
        F.min(F.when(F.col("_closing"), F.col("scored_at"))).alias("resolved_at"),
        F.min(F.when(inside & (F.col("news2_band") == "high"), F.col("scored_at"))).alias("_high_at"),
        at_opening("encounter_key").alias("encounter_key"),
        at_opening("news2_score").alias("news2_score"),
        at_opening("news2_band").alias("news2_band"),
        at_opening("qsofa_score").alias("qsofa_score"),
        at_opening("model_risk").alias("model_risk"),
        at_opening("model_version").alias("model_version"),
        at_opening("input_observation_ids").alias("observation_ids"),
        F.max(F.when(inside, F.col("news2_score"))).alias("peak_news2_score"),
    ).where(F.col("opened_at").isNotNull())  # a stretch out of the level only
    medium = F.col("level") == "news2_medium"
    escalated_at = F.when(medium, F.col("_high_at"))
    now = [F.lit(scores_version).cast("long").alias("scores_version"),
           F.lit(CODE_VERSION).alias("code_version"), F.lit(ingest_batch_id).alias("computed_by"),
           F.lit(processed_at).cast("timestamp").alias("computed_at")]
    alerts = episodes.select(
        _alert_id(F.col("patient_key"), F.col("level"), F.col("opened_at")).alias("alert_id"),
        "patient_key", "encounter_key", "level",
        F.when(F.col("resolved_at").isNull(), F.lit(OPEN)).otherwise(F.lit(RESOLVED)).alias("status"),
        "opened_at", "resolved_at", escalated_at.alias("escalated_at"),
        F.when(escalated_at.isNotNull(), _alert_id(F.col("patient_key"), F.lit("news2_high"), escalated_at))
        .alias("escalated_to"),
        "news2_score", "news2_band", "qsofa_score", "model_risk", "model_version", "observation_ids",
        "peak_news2_score", "last_scored_at", *now)
    if existing is not None:  # episodes the recomputation no longer finds: kept, marked withdrawn
        gone = existing.join(alerts.select("alert_id"), "alert_id", "left_anti")
        kept = [F.lit(WITHDRAWN).alias("status") if f.name == "status" else F.col(f.name)
                for f in SCHEMA.fields if f.name not in _PROVENANCE]
        alerts = alerts.unionByName(gone.select(*kept, *now))
    stale = _open_of_merged(read_table, merged or {}, starts) if known_alerts else None
    if stale is not None:
        kept = [F.lit(MERGED).alias("status") if f.name == "status" else F.col(f.name)
                for f in SCHEMA.fields if f.name not in _PROVENANCE]
        alerts = alerts.unionByName(stale.select(*kept, *now))
    return alerts.selectExpr(*sql.casts(SCHEMA.fields))


# Per lakehouse (the owner of `read_table`: the runner): merged identities seen without an open alert in a
# committed version of the table. Nothing scores under a merged key again, so none of them gets one later.
_CLEARED: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()


def _open_of_merged(read_table: Callable[..., DataFrame], merged: Mapping[str, str],
                    starts: Mapping[str, datetime]) -> DataFrame | None:
    """The open alerts of identities merged into another person, or None when there are none.

    Only identities not yet seen cleared are looked up (one small collect, in the batches after a new link), so
    a lakehouse with years of merges does not scan its alerts for all of them in every batch. Surviving keys and
    this batch's patients are left out: in a cycle of links (a -> b, b -> a) both keys still score.
    """
    cleared = _CLEARED.setdefault(getattr(read_table, "__self__", read_table), set())
    keys = sorted(set(merged) - set(merged.values()) - set(starts) - cleared)
    if not keys:
        return None
    stale = read_table(ALERTS).where(F.expr(f"status = {sql.string(OPEN)} AND patient_key IN ({sql.strings(keys)})"))
    still_open = {r[0] for r in stale.select("patient_key").distinct().collect()}
    cleared.update(set(keys) - still_open)  # those with open alerts are checked again once this batch commits
    return stale if still_open else None
