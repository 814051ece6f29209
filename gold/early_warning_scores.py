"""gold.early_warning_scores and gold.vitals_features: NEWS2, qSOFA, SIRS and model risk each time an input arrives.

One score row per patient and `scored_at`, the event time of a NEWS2/qSOFA/SIRS input measured for that patient
(values measured together, e.g. one monitor frame, make one row). Each row scores the newest value of every input
at that time ("as of"), looking back `gold.lookback` (4 h by default): an older or absent input is missing, the
row is flagged partial and the missing/stale inputs are named, never treated as normal. The same points get the
vitals features (gold.features) and, when a model is registered as `champion`, its risk and version.

How a batch works (pure: the runner passes the changed silver rows and `read_table` for history):
1. touched: per person, the earliest event time among the batch's changed input observations (new values,
   corrections and deletions alike, before and after the change: a reading moved to another patient or time
   touches both);
2. history: the person's usable inputs from `gold.history` before that time on (silver.observations snapshot),
   the minutes that hold no scoring point or feature-window edge read from gold.vitals_minutes, a few rows each,
   which the same batch keeps up to date for the minutes its changes touch (`_history_in_minutes`);
3. every input time from the touched time on is (re)scored: a late or corrected value changes the rows after
   it too, and the MERGE on (patient_key, scored_at) makes replays and restarts idempotent; a stored point whose
   readings are all gone (retracted, deleted, moved) is withdrawn: its score and features rows are deleted;
4. the touched patients' alert episodes are recomputed from those score rows (gold.deterioration_alerts), in
   the same batch: an alert commits with the scores that raised it, one micro-batch after the reading.

People, not identities: FHIR Observations name `Patient/<id>`, HL7 and monitors the MRN; silver.patients links
them (`merged_into`, also for A40 merges), and scores use the surviving key, so every feed of one person lands
in one score stream. Encounter keys resolve the same way through silver.encounters.

The as-of values come from one sort per person (forward fill over rows), never from a range join: an ICU
monitor sends a value every second.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pandas as pd
from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql.types import (
    ArrayType,
    BooleanType,
    DoubleType,
    IntegerType,
    LongType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

from gold import deterioration_alerts, features, news2
from pipelines import __version__ as CODE_VERSION
from pipelines import sqltext as sql

SCORES = "gold.early_warning_scores"
FEATURES = "gold.vitals_features"
# The silver rows that record a hypercapnic target (gold.spo2_scale2_codes), kept by the score job as they stream
# past, so a batch looks up SpO2 scale 2 in this small table instead of scanning silver.observations.
SCALE2 = "gold.spo2_scale2_markers"
# Each patient's usable silver rows per (concept, minute), kept by the score job: a batch reads the hours of
# history before its points from here, and silver row by row only in the minutes its points and windows probe.
MINUTES = "gold.vitals_minutes"
OBSERVATIONS = "silver.observations"
PATIENTS = "silver.patients"
ENCOUNTERS = "silver.encounters"
OUTPUT = "_output"

# Scoring inputs: silver concept -> the score row's value column.
INPUTS: Mapping[str, str] = {
    "rr": "respiratory_rate", "spo2": "spo2", "fio2": "fio2", "o2flow": "o2flow", "sbp": "systolic_bp",
    "hr": "pulse", "acvpu": "consciousness", "temp": "temperature", "wbc": "wbc",
}
TEXT_INPUTS = frozenset({"acvpu"})
# Observation statuses that are not a valid measurement (FHIR ObservationStatus; HL7 OBX-11 W/X/D).
NOT_MEASURED = ("deleted", "entered-in-error", "cancelled", "W", "X", "D")

_ID = StructField("patient_key", StringType(), False)
_KEYS = [_ID, StructField("encounter_key", StringType(), True), StructField("scored_at", TimestampType(), False)]
_PROVENANCE = [
    StructField("silver_version", LongType(), True),  # silver.observations version the batch read
    StructField("code_version", StringType(), True),  # carelake version that computed the row
    StructField("computed_by", StringType(), True),  # the ingest batch (job/query/batch) that wrote it
    StructField("computed_at", TimestampType(), True),
]

SCHEMA = StructType([
    *_KEYS,
    StructField("news2_score", IntegerType(), True),
    StructField("news2_band", StringType(), True),
    *[StructField(c, IntegerType(), True) for c in news2.COMPONENTS],
    StructField("news2_partial", BooleanType(), True),
    StructField("missing_inputs", ArrayType(StringType()), True),  # NEWS2 components without a usable input
    StructField("stale_inputs", ArrayType(StringType()), True),  # inputs measured, but before the look-back
    StructField("spo2_scale", IntegerType(), True),  # 1, or 2 for a recorded hypercapnic target
    *[StructField(column, StringType() if concept in TEXT_INPUTS else DoubleType(), True)
      for concept, column in INPUTS.items()],
    StructField("on_oxygen", BooleanType(), True),
    StructField("input_observation_ids", ArrayType(StringType()), True),  # the silver rows scored
    StructField("qsofa_score", IntegerType(), True),
    StructField("qsofa_partial", BooleanType(), True),
    StructField("sirs_count", IntegerType(), True),
    StructField("model_risk", DoubleType(), True),
    StructField("model_version", StringType(), True),
    StructField("model_alert", BooleanType(), True),  # model_risk >= the registered model's threshold
    *_PROVENANCE,
])

# A score point can disappear: its readings were retracted (entered in error, deleted) or corrected to another
# patient or time. The batch that sees it sends the point's key with no silver_version (a withdrawal), and the
# MERGE deletes the stored score and features rows (time travel keeps them for audit); it never inserts one.
WITHDRAWAL = "s.silver_version IS NULL"


def _emptied(alias: str = "") -> str:
    """A minute whose readings are all gone (readings 0, no scored row), in SQL over `alias`."""
    return f"{alias}readings = 0 AND {alias}pick_at IS NULL"


# The MERGE deletes the stored row of an emptied minute. The batch sends an emptied minute only where a stored row
# exists, as it sends a WITHDRAWAL only for a stored row: delta-rs (1.6) fails a MERGE into a table with a change
# feed when an unmatched source row fails the insert condition, instead of skipping it.
EMPTIED_MINUTE = _emptied("s.")


SCALE2_SCHEMA = StructType([
    StructField("observation_id", StringType(), False),
    StructField("patient_key", StringType(), True),  # the identity silver keyed (links are followed on use)
    StructField("code", StringType(), True),
    StructField("value_text", StringType(), True),
    StructField("status", StringType(), True),  # a deleted or entered-in-error marker no longer counts
    StructField("effective_at", TimestampType(), True),
    StructField("silver_version", LongType(), True),  # the silver.observations version of this row's state
    StructField("computed_by", StringType(), True),
    StructField("computed_at", TimestampType(), True),
])


MINUTES_SCHEMA = StructType([
    StructField("patient_key", StringType(), False),  # the identity silver keyed (links are followed on use)
    StructField("concept", StringType(), False),
    StructField("minute", TimestampType(), False),  # the minute's start
    StructField("readings", LongType(), True),  # numeric feature readings in the minute (0: only scored rows)
    StructField("last_at", TimestampType(), True),  # the newest of them (the largest value at a tie)
    StructField("last_value", DoubleType(), True),
    StructField("pick_at", TimestampType(), True),  # scores: the newest row (the largest observation id at a tie)
    StructField("pick_id", StringType(), True),
    StructField("pick_value", DoubleType(), True),
    StructField("pick_text", StringType(), True),
    StructField("valued_at", TimestampType(), True),  # scores: the newest row that has a value
    StructField("valued_id", StringType(), True),
    StructField("valued_value", DoubleType(), True),
    StructField("valued_text", StringType(), True),
    StructField("encounter_at", TimestampType(), True),  # the newest row naming an encounter (the largest at a tie)
    StructField("encounter_key", StringType(), True),
    *_PROVENANCE,
])


def features_schema(windows_ms: Sequence[int]) -> StructType:
    """gold.vitals_features: keys, one column per feature (counts are whole numbers), provenance."""
    cols = [StructField(name, LongType() if "_count_" in name else DoubleType(), True)
            for name in features.feature_columns(windows_ms)]
    return StructType([*_KEYS, *cols, *_PROVENANCE])


# -- identity resolution ---------------------------------------------------------------------------------------
# Per lakehouse (the owner of `read_table`: the runner), per (table, version). Weak: a runner gone, its cache too.
_RESOLVED: weakref.WeakKeyDictionary[Any, dict[tuple[str, int], dict[str, str]]] = weakref.WeakKeyDictionary()


def _links(read_table: Callable[[str], DataFrame], table_version: Callable[[str], int | None], table: str,
           key: str) -> dict[str, str]:
    """{identity key: surviving key} for the identities of `table` that continue as another (cached per version)."""
    version = table_version(table)
    if version is None:
        return {}
    cache = _RESOLVED.setdefault(getattr(read_table, "__self__", read_table), {})
    cache_key = (table, version)
    if cache_key not in cache:
        rows = (read_table(table).where(F.col("merged_into").isNotNull() & (F.col("merged_into") != F.col(key)))
                .select(key, "merged_into").collect())
        step = {r[0]: r[1] for r in rows}
        resolved = {}
        for start in step:
            seen, current = {start}, step[start]
            while current in step and step[current] not in seen:  # follow chains; stop on a cycle
                seen.add(current)
                current = step[current]
            resolved[start] = current
        for old in [k for k in cache if k[0] == table]:
            del cache[old]
        cache[cache_key] = resolved
    return cache[cache_key]


def _resolve(df: DataFrame, column: str, links: Mapping[str, str]) -> DataFrame:
    """Replace identity keys in `column` by the key they continue as."""
    if not links:
        return df
    mapping = "map(" + ", ".join(f"{sql.string(k)}, {sql.string(v)}" for k, v in links.items()) + ")"
    c = sql.name(column)
    return df.withColumn(column, F.expr(f"coalesce({mapping}[{c}], {c})"))


# -- the transform -------------------------------------------------------------------------------------------
def early_warning_scores(
    changes: DataFrame, *, read_table: Callable[..., DataFrame], table_version: Callable[[str], int | None],
    ingest_batch_id: str, processed_at: datetime, lookback_ms: int, history_ms: int, windows_ms: Sequence[int],
    scale2_codes: Sequence[str], champion: Callable[[], Any], resolve_after_ms: int,
) -> DataFrame:
    """Score every touched patient's inputs from the earliest changed one on, and recompute their alerts from
    those scores; one routed DataFrame (`_output` = gold.early_warning_scores, gold.vitals_features,
    gold.deterioration_alerts or gold.spo2_scale2_markers)."""
    spark = changes.sparkSession
    feature_schema = features_schema(windows_ms)
    routed_schema = _routed_schema(feature_schema)
    scores_version = table_version(SCORES)
    inputs = list(INPUTS)
    patient_links = _links(read_table, table_version, PATIENTS, "patient_key")
    now = changes.where(F.col("_change_type").isin("insert", "update_postimage"))
    stamp = {"computed_by": ingest_batch_id, "computed_at": processed_at}
    # This batch's scale-2 markers (new, corrected or deleted); the first batch also takes every marker silver
    # already holds (a lakehouse scored before the markers table existed, or whose job starts late).
    new_markers = _scale2_markers(now, scale2_codes, F.col("_commit_version"), stamp)
    if table_version(SCALE2) is None:
        backfill = _scale2_markers(read_table(OBSERVATIONS), scale2_codes, F.lit(table_version(OBSERVATIONS)), stamp)
        new_markers = markers = _newest(backfill.unionByName(new_markers))
    else:  # each marker's newest state, whether kept earlier or in this batch
        markers = _newest(read_table(SCALE2).unionByName(new_markers))
    marker_rows = _as_routed(new_markers.select("*", F.lit(SCALE2).alias(OUTPUT)), routed_schema)
    version = table_version(OBSERVATIONS)
    if version is None:  # every row records it; a row without it is a WITHDRAWAL
        raise ValueError(f"{SCORES}: {OBSERVATIONS} has no version; the score job reads its change feed")
    minutes_version = table_version(MINUTES)

    def read_usable(at: datetime, until: datetime | None = None) -> DataFrame:
        """Usable rows from `at` on (up to `until`), resolved to people; only the files that may hold them are read."""
        since = ("effective_at", at) if until is None else ("effective_at", at, until)
        return _resolve(usable_observations(read_table(OBSERVATIONS, since=since)), "patient_key", patient_links)

    # The minutes this batch changes, before and after each change (a correction may move a reading), recomputed
    # from silver; a lakehouse scored before gold.vitals_minutes existed gets all of its minutes once.
    minute_stamp = {"silver_version": version, "ingest_batch_id": ingest_batch_id, "processed_at": processed_at}
    fresh_minutes = None
    # (Version 0 is the empty table a first merge creates: a backfill that died after it must run again.)
    if (minutes_version is None or minutes_version == 0) and scores_version is not None:
        fresh_minutes = vitals_minutes(read_table(OBSERVATIONS), **minute_stamp)
    else:
        moved = (usable_observations(changes, measured_only=False)
                 .select("patient_key", "concept", _minute_start("effective_at").alias("minute")).distinct())
        # Read silver in the minutes touched (a lab resulted hours late must not read hours of every monitor).
        touched_minutes = [_utc(r[0]) for r in moved.select("minute").distinct().limit(_MAX_SLICES + 1).collect()]
        if touched_minutes:
            step = timedelta(seconds=MINUTE_SECONDS)
            slices = ([(min(touched_minutes), max(touched_minutes) + step)] if len(touched_minutes) > _MAX_SLICES
                      else _merged([(m, m + step) for m in touched_minutes]))
            rows = _union([read_table(OBSERVATIONS, since=("effective_at", lo, hi)) for lo, hi in slices])
            stored = None if minutes_version is None else _union(
                [read_table(MINUTES, since=("minute", lo, hi)) for lo, hi in slices])
            fresh_minutes = vitals_minutes(rows, only=moved, stored=stored, **minute_stamp)
    if fresh_minutes is not None:
        fresh_minutes = fresh_minutes.localCheckpoint(eager=True)
        marker_rows = marker_rows.unionByName(
            _as_routed(fresh_minutes.select("*", F.lit(MINUTES).alias(OUTPUT)), routed_schema))

    # Before and after each change: a correction that moves a reading to another patient or time, or retracts or
    # deletes it, rescores the old patient from the old time too (a point left without readings is withdrawn).
    changed = (changes.where(F.col("concept").isin(*inputs) & F.col("patient_key").isNotNull()
                             & F.col("effective_at").isNotNull()))
    changed = _resolve(changed, "patient_key", patient_links)
    # Times collected to the driver become aware UTC at once: Spark gives naive local times back, and clock-face
    # arithmetic on those would be an hour off across a daylight-saving change.
    touched = changed.groupBy("patient_key").agg(F.min("effective_at").alias("_from"),
                                                 F.max(F.col("_change_type") != "insert").alias("_corrected"))
    touched_rows, corrected = [], set()
    for r in touched.collect():
        touched_rows.append((r["patient_key"], _utc(r["_from"])))
        if r["_corrected"]:  # a reading changed or gone: some of its points may be withdrawn
            corrected.add(r["patient_key"])
    if not touched_rows:
        return marker_rows
    earliest = min(f for _, f in touched_rows)
    history = timedelta(milliseconds=history_ms)

    # Each touched patient's points run from _from to _to, the newest input time from _from on.
    starts = spark.createDataFrame(touched_rows, "patient_key string, _from timestamp")
    ends = (read_usable(earliest).where(F.col("concept").isin(*inputs)).join(F.broadcast(starts), "patient_key")
            .where(F.col("effective_at") >= F.col("_from")).groupBy("patient_key")
            .agg(F.max("effective_at").alias("_to")).collect())
    newest = {r["patient_key"]: _utc(r["_to"]) for r in ends}
    spans = [(key, at, newest.get(key, at)) for key, at in touched_rows]
    touched = spark.createDataFrame(spans, "patient_key string, _from timestamp, _to timestamp")
    if ROLL_UP:
        stored = None
        if minutes_version is not None:
            # Minutes at or after a patient's first point are read row by row: none from the table is needed there.
            last = _minute_floor(max(f for _, f in touched_rows)) + timedelta(seconds=MINUTE_SECONDS)
            stored = read_table(MINUTES, since=("minute", _minute_floor(earliest - history), last))
            stored = stored.select(*MINUTES_SCHEMA.fieldNames())
        history = _history_in_minutes(
            read_usable, stored, fresh_minutes, touched, spans, inputs, windows_ms, history_ms, patient_links)
    else:
        history = (read_usable(earliest - history).join(F.broadcast(touched), "patient_key")
                   .where(F.col("effective_at") >= F.col("_from") - F.expr(f"INTERVAL {history_ms} MILLISECONDS"))
                   .select(*_HISTORY_COLUMNS, *_as_read()))
    history = _resolve(history, "encounter_key", _links(read_table, table_version, ENCOUNTERS, "encounter_key"))
    # Every later step groups, windows or joins per patient: one shuffle by patient here serves them all.
    history = history.repartition(_partitions(spark), "patient_key").persist()
    try:
        scale2 = _scale2_patients(markers, touched, patient_links)
        asof = _as_of(history.where(F.col("_asof")), inputs)
        # Up to _to: silver may have grown between the `ends` read and this one; later rows score next batch.
        points = (asof.where((F.col("scored_at") >= F.col("_from")) & (F.col("scored_at") <= F.col("_to")))
                  .join(scale2, "patient_key", "left"))
        scores = _score(points, lookback_ms)
        numeric = history.where(F.col("_feature") & F.col("concept").isin(*features.FEATURE_CONCEPTS))
        feats = features.vitals_features(numeric, scores.select("patient_key", "scored_at"), windows_ms)
        names = set(features.feature_columns(windows_ms))
        feats = feats.selectExpr("patient_key", "scored_at",
                                 *sql.casts(f for f in feature_schema.fields if f.name in names))
        both = scores.join(feats, ["patient_key", "scored_at"], "left")
        both = _with_model(both, champion(), windows_ms)
        both = both.select("*", F.lit(version).cast("long").alias("silver_version"),
                           F.lit(CODE_VERSION).alias("code_version"), F.lit(ingest_batch_id).alias("computed_by"),
                           F.lit(processed_at).cast("timestamp").alias("computed_at"),
                           F.explode(F.array(F.lit(SCORES), F.lit(FEATURES))).alias(OUTPUT))
        scored = _as_routed(both, routed_schema).localCheckpoint(eager=True)  # once, while `history` is cached
    finally:
        history.unpersist()
    new_scores = scored.where(F.col(OUTPUT) == SCORES).select(*SCHEMA.fieldNames())
    redone = F.broadcast(touched.select("patient_key", "_from"))

    def scores_from(since: datetime) -> DataFrame:
        """Score rows from `since` on as they stand once this batch commits: a touched patient's stored rows from
        its first point on are replaced by this batch's (the points no longer there are withdrawn)."""
        if scores_version is None:
            return new_scores
        stored = read_table(SCORES, since=("scored_at", since)).select(*SCHEMA.fieldNames())
        kept = (stored.join(redone, "patient_key", "left")
                .where(F.col("_from").isNull() | (F.col("scored_at") < F.col("_from"))).drop("_from"))
        return kept.unionByName(new_scores)

    routed = [scored]
    # Stored points of a touched patient this batch no longer finds, withdrawn from each table that holds them (a
    # crash between the two commits may have left a features row whose point was then retracted).
    for table in (SCORES, FEATURES) if scores_version is not None else ():
        if table_version(table) is None:
            continue
        gone = (read_table(table, since=("scored_at", earliest)).select("patient_key", "scored_at")
                .join(redone, "patient_key").where(F.col("scored_at") >= F.col("_from"))
                .join(new_scores.select("patient_key", "scored_at"), ["patient_key", "scored_at"], "left_anti"))
        routed.append(_as_routed(gone.select(  # no silver_version: a WITHDRAWAL
            "patient_key", "scored_at", F.lit(CODE_VERSION).alias("code_version"),
            F.lit(ingest_batch_id).alias("computed_by"), F.lit(processed_at).cast("timestamp").alias("computed_at"),
            F.lit(table).alias(OUTPUT)), routed_schema))

    alerts = deterioration_alerts.deterioration_alerts(
        dict(touched_rows), scores_from, read_table=read_table,
        table_version=table_version, scores_version=scores_version, ingest_batch_id=ingest_batch_id,
        processed_at=processed_at, resolve_after_ms=resolve_after_ms, corrected=corrected, merged=patient_links)
    alert_rows = _as_routed(alerts.select("*", F.lit(deterioration_alerts.ALERTS).alias(OUTPUT)), routed_schema)
    return _union([*routed, alert_rows, marker_rows])


