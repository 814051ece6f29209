"""gold.imaging_worklist and gold.imaging_sla_breaches: what radiology should read next, and what it read late.

**The worklist** holds one row per unread study (status `unread`: a study with no final, amended or corrected
report), ranked (`rank` 1 = read first) by gold.imaging_rank, whose factors the row lists. Beside them, orders whose
images are overdue (status `images_overdue`: an active order no study matched, `imaging.images_expected` after it
was ordered) are rows too, unranked: there is nothing to read yet, but somebody should find out why.

Each batch gives the whole open set again, from the current silver.imaging_studies, silver.imaging_orders (matched to
studies by silver.imaging_match), silver.imaging_reports, the patients' current NEWS2 band (gold.early_warning_scores,
the newest score within `imaging.news2_current_for`) and their open alerts (gold.deterioration_alerts). The open set
is small (the studies of a day or two), so the ranking runs on the driver in plain Python (the same function the
queue replay uses). A batch small enough for the runner's driver path is computed there by key (gold.imaging_keyed:
only the match groups its changes and the open set name); the first batch of a query and a large batch run the
whole-table Spark plan below, whose scans grow with the history (benchmarks/imaging_worklist.py measures both).
Rows that left the set since the last batch (read, matched, cancelled) are deleted from the table; time travel keeps
every earlier worklist.

**The SLA breaches** (gold.imaging_sla_breaches) are opened and closed like alerts: one row per study whose time to
read passed its SLA (`breach_id` = hash of the study), `opened_at` when the SLA passed (the due time), `closed_at` the
time of the first final report (null while open). Every value is a function of the inputs, never of when a batch ran,
so a replayed or repeated batch writes the same rows (the MERGE updates a row only when its content changes).

"Now" is the batch's processing time (`imaging.clock: wall`), or, for replays of recorded or simulated days, the
newest event time among the studies, orders and reports (`data`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from pyspark.sql import DataFrame
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

from gold import imaging_rank
from pipelines import __version__ as CODE_VERSION

log = logging.getLogger("carelake.imaging")

WORKLIST = "gold.imaging_worklist"
BREACHES = "gold.imaging_sla_breaches"
STUDIES, ORDERS, REPORTS = "silver.imaging_studies", "silver.imaging_orders", "silver.imaging_reports"
SCORES, ALERTS = "gold.early_warning_scores", "gold.deterioration_alerts"
UNREAD, IMAGES_OVERDUE, LEFT = "unread", "images_overdue", "left"
READ_STATUSES = ("final", "amended", "corrected")  # a report in one of these means the study has been read
NO_ORDER, NO_STUDY = "no order", "no study"
# The columns of the imaging contract this job reads (silver.imaging_orders / silver.imaging_reports).
ORDER_COLUMNS = ("order_key", "order_number", "accession_number", "patient_key", "procedure_display", "modality",
                 "body_part", "priority", "indication_text", "indication_codes", "ordered_at", "location_class",
                 "status")
REPORT_COLUMNS = ("report_key", "accession_number", "order_number", "study_instance_uid", "status", "read_at")
STUDY_COLUMNS = ("study_instance_uid", "patient_key", "accession_number", "study_description", "study_time_utc",
                 "modality", "body_part", "first_received_at")

FACTOR = StructType([StructField("factor", StringType(), False), StructField("value", StringType(), True),
                     StructField("points", DoubleType(), False)])
_PROVENANCE = [
    StructField("studies_version", LongType(), True),  # silver.imaging_studies version the batch read
    StructField("orders_version", LongType(), True),
    StructField("reports_version", LongType(), True),
    StructField("scores_version", LongType(), True),  # gold.early_warning_scores
    StructField("alerts_version", LongType(), True),  # gold.deterioration_alerts
    StructField("code_version", StringType(), True),
    StructField("computed_by", StringType(), True),
    StructField("computed_at", TimestampType(), True),
]
SCHEMA = StructType([
    StructField("worklist_key", StringType(), False),  # the study UID; `order:<order_key>` for images_overdue
    StructField("status", StringType(), False),  # unread, images_overdue
    StructField("rank", IntegerType(), True),  # 1 = read first; null for images_overdue
    StructField("score", DoubleType(), True),  # the sum of the factors' points
    StructField("factors", ArrayType(FACTOR), True),  # why: each factor, the value it read, its points
    StructField("study_instance_uid", StringType(), True),
    StructField("accession_number", StringType(), True),
    StructField("patient_key", StringType(), True),  # pseudonymous (silver.identity)
    StructField("modality", StringType(), True),
    StructField("body_part", StringType(), True),
    StructField("study_description", StringType(), True),
    StructField("study_time_utc", TimestampType(), True),
    StructField("available_at", TimestampType(), True),  # study time, else first received: the SLA clock's start
    StructField("order_key", StringType(), True),
    StructField("order_number", StringType(), True),
    StructField("order_match", StringType(), True),  # accession, patient_procedure_time, "no order", "no study"
    StructField("priority", StringType(), True),  # STAT, ASAP, ROUTINE; null: no order
    StructField("procedure_display", StringType(), True),
    StructField("indication_text", StringType(), True),
    StructField("indication_category", StringType(), True),  # stroke, pe, bleed, trauma (the top one), or null
    StructField("location_class", StringType(), True),
    StructField("ordered_at", TimestampType(), True),
    StructField("news2_band", StringType(), True),  # the patient's current band (imaging.news2_current_for)
    StructField("news2_score", IntegerType(), True),
    StructField("news2_scored_at", TimestampType(), True),
    StructField("open_alert_levels", ArrayType(StringType()), True),  # gold.deterioration_alerts open for them
    StructField("critical_probability", DoubleType(), True),  # null: no critical-finding model registered
    StructField("critical_model_version", StringType(), True),
    StructField("sla_due_at", TimestampType(), True),  # images_overdue: when the images were expected
    StructField("sla_breached", BooleanType(), True),
    StructField("waited_minutes", DoubleType(), True),
    StructField("as_of", TimestampType(), False),  # the "now" the batch ranked at
    *_PROVENANCE,
])
BREACH_SCHEMA = StructType([
    StructField("breach_id", StringType(), False),
    StructField("study_instance_uid", StringType(), False),
    StructField("accession_number", StringType(), True),
    StructField("patient_key", StringType(), True),
    StructField("order_key", StringType(), True),
    StructField("priority", StringType(), True),  # null: no order (imaging.no_order_sla)
    StructField("sla_minutes", DoubleType(), False),
    StructField("available_at", TimestampType(), False),
    StructField("opened_at", TimestampType(), False),  # when the SLA passed (available_at + SLA)
    StructField("closed_at", TimestampType(), True),  # the first final report's read_at; null while open
    StructField("status", StringType(), False),  # open, closed
    StructField("report_key", StringType(), True),
    StructField("minutes_past_sla", DoubleType(), True),  # at closing
    *_PROVENANCE,
])
BREACH_CONTENT = ("closed_at", "status", "report_key", "priority", "order_key", "opened_at", "minutes_past_sla")


def empty(spark, columns: tuple[str, ...], schema: StructType) -> DataFrame:
    """An empty frame of `columns` (their types from `schema`): an input table that does not exist yet."""
    fields = {f.name: f for f in schema.fields}
    return spark.createDataFrame([], StructType([fields[c] for c in columns]))


ORDER_TYPES = StructType([
    *(StructField(c, StringType(), True) for c in ORDER_COLUMNS if c not in ("indication_codes", "ordered_at")),
    StructField("indication_codes", ArrayType(StringType()), True), StructField("ordered_at", TimestampType(), True)])
REPORT_TYPES = StructType([*(StructField(c, StringType(), True) for c in REPORT_COLUMNS if c != "read_at"),
                           StructField("read_at", TimestampType(), True)])


def final_reads(reports: DataFrame, studies: DataFrame, matched: DataFrame) -> DataFrame:
    """study_instance_uid -> read_at and report_key of its first final report, linked by study UID, accession
    number, or the number of the order matched to the study."""
    final = reports.where(F.lower("status").isin(*READ_STATUSES) & F.col("read_at").isNotNull())
    by_uid = final.where(F.col("study_instance_uid").isNotNull()).select("study_instance_uid", "read_at",
                                                                          "report_key")
    unnamed = final.drop("study_instance_uid")
    by_accession = unnamed.where(F.col("accession_number").isNotNull()).join(
        studies.select("study_instance_uid", "accession_number"), "accession_number"
    ).select("study_instance_uid", "read_at", "report_key")
    by_order = unnamed.where(F.col("order_number").isNotNull()).join(
        matched.where(F.col("study_instance_uid").isNotNull()).select("study_instance_uid", "order_number"),
        "order_number").select("study_instance_uid", "read_at", "report_key")
    links = by_uid.unionByName(by_accession).unionByName(by_order)
    first = F.struct("read_at", "report_key")
    return links.groupBy("study_instance_uid").agg(F.min(first).alias("_f")).select(
        "study_instance_uid", F.col("_f.read_at").alias("read_at"), F.col("_f.report_key").alias("report_key"))


def matched_orders(orders: DataFrame, pairs: DataFrame | None) -> DataFrame:
    """Orders with the study matched to each (or null) and the match method; `pairs` is silver.imaging_match's
    answer (None: no orders table yet, nothing matched)."""
    if pairs is None:
        return orders.select("*", F.lit(None).cast("string").alias("study_instance_uid"),
                             F.lit(None).cast("string").alias("match_method"))
    pairs = pairs.where(F.col("order_key").isNotNull()).select("order_key", "study_instance_uid", "match_method")
    return orders.join(pairs, "order_key", "left")


def study_items(studies: DataFrame, matched: DataFrame, reads: DataFrame) -> DataFrame:
    """Every study with its matched order's columns, and read_at/report_key when it has been read."""
    order = matched.where(F.col("study_instance_uid").isNotNull()).select(
        "study_instance_uid", "order_key", "order_number", F.col("accession_number").alias("order_accession"),
        "procedure_display", "priority", "indication_text", "indication_codes", "ordered_at", "location_class",
        F.col("match_method").alias("order_match"))
    return (studies.join(order, "study_instance_uid", "left").join(reads, "study_instance_uid", "left")
            .withColumn("available_at", F.coalesce("study_time_utc", "first_received_at"))
            .withColumn("order_match", F.coalesce("order_match", F.lit(NO_ORDER))))


