"""gold.early_warning_scores, gold.vitals_features and gold.deterioration_alerts: the stateful score job.

One score row per person and `scored_at`, the event time of a NEWS2/qSOFA/SIRS input measured for them, with its
features row and, when a model is registered as `champion`, its risk; alerts per person, level and episode.
What each figure means is gold.scoring's docstring; this module runs it on Spark:

1. the silver.observations change feed is the job's stream; each change row is keyed by the **person** it
   belongs to (silver.patients links: a FHIR `Patient/<id>`, an MRN and an A40-merged identity of one person all
   score as one), and a change that moves a reading to another person or time is a `gone` row for the old one;
2. `applyInPandasWithState` groups each micro-batch by person and calls gold.scoring.step with the person's state
   from Spark's state store (RocksDB, checkpointed with the query): a batch costs what its new readings cost and
   reads no history back from tables;
3. the batch's rows (scores, features, withdrawn points, alerts) are committed by the runner like any job's: an
   alert commits with the scores that raised it, one micro-batch after the reading.

Per-batch facts the executors need (identity links, the model, the batch's time, the silver version) are written
by the driver before the batch runs (`context`) and read by the stage's Python code: a replay reads the same file.

Rare events read silver itself, on the executor, for one person: a state written by another carelake version, an
identity linked or unlinked (the person's state is rebuilt from all of their identities' rows), a retraction
older than the state's tail that a carry held (rebuilt), and a reading older than the tail (the points between it
and the tail are rescored from silver; their alerts are left as they were: `carelake run
gold.early_warning_scores --recompute --from ... --to ...` recomputes a range with its alerts).
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import (
    ArrayType,
    BinaryType,
    BooleanType,
    DoubleType,
    IntegerType,
    LongType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

from gold import deterioration_alerts, features, news2, scoring
from gold.scoring import INPUTS, TEXT_INPUTS
from pipelines import __version__ as CODE_VERSION
from pipelines import sqltext as sql
from pipelines.errors import UsageError

# pyspark's own serializer concatenates the frames the stage yields, and pandas 2.x warns when some column of
# one of them is all null (a person without alerts): that is this job's normal output, not a problem to report.
warnings.filterwarnings("ignore", message="The behavior of DataFrame concatenation with empty or all-NA entries",
                        category=FutureWarning)

SCORES = "gold.early_warning_scores"
FEATURES = "gold.vitals_features"
ALERTS = deterioration_alerts.ALERTS
OBSERVATIONS = "silver.observations"
PATIENTS = "silver.patients"
ENCOUNTERS = "silver.encounters"
OUTPUT = "_output"

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
    StructField("spo2_scale", IntegerType(), True),  # 1, or 2 from a recorded hypercapnic target on
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


def features_schema(windows_ms: Sequence[int]) -> StructType:
    """gold.vitals_features: keys, one column per feature (counts are whole numbers), provenance."""
    cols = [StructField(name, LongType() if "_count_" in name else DoubleType(), True)
            for name in features.feature_columns(windows_ms)]
    return StructType([*_KEYS, *cols, *_PROVENANCE])


def _routed_schema(windows_ms: Sequence[int]) -> StructType:
    """Scores, features and alerts in one row shape, `_output` naming the table of each row."""
    fields = [*SCHEMA.fields]
    for more in (features_schema(windows_ms), deterioration_alerts.SCHEMA):
        names = {f.name for f in fields}
        fields += [StructField(f.name, f.dataType, True) for f in more.fields if f.name not in names]
    return StructType([*fields, StructField(OUTPUT, StringType(), False)])


def stage_schema(windows_ms: Sequence[int]) -> StructType:
    """What the stateful stage gives per row: `_kind` (score, withdraw, alert), the routed columns without
    provenance, the silver version the person's rows came from, and the oldest change's commit time (lag)."""
    provenance = {f.name for f in _PROVENANCE} | {"scores_version", "code_version", "computed_by", "computed_at"}
    fields = [StructField(f.name, f.dataType, True) for f in _routed_schema(windows_ms).fields
              if f.name not in provenance and f.name != OUTPUT]
    return StructType([StructField("_kind", StringType(), False), *fields,
                       StructField("_silver_version", LongType(), True),
                       StructField("_commit_timestamp", TimestampType(), True)])


STATE_SCHEMA = StructType([StructField("state", BinaryType(), False)])
# The silver.observations columns the stage reads from the change feed.
_CHANGE_COLUMNS = ("observation_id", "patient_key", "encounter_key", "code", "concept", "value", "value_text",
                   "status", "effective_at", "_change_type", "_commit_version", "_commit_timestamp")


# -- the per-batch context: written by the driver, read by the stage on the executors ----------------------------
class Context:
    """The driver side: what each batch's stage needs, as <folder>/<batch id>.json (kept if it exists, so a replay
    sees what the first attempt saw), with the champion model pickled beside it."""

    KEEP = 20  # context files kept (the newest is the running batch's)

    def __init__(self, folder: Path):
        self.folder = folder
        self._links: dict[str, tuple[int, dict[str, str]]] = {}  # table -> (version, links)

    def links(self, read_table, table_version, table: str, key: str) -> dict[str, str]:
        """`resolved_links` of the table, read again only when it has a new version."""
        version = table_version(table)
        if version is None:
            return {}
        if table not in self._links or self._links[table][0] != version:
            self._links[table] = (version, resolved_links(read_table(table), key))
        return self._links[table][1]

    def write(self, batch_id: int, facts: Mapping[str, Any], champion: Any) -> dict[str, Any]:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{batch_id}.json"
        if path.exists():
            return json.loads(path.read_text())
        model = None
        if champion is not None:
            model = self.folder / f"champion-{champion.version}.pkl"
            if not model.exists():
                _write_atomically(model, pickle.dumps(champion, protocol=5))
        doc = {**facts, "batch_id": batch_id, "champion": None if model is None else str(model)}
        _write_atomically(path, json.dumps(doc).encode())
        for old in sorted(self.folder.glob("*.json"), key=lambda p: int(p.stem))[:-self.KEEP]:
            old.unlink(missing_ok=True)
        return doc


def resolved_links(identities: DataFrame, key: str) -> dict[str, str]:
    """{identity: the person it continues as} for every row of silver.patients (or .encounters) that continues as
    another (`merged_into`): chains followed, a cycle stopped where it closes."""
    rows = (identities.where(F.col("merged_into").isNotNull() & (F.col("merged_into") != F.col(key)))
            .select(key, "merged_into").collect())
    step = {r[0]: r[1] for r in rows}
    resolved = {}
    for start in step:
        seen, current = {start}, step[start]
        while current in step and step[current] not in seen:
            seen.add(current)
            current = step[current]
        resolved[start] = current
    return resolved


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


_READ: dict[str, tuple[str, dict[str, Any]]] = {}  # per executor process: folder -> (file name, context)
_MODELS: dict[str, Any] = {}


def _batch_context(folder: str) -> dict[str, Any]:
    """The running batch's context (the newest file: batches run one after another), cached per file."""
    files = [p for p in Path(folder).glob("*.json")]
    if not files:
        raise RuntimeError(f"the score job's batch context is missing under {folder}; the runner writes it before "
                           "each batch: run the job with `carelake run`")
    newest = max(files, key=lambda p: int(p.stem))
    cached = _READ.get(folder)
    if cached is None or cached[0] != newest.name:
        doc = json.loads(newest.read_text())
        cached = (newest.name, doc)
        _READ[folder] = cached
    return cached[1]