def _partitions(spark) -> int:
    return int(spark.conf.get("spark.sql.shuffle.partitions"))


def _routed_schema(feature_schema: StructType) -> StructType:
    fields = [*SCHEMA.fields]
    for more in (feature_schema, deterioration_alerts.SCHEMA, SCALE2_SCHEMA, MINUTES_SCHEMA):
        names = {f.name for f in fields}
        fields += [StructField(f.name, f.dataType, True) for f in more.fields if f.name not in names]
    return StructType([*fields, StructField(OUTPUT, StringType(), False)])


def _as_routed(df: DataFrame, routed_schema: StructType) -> DataFrame:
    """`df` in the routed schema: its own columns cast to their declared types, the other tables' columns null."""
    have = set(df.columns)
    return df.selectExpr(*[f"CAST({sql.name(f.name) if f.name in have else 'NULL'} AS {sql.type_text(f.dataType)}) "
                           f"AS {sql.name(f.name)}" for f in routed_schema.fields])


def _scale2_markers(observations: DataFrame, codes: Sequence[str], version: Column,
                    stamp: Mapping[str, Any]) -> DataFrame:
    """Rows of silver.observations (or of its change feed) that record a hypercapnic target, one per observation
    (its newest state), whatever their status: a deletion must reach the markers table too."""
    marked = observations.where(F.col("observation_id").isNotNull()
                                & (F.col("code").isin(*codes) | F.col("value_text").isin(*codes)) if codes
                                else F.lit(False))
    return _newest(marked.select("observation_id", "patient_key", "code", "value_text", "status", "effective_at",
                                 version.cast("long").alias("silver_version"),
                                 F.lit(stamp["computed_by"]).alias("computed_by"),
                                 F.lit(stamp["computed_at"]).cast("timestamp").alias("computed_at")))