def current_news2(scores: DataFrame) -> DataFrame:
    """patient_key -> the newest score's band, score and time (of the scores given: the caller bounds their age)."""
    newest = F.max_by(F.struct("news2_band", "news2_score", "scored_at"), "scored_at")
    got = scores.groupBy("patient_key").agg(newest.alias("_n"))
    return got.select("patient_key", F.col("_n.news2_band").alias("news2_band"),
                      F.col("_n.news2_score").alias("news2_score"), F.col("_n.scored_at").alias("news2_scored_at"))


def open_alerts(alerts: DataFrame) -> DataFrame:
    """patient_key -> the levels of their open deterioration alerts."""
    return (alerts.where(F.col("status") == "open").groupBy("patient_key")
            .agg(F.array_sort(F.collect_set("level")).alias("open_alert_levels")))


def _plus_seconds(start: str, seconds: Mapping[str, int], default: int) -> F.Column:
    """`start` + the seconds `seconds` gives the row's priority (`default` for none or another)."""
    by_priority = F.create_map(*(F.lit(x) for p, n in seconds.items() for x in (p, n)))
    wait = F.coalesce(by_priority[F.coalesce(F.col("priority"), F.lit(""))], F.lit(default))
    return F.timestamp_micros(F.unix_micros(start) + wait.cast("long") * 1_000_000)