def _champion(doc: Mapping[str, Any]) -> Any:
    path = doc.get("champion")
    if path is None:
        return None
    if path not in _MODELS:
        _MODELS.clear()
        _MODELS[path] = pickle.loads(Path(path).read_bytes())
    return _MODELS[path]


# -- the stage -------------------------------------------------------------------------------------------------
class ScoreStage:
    """The score job's stateful stage (pipelines.jobs.StateStage): its plan, and each batch's facts."""

    # The shape of the state in the query's checkpoint: a checkpoint of another layout is set aside by the runner (and
    # the job replays silver). 2: per-person state with processing-time timeouts (gold.state_idle).
    layout = "per-person-2"

    def __init__(self, settings: scoring.Settings, windows_ms: Sequence[int], champion, *, partitions: int = 2,
                 idle_ms: int = 0):
        self.settings, self.windows_ms, self.champion = settings, tuple(windows_ms), champion
        self.partitions, self.idle_ms = partitions, idle_ms
        self._contexts: dict[str, Context] = {}

    def plan(self, stream: DataFrame, folder: str) -> DataFrame:
        return plan(stream, folder, settings=self.settings, windows_ms=self.windows_ms, idle_ms=self.idle_ms)

    def prepare(self, folder: str, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Before a batch runs (driver): write its context; give the transform the batch's facts."""
        context = self._contexts.setdefault(folder, Context(Path(folder)))
        read_table, table_version = batch["read_table"], batch["table_version"]
        links = context.links(read_table, table_version, PATIENTS, "patient_key")
        silver_version = table_version(OBSERVATIONS)
        facts = {"links": links, "silver_path": batch["table_path"](OBSERVATIONS),
                 "silver_version": -1 if silver_version is None else silver_version,
                 "now_us": utc_micros(batch["processed_at"])}
        for name, table in (("scores", SCORES), ("alerts", ALERTS)):  # what a rebuild compares with
            version = table_version(table)
            facts[f"{name}_path"] = None if version is None else batch["table_path"](table)
            facts[f"{name}_version"] = version
        doc = context.write(batch["batch_id"], facts, self.champion())
        merged = None
        if table_version(ALERTS) is not None and doc["links"]:
            merged = deterioration_alerts.open_of_merged(read_table, doc["links"], context)
        encounters = context.links(read_table, table_version, ENCOUNTERS, "encounter_key")
        return {"links": doc["links"], "encounter_links": encounters, "open_of_merged": merged}


    def recompute(self, batch: Mapping[str, Any], start: datetime, end: datetime) -> DataFrame:
        """The job's rows for the points in [start, end] recomputed from silver, as one batch (the routed frame
        its transform gives): every person's rows from `history` before `start` (and back to the opening of any
        alert episode still running then) to the newest, one fresh gold.scoring pass per person. Points in the
        range no longer found are withdrawn; alert episodes that run at or after `start` are recomputed whole,
        and stored ones no longer found are withdrawn. Links as they stand now: a merged identity's points in the
        range score under the person it continues as."""
        read_table, table_version = batch["read_table"], batch["table_version"]
        if table_version(OBSERVATIONS) is None:
            raise UsageError(f"--recompute: {OBSERVATIONS} does not exist yet; nothing to recompute from")
        links, encounters = ({} if table_version(table) is None else resolved_links(read_table(table), key)
                             for table, key in ((PATIENTS, "patient_key"), (ENCOUNTERS, "encounter_key")))
        s = self.settings
        start_us, end_us = utc_micros(start), utc_micros(end)
        since_us = start_us - s.history_us
        have_alerts = table_version(ALERTS) is not None
        if have_alerts:  # episodes running at the start of the history are recomputed from their opening
            since = _aware(since_us)
            row = (read_table(ALERTS).where(
                (F.col("status") != scoring.WITHDRAWN) & (F.col("opened_at") < F.lit(since))
                & (F.col("resolved_at").isNull()
                   | (F.col("resolved_at") >= F.lit(_aware(since_us - s.resolve_after_us)))))
                .agg(F.min("opened_at")).first())
            if row[0] is not None:
                since_us = min(since_us, utc_micros(row[0]))
        codes = sorted(s.scale2_codes)
        rows = read_table(OBSERVATIONS, since=("effective_at", _aware(since_us)))
        if codes:  # a marker counts from its time on, however long ago
            markers = read_table(OBSERVATIONS).where(
                (F.col("effective_at") < F.lit(_aware(since_us))) & (F.col("code").isin(*codes)
                                                                      | F.col("value_text").isin(*codes)))
            rows = rows.unionByName(markers)
        rows = rows.where(F.col("patient_key").isNotNull() & F.col("effective_at").isNotNull())
        rows = _resolve(rows.select(*[c for c in _CHANGE_COLUMNS if not c.startswith("_")],
                                    F.col("patient_key").alias("_person")), "_person", links)
        version = table_version(OBSERVATIONS)
        out_schema = stage_schema(self.windows_ms)
        champion = self.champion()
        settings, now_us = s, utc_micros(batch["processed_at"])

        def one_person(frame: pd.DataFrame) -> pd.DataFrame:
            person = frame["_person"].iat[0]
            frame = frame.assign(_change_type="insert", _commit_version=version)
            out = scoring.step(None, _kernel_rows(frame), settings, person=person, now_us=now_us,
                               predict=None if champion is None else _predictor(champion))
            at = out.scores["scored_at"] if len(out.scores) else np.zeros(0, "int64")
            scores = out.scores.where((at >= start_us) & (at <= end_us)) if len(at) else out.scores
            alerts = [a for a in out.alerts if max(a["last_scored_at"], a["resolved_at"] or 0) >= start_us]
            parts = list(_parts(person, scores, [], alerts, out_schema, silver_version=version, commit_ts=None))
            return pd.concat(parts, ignore_index=True) if parts else _empty(out_schema)

        stage = rows.groupBy("_person").applyInPandas(one_person, schema=out_schema).persist()
        stored = read_table(SCORES, since=("scored_at", start, end)) if table_version(SCORES) is not None else None
        parts = [stage]
        if stored is not None:  # `since` reads [start, end): the end instant itself is read apart
            stored = stored.where((F.col("scored_at") >= F.lit(start)) & (F.col("scored_at") <= F.lit(end)))
            gone = (stored.select("patient_key", "scored_at")
                    .join(stage.where(F.col("_kind") == "score").select("patient_key", "scored_at"),
                          ["patient_key", "scored_at"], "left_anti"))
            parts.append(gone.select(F.lit("withdraw").alias("_kind"), "*"))
        if have_alerts:
            found = stage.where(F.col("_kind") == "alert").select("alert_id")
            lost = (read_table(ALERTS).where(
                ~F.col("status").isin(scoring.WITHDRAWN, deterioration_alerts.MERGED)
                & ((F.col("status") == scoring.OPEN) | (F.coalesce("resolved_at", "last_scored_at") >= F.lit(start))
                   | (F.col("last_scored_at") >= F.lit(start))))
                .join(found, "alert_id", "left_anti"))
            parts.append(lost.select(F.lit("alert").alias("_kind"), *[c for c in _ALERT_FIELDS if c != "status"],
                                     F.lit(scoring.WITHDRAWN).alias("status"),
                                     F.lit(version).cast("long").alias("_silver_version")))
        united = parts[0]
        for more in parts[1:]:
            united = united.unionByName(more, allowMissingColumns=True)
        return early_warning_scores(united, ingest_batch_id=batch["ingest_batch_id"],
                                    processed_at=batch["processed_at"], windows_ms=self.windows_ms,
                                    batch_facts={"encounter_links": encounters, "open_of_merged": None})


def plan(stream: DataFrame, folder: str, *, settings: scoring.Settings, windows_ms: Sequence[int],
         idle_ms: int = 0) -> DataFrame:
    """The stateful stage over silver.observations' change feed: one output row per score, withdrawn point and
    changed alert of the people each batch touches. A person without changes for `idle_ms` of processing time
    (0: never) is put to sleep when a later batch runs (`_sleep`)."""
    resolve_links = F.pandas_udf(lambda keys: _resolve_series(keys, folder), StringType())
    wanted = (F.col("_change_type").isin("insert", "update_preimage", "update_postimage", "delete")
              & F.col("patient_key").isNotNull() & F.col("effective_at").isNotNull())
    changes = stream.where(wanted).select(*_CHANGE_COLUMNS).withColumn("_person", resolve_links(F.col("patient_key")))
    out_schema = stage_schema(windows_ms)

    def run(key: tuple, frames: Iterator[pd.DataFrame], state) -> Iterator[pd.DataFrame]:
        if state.hasTimedOut:
            _sleep(state)
            return
        yield from _score_person(key[0], frames, state, folder, settings, out_schema)
        if idle_ms:
            state.setTimeoutDuration(idle_ms)

    from pyspark.sql.streaming.state import GroupStateTimeout

    return changes.groupBy("_person").applyInPandasWithState(
        run, outputStructType=out_schema, stateStructType=STATE_SCHEMA, outputMode="append",
        timeoutConf=GroupStateTimeout.ProcessingTimeTimeout)


def _sleep(group_state) -> None:
    """A person idle for gold.state_idle (discharged, most often): keep only what outlives `history`, unless an
    alert episode of theirs is still running (it must see their next points) or a rebuild is owed."""
    state = scoring.PersonState.loads(group_state.get[0]) if group_state.exists else None
    if state is not None and not state.sleeping and state.can_sleep():
        group_state.update((state.asleep().dumps(),))


def _resolve_series(keys: pd.Series, folder: str) -> pd.Series:
    links = _batch_context(folder)["links"]
    return keys.map(lambda k: links.get(k, k)) if links else keys


def _us(times: pd.Series) -> np.ndarray:
    """Timestamps as microseconds since the epoch."""
    return pd.to_datetime(times, utc=True).dt.as_unit("us").astype("int64").to_numpy()


def _kernel_rows(changes: pd.DataFrame) -> pd.DataFrame:
    """Change-feed rows in change order as gold.scoring rows (`gone` for a deletion or a correction's old state)."""
    changes = changes.sort_values("_commit_version", kind="stable")
    return pd.DataFrame({
        "observation_id": changes["observation_id"].to_numpy(object),
        "concept": changes["concept"].to_numpy(object), "code": changes["code"].to_numpy(object),
        "value": pd.to_numeric(changes["value"], errors="coerce").to_numpy("float64"),
        "value_text": changes["value_text"].to_numpy(object), "status": changes["status"].to_numpy(object),
        "t": _us(changes["effective_at"]), "encounter_key": changes["encounter_key"].to_numpy(object),
        "gone": changes["_change_type"].isin(["update_preimage", "delete"]).to_numpy(bool),
    })


def _silver_rows(doc: Mapping[str, Any], version: int, identities: Sequence[str], since_us: int,
                 codes: Sequence[str]) -> pd.DataFrame:
    """One person's usable silver rows from `since_us` on (and every scale-2 marker row), at `version`."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipelines.store.deltars import read_where

    since = pa.scalar(since_us, type=pa.timestamp("us", tz="UTC"))
    wanted = pc.field("effective_at") >= since
    if codes:
        wanted = wanted | pc.field("code").isin(list(codes)) | pc.field("value_text").isin(list(codes))
    # Markers count from any time: only without scale-2 codes can the files before `since` be skipped.
    rows = read_where(doc["silver_path"], version, pc.field("patient_key").isin(list(identities)) & wanted,
                      [c for c in _CHANGE_COLUMNS if not c.startswith("_")],
                      since=None if codes else ("effective_at", _aware(since_us))).to_pandas()
    rows["_change_type"], rows["_commit_version"] = "insert", version
    return _kernel_rows(rows)


def _score_person(person: str, frames: Iterator[pd.DataFrame], group_state, folder: str,
                  settings: scoring.Settings, out_schema: StructType) -> Iterator[pd.DataFrame]:
    doc = _batch_context(folder)
    changes = pd.concat(list(frames), ignore_index=True)
    links = doc["links"]
    identities = sorted({person, *(k for k, v in links.items() if v == person)})
    version = int(changes["_commit_version"].max())
    commit_ts = changes["_commit_timestamp"].min()
    rows = _kernel_rows(changes)
    now_us = int(doc["now_us"])
    champion = _champion(doc)
    predict = None if champion is None else _predictor(champion)
    had = group_state.exists
    state = scoring.PersonState.loads(group_state.get[0]) if had else None
    known = tuple(state.identities) if state is not None else (person,)
    if (had and state is None) or _relinked_with_rows(doc, set(known) ^ set(identities)) or \
            (state is not None and not state.wakes_exactly(rows, settings)):
        # Written by another carelake version, an identity linked or unlinked, or a sleeping person's change that
        # their past can see: rebuild from silver (a person who absorbs another identity gets its history; their
        # alert episodes run over all of its points).
        start = int(rows["t"].min())
        out = _rebuild(start, doc, version, identities, settings, person, now_us, predict)
    else:
        out = scoring.step(state, rows, settings, person=person, now_us=now_us, predict=predict)
        if out.rebuild or out.recompute is not None:
            # A change older than the state's tail: the person's points from it on, and their alerts, from silver.
            start = out.recompute[0] if out.recompute is not None else int(rows["t"].min())
            out = _rebuild(start, doc, version, identities, settings, person, now_us, predict)
    out.state.identities = tuple(identities)
    group_state.update((out.state.dumps(),))
    yield from _parts(person, out.scores, out.withdrawn, out.alerts, out_schema,
                      silver_version=int(doc["silver_version"]), commit_ts=commit_ts)


_LINKED_WITH_ROWS: dict[str, tuple[int, frozenset[str]]] = {}  # per executor process: silver path -> (version, keys)


def _relinked_with_rows(doc: Mapping[str, Any], changed: set[str]) -> bool:
    """Whether identities linked to or unlinked from a person since their state was built (`changed`) can change
    their points: an identity that is linked to someone now and has no row in silver cannot (a FHIR Patient
    resource that only names an MRN: every imported or admitted patient). An identity no longer linked is not
    checked (it counts). Which linked identities have rows is read once per batch and executor process: the
    patient_key column of silver at the batch's version; reading the person's rows from silver each time cost a
    whole-table read per newly admitted patient."""
    if not changed:
        return False
    links = doc["links"]
    path, version = doc["silver_path"], int(doc["silver_version"])
    if version < 0 or any(k not in links for k in changed):
        return True
    cached = _LINKED_WITH_ROWS.get(path)
    if cached is None or cached[0] != version:
        import pyarrow.compute as pc

        from pipelines.store.deltars import read_where

        keys = read_where(path, version, pc.field("patient_key").isin(list(links)), ["patient_key"])
        cached = (version, frozenset(pc.unique(keys["patient_key"]).to_pylist()))
        _LINKED_WITH_ROWS.clear()
        _LINKED_WITH_ROWS[path] = cached
    return not changed.isdisjoint(cached[1])


def _rebuild(start: int, doc: Mapping[str, Any], version: int, identities: Sequence[str],
             settings: scoring.Settings, person: str, now_us: int, predict) -> scoring.Step:
    """A fresh state from the person's silver rows at `version` (which hold this batch's changes), and what changes
    from `start` on against what the tables hold: points rescored or withdrawn, alerts recomputed or withdrawn.

    The rows are read from `history` before `start`, and further back to the opening of any stored alert episode
    still running then, so an episode is always recomputed from its opening (its id is its opening time)."""
    stored_alerts = _person_rows(doc.get("alerts_path"), doc.get("alerts_version"), person)
    since = start - settings.history_us
    if len(stored_alerts):
        live = stored_alerts[stored_alerts["status"] != scoring.WITHDRAWN]
        opened, resolved = _us(live["opened_at"]), live["resolved_at"]
        ended = np.where(resolved.isna(), np.iinfo("int64").max,
                         _us(resolved.fillna(pd.Timestamp(0, tz="UTC"))) + settings.resolve_after_us)
        running = (opened < since) & (ended >= since)
        if running.any():
            since = int(opened[running].min())
    fresh = scoring.step(None, _silver_rows(doc, version, identities, since, sorted(settings.scale2_codes)), settings,
                         person=person, now_us=now_us, predict=predict)
    scores = fresh.scores.where(fresh.scores["scored_at"] >= start) if len(fresh.scores) else fresh.scores
    again = set(scores["scored_at"].tolist()) if len(scores) else set()
    stored_points = _person_rows(doc.get("scores_path"), doc.get("scores_version"), person, since_us=start)
    withdrawn = sorted(int(t) for t in _us(stored_points["scored_at"]) if int(t) not in again) \
        if len(stored_points) else []
    alerts = [a for a in fresh.alerts if max(a["last_scored_at"], a["resolved_at"] or 0) >= start]
    found = {a["alert_id"] for a in fresh.alerts}
    if len(stored_alerts):
        live = stored_alerts[stored_alerts["status"] != scoring.WITHDRAWN]
        last = _us(live["last_scored_at"].fillna(live["opened_at"]))
        for row, at in zip(live.to_dict("records"), last, strict=True):
            if row["alert_id"] not in found and (row["status"] == scoring.OPEN or at >= start):
                alerts.append({**{k: row[k] for k in _ALERT_FIELDS}, "status": scoring.WITHDRAWN})
    return scoring.Step(fresh.state, scores, withdrawn, alerts)


# The columns of an alert row the stage sends (the rest is provenance the transform adds).
_ALERT_FIELDS = ("alert_id", "patient_key", "encounter_key", "level", "status", "opened_at", "resolved_at",
                 "escalated_at", "escalated_to", "news2_score", "news2_band", "qsofa_score", "model_risk",
                 "model_version", "observation_ids", "peak_news2_score", "last_scored_at")


def _person_rows(path: str | None, version: int | None, person: str, since_us: int | None = None) -> pd.DataFrame:
    """One person's rows of a gold table at `version` (scored_at from `since_us` on), or none when it has none."""
    if path is None or version is None:
        return pd.DataFrame()
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipelines.store.deltars import read_where

    wanted = pc.field("patient_key") == person
    if since_us is None:
        return read_where(path, version, wanted).to_pandas()
    wanted = wanted & (pc.field("scored_at") >= pa.scalar(since_us, type=pa.timestamp("us", tz="UTC")))
    return read_where(path, version, wanted, since=("scored_at", _aware(since_us))).to_pandas()