def _newest(markers: DataFrame) -> DataFrame:
    """One row per marker: the state of the newest silver version (a kept row may be newer than a replayed one)."""
    newest = Window.partitionBy("observation_id").orderBy(F.col("silver_version").desc_nulls_last())
    return markers.select("*", F.row_number().over(newest).alias("_n")).where("_n = 1").drop("_n")


def _scale2_patients(markers: DataFrame, touched: DataFrame, links: Mapping[str, str]) -> DataFrame:
    """Touched patients with a recorded hypercapnic target (any time): (patient_key, _scale2 = true)."""
    marked = markers.where(~F.coalesce(F.col("status"), F.lit("final")).isin(*NOT_MEASURED))
    marked = _resolve(marked.select("patient_key"), "patient_key", links)
    return (marked.join(F.broadcast(touched.select("patient_key")), "patient_key").distinct()
            .withColumn("_scale2", F.lit(True)))


# A patient's history before its batch is read in minutes (gold.vitals_minutes), and row by row only where the
# batch probes it; False reads every row (tests compare the two).
ROLL_UP = True
MINUTE_SECONDS = 60
_ENCOUNTER = "_encounter"  # the concept of a rolled-up row that carries only the newest encounter
_HISTORY_COLUMNS = ("patient_key", "encounter_key", "concept", "value", "value_text", "effective_at",
                    "observation_id", "_from", "_to")


