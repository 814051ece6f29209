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

gold.scoring runs the episodes per person as score rows arrive (its state keeps each level's running episode and
the rows that may still change), and a batch sends the alert rows that changed; the MERGE by `alert_id` =
hash(patient, level, opened_at) makes replays and restarts change nothing, a late reading that extends an episode
updates it, and an episode that late or corrected data dissolves is kept as `withdrawn`, never silently deleted.

An identity merged into another person (ADT A40, a FHIR `replaced-by` link) scores no more under its own key:
its readings score under the surviving person's. Its alerts still open become `merged` in the next batch (the
finding, if it persists, raises or continues the survivor's alert); its resolved ones and its score rows stay.
An identity unlinked again scores under its own key once more, and a batch that touches it recomputes its
episodes like any patient's (a `merged` alert whose episode is found again is open or resolved again).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from typing import Any

from pyspark.sql import DataFrame
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

from pipelines import sqltext as sql

ALERTS = "gold.deterioration_alerts"
OPEN, RESOLVED, WITHDRAWN, MERGED = "open", "resolved", "withdrawn", "merged"
LEVELS = ("news2_medium", "news2_high", "qsofa", "model")


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


# Per score job (its owner: the stage's context): merged identities seen without an open alert in a committed version
# of the table. Nothing scores under a merged key again, so none of them gets one later.
_CLEARED: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()


def open_of_merged(read_table: Callable[..., DataFrame], merged: Mapping[str, str], owner: Any) -> DataFrame | None:
    """The open alerts of identities merged into another person, or None when there are none.

    Only identities not yet seen cleared are looked up (one small collect, in the batches after a new link), so
    a lakehouse with years of merges does not scan its alerts for all of them in every batch. Surviving keys are
    left out: in a cycle of links (a -> b, b -> a) both keys still score.
    """
    cleared = _CLEARED.setdefault(owner, set())
    keys = sorted(set(merged) - set(merged.values()) - cleared)
    if not keys:
        return None
    stale = read_table(ALERTS).where(F.expr(f"status = {sql.string(OPEN)} AND patient_key IN ({sql.strings(keys)})"))
    still_open = {r[0] for r in stale.select("patient_key").distinct().collect()}
    cleared.update(set(keys) - still_open)  # those with open alerts are checked again once this batch commits
    return stale if still_open else None