def _aware(us: int) -> datetime:
    return datetime.fromtimestamp(us // 1_000_000, tz=UTC).replace(microsecond=us % 1_000_000)


def _predictor(champion):
    names = list(champion.feature_names)
    version, threshold = str(champion.version), float(champion.threshold)

    def predict(features: pd.DataFrame):
        missing = [n for n in names if n not in features.columns]
        if missing:  # the registered model was trained on other windows or concepts than this job computes
            raise ValueError(f"model {version} needs features {missing[:5]} that gold.vitals_features does not "
                             "compute with the configured gold.feature_windows; retrain with `carelake train "
                             "deterioration` or change the windows back")
        risk = np.asarray(champion.predict(features[names]), dtype="float64") if len(features) else np.zeros(0)
        return risk, risk >= threshold, version

    return predict


def _times(values) -> pd.Series:
    """Times given as microseconds (the kernel's) or as timestamps (rows read from a table), as UTC timestamps."""
    def one(v):
        if v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NaT:
            return pd.NaT
        if isinstance(v, int | float | np.integer | np.floating):  # a column with gaps makes pandas floats of them
            return pd.Timestamp(int(v), unit="us", tz="UTC")
        return pd.Timestamp(v).tz_convert("UTC") if pd.Timestamp(v).tzinfo else pd.Timestamp(v, tz="UTC")

    return pd.Series([one(v) for v in values], dtype="datetime64[us, UTC]")


def _empty(schema: StructType) -> pd.DataFrame:
    return _conform({}, 0, schema)


def _parts(person: str, scores: scoring.Table, withdrawn: list[int], alerts: list[dict], schema: StructType, *,
           silver_version: int, commit_ts) -> Iterator[pd.DataFrame]:
    """The stage's output frames for one person: score rows, withdrawn points, alert rows."""
    extra = {"_silver_version": silver_version, "_commit_timestamp": commit_ts}
    if len(scores):
        n = len(scores)
        yield _conform({**scores.cols, "_kind": "score", "patient_key": person, **extra}, n, schema)
    if withdrawn:
        yield _conform({"_kind": "withdraw", "patient_key": person, "scored_at": np.array(withdrawn, "int64"),
                        **extra}, len(withdrawn), schema)
    if alerts:
        columns = {name: scoring.objects([a.get(name) for a in alerts]) for name in _ALERT_FIELDS}
        yield _conform({**columns, "_kind": "alert", **extra}, len(alerts), schema)


def _conform(columns: Mapping[str, Any], n: int, schema: StructType) -> pd.DataFrame:
    """`n` rows in exactly the schema's columns and order, from arrays (a scalar is repeated). Arrow takes NaN in a
    float array as null for an integer or boolean column, so numbers stay the kernel's NumPy arrays; times become
    UTC timestamps; a column the rows do not have is null."""
    out = {}
    for f in schema.fields:
        value = columns.get(f.name)
        kind = type(f.dataType)
        if value is None:
            value = np.full(n, np.nan) if kind in (IntegerType, LongType, DoubleType) else np.full(n, None, object)
        elif np.isscalar(value) or isinstance(value, pd.Timestamp):
            value = np.full(n, value, dtype=object if isinstance(value, str) else None)
        dtype_kind = np.asarray(value).dtype.kind
        if kind is TimestampType:
            value = (_times(value) if dtype_kind == "O" else pd.to_datetime(np.asarray(value), unit="us", utc=True)
                     if dtype_kind in "iu" else pd.to_datetime(value, utc=True))
        elif kind is BooleanType and dtype_kind != "b":
            value = pd.array([None if pd.isna(v) else bool(v) for v in value], dtype="boolean")
        out[f.name] = value
    return pd.DataFrame(out, copy=False)


# -- the transform: the stage's rows as the job's tables ----------------------------------------------------------
def early_warning_scores(stage: DataFrame, *, ingest_batch_id: str, processed_at: datetime, windows_ms: Sequence[int],
                         batch_facts: Mapping[str, Any]) -> DataFrame:
    """One routed DataFrame (`_output` = gold.early_warning_scores, gold.vitals_features or
    gold.deterioration_alerts) from the stage's rows: provenance added, encounters resolved, withdrawals sent to
    both point tables, alerts of identities merged into another person marked `merged`."""
    encounter_links, open_of_merged = batch_facts["encounter_links"], batch_facts["open_of_merged"]
    routed = _routed_schema(windows_ms)
    stamp = [F.lit(CODE_VERSION).alias("code_version"), F.lit(ingest_batch_id).alias("computed_by"),
             F.lit(processed_at).cast("timestamp").alias("computed_at")]
    stage = _resolve(stage, "encounter_key", encounter_links)
    points = stage.where(F.col("_kind") == "score").select(
        "*", F.col("_silver_version").alias("silver_version"), *stamp,
        F.explode(F.array(F.lit(SCORES), F.lit(FEATURES))).alias(OUTPUT))
    gone = stage.where(F.col("_kind") == "withdraw").select(  # no silver_version: a WITHDRAWAL
        "patient_key", "scored_at", *stamp, F.explode(F.array(F.lit(SCORES), F.lit(FEATURES))).alias(OUTPUT))
    alerts = stage.where(F.col("_kind") == "alert").select(
        "*", F.col("_silver_version").alias("scores_version"), *stamp, F.lit(ALERTS).alias(OUTPUT))
    parts = [_as_routed(p, routed) for p in (points, gone, alerts)]
    if open_of_merged is not None:
        kept = [F.lit(deterioration_alerts.MERGED).alias("status") if f.name == "status" else F.col(f.name)
                for f in deterioration_alerts.SCHEMA.fields if f.name not in ("code_version", "computed_by",
                                                                                "computed_at")]
        parts.append(_as_routed(open_of_merged.select(*kept, *stamp, F.lit(ALERTS).alias(OUTPUT)), routed))
    out = parts[0]
    for more in parts[1:]:
        out = out.unionByName(more)
    return out


def _resolve(df: DataFrame, column: str, links: Mapping[str, str]) -> DataFrame:
    """Replace identity keys in `column` by the key they continue as."""
    if not links:
        return df
    mapping = "map(" + ", ".join(f"{sql.string(k)}, {sql.string(v)}" for k, v in links.items()) + ")"
    c = sql.name(column)
    return df.withColumn(column, F.expr(f"coalesce({mapping}[{c}], {c})"))


def _as_routed(df: DataFrame, routed_schema: StructType) -> DataFrame:
    """`df` in the routed schema: its own columns cast to their declared types, the other tables' columns null."""
    have = set(df.columns)
    return df.selectExpr(*[f"CAST({sql.name(f.name) if f.name in have else 'NULL'} AS {sql.type_text(f.dataType)}) "
                           f"AS {sql.name(f.name)}" for f in routed_schema.fields])


def utc_micros(at: datetime) -> int:
    """An aware time as microseconds since the epoch."""
    return int(at.astimezone(UTC).timestamp()) * 1_000_000 + at.microsecond