def _as_read() -> list[Column]:
    """The flags of a history row read as it is: it stands for one reading; scores read inputs, features all."""
    return [F.lit(1).cast("long").alias("_n"), F.col("concept").isin(*INPUTS).alias("_asof"),
            F.lit(True).alias("_feature")]


# More distinct minutes than this in one batch (a backfill chunk): one read from the first to the last.
_MAX_SLICES = 200


def _utc(at: datetime) -> datetime:
    """A time Spark gave back (naive local time) as aware UTC."""
    return at.astimezone(UTC)


def _union(parts: Sequence[DataFrame]) -> DataFrame:
    out = parts[0]
    for part in parts[1:]:
        out = out.unionByName(part)
    return out


def _minute_index(at: str) -> str:
    return f"floor(unix_seconds({at}) / {MINUTE_SECONDS})"


def _minute_start(column: str) -> Column:
    return F.expr(f"timestamp_seconds({_minute_index(column)} * {MINUTE_SECONDS})")


def _minute_floor(at: datetime) -> datetime:
    """The start of `at`'s minute (an aware UTC time: the minutes of the SQL side)."""
    return at.astimezone(UTC).replace(second=0, microsecond=0)


def usable_observations(observations: DataFrame, *, measured_only: bool = True) -> DataFrame:
    """The rows of silver.observations (or of its change feed) that scores and features read: inputs and feature
    concepts with a patient, a time and a value, not retracted (identities as silver keyed them). With
    `measured_only=False` retracted and value-less rows too: every row whose minute a change touches."""
    wanted = sorted({*INPUTS, *features.FEATURE_CONCEPTS})
    kept = (F.col("concept").isin(*wanted) & F.col("patient_key").isNotNull() & F.col("effective_at").isNotNull())
    if measured_only:
        kept = (kept & (F.col("value").isNotNull() | F.col("value_text").isNotNull())
                & ~F.coalesce(F.col("status"), F.lit("final")).isin(*NOT_MEASURED))
    return observations.where(kept)


