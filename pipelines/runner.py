"""The streaming runner: each registered job as a Structured Streaming query with an idempotent sink.

Source: a landing folder (Spark's file source) or an upstream table's new versions. Sink: the table
store through foreachBatch, each batch committed with a Delta transaction (app id = job + query id,
version = batch id * CHUNK_STRIDE + chunk), so a batch replayed after a crash is skipped instead of written
twice. A batch of more than streaming.max_rows_per_batch rows is written in chunks, one transaction each (a landing
batch that carries fused jobs counts the bronze rows it makes).
Checkpoints live under <root>/_checkpoints/<job>; per-batch metrics go to the log and ops.metrics.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from pyspark.errors import StreamingQueryException

from pipelines.config import Config
from pipelines.errors import CarelakeError, SchemaEvolutionError, UsageError
from pipelines.jobs import ROUTE_COLUMN, Job, LandingSource, Output, Registry, TableSource
from pipelines.store import TableStore, Txn, WriteResult
from pipelines.timeutil import utcnow

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession
    from pyspark.sql.streaming import StreamingQuery

log = logging.getLogger("carelake.runner")

METRICS_TABLE = "ops.metrics"
# Beside a stateful job's checkpoint: the layout of the state it holds (StateStage.layout).
STATE_LAYOUT_FILE = "carelake-state-layout"
QUARANTINE_TABLE = "silver.quarantine"
# Spark's binaryFile source columns: one row per landing file.
LANDING_FILE_SCHEMA = "path STRING, modificationTime TIMESTAMP, length BIGINT, content BINARY"
METRICS_SCHEMA = pa.schema([
    ("job", pa.string()), ("query_id", pa.string()), ("batch_id", pa.int64()),
    ("started_at", pa.timestamp("us", tz="UTC")), ("finished_at", pa.timestamp("us", tz="UTC")),
    ("duration_ms", pa.int64()), ("rows_in", pa.int64()), ("rows_out", pa.int64()),
    ("lag_ms", pa.int64()), ("table_version", pa.int64()), ("replayed", pa.bool_()),
])


@dataclass(frozen=True)
class Trigger:
    """--available-now (process what is there, then stop) or --continuous every interval_ms."""

    available_now: bool
    interval_ms: int = 5000

    def describe(self) -> str:
        return "available-now" if self.available_now else f"continuous every {self.interval_ms} ms"


@dataclass
class JobSummary:
    job: str
    batches: int = 0
    replayed: int = 0
    rows_in: int = 0
    rows_out: int = 0
    seconds: float = 0.0
    status: str = "not started"
    detail: str = ""

    def line(self) -> str:
        extra = f", {self.replayed} replayed batch(es) skipped" if self.replayed else ""
        text = (f"{self.job}: {self.status} - {self.batches} batch(es), {self.rows_in:,} input records,"
                f" {self.rows_out:,} rows written in {self.seconds:.1f} s{extra}")
        return f"{text} ({self.detail})" if self.detail else text


@dataclass
class _Running:
    job: Job
    query: StreamingQuery
    summary: JobSummary
    started: float = field(default_factory=time.monotonic)
    # Available-now over carelake_delta sources: each source table's version when the run started (see targets).
    targets: dict[str, int] | None = None


class StopSignal:
    """SIGINT/SIGTERM -> a flag the runner checks between batches (the running batch finishes)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signal_name = ""

    def __call__(self, signum: int, _frame: Any) -> None:
        self.signal_name = signal.Signals(signum).name
        log.warning("%s received: finishing the running batch, then stopping (again to force)", self.signal_name)
        if self.event.is_set():
            raise KeyboardInterrupt
        self.event.set()

    @contextmanager
    def installed(self) -> Iterator[StopSignal]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def _check_schema(output: Output, out: DataFrame | pa.Table) -> None:
    if output.schema is None:
        return
    if isinstance(out, pa.Table):
        from pyspark.sql.pandas.types import from_arrow_schema

        fields = from_arrow_schema(out.schema).fields
    else:
        fields = out.schema.fields
    want = [(f.name, f.dataType.simpleString()) for f in output.schema.fields]
    got = [(f.name, f.dataType.simpleString()) for f in fields]
    if want != got:
        raise SchemaEvolutionError(
            f"{output.table}: the transform produced columns {got}, but the schema declares {want};"
            " fix the transform or the schema in the job's module"
        )


def _collected(output: Output, out: DataFrame | pa.Table) -> pa.Table:
    """An output of a batch written from the driver, as Arrow: a DataFrame collected, or the Arrow table a transform
    computed on the driver itself (checked against the declared schema either way)."""
    _check_schema(output, out)
    return out if isinstance(out, pa.Table) else out.toArrow()


def _check_routed(job: Job, routed: DataFrame) -> None:
    fields = {f.name: f.dataType.simpleString() for f in routed.schema.fields}
    for output in job.outputs:
        if output.schema is None:
            raise SchemaEvolutionError(f"{output.table}: a routed output needs a declared schema")
        wrong = [(f.name, f.dataType.simpleString(), fields.get(f.name)) for f in output.schema.fields
                 if fields.get(f.name) != f.dataType.simpleString()]
        if wrong:
            raise SchemaEvolutionError(f"{output.table}: the routed batch lacks or mistypes columns "
                                       f"(name, declared, produced): {wrong}")


def _split_routed(job: Job, routed: DataFrame) -> dict[str, DataFrame]:
    """Each output table's rows and columns of a routed batch (compute `routed` once: persist it first)."""
    from pyspark.sql import functions as F

    _check_routed(job, routed)
    return {o.table: routed.where(F.col(ROUTE_COLUMN) == o.table).select(*[f.name for f in o.schema.fields])
            for o in job.outputs}


def _output_frames(job: Job, outputs: dict[str, DataFrame] | DataFrame
                   ) -> tuple[dict[str, DataFrame], DataFrame | None]:
    """Each output table's DataFrame, checked against its schema; and the routed frame persisted for them (the
    caller unpersists it), if the transform routed its outputs through one."""
    if isinstance(outputs, dict):
        for output in job.outputs:
            _check_schema(output, outputs[output.table])
        return {o.table: outputs[o.table] for o in job.outputs}, None
    routed = outputs.persist()
    return _split_routed(job, routed), routed


def _dq_txn(table: str, query_id: str, version: int) -> Txn:
    """The transaction of one table's validation results in a batch (one per validated table, replays skip it)."""
    return Txn(f"dq:{table}:{query_id}:chunked", version)