def overdue_orders(matched: DataFrame, expected_s: Mapping[str, int], now: datetime) -> DataFrame:
    """Active orders no study matched, past the time their images were expected (seconds per priority)."""
    waiting = matched.where(F.col("study_instance_uid").isNull() & (F.lower("status") == "active"))
    due = _plus_seconds("ordered_at", expected_s, max(expected_s.values()))
    return waiting.withColumn("sla_due_at", due).where(F.col("sla_due_at") < F.lit(now).cast("timestamp"))


def breaches(items: DataFrame, ranking: imaging_rank.Ranking, now: datetime, keep: DataFrame) -> DataFrame:
    """SLA breaches of the studies in `items` that are open (unread past due) or in `keep` (study UIDs whose
    breach may have changed: open ones in the table, studies the batch touched)."""
    sla_s = {p: ms // 1000 for p, ms in ranking.sla_ms.items()}
    due = _plus_seconds("available_at", sla_s, ranking.no_order_sla_ms // 1000)
    sla_minutes = (F.unix_micros(due) - F.unix_micros("available_at")) / 60e6
    late = items.where(F.col("available_at").isNotNull()).withColumn("opened_at", due).where(
        F.col("opened_at") < F.coalesce("read_at", F.lit(now).cast("timestamp")))
    chosen = late.where(F.col("read_at").isNull()).unionByName(
        late.where(F.col("read_at").isNotNull()).join(keep, "study_instance_uid", "left_semi"))
    closed = F.col("read_at").isNotNull()
    return chosen.select(
        F.sha2(F.concat(F.lit("sla|"), "study_instance_uid"), 256).alias("breach_id"), "study_instance_uid",
        "accession_number", "patient_key", "order_key", "priority", sla_minutes.alias("sla_minutes"),
        "available_at", "opened_at", F.col("read_at").alias("closed_at"),
        F.when(closed, "closed").otherwise("open").alias("status"),
        F.when(closed, F.col("report_key")).alias("report_key"),
        F.when(closed, (F.unix_micros("read_at") - F.unix_micros("opened_at")) / 60e6).alias("minutes_past_sla"))


def touched_studies(changes: DataFrame, items: DataFrame) -> DataFrame:
    """Study UIDs the batch's change rows name: by study UID, accession number or (matched) order number."""
    keys = [c for c in ("study_instance_uid", "accession_number", "order_number") if c in changes.columns]
    if not keys:
        return items.select("study_instance_uid").limit(0)
    named = changes.select(*keys)
    hits = [items.join(named.select(k).where(F.col(k).isNotNull()).distinct(), k, "left_semi")
            for k in keys]
    out = hits[0].select("study_instance_uid")
    for more in hits[1:]:
        out = out.unionByName(more.select("study_instance_uid"))
    return out.distinct()


def load_inputs(read_table: Callable[..., DataFrame], exists: Callable[[str], bool], spark, match: Callable[..., Any],
                match_window: timedelta) -> tuple[DataFrame, DataFrame, DataFrame, DataFrame]:
    """The studies, orders and reports columns the worklist reads (empty when a table does not exist yet), and the
    orders matched to studies by silver.imaging_match."""
    from silver.imaging_studies import SCHEMA as STUDY_TYPES

    def table(name: str, columns: tuple[str, ...], types: StructType) -> DataFrame:
        return read_table(name).select(*columns) if exists(name) else empty(spark, columns, types)

    studies = table(STUDIES, STUDY_COLUMNS, STUDY_TYPES)
    orders = table(ORDERS, ORDER_COLUMNS, ORDER_TYPES)
    pairs = match(read_table(ORDERS), read_table(STUDIES), window=match_window) \
        if exists(ORDERS) and exists(STUDIES) else None
    return studies, orders, table(REPORTS, REPORT_COLUMNS, REPORT_TYPES), matched_orders(orders, pairs)


def data_clock(studies: DataFrame, orders: DataFrame, reports: DataFrame) -> datetime | None:
    """The newest event time among the inputs (imaging.clock: data)."""
    times = [studies.agg(F.max(F.coalesce("study_time_utc", "first_received_at"))),
             orders.agg(F.max("ordered_at")), reports.agg(F.max("read_at"))]
    found = [t.toArrow().column(0)[0].as_py() for t in times]
    return max((t for t in found if t is not None), default=None)


def _worklist_row(rank: int | None, item: Mapping[str, Any], scored: imaging_rank.Scored | None, now: datetime,
                  model_version: str | None) -> dict[str, Any]:
    row = {f.name: item.get(f.name) for f in SCHEMA.fields}
    if scored is not None:
        due = scored.sla_due_at
        row.update(rank=rank, score=scored.score, indication_category=scored.indication_category,
                   factors=[(f["factor"], f["value"], f["points"]) for f in scored.factors], sla_due_at=due,
                   critical_model_version=model_version if item.get("critical_probability") is not None else None)
    start = item.get("available_at") or item.get("ordered_at")
    row["sla_breached"] = row["sla_due_at"] is not None and row["sla_due_at"] < now
    row["waited_minutes"] = round(max((now - start).total_seconds(), 0) / 60, 1) if start else None
    row["as_of"] = now
    return row


def rank_unread(unread: list[dict[str, Any]], ranking: imaging_rank.Ranking, now: datetime,
                critical_model: Any) -> list[dict[str, Any]]:
    """The unread studies as worklist rows: the model's probabilities, then gold.imaging_rank's order."""
    imaging_rank.prepare(unread, ranking, critical_model)
    version = getattr(critical_model, "version", None)
    return [{**_worklist_row(n, item, scored, now, version), "worklist_key": item["study_instance_uid"],
             "status": UNREAD} for n, item, scored in imaging_rank.ranked(unread, ranking, now)]


def overdue_row(order: Mapping[str, Any], now: datetime) -> dict[str, Any]:
    """An order whose images are overdue as a worklist row (unranked)."""
    return {**_worklist_row(None, order, None, now, None), "worklist_key": f"order:{order['order_key']}",
            "status": IMAGES_OVERDUE, "order_match": NO_STUDY}


def _collect(df: DataFrame) -> list[dict[str, Any]]:
    """Rows as dicts, timestamps as aware UTC datetimes (Arrow; a plain collect gives local naive times)."""
    return df.toArrow().to_pylist()


def imaging_worklist(changes: DataFrame, *, read_table: Callable[..., DataFrame],
                     table_version: Callable[[str], int | None], processed_at: datetime, ingest_batch_id: str,
                     ranking: imaging_rank.Ranking, images_expected_s: Mapping[str, int],
                     match: Callable[..., DataFrame], match_window: timedelta, news2_current_s: int, clock: str,
                     critical_model: Callable[[], Any], batch_id: int = 0, via_driver: bool = False,
                     read_rows: Callable[..., Any] | None = None) -> dict[str, DataFrame | Any]:
    """The upstream changes of a batch -> the whole worklist again (rows that left it marked `left`) and the SLA
    breaches that opened or closed. A batch the runner writes through the driver (`via_driver`) is refreshed there
    by key, with delta-rs reads (`read_rows`; gold.imaging_keyed), and returned as Arrow tables."""
    spark = changes.sparkSession
    versions = {t: table_version(t) for t in (STUDIES, ORDERS, REPORTS, SCORES, ALERTS)}
    if via_driver and read_rows is not None:
        return _on_driver(changes, read_rows, {**versions, **{t: table_version(t) for t in (WORKLIST, BREACHES)}},
                          batch_id=batch_id, processed_at=processed_at, ingest_batch_id=ingest_batch_id,
                          ranking=ranking, images_expected_s=images_expected_s, match_window=match_window,
                          news2_current_s=news2_current_s, clock=clock, critical_model=critical_model)

    from pipelines.timeutil import Steps

    steps = Steps()
    if not _any_rows(read_table, versions, (STUDIES, ORDERS)):
        return {WORKLIST: empty(spark, tuple(SCHEMA.names), SCHEMA),  # no imaging yet (a vitals-only lakehouse)
                BREACHES: empty(spark, tuple(BREACH_SCHEMA.names), BREACH_SCHEMA)}
    steps.done("state")
    studies, orders, reports, matched = load_inputs(read_table, lambda t: versions[t] is not None, spark, match,
                                                    match_window)
    now = processed_at.astimezone(UTC) if clock == "wall" else (data_clock(studies, orders, reports)
                                                                 or processed_at.astimezone(UTC))
    steps.done("reads")
    matched = matched.localCheckpoint()  # the match is global (nearest order wins): computed once per batch
    items = study_items(studies, matched, final_reads(reports, studies, matched)).localCheckpoint()
    unread = items.where(F.col("read_at").isNull()).withColumn("_kind", F.lit(UNREAD))
    overdue = overdue_orders(matched, images_expected_s, now).withColumn("_kind", F.lit(IMAGES_OVERDUE))
    both = _collect(unread.unionByName(overdue, allowMissingColumns=True))  # one small collect: the open set
    steps.done("match")
    context = patient_context(read_table, versions, {r["patient_key"] for r in both if r["patient_key"]}, now,
                              news2_current_s)
    for r in both:
        r.update(context.get(r["patient_key"], {}))
    steps.done("context")
    rows = rank_unread([r for r in both if r["_kind"] == UNREAD], ranking, now, critical_model())
    steps.done("rank")
    log.info("%s Spark plan (whole tables): %d open; steps (s): %s (the breaches and the rows that left are "
             "computed when written)", WORKLIST, len(both), steps.line())
    rows += [overdue_row(o, now) for o in both if o["_kind"] == IMAGES_OVERDUE]
    provenance = batch_provenance(versions, ingest_batch_id, processed_at)
    worklist = spark.createDataFrame([{**r, **provenance} for r in rows], SCHEMA)
    if table_version(WORKLIST) is not None:
        gone = read_table(WORKLIST).select("worklist_key").join(worklist.select("worklist_key"), "worklist_key",
                                                                "left_anti")
        worklist = worklist.unionByName(_left_rows(gone, now, provenance))
    keep = touched_studies(changes, items)
    if table_version(BREACHES) is not None:
        keep = keep.unionByName(read_table(BREACHES).where(F.col("status") == "open").select("study_instance_uid"))
    sla = breaches(items, ranking, now, keep.distinct())
    sla = sla.select("*", *(F.lit(v).cast(SCHEMA[k].dataType).alias(k) for k, v in provenance.items()))
    return {BREACHES: sla.select(*(F.col(f.name).cast(f.dataType) for f in BREACH_SCHEMA.fields)),
            WORKLIST: worklist}


def _any_rows(read_table: Callable[..., DataFrame], versions: Mapping[str, int | None], tables: tuple[str, ...]
              ) -> bool:
    """Whether any of `tables` holds a row (one Spark job for them all)."""
    present = [read_table(t).select(F.lit(1).alias("x")) for t in tables if versions[t] is not None]
    if not present:
        return False
    rows = present[0]
    for more in present[1:]:
        rows = rows.unionByName(more)
    return not rows.limit(1).isEmpty()


def batch_provenance(versions: Mapping[str, int | None], ingest_batch_id: str, processed_at: datetime
                     ) -> dict[str, Any]:
    """The provenance columns every row of a batch carries: the input versions it read, code and batch."""
    names = {STUDIES: "studies_version", ORDERS: "orders_version", REPORTS: "reports_version",
             SCORES: "scores_version", ALERTS: "alerts_version"}
    return {**{names[t]: v for t, v in versions.items() if t in names}, "code_version": CODE_VERSION,
            "computed_by": ingest_batch_id, "computed_at": processed_at}


def _left_rows(gone: DataFrame, now: datetime, provenance: Mapping[str, Any]) -> DataFrame:
    """Rows that left the worklist, as delete markers (status `left`: the MERGE deletes them)."""
    values = {**provenance, "status": LEFT, "as_of": now}
    return gone.select("worklist_key", *(F.lit(values[f.name]).cast(f.dataType).alias(f.name) if f.name in values
                                         else F.lit(None).cast(f.dataType).alias(f.name)
                                         for f in SCHEMA.fields if f.name != "worklist_key")
                       ).select(*(f.name for f in SCHEMA.fields))


def patient_context(read_table: Callable[..., DataFrame], versions: Mapping[str, int | None], patients: set[str],
                    now: datetime, news2_current_s: int) -> dict[str, dict[str, Any]]:
    """patient_key -> their current NEWS2 (the newest score within news2_current_s before now: news2_band,
    news2_score, news2_scored_at) and open alert levels (open_alert_levels), for the given patients."""
    out: dict[str, dict[str, Any]] = {k: {} for k in patients}
    if not patients:
        return out
    keys = F.col("patient_key").isin(sorted(patients))
    parts = []
    if versions[SCORES] is not None:
        since = now - timedelta(seconds=news2_current_s)
        scores = read_table(SCORES, since=("scored_at", since)).where(keys & (F.col("scored_at") <= F.lit(now)))
        parts.append(current_news2(scores.select("patient_key", "scored_at", "news2_band", "news2_score")))
    if versions[ALERTS] is not None:
        parts.append(open_alerts(read_table(ALERTS).where(keys).select("patient_key", "level", "status")))
    if not parts:
        return out
    both = parts[0] if len(parts) == 1 else parts[0].join(parts[1], "patient_key", "full")  # one Spark job
    for r in _collect(both):
        out[r.pop("patient_key")].update({k: v for k, v in r.items() if v is not None})
    return out


def arrival_context(items: DataFrame, scores: DataFrame | None, alerts: DataFrame | None, news2_current_s: int
                    ) -> DataFrame:
    """Each study with the patient's NEWS2 band and open alert levels as they were when it arrived (available_at):
    what the critical-finding model is trained on (the worklist itself reads the current ones)."""
    at = items.select("study_instance_uid", "patient_key", "available_at")
    out = items
    if scores is not None:
        hit = at.join(scores.select("patient_key", "scored_at", "news2_band", "news2_score"), "patient_key").where(
            (F.col("scored_at") <= F.col("available_at"))
            & (F.unix_micros("scored_at") >= F.unix_micros("available_at") - news2_current_s * 1_000_000))
        newest = hit.groupBy("study_instance_uid").agg(
            F.max_by(F.struct("news2_band", "news2_score", "scored_at"), "scored_at").alias("_n"))
        out = out.join(newest.select("study_instance_uid", F.col("_n.news2_band").alias("news2_band"),
                                     F.col("_n.news2_score").alias("news2_score")), "study_instance_uid", "left")
    if alerts is not None:
        live = at.join(alerts.select("patient_key", "level", "opened_at", "resolved_at"), "patient_key").where(
            (F.col("opened_at") <= F.col("available_at"))
            & (F.col("resolved_at").isNull() | (F.col("resolved_at") > F.col("available_at"))))
        levels = live.groupBy("study_instance_uid").agg(F.array_sort(F.collect_set("level")).alias("open_alert_levels"))
        out = out.join(levels, "study_instance_uid", "left")
    return out


def _on_driver(changes: DataFrame, read_rows: Callable[..., Any], versions: Mapping[str, int | None], *,
               batch_id: int, **options: Any) -> dict[str, Any]:
    """The driver path (gold.imaging_keyed): the batch's key columns collected (one small Spark job over the cached
    batch), the rest in Python; the first batch of a query reads the tables whole."""
    from pyspark.sql.pandas.types import to_arrow_schema

    from gold import imaging_keyed

    schemas = (to_arrow_schema(SCHEMA), to_arrow_schema(BREACH_SCHEMA))
    if versions[STUDIES] is None and versions[ORDERS] is None:  # no imaging yet (a vitals-only lakehouse)
        return {WORKLIST: schemas[0].empty_table(), BREACHES: schemas[1].empty_table()}
    keys = [c for c in imaging_keyed.KEY_COLUMNS if c in changes.columns]
    rows = changes.select(*keys).toArrow().to_pylist() if keys else []
    return imaging_keyed.refresh(rows, read=imaging_keyed.Reader(read_rows, versions), whole=batch_id == 0,
                                 schemas=schemas, **options)