def vitals_minutes(observations: DataFrame, *, silver_version: int | None, ingest_batch_id: str,
                   processed_at: datetime, only: DataFrame | None = None,
                   stored: DataFrame | None = None) -> DataFrame:
    """gold.vitals_minutes rows of silver.observations rows: per (patient_key, concept, minute), what a score batch
    needs of a minute in which none of its points or window edges falls (`_history_in_minutes`). `only`: the
    (patient_key, concept, minute) keys to recompute, each one getting a row; one with nothing left is an
    EMPTIED_MINUTE, sent only where `stored` (gold.vitals_minutes rows) has the key: the MERGE deletes it."""
    keys = ["patient_key", "concept", "minute"]
    rows = usable_observations(observations).select("*", _minute_start("effective_at").alias("minute"))
    if only is not None:
        rows = rows.join(only, keys, "left_semi")
    minutes = _minute_rows(rows, list(INPUTS))
    if only is not None:
        minutes = only.join(minutes, keys, "left")
    minutes = minutes.select(
        *[(F.coalesce("readings", F.lit(0)) if f.name == "readings" else F.col(f.name))
          .cast(sql.type_text(f.dataType)).alias(f.name) for f in MINUTES_SCHEMA.fields[:-len(_PROVENANCE)]],
        F.lit(silver_version).cast("long").alias("silver_version"), F.lit(CODE_VERSION).alias("code_version"),
        F.lit(ingest_batch_id).alias("computed_by"), F.lit(processed_at).cast("timestamp").alias("computed_at"))
    emptied = F.expr(_emptied())
    if stored is None:
        return minutes.where(~emptied)
    return minutes.where(~emptied).unionByName(minutes.where(emptied).join(stored.select(*keys), keys, "left_semi"))