def _route(job: Job, routed: DataFrame) -> dict[str, pa.Table]:
    """Compute a routed batch once, on the driver, and split it into each output table's rows and columns."""
    import pyarrow.compute as pc

    _check_routed(job, routed)
    table = routed.toArrow()
    out = {}
    for output in job.outputs:
        rows = table.filter(pc.equal(table[ROUTE_COLUMN], output.table))
        out[output.table] = rows.select([f.name for f in output.schema.fields])
    return out


# Chunk k of batch b commits with Txn version b * CHUNK_STRIDE + k: versions increase across batches and chunks,
# and a replay of batch b skips the chunks it finds committed.
CHUNK_STRIDE = 100_000
# Bronze lineage: a chunk is a contiguous range of the batch in (bronze commit, landing file, byte offset) order,
# so chunks are committed in arrival order, exactly as smaller micro-batches would have been.
ORDER_COLUMNS = ("_commit_version", "landing_file", "landing_position")
# Available-now over carelake_delta sources (Runner.targets): how often an idle query looks for its next batch.
BOUNDED_POLL_MS = 200
# Available-now: how often the runner looks whether the running query has finished or reached its targets. Each
# look is a py4j call and a read of the checkpoint's newest files; a `run all` starts a query per job, and the
# time between its last commit and the look that sees it is lost for every one of them.
DONE_POLL_S = 0.1
# A batch this large that arrived in fewer partitions than Spark has cores is spread out before chunking.
SPREAD_ROWS = 100_000


@dataclass(frozen=True)
class _ChunkResult:
    rows: int
    version: int | None
    skipped: bool = False
    side: dict[str, int] = field(default_factory=dict)


def _chunk_app(job: Job, query_id: str) -> str:
    return f"carelake:{job.name}:{query_id}:chunked"


def _chunk_version(batch_id: int, index: int, count: int) -> int:
    if count >= CHUNK_STRIDE:
        raise UsageError(f"a batch split into {count:,} chunks exceeds {CHUNK_STRIDE - 1:,}: raise "
                         "streaming.max_rows_per_batch")
    return batch_id * CHUNK_STRIDE + index