def _minute_rows(rows: DataFrame, inputs: Sequence[str]) -> DataFrame:
    """gold.vitals_minutes rows (without provenance) of usable silver rows with their `minute`: per (patient_key,
    concept, minute), what a batch needs of the minute when no point or window edge falls in it. Features: the
    newest numeric reading and how many there were. Scores (`_as_of` reads only the newest row of an input before
    a patient's first point): the newest row (the largest observation id at that instant), the newest row with a
    value, the newest encounter."""
    feature = (f"concept IN ({', '.join(sql.string(c) for c in features.FEATURE_CONCEPTS)}) AND value IS NOT NULL "
               "AND NOT isnan(value)")
    scored = f"concept IN ({', '.join(sql.string(c) for c in inputs)})"
    valued = (f"{scored} AND CASE WHEN concept IN ({', '.join(sql.string(c) for c in TEXT_INPUTS)}) "
              "THEN value_text IS NOT NULL ELSE value IS NOT NULL END")
    row = "struct(effective_at AS at, observation_id AS id, CAST(value AS DOUBLE) AS value, value_text AS text)"
    groups = rows.groupBy("patient_key", "concept", "minute").agg(
        F.expr(f"count(*) FILTER (WHERE {feature})").alias("readings"),
        F.expr(f"max(struct(effective_at AS at, CAST(value AS DOUBLE) AS value)) FILTER (WHERE {feature})")
        .alias("_last"),
        F.expr(f"max({row}) FILTER (WHERE {scored})").alias("_pick"),
        F.expr(f"max({row}) FILTER (WHERE {valued})").alias("_valued"),
        F.expr(f"max(struct(effective_at AS at, encounter_key AS key)) FILTER (WHERE {scored} AND encounter_key "
               "IS NOT NULL)").alias("_enc"))
    return groups.selectExpr(
        "patient_key", "concept", "minute", "readings", "_last.at AS last_at", "_last.value AS last_value",
        *[f"{p}.{f} AS {name}_{g}" for p, name in (("_pick", "pick"), ("_valued", "valued"))
          for f, g in (("at", "at"), ("id", "id"), ("value", "value"), ("text", "text"))],
        "_enc.at AS encounter_at", "_enc.key AS encounter_key")


def _merged(slices: Sequence[tuple[datetime, datetime | None]]) -> list[tuple[datetime, datetime | None]]:
    """Time slices [start, end) (end None: open) merged where they overlap or touch."""
    out: list[tuple[datetime, datetime | None]] = []
    for lo, hi in sorted(slices, key=lambda s: s[0]):
        if out and (out[-1][1] is None or lo <= out[-1][1]):
            end = out[-1][1]
            out[-1] = (out[-1][0], None if end is None or hi is None else max(end, hi))
        else:
            out.append((lo, hi))
    return out


def _history_in_minutes(read_usable: Callable[..., DataFrame], stored: DataFrame | None,
                        fresh: DataFrame | None, touched: DataFrame, spans: Sequence[tuple[str, datetime, datetime]],
                        inputs: Sequence[str], windows_ms: Sequence[int], history_ms: int,
                        links: Mapping[str, str]) -> DataFrame:
    """The touched patients' history: silver row by row in the minutes the batch probes, gold.vitals_minutes
    elsewhere. The same scores and features as reading every row.

    A score needs, per input, only the newest value before the patient's first point (`_from`); a feature needs
    the readings around each of its probes (at each point, and one window before it) row by row, and between the
    probes only how many readings there were and the newest one. So silver is read row by row in the minutes from
    `_from` on, in [_from - w, _to - w] for every window w, and in the minute the history starts; the minutes in
    between come from gold.vitals_minutes as at most four rows each per concept: for the features the newest
    reading with `_n` = the readings it stands for; for the scores the newest instant's row, the newest row that
    has a value, and the newest encounter (an `_encounter` row), only the newest minute's rows of each kind kept.
    12 h of a monitor that sends a reading a second, ~43,000 readings per vital, become ~720 rows, and silver is
    read only in a few slices a few minutes wide (data skipping), however many hours the history holds.

    `fresh`: the minutes this batch recomputed (they replace the stored ones). Exact but for two cases: in a minute
    read from the table, several rows of one input at its newest instant, the one with the largest id without a
    value (row by row the score carries the value from before that instant forward; here it finds none before it
    and counts the input missing: partial, never normal); and two encounters named at one instant that links
    (merges) make one (the larger key before following the link wins).

    Out: _HISTORY_COLUMNS, `_n` (readings a row stands for), `_asof` (scores read it), `_feature` (features do).
    """
    step, history = timedelta(seconds=MINUTE_SECONDS), timedelta(milliseconds=history_ms)
    windows = [timedelta(milliseconds=int(w)) for w in windows_ms]
    first, last_from, last_to = min(s[1] for s in spans), max(s[1] for s in spans), max(s[2] for s in spans)
    slices = [(_minute_floor(first), None), (_minute_floor(first - history), _minute_floor(last_from - history) + step),
              *[(_minute_floor(first - w), _minute_floor(last_to - w) + step) for w in windows]]
    rows = _union([read_usable(lo, hi) for lo, hi in _merged(slices)])
    start = f"_from - INTERVAL {int(history_ms)} MILLISECONDS"

    def probed(minute: str) -> str:
        edges = [f"{minute} >= {_minute_index('_from')}", f"{minute} = {_minute_index(start)}"]
        for w in windows_ms:
            back = f"INTERVAL {int(w)} MILLISECONDS"
            edges.append(f"({minute} BETWEEN {_minute_index(f'_from - {back}')} AND {_minute_index(f'_to - {back}')})")
        return " OR ".join(edges)

    raw = (rows.join(F.broadcast(touched), "patient_key")
           .where(f"effective_at >= {start} AND ({probed(_minute_index('effective_at'))})")
           .select(*_HISTORY_COLUMNS, *_as_read()))
    minutes = stored
    if fresh is not None:
        fresh = fresh.select(*MINUTES_SCHEMA.fieldNames())
        minutes = fresh if stored is None else stored.join(
            fresh.select("patient_key", "concept", "minute"), ["patient_key", "concept", "minute"], "left_anti"
        ).unionByName(fresh)
    if minutes is None:
        return raw
    here = _minute_index("minute")
    minutes = (_resolve(minutes, "patient_key", links).join(F.broadcast(touched), "patient_key")
               .where(f"{here} > {_minute_index(start)} AND NOT ({probed(here)})"))

    def entry(kind: int, at: str, concept: str, value: str, text: str, oid: str, enc: str, n: str) -> str:
        return (f"named_struct('_kind', {kind}, 'effective_at', {at}, 'concept', {concept}, "
                f"'value', CAST({value} AS DOUBLE), 'value_text', CAST({text} AS STRING), "
                f"'observation_id', CAST({oid} AS STRING), 'encounter_key', CAST({enc} AS STRING), "
                f"'_n', CAST({n} AS BIGINT))")

    entries = [entry(0, "last_at", "concept", "last_value", "NULL", "NULL", "NULL", "readings"),
               *[entry(k, f"{p}_at", "concept", f"{p}_value", f"{p}_text", f"{p}_id", "NULL", "1")
                 for k, p in ((1, "pick"), (2, "valued"))],
               entry(3, "encounter_at", sql.string(_ENCOUNTER), "NULL", "NULL", "NULL", "encounter_key", "1")]
    rolled = minutes.selectExpr("patient_key", "_from", "_to", f"inline(array({', '.join(entries)}))").where(
        "effective_at IS NOT NULL")
    # A feature keeps every minute's row (its counts); a score only the newest minute's rows of each kind.
    # Ties (a person's identities at one instant, after links): the largest id, as `_as_of` picks; the largest
    # encounter.
    newest = Window.partitionBy("patient_key", "concept", "_kind").orderBy(
        F.col("effective_at").desc(), F.col("observation_id").desc_nulls_last(),
        F.col("encounter_key").desc_nulls_last())
    rolled = rolled.select("*", F.when(F.col("_kind") == 0, F.lit(1)).otherwise(F.row_number().over(newest))
                           .alias("_rank")).where("_rank = 1")
    return raw.unionByName(rolled.select(*_HISTORY_COLUMNS, "_n", (F.col("_kind") > 0).alias("_asof"),
                                         (F.col("_kind") == 0).alias("_feature")))