def _chunk_predicates(batch_df: DataFrame, rows: int, max_rows: int) -> list[Column | None]:
    """Filters splitting a batch into chunks of at most about `max_rows` rows: [None] when it fits in one.

    Deterministic for the same batch (a replay gets the same chunks). With bronze lineage columns each chunk is a
    contiguous range in ORDER_COLUMNS order (a landing file larger than a chunk is cut at byte offsets); without
    them rows are dealt by a hash of their `patient_key` when they have one (each patient's changes in one chunk:
    gold jobs rescore a patient from its earliest change, so spreading a patient over chunks would redo that work
    in every chunk), else by a hash of all their columns.
    """
    from pyspark.sql import functions as F

    if rows <= max_rows:
        return [None]
    order = [c for c in ORDER_COLUMNS if c in batch_df.columns]
    if "landing_position" not in order or "landing_file" not in order:
        count = -(-rows // max_rows)
        by = ["patient_key"] if "patient_key" in batch_df.columns else batch_df.columns
        bucket = F.pmod(F.xxhash64(*by), F.lit(count))
        return [bucket == k for k in range(count)]
    starts = _range_starts(batch_df, order, max_rows)
    key = F.struct(*order)
    bounds = [F.struct(*(F.lit(v).cast(batch_df.schema[c].dataType).alias(c) for c, v in zip(order, start,
                                                                                               strict=True)))
              for start in starts]
    out: list[Column | None] = []
    for k in range(len(bounds)):
        cond = key >= bounds[k] if k > 0 else None
        if k + 1 < len(bounds):
            cond = key < bounds[k + 1] if cond is None else cond & (key < bounds[k + 1])
        out.append(cond)
    return out if len(out) > 1 else [None]


def _range_starts(batch_df: DataFrame, order: list[str], max_rows: int) -> list[tuple[Any, ...]]:
    """The first key of each chunk: whole landing files packed in order, larger files cut at even byte offsets."""
    from pyspark.sql import functions as F

    groups = (batch_df.groupBy(*order[:-1]).agg(F.count(F.lit(1)).alias("n"), F.min(order[-1]).alias("lo"),
                                                 F.max(order[-1]).alias("hi")).collect())
    pieces: list[tuple[tuple[Any, ...], int]] = []  # (start key, rows)
    for g in sorted(groups, key=lambda r: tuple(r[c] for c in order[:-1])):
        prefix, n, lo, hi = tuple(g[c] for c in order[:-1]), g["n"], g["lo"], g["hi"]
        cuts = -(-n // max_rows)
        pieces += [((*prefix, lo + (hi + 1 - lo) * j // cuts), -(-n // cuts)) for j in range(cuts)]
    starts, filled = [], max_rows
    for start, n in pieces:
        if filled + n > max_rows:
            starts.append(start)
            filled = 0
        filled += n
    return starts


def _spread(batch_df: DataFrame) -> DataFrame:
    """A large batch from fewer partitions than cores (one bronze commit is one partition) spread over them all."""
    parallelism = batch_df.sparkSession.sparkContext.defaultParallelism
    if batch_df.rdd.getNumPartitions() >= parallelism:
        return batch_df
    spread = batch_df.repartition(parallelism).persist()
    spread.count()
    batch_df.unpersist()
    return spread


def check_recompute(job: Job, start: datetime, end: datetime) -> None:
    """A recompute needs a job that keeps state per key and a time range."""
    if job.state is None or not hasattr(job.state, "recompute"):
        raise UsageError(f"--recompute applies to jobs that keep state per key, e.g. gold.early_warning_scores; "
                         f"{job.name} reads its source afresh on every run: reset its checkpoint instead")
    if start >= end:
        raise UsageError(f"--recompute: --from ({start.isoformat()}) must be before --to ({end.isoformat()})")


class Runner:
    """Runs jobs from the registry on one SparkSession and one table store."""

    def __init__(self, cfg: Config, spark: SparkSession, store: TableStore, registry: Registry):
        self.cfg, self.spark, self.store, self.registry = cfg, spark, store, registry
        self._errors: dict[str, BaseException] = {}
        self._suites: dict[str, Any] = {}
        self._registered_source = False

    # -- sources -----------------------------------------------------------------------------
    def checkpoint(self, job: Job) -> str:
        # Created here, under the lakehouse's umask (pipelines.permissions): Hadoop's local filesystem creates what
        # Spark writes inside with its own default modes (0755/0644, whatever fs.permissions.umask-mask says in
        # Spark 4.0's shaded Hadoop), so this folder is what keeps the checkpoints (and, with state, PHI) closed.
        folder = self.cfg.path("_checkpoints")
        folder.mkdir(parents=True, exist_ok=True)
        here = folder / job.name
        if job.state is None:
            return str(here)
        layout = here / STATE_LAYOUT_FILE
        written = layout.read_text().strip() if layout.is_file() else None
        if (here / "commits").is_dir() and any((here / "commits").iterdir()) and written != job.state.layout:
            # Written by a carelake whose job kept no state, or a state of another shape: Spark cannot change the
            # state of a running query's checkpoint. Set it aside; the job reads its source from the start again,
            # and its MERGE on the row keys makes that idempotent.
            aside = folder / f"{job.name}.before-state-{utcnow().strftime('%Y%m%dT%H%M%S')}"
            here.rename(aside)
            log.warning("%s: its checkpoint holds %s, not this carelake's (%s); moved to %s, and the job starts "
                        "again from the first version of its source", job.name,
                        f"state layout {written}" if written else "no state layout", job.state.layout, aside.name)
            written = None
        if written is None:
            here.mkdir(parents=True, exist_ok=True)
            layout.write_text(job.state.layout + "\n")
        return str(here)

    def _source(self, job: Job, targets: dict[str, int] | None = None) -> DataFrame:
        if isinstance(job.source, LandingSource):
            streaming = self.cfg.streaming
            # A source the transform reads itself (content=False) is admitted by files: its batches cost no memory
            # here, whatever the files' sizes.
            admission = streaming.landing_admission if job.source.content \
                else ("maxFilesPerTrigger", streaming.max_mapped_files_per_trigger)
            files = [self._landing_files(feed, job.source.glob, admission) for feed in job.source.feeds]
            united = files[0]
            for more in files[1:]:
                united = united.unionByName(more)
            # Without `content` selected, Spark's binaryFile source lists the files and never reads them.
            return united if job.source.content else united.select("path", "modificationTime", "length")
        streams = [self._changes(job, table, (targets or {}).get(table)) for table in job.source.tables]
        united = streams[0]
        for more in streams[1:]:
            united = united.unionByName(more, allowMissingColumns=True)
        if job.state is not None:
            return job.state.plan(united, self._state_folder(job))
        return united

    def _landing_files(self, feed: str, glob: str, admission: tuple[str, int]) -> DataFrame:
        """One feed's landing folder as a stream of whole files (Spark's file source)."""
        folder = self.cfg.path("landing", feed)
        folder.mkdir(parents=True, exist_ok=True)
        return (self.spark.readStream.format("binaryFile").schema(LANDING_FILE_SCHEMA)
                .option("pathGlobFilter", glob)
                .option(*admission)
                .load(str(folder)))

    def _state_folder(self, job: Job) -> str:
        """Where a stateful job's stage keeps what each batch's executors read (beside the query's checkpoint)."""
        folder = self.cfg.path("_checkpoints") / f"{job.name}.context"
        folder.mkdir(parents=True, exist_ok=True)
        return str(folder)

    def _changes(self, job: Job, upstream: str, ending_version: int | None = None) -> DataFrame:
        """The change feed of one upstream table, as a stream: batches of at most about
        streaming.max_rows_per_batch change rows (at least one table version), up to `ending_version` if given."""
        if not self.store.exists(upstream):
            raise UsageError(f"{job.name} reads {upstream}, which does not exist yet; run: carelake run {upstream}")
        path = str(self.store.ref(upstream).path)
        if self.store.engine == "delta-spark":
            return (self.spark.readStream.format("delta").option("readChangeFeed", "true")
                    .option("startingVersion", 0).load(path))
        if not self._registered_source:
            from pipelines.deltasource import DeltaChangesSource

            self.spark.dataSource.register(DeltaChangesSource)
            self._registered_source = True
        from pipelines.deltasource import FORMAT

        reader = (self.spark.readStream.format(FORMAT).option("path", path)
                  .option("maxRowsPerBatch", self.cfg.streaming.max_rows_per_batch))
        if ending_version is not None:
            reader = reader.option("endingVersion", ending_version)
        return reader.load()

    def _read_table(self, name: str, since: tuple[str, datetime] | tuple[str, datetime, datetime] | None = None
                    ) -> DataFrame:
        """A table's current snapshot, for transforms that look up history (e.g. gold scoring); `since` reads
        only the rows (and files) from a time on, or of a time slice: see TableStore.read."""
        if not self.store.exists(name):
            raise UsageError(f"{name} does not exist yet; run the job that writes it first: carelake run {name}")
        return self.store.read(name, since=since)

    def _table_version(self, name: str) -> int | None:
        return self.store.version(name) if self.store.exists(name) else None

    # -- sink --------------------------------------------------------------------------------
    def _query_id(self, job: Job) -> str:
        meta = self.cfg.path("_checkpoints", job.name, "metadata")
        return json.loads(meta.read_text().splitlines()[0])["id"]

    def _lag_column(self, job: Job) -> str:
        return "modificationTime" if isinstance(job.source, LandingSource) else "_commit_timestamp"

    def _batch_handler(self, job: Job, summary: JobSummary) -> Callable[[DataFrame, int], None]:
        def handle(batch_df: DataFrame, batch_id: int) -> None:
            try:
                self._handle(job, summary, batch_df, batch_id)
            except BaseException as exc:  # keep the real error: Spark wraps it in a Java exception
                self._errors[job.name] = exc
                raise

        return handle

    def _handle(self, job: Job, summary: JobSummary, batch_df: DataFrame, batch_id: int) -> None:
        from pyspark.sql import functions as F

        started_at, t0 = utcnow(), time.monotonic()
        query_id = self._query_id(job)
        batch = {"batch_id": batch_id, "ingest_batch_id": f"{job.name}/{query_id[:8]}/{batch_id}",
                 "processed_at": started_at, "read_table": self._read_table, "table_version": self._table_version,
                 "table_path": lambda name: str(self.store.ref(name).path)}
        if job.state is not None:  # before anything runs the batch's plan: its stage reads what this writes
            batch["batch_facts"] = job.state.prepare(self._state_folder(job), batch)
        batch_df = batch_df.persist()
        try:
            landing = isinstance(job.source, LandingSource)
            stats = batch_df.agg(F.count(F.lit(1)).alias("n"), F.min(self._lag_column(job)).alias("oldest"),
                                 (F.sum("length") if landing else F.lit(0)).alias("bytes")).first()
            rows_in, oldest = int(stats["n"]), stats["oldest"]
            limits = self.cfg.storage
            small = (int(stats["bytes"] or 0) <= limits.driver_write_max_mb * 1024 * 1024 if landing
                     else rows_in <= limits.driver_write_max_rows)
            batch["landing_bytes"] = int(stats["bytes"] or 0)
            batch["via_driver"] = small and (limits.driver_write_max_rows > 0 or limits.driver_write_max_mb > 0)
            if rows_in >= SPREAD_ROWS:
                batch_df = _spread(batch_df)
            if summary.batches == 0 and self._committed_before_chunking(job, query_id, batch_id):
                chunks = [_ChunkResult(0, None, skipped=True)]  # a replay of a batch an earlier carelake wrote whole
            else:
                chunks = self._write_chunks(job, batch_df, rows_in, batch, query_id, started_at)
        finally:
            batch_df.unpersist()
        rows_out = sum(c.rows for c in chunks if not c.skipped)
        replayed = all(c.skipped for c in chunks)
        version = next((c.version for c in reversed(chunks) if c.version is not None), None)
        finished_at = utcnow()
        lag_ms = 0
        if oldest is not None:
            lag_ms = int((finished_at - oldest.replace(tzinfo=oldest.tzinfo or UTC)).total_seconds() * 1000)
        self._record_metrics(job, query_id, batch_id, started_at, finished_at, rows_in, rows_out, lag_ms, version,
                             replayed)
        summary.batches += 1
        summary.replayed += int(replayed)
        summary.rows_in += rows_in
        summary.rows_out += rows_out
        for down in job.fused:  # a fused job's part of the batch, in ops.metrics under its own name
            self._record_metrics(down, query_id, batch_id, started_at, finished_at, rows_in,
                                 sum(c.side.get(down.name, 0) for c in chunks if not c.skipped), lag_ms, None, replayed)
        tables = [*(o.table for o in job.side_outputs), *dict.fromkeys(job.fused_tables)]
        side = "".join(f", {sum(c.side.get(t, 0) for c in chunks):,} to {t}" for t in tables)
        unit = "file(s)" if isinstance(job.source, LandingSource) else "change(s)"
        parts = f" in {len(chunks)} chunks" if len(chunks) > 1 else ""
        log.info("%s batch %d: %s %s in -> %s rows %s%s%s in %.2f s, lag %.1f s, %s v%s", job.name, batch_id,
                 f"{rows_in:,}", unit, f"{rows_out:,}", "skipped (already committed)" if replayed else "written",
                 parts, side, time.monotonic() - t0, lag_ms / 1000, job.name, version if version is not None else "-")

    def _write_chunks(self, job: Job, batch_df: DataFrame, rows_in: int, batch: dict[str, Any], query_id: str,
                      at: datetime) -> list[_ChunkResult]:
        """Write a batch as one transaction per chunk; chunks a replay finds committed are not computed again."""
        if job.fused and isinstance(job.source, LandingSource):
            return self._write_carrier_chunks(job, batch_df, batch, query_id, at)
        predicates = _chunk_predicates(batch_df, rows_in, self.cfg.streaming.max_rows_per_batch)

        def write(predicate: Column | None, label: str, txn: Txn) -> _ChunkResult:
            rows = batch_df if predicate is None else batch_df.where(predicate)
            return self._write_chunk(job, rows, batch, label, txn, query_id, at)

        return self._each_chunk(job, predicates, batch, query_id, write)

    def _each_chunk(self, job: Job, predicates: list[Column | None], batch: dict[str, Any], query_id: str,
                    write: Callable[[Column | None, str, Txn], _ChunkResult]) -> list[_ChunkResult]:
        """`write` each chunk with its label and transaction, skipping the chunks a replay finds committed."""
        done = None
        if len(predicates) > 1:
            done = self.store.txn_version(job.name, _chunk_app(job, query_id)) if self.store.exists(job.name) else None
        results = []
        for index, predicate in enumerate(predicates):
            version = _chunk_version(batch["batch_id"], index, len(predicates))
            if done is not None and done >= version:
                results.append(_ChunkResult(0, None, skipped=True))
                continue
            label = batch["ingest_batch_id"] + (f"#{index + 1}of{len(predicates)}" if len(predicates) > 1 else "")
            results.append(write(predicate, label, Txn(_chunk_app(job, query_id), version)))
        return results

    def _write_carrier_chunks(self, job: Job, batch_df: DataFrame, batch: dict[str, Any], query_id: str,
                              at: datetime) -> list[_ChunkResult]:
        """A landing batch of a job that carries fused jobs, committed in chunks of at most
        streaming.max_rows_per_batch of its bronze rows (contiguous in landing file and byte order): each fused
        table gets one version per chunk, so the jobs reading those tables get bounded batches too (a backfill's
        128 MB of device lines is ~1 M silver rows, which one version would hand a score job whole). A landing
        batch has no more rows than bytes (a row is a distinct byte offset), so a batch of fewer bytes than the
        bound is never counted."""
        outputs = job.apply(batch_df, batch)
        if not isinstance(outputs, dict) or job.side_outputs:
            raise SchemaEvolutionError(f"{job.name}: a job that carries fused jobs writes its own table only")
        bound = self.cfg.streaming.max_rows_per_batch
        own = outputs[job.name].persist()
        try:
            rows = own.count() if batch["landing_bytes"] > bound else 0
            predicates = _chunk_predicates(own, rows, bound)

            def write(predicate: Column | None, label: str, txn: Txn) -> _ChunkResult:
                part = own if predicate is None else own.where(predicate)
                return self._write_carrying(job, {job.name: part}, batch, label, txn, query_id, at)

            return self._each_chunk(job, predicates, batch, query_id, write)
        finally:
            own.unpersist()

    def _write_chunk(self, job: Job, rows: DataFrame, batch: dict[str, Any], label: str, txn: Txn, query_id: str,
                     at: datetime) -> _ChunkResult:
        """Transform, validate and commit one chunk of a batch (every output with the chunk's transaction)."""
        outputs = job.apply(rows, batch)
        if job.fused:
            return self._write_carrying(job, outputs, batch, label, txn, query_id, at)
        return self._write_outputs(job, outputs, batch, label, txn, query_id, at)

    def _write_carrying(self, job: Job, outputs: dict[str, DataFrame] | DataFrame, batch: dict[str, Any], label: str,
                        txn: Txn, query_id: str, at: datetime) -> _ChunkResult:
        """A chunk of a job that carries fused jobs (streaming.fuse): each fused job's transform runs on this job's
        rows, as the inserts its change feed would have shown, and commits its tables (validated, quarantine
        included) with this chunk's transaction; this job's own table commits last, so a replay that finds it
        committed finds every fused table committed too, and one that does not redoes only what is missing."""
        from pyspark.sql import functions as F

        if not isinstance(outputs, dict) or job.side_outputs:
            raise SchemaEvolutionError(f"{job.name}: a job that carries fused jobs writes its own table only")
        own = outputs[job.name].persist()  # computed once for its own table and for each fused job
        try:
            # Through the driver, the rows are collected once: for its own write, and for a fused job that computes
            # its part on the driver (the batch parameter carried_rows).
            carried = _collected(job.outputs[-1], own) if batch.get("via_driver") else None
            side: dict[str, int] = {}
            for down in job.fused:
                changes = own.withColumn("_change_type", F.lit("insert"))
                result = self._write_outputs(down, down.apply(changes, {**batch, "carried_rows": carried}), batch,
                                             label, txn, query_id, at)
                side[down.name] = result.rows
                side.update(result.side)
            mine = self._write_outputs(job, {job.name: own if carried is None else carried}, batch, label, txn,
                                       query_id, at)
            return _ChunkResult(mine.rows, mine.version, mine.skipped, {**mine.side, **side})
        finally:
            own.unpersist()

    def _write_outputs(self, job: Job, outputs: dict[str, DataFrame] | DataFrame, batch: dict[str, Any], label: str,
                       txn: Txn, query_id: str, at: datetime) -> _ChunkResult:
        """Validate and commit a chunk's computed outputs: through the driver when it is small, else the executors."""
        meta = {"carelake.job": job.name, "carelake.batch": str(batch["batch_id"]), "carelake.query": query_id}
        if label != batch["ingest_batch_id"]:
            meta["carelake.chunk"] = label.rsplit("#", 1)[1]
        validated = bool(job.validated_outputs and self.cfg.quality.enabled)
        if batch.get("via_driver"):
            return self._write_collected(job, outputs, label, at, txn, query_id, meta, validated)
        if not validated:
            return self._write_frames(job, outputs, txn, meta)
        return self._validate_and_write(job, outputs, label, at, txn, query_id, meta)

    def _write_collected(self, job: Job, outputs: dict[str, DataFrame] | DataFrame, label: str, at: datetime,
                         txn: Txn, query_id: str, meta: dict[str, str], validated: bool) -> _ChunkResult:
        """A small batch: collected once as Arrow, validated by Great Expectations, written by delta-rs here."""
        if isinstance(outputs, dict):
            arrows = {o.table: _collected(o, outputs[o.table]) for o in job.outputs}
        else:
            arrows = _route(job, outputs)
        if validated:
            self._validate(job, arrows, label, at, query_id, txn.version, meta)
        written = {output.table: self._write(output, arrows[output.table], txn, meta) for output in job.outputs}
        result = written[job.name]
        return _ChunkResult(arrows[job.name].num_rows, result.version if result else None,
                            skipped=bool(result and result.skipped),
                            side={o.table: arrows[o.table].num_rows for o in job.side_outputs})

    def _validate_and_write(self, job: Job, outputs: dict[str, DataFrame] | DataFrame, label: str, at: datetime,
                            txn: Txn, query_id: str, meta: dict[str, str]) -> _ChunkResult:
        """The validation step, then the commit. Each suite (the job's, and a side table's own) is first judged in
        Spark (pipelines.quality_spark): a batch whose quarantine and fail expectations all pass is written by the
        executors. Otherwise (rows to quarantine, a failed batch, an expectation Spark cannot judge, in any of its
        tables) the batch is collected once, as Arrow, and Great Expectations judges it exactly, naming the rows it
        moves; it is then committed from here."""
        from pipelines import quality_spark

        frames, routed = _output_frames(job, outputs)
        held = []  # a routed batch is persisted whole; a job's own frames are persisted each for its judgement
        if routed is None:
            for output in job.validated_outputs:
                held.append(frames[output.table].persist())
                frames[output.table] = held[-1]
        try:
            judged = []
            for output in job.validated_outputs:  # the job's own table, then side tables with suites of their own
                v = quality_spark.validate_frame(frames[output.table], self._suite(output.expectation_suite),
                                                 batch=label, job=job.name, at=at)
                if v is None:
                    return self._write_collected(job, frames, label, at, txn, query_id, meta, validated=True)
                judged.append((output, v))
            for output, v in judged:
                self._record_validation(job, v, label, at, _dq_txn(output.table, query_id, txn.version), meta,
                                        output.table)
            return self._commit_frames(job, frames, txn, meta)
        finally:
            for frame in held:
                frame.unpersist()
            if routed is not None:
                routed.unpersist()

    def _write_frames(self, job: Job, outputs: dict[str, DataFrame] | DataFrame, txn: Txn,
                      meta: dict[str, str]) -> _ChunkResult:
        """Commit each output as a Spark DataFrame: the executors write its files, this process commits them."""
        frames, routed = _output_frames(job, outputs)
        try:
            return self._commit_frames(job, frames, txn, meta)
        finally:
            if routed is not None:
                routed.unpersist()

    def _commit_frames(self, job: Job, frames: dict[str, DataFrame], txn: Txn, meta: dict[str, str]) -> _ChunkResult:
        written = {output.table: self._write(output, frames[output.table], txn, meta) for output in job.outputs}
        result = written[job.name]
        return _ChunkResult(result.rows if result else 0, result.version if result else None,
                            skipped=bool(result and result.skipped),
                            side={o.table: written[o.table].rows if written[o.table] else 0 for o in job.side_outputs})

    def _committed_before_chunking(self, job: Job, query_id: str, batch_id: int) -> bool:
        """Whether an earlier carelake (one transaction per batch, version = batch id) already wrote this batch:
        only the first batch after a start can be such a replay."""
        if not self.store.exists(job.name):
            return False
        done = self.store.txn_version(job.name, f"carelake:{job.name}:{query_id}")
        return done is not None and done >= batch_id

    def _suite(self, name: str) -> Any:
        from pipelines import quality

        if name not in self._suites:
            self._suites[name] = quality.load_suite(name, self.cfg.expectations_dir)
        return self._suites[name]

    def _record_validation(self, job: Job, v: Any, batch: str, at: datetime, txn: Txn, meta: dict[str, str],
                           table: str | None = None) -> None:
        """Keep a batch's validation of one table: its results in silver.dq_results, the HTML report, the log."""
        from pipelines import quality

        table = table or job.name
        self.store.append(quality.DQ_RESULTS, v.results, txn=txn, metadata=meta)
        if self.cfg.quality.report:
            report = self.cfg.path("_reports", "dq", f"{table}.html")
            report.parent.mkdir(parents=True, exist_ok=True)
            quality.render_html(v.results, report, title=f"carelake data quality: {table}, batch {batch}")
        log.info("%s: %s", table, v.summary())
        for finding in v.warnings:
            log.warning("%s: data quality warning: %s", table, finding.line())

    def _validate(self, job: Job, arrows: dict[str, pa.Table], batch: str, at: datetime, query_id: str,
                  version: int, meta: dict[str, str]) -> None:
        """The validation step: run each suite (the job's, and a side table's own) on its table's rows, record the
        results (silver.dq_results and an HTML report), move quarantine-severity failures to silver.quarantine, stop
        on fail severity (nothing of the batch is written; it replays once the cause is fixed)."""
        results = []
        for output in job.validated_outputs:
            results.append((output, self._validate_one(job, output, arrows, batch, at)))
        for output, v in results:
            self._record_validation(job, v, batch, at, _dq_txn(output.table, query_id, version), meta,
                                    output.table)
        for _, v in results:
            v.raise_for_failures()
        for output, v in results:
            self._quarantine_failed(job, output, v, arrows, at)

    def _validate_one(self, job: Job, output: Output, arrows: dict[str, pa.Table], batch: str, at: datetime) -> Any:
        from pipelines import quality

        return quality.validate(arrows[output.table], self._suite(output.expectation_suite), batch=batch,
                                job=job.name, at=at, sample_rows=self.cfg.quality.sample_rows or None)

    def _quarantine_failed(self, job: Job, output: Output, v: Any, arrows: dict[str, pa.Table], at: datetime) -> None:
        """Move the rows a suite quarantined from their table's batch to silver.quarantine's."""
        from pipelines import quality

        if v.quarantine_rows:
            side = next((o for o in job.side_outputs if o.table == QUARANTINE_TABLE), None)
            if side is None:
                raise SchemaEvolutionError(f"{job.name}: its suite quarantines rows, but the job has no "
                                           f"{QUARANTINE_TABLE} side output to put them in")
            convert = quality.lineage_quarantine_row(job.name, at, item_column=output.quarantine_item or "source_id")
            kept, moved = quality.split_quarantined(arrows[output.table], v, to_quarantine_row=convert,
                                                    quarantine_schema=arrows[QUARANTINE_TABLE].schema)
            arrows[output.table] = kept
            arrows[QUARANTINE_TABLE] = pa.concat_tables([arrows[QUARANTINE_TABLE], moved.cast(
                arrows[QUARANTINE_TABLE].schema)])

    def _write(self, output: Output, data: pa.Table | DataFrame, txn: Txn, meta: dict[str, str]
               ) -> WriteResult | None:
        """Commit one table's part of a batch (nothing when it is empty and the table exists)."""
        if isinstance(data, pa.Table) and data.num_rows == 0 and self.store.exists(output.table):
            return None
        if output.write == "merge":
            return self.store.merge(output.table, data, output.merge, txn=txn, metadata=meta)
        return self.store.append(output.table, data, txn=txn, metadata=meta)

    def _record_metrics(self, job: Job, query_id: str, batch_id: int, started_at: datetime, finished_at: datetime,
                        rows_in: int, rows_out: int, lag_ms: int, version: int | None, replayed: bool) -> None:
        row = {"job": job.name, "query_id": query_id, "batch_id": batch_id, "started_at": started_at,
               "finished_at": finished_at,
               "duration_ms": int((finished_at - started_at).total_seconds() * 1000),
               "rows_in": rows_in, "rows_out": rows_out, "lag_ms": lag_ms, "table_version": version,
               "replayed": replayed}
        table = pa.Table.from_pylist([row], schema=METRICS_SCHEMA)
        self.store.append(METRICS_TABLE, table, txn=Txn(f"metrics:{job.name}:{query_id}", batch_id),
                          metadata={"carelake.job": job.name})

    # -- recompute ---------------------------------------------------------------------------
    def recompute(self, name: str, start: datetime, end: datetime) -> JobSummary:
        """Redo a stateful job's rows for event times in [start, end] from its upstream tables, as one batch
        (e.g. after a correction older than the scores' state keeps); the streaming query and its state are
        left alone. Its commits carry no streaming transaction: running it again computes and merges again."""
        job = self.registry.get(name)
        check_recompute(job, start, end)
        started_at, t0 = utcnow(), time.monotonic()
        label = f"{job.name}/recompute/{started_at.strftime('%Y%m%dT%H%M%S')}"
        batch = {"batch_id": 0, "ingest_batch_id": label, "processed_at": started_at,
                 "read_table": self._read_table, "table_version": self._table_version,
                 "table_path": lambda table: str(self.store.ref(table).path)}
        routed = job.state.recompute(batch, start, end)
        meta = {"carelake.job": job.name, "carelake.recompute": f"{start.isoformat()}..{end.isoformat()}"}
        result = self._write_frames(job, routed, None, meta)
        side = "".join(f", {result.side.get(o.table, 0):,} to {o.table}" for o in job.side_outputs)
        log.info("%s recomputed for %s .. %s: %s rows%s in %.1f s", job.name, start.isoformat(), end.isoformat(),
                 f"{result.rows:,}", side, time.monotonic() - t0)
        return JobSummary(job.name, status="recomputed", batches=1, rows_out=result.rows,
                          seconds=time.monotonic() - t0, detail=f"{start.isoformat()} .. {end.isoformat()}{side}")

    # -- queries -----------------------------------------------------------------------------
    def start(self, job: Job, trigger: Trigger) -> _Running:
        summary = JobSummary(job.name, status="running")
        targets = self.targets(job) if trigger.available_now else None
        writer = (self._source(job, targets).writeStream.queryName(job.name.replace(".", "_"))
                  .option("checkpointLocation", self.checkpoint(job))
                  .foreachBatch(self._batch_handler(job, summary)))
        conf = {"spark.sql.shuffle.partitions": str(job.state.partitions)} if job.state is not None else {}
        running = self._start_with(job, trigger, writer, summary, conf, bounded=targets is not None)
        running.targets = targets
        return running

    def targets(self, job: Job) -> dict[str, int] | None:
        """Available-now for a job fed by carelake_delta sources: each source table's version now, the run's target.

        Spark's available-now takes a source without native support for it (SupportsTriggerAvailableNow, which the
        Python source API lacks) to its latest offset in ONE batch, whatever the reader's bound: a backfill of a
        million rows would be one batch. So such a job runs on a processing-time trigger, each source capped at
        its target (option endingVersion) and its batches bounded by rows, and the runner stops it once every
        source's committed offset reached its target (reached())."""
        if not isinstance(job.source, TableSource) or self.store.engine == "delta-spark":
            return None
        return {table: self.store.version(table) for table in job.source.tables}

    def _start_with(self, job: Job, trigger: Trigger, writer, summary: JobSummary, conf: dict[str, str],
                    bounded: bool = False) -> _Running:
        """Start the query with `conf` set for it alone: a query plans its batches in a copy of the session taken
        when it starts, so the session's own settings are put back at once. `bounded`: available-now as a
        processing-time query up to the sources' ending versions (targets)."""
        if bounded:
            writer = writer.trigger(processingTime=f"{BOUNDED_POLL_MS} milliseconds")
        elif trigger.available_now:
            writer = writer.trigger(availableNow=True)
        else:
            from pipelines.config import parse_duration_ms

            ms = parse_duration_ms(job.interval, f"job {job.name} interval") if job.interval else trigger.interval_ms
            writer = writer.trigger(processingTime=f"{ms} milliseconds")
        log.info("%s: started (%s, source %s)", job.name, trigger.describe(), job.source.describe())
        before = {key: self.spark.conf.get(key, None) for key in conf}
        for key, value in conf.items():
            self.spark.conf.set(key, value)
        try:
            query = writer.start()
        finally:
            for key, value in before.items():
                if value is None:
                    self.spark.conf.unset(key)
                else:
                    self.spark.conf.set(key, value)
        return _Running(job, query, summary)

    def reached(self, running: _Running) -> bool:
        """Whether a bounded available-now query has committed every source up to its target (committed_to)."""
        return running.targets is not None and self.committed_to(running.job, running.targets)

    def committed_to(self, job: Job, targets: dict[str, int]) -> bool:
        """Whether `job`'s checkpoint has committed every source up to `targets`, read from the offsets of the
        newest committed batch. The offsets log lists the sources in plan order, not by table; but a source never
        passes its target (the reader caps its offsets at endingVersion), so the sum of the committed end versions
        reaches the sum of the targets only when every source has reached its own. From then on no batch can
        start, and stopping the query is clean."""
        folder = self.cfg.path("_checkpoints", job.name)
        done = [int(p.name) for p in (folder / "commits").glob("[0-9]*") if p.name.isdigit()]
        if not done:
            return False
        try:
            lines = (folder / "offsets" / str(max(done))).read_text().splitlines()[2:]
            ends = [json.loads(line)["version"] for line in lines if line.strip() not in ("", "-")]
        except (OSError, ValueError, KeyError, TypeError):  # not a checkpoint of this source: let Spark judge it
            return False
        return len(ends) == len(targets) and sum(ends) >= sum(targets.values())

    def _stop_gracefully(self, running: _Running) -> None:
        deadline = time.monotonic() + self.cfg.streaming.stop_timeout_s
        while running.query.isActive and running.query.status.get("isTriggerActive") and time.monotonic() < deadline:
            time.sleep(0.1)
        running.query.stop()

    def _finish(self, running: _Running, stopped: bool) -> JobSummary:
        s = running.summary
        s.seconds = time.monotonic() - running.started
        error = self._errors.pop(running.job.name, None)
        exc = running.query.exception()
        if stopped and (error is not None or exc is not None):
            # A signal sent to the whole process group also stops the JVM under a running batch. Nothing is
            # lost: that batch was not recorded as done and replays, idempotently, on the next start.
            log.warning("%s: Spark shut down under the running batch (%s); it replays on the next start",
                        running.job.name, str(error or exc).splitlines()[0][:200])
            s.status, s.detail = "stopped", "interrupted batch replays on restart"
            return s
        if error is not None or exc is not None:
            s.status = "failed"
            s.detail = str(error) if error is not None else str(exc).splitlines()[0]
            raise JobFailed(running.job.name, s, error)
        s.status = "stopped" if stopped else "done"
        return s

    def run(self, names: list[str], trigger: Trigger, on_summary: Callable[[JobSummary], None] | None = None,
            ) -> list[JobSummary]:
        """Run jobs: one after another in dependency order (available-now), or all at once (continuous)."""
        jobs = self.registry.runnable(names)
        if not jobs:
            raise UsageError("no jobs to run")
        stop = StopSignal()
        with stop.installed():
            if trigger.available_now:
                summaries = self._run_in_order(jobs, trigger, stop, on_summary)
            else:
                summaries = self._run_together(jobs, trigger, stop, on_summary)
        for summary in self._carried(names, summaries):
            summaries.append(summary)
            if on_summary:
                on_summary(summary)
        return summaries

    def _carried(self, names: list[str] | None, summaries: list[JobSummary]) -> list[JobSummary]:
        """A summary for each job named that runs only inside its carriers' batches (streaming.fuse): their status."""
        by_job = {s.job: s for s in summaries}
        out = []
        for job in self.registry.order(names):
            if job.carried_only:
                carriers = [j.name for j in self.registry.runnable([job.name])]
                ran = [by_job[c] for c in carriers if c in by_job]
                out.append(JobSummary(job.name, status=ran[0].status if ran else "skipped",
                                      detail=f"written in the batches of {', '.join(carriers)} (streaming.fuse)"))
        return out

    def _skip_missing_upstream(self, job: Job) -> JobSummary | None:
        """Skip a job none of whose upstream tables exist; create the missing ones of a multi-table source
        empty (from their job's schema), so the stream always has every source from its first start and
        its checkpoint stays valid when a feed starts later than the others."""
        if not isinstance(job.source, TableSource):
            return None
        missing = [t for t in job.source.tables if not self.store.exists(t)]
        if len(missing) == len(job.source.tables):
            return JobSummary(job.name, status="skipped", detail=f"{job.source.describe()} has no data yet")
        for table in missing:
            schema = self.registry.get(table).schema if table in self.registry.names() else None
            if schema is None:
                return JobSummary(job.name, status="skipped", detail=f"{table} has no data yet")
            from pyspark.sql.pandas.types import to_arrow_schema

            self.store.append(table, to_arrow_schema(schema).empty_table(),
                              metadata={"carelake.job": table, "carelake.created_by": job.name})
        return None

    def _skip_up_to_date(self, job: Job, trigger: Trigger) -> JobSummary | None:
        """Available-now with nothing new upstream since the checkpoint: not started at all. A query started and
        stopped at once leaves the Python source runner Spark launched for it to time out connecting back to a
        JVM that has forgotten it, and print a CANNOT_OPEN_SOCKET traceback a minute later."""
        targets = self.targets(job) if trigger.available_now else None
        if targets is None:
            return None
        self.checkpoint(job)  # a checkpoint of another state layout is set aside first: the job then starts over
        if not self.committed_to(job, targets):
            return None
        return JobSummary(job.name, status="done", detail="nothing new upstream")

    def _run_in_order(self, jobs: list[Job], trigger: Trigger, stop: StopSignal,
                      on_summary: Callable[[JobSummary], None] | None) -> list[JobSummary]:
        summaries = []
        for job in jobs:
            if stop.event.is_set():
                break
            summary = self._skip_missing_upstream(job) or self._skip_up_to_date(job, trigger)
            if summary is None:
                running = self.start(job, trigger)
                while running.query.isActive and not stop.event.is_set() and not self.reached(running):
                    try:
                        running.query.awaitTermination(DONE_POLL_S)
                    except StreamingQueryException:
                        break  # _finish reports the cause (the Python exception, not Spark's wrapper)
                if running.query.isActive:
                    self._stop_gracefully(running)
                summary = self._finish(running, stop.event.is_set())
            summaries.append(summary)
            if on_summary:
                on_summary(summary)
        return summaries

    def _run_together(self, jobs: list[Job], trigger: Trigger, stop: StopSignal,
                      on_summary: Callable[[JobSummary], None] | None) -> list[JobSummary]:
        pending = list(jobs)
        running: list[_Running] = []
        ended: list[JobSummary] = []
        restarts = _Restarts(self.cfg.streaming.max_restarts)
        try:
            while not stop.event.is_set():
                for job in list(pending):
                    if self._skip_missing_upstream(job) is None:
                        running.append(self.start(job, trigger))
                        pending.remove(job)
                for job in restarts.due():
                    if stop.event.is_set():  # a signal arrived meanwhile: report it as waiting, do not start it
                        restarts.put_back(job)
                        break
                    try:
                        running.append(self.start(job, trigger))
                    except Exception as exc:  # e.g. the JVM briefly out of threads: counts as another failure
                        summary = JobSummary(job.name, status="failed", detail=_first_line(exc))
                        restarts.after_failure(_Running(job, None, summary), JobFailed(job.name, summary, exc))
                for r in [r for r in running if not r.query.isActive]:
                    running.remove(r)
                    try:
                        ended.append(restarts.merged(self._finish(r, stopped=False)))
                    except JobFailed as failed:
                        restarts.after_failure(r, failed)  # raises when the job has failed too often
                stop.event.wait(0.5)
        finally:
            for r in running:
                if r.query.isActive:
                    self._stop_gracefully(r)
        summaries = ended + [restarts.merged(self._finish(r, stopped=True)) for r in running] + restarts.waiting()
        summaries += [JobSummary(j.name, status="skipped", detail=f"{j.source.describe()} never had data")
                      for j in pending]
        for s in summaries:
            if on_summary:
                on_summary(s)
        return summaries


def _first_line(value: object) -> str:
    """The first line of an error's text, or its repr when it has none (MemoryError())."""
    lines = str(value).splitlines()
    return lines[0][:300] if lines and lines[0].strip() else repr(value)[:300]


class _Restarts:
    """Continuous mode: a failed query restarts from its checkpoint after a backoff (its interrupted batch replays,
    idempotently). Transient failures happen on a loaded machine (a Python worker that does not connect back within
    Spark's 10 s, a JVM out of threads for a moment). The run stops when a job fails again after `limit` restarts
    in a row (a run of at least HEALTHY_S seconds resets the count), and at once for carelake's own errors (a data
    quality check at fail severity, a schema change, a usage error): those fail the same way every time."""

    BACKOFF_S = (5.0, 15.0, 30.0, 60.0)
    HEALTHY_S = 600.0

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count: dict[str, int] = {}
        self.pending: dict[str, tuple[float, Job]] = {}
        self.earlier: dict[str, JobSummary] = {}  # per job: the runs before the current one, added up
        self.restarted: dict[str, int] = {}

    def after_failure(self, running: _Running, failed: JobFailed) -> None:
        name = running.job.name
        if isinstance(failed.cause, CarelakeError):
            raise failed
        count = 0 if time.monotonic() - running.started >= self.HEALTHY_S else self.count.get(name, 0)
        if count >= self.limit:
            raise failed
        self.count[name] = count + 1
        self.restarted[name] = self.restarted.get(name, 0) + 1
        self._add(failed.summary)
        delay = self.BACKOFF_S[min(count, len(self.BACKOFF_S) - 1)]
        log.warning("%s failed (%s); restarting it from its checkpoint in %.0f s (restart %d of at most %d in a "
                    "row)", name, _first_line(failed.cause or failed.summary.detail), delay, count + 1, self.limit)
        self.pending[name] = (time.monotonic() + delay, running.job)

    def _add(self, summary: JobSummary) -> None:
        total = self.earlier.setdefault(summary.job, JobSummary(summary.job))
        total.batches += summary.batches
        total.replayed += summary.replayed
        total.rows_in += summary.rows_in
        total.rows_out += summary.rows_out
        total.seconds += summary.seconds
        total.detail = summary.detail

    def due(self) -> list[Job]:
        now = time.monotonic()
        ready = [name for name, (at, _) in self.pending.items() if at <= now]
        return [self.pending.pop(name)[1] for name in ready]

    def put_back(self, job: Job) -> None:
        self.pending[job.name] = (time.monotonic(), job)

    def merged(self, summary: JobSummary) -> JobSummary:
        """A job's summary with the runs before its restarts added in (it starts counting anew at each start)."""
        earlier = self.earlier.get(summary.job)
        if earlier is None:
            return summary
        out = JobSummary(summary.job, batches=summary.batches + earlier.batches,
                         replayed=summary.replayed + earlier.replayed, rows_in=summary.rows_in + earlier.rows_in,
                         rows_out=summary.rows_out + earlier.rows_out, seconds=summary.seconds + earlier.seconds,
                         status=summary.status)
        note = f"restarted {self.restarted[summary.job]} time(s), last after: {earlier.detail}"
        out.detail = f"{summary.detail}; {note}" if summary.detail else note
        return out

    def waiting(self) -> list[JobSummary]:
        """Summaries of the jobs stopped while waiting to restart."""
        out = []
        for name in self.pending:
            earlier = self.earlier[name]
            out.append(JobSummary(name, batches=earlier.batches, replayed=earlier.replayed, rows_in=earlier.rows_in,
                                  rows_out=earlier.rows_out, seconds=earlier.seconds, status="stopped",
                                  detail=f"stopped while waiting to restart after: {earlier.detail}"))
        return out


class JobFailed(CarelakeError):
    """A job's query stopped with an error; the summary says how far it got."""

    def __init__(self, job: str, summary: JobSummary, cause: BaseException | None):
        self.summary = summary
        self.cause = cause
        reason = str(cause) if cause is not None else summary.detail
        super().__init__(f"job {job} failed after {summary.batches} committed batch(es): {reason}")