def _as_of(history: DataFrame, inputs: Sequence[str]) -> DataFrame:
    """One row per (patient, input time) with the newest value, time and observation of every input so far."""
    aggs = ["max(encounter_key) AS _enc", "first(_from) AS _from", "first(_to) AS _to"]
    for c in inputs:
        value = "value_text" if c in TEXT_INPUTS else "value"
        here = f"concept = {sql.string(c)}"
        aggs += [f"max_by(CASE WHEN {here} THEN {value} END, CASE WHEN {here} THEN observation_id END) AS _v_{c}",
                 f"max(CASE WHEN {here} THEN observation_id END) AS _id_{c}"]
    per_time = history.groupBy("patient_key", "effective_at").agg(*[F.expr(a) for a in aggs])
    so_far = "OVER (PARTITION BY patient_key ORDER BY effective_at ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)"
    filled = [f"last(_enc, true) {so_far} AS encounter_key"]
    for c in inputs:
        filled += [f"last(_v_{c}, true) {so_far} AS _v_{c}",
                   f"last(CASE WHEN _v_{c} IS NOT NULL THEN effective_at END, true) {so_far} AS _t_{c}",
                   f"last(_id_{c}, true) {so_far} AS _id_{c}"]
    return per_time.selectExpr("patient_key", "effective_at AS scored_at", "_from", "_to", *filled)


def _score(points: DataFrame, lookback_ms: int) -> DataFrame:
    """NEWS2, qSOFA and SIRS from the as-of inputs, inputs older than the look-back treated as missing.

    Three selects: the usable inputs as plain columns, then the NEWS2 components over those names, then totals
    and bands over the components, so each expression stays small (planning is a per-batch cost in a stream).
    """
    fresh, stale, ids = [], [], []
    for c, column in INPUTS.items():
        ok = f"_t_{c} >= scored_at - INTERVAL {lookback_ms // 1000} SECONDS"
        fresh.append(f"CASE WHEN {ok} THEN _v_{c} END AS {column}")
        stale.append(f"CASE WHEN _v_{c} IS NOT NULL AND NOT ({ok}) THEN {sql.string(column)} END")
        ids.append(f"CASE WHEN {ok} THEN _id_{c} END")
    inputs = points.selectExpr(
        "patient_key", "encounter_key", "scored_at", *fresh,
        f"filter(array({', '.join(stale)}), x -> x IS NOT NULL) AS stale_inputs",
        f"filter(array({', '.join(ids)}), x -> x IS NOT NULL) AS input_observation_ids",
        "coalesce(_scale2, false) AS _scale2")
    inputs = inputs.selectExpr("*", f"{news2.on_oxygen_sql('fio2', 'o2flow')} AS on_oxygen")
    components = news2.news2_component_sql("respiratory_rate", "spo2", "on_oxygen", "systolic_bp", "pulse",
                                           "consciousness", "temperature", "_scale2")
    q = news2.qsofa_sql("respiratory_rate", "systolic_bp", "consciousness")
    scored = inputs.selectExpr(
        "*", *[f"{expr} AS {name}" for name, expr in components.items()],
        f"{q['qsofa_score']} AS qsofa_score", f"{q['qsofa_partial']} AS qsofa_partial",
        f"{news2.sirs_sql('temperature', 'pulse', 'respiratory_rate', 'wbc')} AS sirs_count")
    n = news2.news2_summary_sql({name: name for name in news2.COMPONENTS})
    return scored.selectExpr(
        "patient_key", "encounter_key", "scored_at",
        f"{n['news2_score']} AS news2_score", f"{n['news2_band']} AS news2_band", *news2.COMPONENTS,
        f"{n['news2_partial']} AS news2_partial", f"{n['news2_missing']} AS missing_inputs",
        "stale_inputs", "CASE WHEN _scale2 THEN 2 ELSE 1 END AS spo2_scale",
        *INPUTS.values(), "on_oxygen", "input_observation_ids", "qsofa_score", "qsofa_partial", "sirs_count")


def _with_model(df: DataFrame, champion: Any, windows_ms: Sequence[int]) -> DataFrame:
    """Add model_risk / model_version / model_alert from the champion model (null columns without one)."""
    if champion is None:
        return df.select("*", F.lit(None).cast("double").alias("model_risk"),
                         F.lit(None).cast("string").alias("model_version"),
                         F.lit(None).cast("boolean").alias("model_alert"))
    names = list(champion.feature_names)
    missing = [n for n in names if n not in df.columns]
    if missing:  # the registered model was trained on other windows or concepts than this job computes
        raise ValueError(f"model {champion.version} needs features {missing[:5]} that gold.vitals_features "
                         f"does not compute with gold.feature_windows={list(windows_ms)}; retrain with "
                         f"`carelake train deterioration` or change the windows back")
    out_schema = StructType([*df.schema.fields, StructField("model_risk", DoubleType(), True),
                             StructField("model_version", StringType(), True),
                             StructField("model_alert", BooleanType(), True)])
    version, threshold = str(champion.version), float(champion.threshold)

    def predict(frames):
        for frame in frames:
            risk = champion.predict(frame[names]) if len(frame) else []
            frame = frame.assign(model_risk=pd.Series(risk, index=frame.index, dtype="float64"),
                                 model_version=version)
            frame["model_alert"] = frame["model_risk"] >= threshold
            yield frame

    return df.mapInPandas(predict, out_schema)
