"""Executors write the data files; the driver commits only the file actions (delta-rs).

A Spark DataFrame written to a delta-rs table never passes through the driver. Each task writes its rows as
Parquet files straight into the table's folder (`mapInArrow`) and returns one small row per file: its path,
size and the Delta statistics readers skip files by. The driver turns those rows into add (and remove) actions
and commits them in one Delta transaction through delta-rs (`create_write_transaction`,
`create_table_with_add_actions`), with the write's app transaction, so a replayed batch is still skipped.

MERGE is copy-on-write computed by Spark:
1. the target files the batch can touch: all of them, or only those whose statistics overlap the batch's range
   of each `MergeSpec.prune_by` column;
2. the source joined with those files' rows on the keys (a left join from the source: its size is the batch's),
   each pair given its clause (delete, update, insert, nothing);
3. the files holding an updated or deleted row are rewritten by the executors (their other rows copied, row
   identity = file name + row index), inserted rows go to new files;
4. one commit: remove the rewritten files, add the new ones. A batch that only inserts rewrites nothing.

delta-rs's Python API commits no `cdc` actions, so a copy-on-write commit on its own would show every copied
row as deleted and inserted again in the change feed. The executors therefore also write the commit's exact
changes (insert, update_preimage, update_postimage, delete) as Parquet under `_change_data/`, in the same
pass, and the commit names those files in its metadata (`carelake.change_files`). carelake's change-feed
reader (`load_changes`) reads a marked version from them and any other version through delta-rs, so
downstream jobs see the same pre- and post-images a delta-rs MERGE gives. Other Delta readers see the file
actions' coarser (but equivalent) feed: the copied rows as a delete and an insert of the same values.

Files a task wrote for a commit that never happened (a crash, a conflict) are not in the log: readers never
see them, and vacuum (full mode) removes them once they are older than the layer's retention.

A protocol caveat: these tables have `delta.enableChangeDataFeed` on, and the Delta protocol expects a writer
to record an update's or a delete's changes as `cdc` actions, which delta-rs's Python API cannot commit. Readers
other than carelake's (delta-spark, DuckDB) therefore derive a copy-on-write commit's change feed from its add
and remove actions: every copied row appears deleted and inserted within the same version, with no order
between the two. Their net effect is right; a consumer that applies such rows one by one in file order may not
be. The tables' data (not their change feed) is plain Delta for every reader.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from pipelines.errors import UsageError

if TYPE_CHECKING:
    from deltalake import DeltaTable
    from pyspark.sql import Column, DataFrame

    from pipelines.store.base import MergeSpec

CHANGE_DIR = "_change_data"
# Commit metadata: the change files that hold a copy-on-write commit's exact change feed (a JSON list of paths
# relative to the table).
CHANGE_FILES_KEY = "carelake.change_files"
# Rows a task writes into one data file before it starts the next.
ROWS_PER_FILE = 1_000_000
# Delta's default: statistics for the first 32 columns (delta.dataSkippingNumIndexedCols).
STATS_COLUMNS = 32
# Delta truncates string statistics to a prefix; a longer maximum is left out (unknown), never wrong.
STRING_STATS_PREFIX = 32
CHANGE_COLUMN = "_cl_change"  # the change type of a change row; null on a data row
_FILE, _ROW = "_cl_file", "_cl_row"  # a target row's identity: data file name and row index in it
_ACTION = "_cl_action"
FILE_ROWS_SCHEMA = "kind STRING, path STRING, size BIGINT, records BIGINT, stats STRING, modified BIGINT"


@dataclass(frozen=True)
class WrittenFile:
    kind: str  # "add" (a data file) or "cdc" (a change file)
    path: str  # relative to the table folder
    size: int
    records: int
    stats: str
    modified: int  # ms since the epoch


# -- statistics --------------------------------------------------------------------------------------------------
def _stat_value(value: Any, kind: str) -> Any:
    """A min (kind="min") or max value as Delta's statistics JSON writes it; None when it cannot be bounded."""
    if isinstance(value, datetime):
        whole_ms = value.replace(microsecond=value.microsecond // 1000 * 1000)
        if kind == "max" and whole_ms != value:  # statistics keep milliseconds: round a maximum up, never down
            whole_ms += timedelta(milliseconds=1)
        if whole_ms.tzinfo is None:
            return whole_ms.isoformat(timespec="milliseconds")
        return whole_ms.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, str):
        if len(value) <= STRING_STATS_PREFIX:
            return value
        return value[:STRING_STATS_PREFIX] if kind == "min" else None  # a prefix is below the value, not above
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value


def _bounded(t: pa.DataType) -> bool:
    """Types Delta keeps min/max statistics for."""
    return (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_string(t)
            or pa.types.is_large_string(t) or pa.types.is_date(t) or pa.types.is_timestamp(t))


class _FileStats:
    """Delta statistics of one file, gathered batch by batch: numRecords, minValues, maxValues, nullCount."""

    def __init__(self, schema: pa.Schema):
        self.columns = [f for f in schema if not pa.types.is_nested(f.type)][:STATS_COLUMNS]
        self.records = 0
        self.nulls: dict[str, int] = {f.name: 0 for f in self.columns}
        self.low: dict[str, Any] = {}
        self.high: dict[str, Any] = {}
        self.unbounded: set[str] = set()  # a NaN was seen: no range is right

    def add(self, batch: pa.RecordBatch) -> None:
        import pyarrow.compute as pc

        self.records += batch.num_rows
        for f in self.columns:
            col = batch.column(f.name)
            self.nulls[f.name] += col.null_count
            if not _bounded(f.type) or f.name in self.unbounded or col.null_count == len(col):
                continue
            if pa.types.is_floating(f.type) and pc.any(pc.is_nan(col)).as_py():
                self.unbounded.add(f.name)
                continue
            mm = pc.min_max(col)
            lo, hi = mm["min"].as_py(), mm["max"].as_py()
            if f.name not in self.low or lo < self.low[f.name]:
                self.low[f.name] = lo
            if f.name not in self.high or hi > self.high[f.name]:
                self.high[f.name] = hi

    def json(self) -> str:
        def values(found: dict[str, Any], kind: str) -> dict[str, Any]:
            out = {}
            for name, v in found.items():
                if name not in self.unbounded and (s := _stat_value(v, kind)) is not None:
                    out[name] = s
            return out

        return json.dumps({"numRecords": self.records, "minValues": values(self.low, "min"),
                           "maxValues": values(self.high, "max"), "nullCount": self.nulls})


# -- executor side -----------------------------------------------------------------------------------------------
class _Roller:
    """Parquet files of one kind written by one task, a new file every ROWS_PER_FILE rows."""

    def __init__(self, table_path: str, folder: str, prefix: str, schema: pa.Schema, rows_per_file: int):
        self.table_path, self.folder, self.prefix = table_path, folder, prefix
        self.schema, self.rows_per_file = schema, rows_per_file
        self.writer = None
        self.stats: _FileStats | None = None
        self.relative = ""

    def write(self, batch: pa.RecordBatch) -> Iterator[tuple]:
        import pyarrow.parquet as pq

        if batch.num_rows == 0:
            return
        if self.writer is None:
            self.relative = f"{self.folder}/{self.prefix}-{uuid.uuid4()}.snappy.parquet" if self.folder else \
                f"{self.prefix}-{uuid.uuid4()}-c000.snappy.parquet"
            full = os.path.join(self.table_path, self.relative)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            # Lineage of the file itself: which host and process wrote it (an executor's Python worker).
            tagged = self.schema.with_metadata({"carelake.writer": f"{socket.gethostname()}:{os.getpid()}"})
            self.writer = pq.ParquetWriter(full, tagged, compression="snappy")
            self.stats = _FileStats(self.schema)
        self.writer.write_batch(batch)
        self.stats.add(batch)
        if self.stats.records >= self.rows_per_file:
            yield self.close()

    def close(self) -> tuple | None:
        if self.writer is None:
            return None
        self.writer.close()
        full = os.path.join(self.table_path, self.relative)
        # A committed version must never name a file a power cut could lose.
        fd = os.open(full, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        folder = os.open(os.path.dirname(full), os.O_RDONLY)  # ... nor the file's name in its folder
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
        st = os.stat(full)
        row = ("add" if not self.folder else "cdc", self.relative, st.st_size, self.stats.records,
               self.stats.json(), int(st.st_mtime * 1000))
        self.writer, self.stats = None, None
        return row


def _conform_batch(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """The batch in the file schema's column order and types (Spark hands over large/view layouts, its zone)."""
    columns = []
    for f in schema:
        col = batch.column(f.name)
        columns.append(col if col.type == f.type else col.cast(f.type))
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def _file_writer(table_path: str, schema_ipc: bytes, rows_per_file: int, with_changes: bool):
    """The mapInArrow function of a write: rows in, one (kind, path, size, records, stats, modified) per file."""

    def write(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        import pyarrow.compute as pc

        schema = pa.ipc.read_schema(pa.py_buffer(schema_ipc))
        change_schema = schema.append(pa.field("_change_type", pa.string()))
        data = _Roller(table_path, "", "part", schema, rows_per_file)
        changes = _Roller(table_path, CHANGE_DIR, "cdc", change_schema, rows_per_file)
        done: list[tuple] = []
        for batch in batches:
            if not with_changes:
                done += data.write(_conform_batch(batch, schema))
                continue
            kind = batch.column(CHANGE_COLUMN)
            is_data = pc.is_null(kind)
            done += data.write(_conform_batch(batch.filter(is_data), schema))
            moved = batch.filter(pc.invert(is_data))
            if moved.num_rows:
                moved = moved.append_column("_change_type", moved.column(CHANGE_COLUMN))
                done += changes.write(_conform_batch(moved, change_schema))
        done += [row for row in (data.close(), changes.close()) if row is not None]
        if done:
            yield pa.RecordBatch.from_pylist(
                [dict(zip(("kind", "path", "size", "records", "stats", "modified"), row, strict=True))
                 for row in done],
                schema=pa.schema([("kind", pa.string()), ("path", pa.string()), ("size", pa.int64()),
                                  ("records", pa.int64()), ("stats", pa.string()), ("modified", pa.int64())]))

    return write


def write_files(df: DataFrame, table_path: str, schema: pa.Schema, *, with_changes: bool = False,
                rows_per_file: int = ROWS_PER_FILE) -> list[WrittenFile]:
    """Write `df` (already in `schema`'s columns) as Parquet files in `table_path`, on the executors.

    With `with_changes`, rows whose `_cl_change` column is set are change rows (their `_change_type`) and go to
    change files under _change_data/. Only the small per-file rows come back to the driver."""
    fn = _file_writer(table_path, schema.serialize().to_pybytes(), rows_per_file, with_changes)
    return [WrittenFile(r["kind"], r["path"], r["size"], r["records"], r["stats"], r["modified"])
            for r in df.mapInArrow(fn, FILE_ROWS_SCHEMA).collect()]


# -- driver side -------------------------------------------------------------------------------------------------
def spark_frame(df: DataFrame, schema: pa.Schema) -> DataFrame:
    """`df` with exactly `schema`'s columns, in order, cast to its types; a column df lacks is null."""
    from pyspark.sql import functions as F
    from pyspark.sql.pandas.types import from_arrow_type

    have = set(df.columns)
    return df.select(*[(F.col(f"`{f.name}`") if f.name in have else F.lit(None)).cast(from_arrow_type(f.type))
                       .alias(f.name) for f in schema])


def arrow_schema_of(df: DataFrame) -> pa.Schema:
    from pyspark.sql.pandas.types import to_arrow_schema

    from pipelines.store.schema import canonical_schema

    return canonical_schema(to_arrow_schema(df.schema))


def add_actions(files: list[WrittenFile]) -> list[Any]:
    from deltalake.transaction import AddAction

    return [AddAction(f.path, f.size, {}, f.modified, True, f.stats) for f in files if f.kind == "add"]


def remove_actions(files: Mapping[str, int]) -> list[Any]:
    """Remove actions for {path: size} (paths as the log names them)."""
    from deltalake.transaction import RemoveAction

    now = int(time.time() * 1000)
    return [RemoveAction(path, True, now, size, {}) for path, size in files.items()]


def change_file_metadata(files: list[WrittenFile]) -> dict[str, str]:
    changes = sorted(f.path for f in files if f.kind == "cdc")
    return {CHANGE_FILES_KEY: json.dumps(changes)}


@dataclass(frozen=True)
class TargetFile:
    path: str  # as the log names it (relative, URL-encoded as Delta writes it)
    uri: str  # absolute, for Spark to read
    size: int
    records: int | None


def target_files(dt: DeltaTable, table_path: str, bounds: Mapping[str, tuple[Any, Any] | None] | None
                 ) -> list[TargetFile]:
    """The table's data files, or with `bounds` ({column: (lo, hi)}) only those whose statistics overlap every
    known range (a file without statistics for a column is kept)."""
    from urllib.parse import unquote

    import pyarrow.compute as pc

    actions = pa.table(dt.get_add_actions(flatten=True))
    if actions.num_rows == 0:
        return []
    keep = pa.array([True] * actions.num_rows)
    for column, b in (bounds or {}).items():
        if b is None or f"min.{column}" not in actions.column_names:
            continue
        lo, hi = b
        low, high = actions[f"min.{column}"], actions[f"max.{column}"]
        lo_s, hi_s = bound_scalar(lo, low.type, floor_ms=True), bound_scalar(hi, low.type, floor_ms=False)
        overlap = pc.and_kleene(pc.or_kleene(pc.is_null(low), pc.less_equal(low, hi_s)),
                                pc.or_kleene(pc.is_null(high), pc.greater_equal(high, lo_s)))
        keep = pc.and_kleene(keep, overlap)
    kept = actions.filter(keep)
    base = table_path.rstrip("/")
    return [TargetFile(p, f"{base}/{unquote(p)}", s, n) for p, s, n in
            zip(kept["path"].to_pylist(), kept["size_bytes"].to_pylist(), kept["num_records"].to_pylist(), strict=True)]


def bound_scalar(value: Any, stat_type: pa.DataType, *, floor_ms: bool) -> pa.Scalar:
    """A source bound as a scalar comparable with a statistics column. Statistics keep milliseconds, truncated:
    a lower bound is compared at its millisecond."""
    if isinstance(value, datetime) and pa.types.is_timestamp(stat_type):
        at = value.replace(microsecond=value.microsecond // 1000 * 1000) if floor_ms else value
        if at.tzinfo is None:  # a timestamp without time zone: compared as the wall-clock time it is
            return pa.scalar(at, type=pa.timestamp("us")).cast(stat_type)
        return pa.scalar(at.astimezone(UTC), type=pa.timestamp("us", tz="UTC")).cast(stat_type)
    return pa.scalar(value).cast(stat_type)


def read_target(spark: Any, files: list[TargetFile], schema: pa.Schema) -> DataFrame:
    """The rows of `files` with each row's identity: the file's name (_cl_file) and its row index (_cl_row)."""
    from pyspark.sql import functions as F
    from pyspark.sql.pandas.types import from_arrow_schema

    spark_schema = from_arrow_schema(schema)
    if not files:
        from pyspark.sql.types import LongType, StringType, StructField, StructType

        return spark.createDataFrame([], StructType([*spark_schema.fields, StructField(_FILE, StringType()),
                                                     StructField(_ROW, LongType())]))
    return (spark.read.schema(spark_schema).parquet(*[f.uri for f in files])
            .select("*", F.col("_metadata.file_name").alias(_FILE), F.col("_metadata.row_index").alias(_ROW)))


def _truth(sql: str | None) -> Column:
    """A clause condition as a column: true only where it is true (SQL null counts as false, as in MERGE)."""
    from pyspark.sql import functions as F

    return F.lit(True) if sql is None else F.coalesce(F.expr(sql), F.lit(False))


@dataclass
class MergePlan:
    """What a copy-on-write merge writes and removes."""

    rows: DataFrame  # data rows (_cl_change null) and change rows, in the target schema + _cl_change
    rewritten: dict[str, int]  # {log path: size} of the target files it replaces
    metrics: dict[str, int]
    cached: list[DataFrame]  # frames to unpersist once the rows are written
    with_changes: bool  # change rows are among the rows (the commit updates or deletes)


def plan_merge(spark: Any, source: DataFrame, spec: MergeSpec, files: list[TargetFile], schema: pa.Schema,
               *, with_changes: bool) -> MergePlan:
    """The rows a copy-on-write merge of `source` (unique keys) into `files` writes, and what it replaces."""
    from pyspark.sql import functions as F

    columns = [f.name for f in schema]
    src_cols = set(source.columns)
    target = read_target(spark, files, schema)
    t = target.withColumn("_cl_t", F.lit(True)).alias("t")
    s = source.withColumn("_cl_s", F.lit(True)).alias("s")
    matched = F.col("t._cl_t").isNotNull()
    action = F.when(~matched, F.when(_truth(spec.insert_when), F.lit("insert")) if spec.insert else F.lit(None))
    if spec.delete_when is not None:
        action = action.when(_truth(spec.delete_when), F.lit("delete"))
    if spec.update is not None:
        action = action.when(_truth(spec.update_when), F.lit("update"))
    joined = (s.join(t, F.expr(spec.predicate), "left").withColumn(_ACTION, action)
              .where(F.col(_ACTION).isNotNull()).persist())

    found = joined.groupBy(_ACTION, F.col(f"t.{_FILE}").alias("file")).count().collect()
    counts = {"insert": 0, "update": 0, "delete": 0}
    touched: set[str] = set()
    for r in found:
        counts[r[_ACTION]] += r["count"]
        if r["file"] is not None:
            touched.add(r["file"])

    by_name = {os.path.basename(f.uri): f for f in files}
    gone = None  # target rows deleted because the source lacks them
    if spec.delete_not_matched_by_source:
        gone = target.join(source.select(*spec.keys), list(spec.keys), "left_anti").persist()
        for r in gone.groupBy(_FILE).count().collect():
            counts["delete"] += r["count"]
            touched.add(r[_FILE])

    def target_row(prefix: str = "t.") -> list[Column]:
        return [F.col(f"{prefix}`{c}`").alias(c) for c in columns]

    if spec.update == "all":
        updates = {c: f"s.`{c}`" for c in columns if c in src_cols}
    else:
        updates = dict(spec.update or {})
    updated = [(F.expr(updates[c]) if c in updates else F.col(f"t.`{c}`")).alias(c) for c in columns]
    inserted = [(F.col(f"s.`{c}`") if c in src_cols else F.lit(None)).alias(c) for c in columns]

    def tagged(frame: DataFrame, cols: list[Column], change: str | None) -> DataFrame:
        return frame.select(*cols, F.lit(change).cast("string").alias(CHANGE_COLUMN))

    def cast(frame: DataFrame) -> DataFrame:
        return spark_frame(frame, schema.append(pa.field(CHANGE_COLUMN, pa.string())))

    parts = [tagged(joined.where(F.col(_ACTION) == "insert"), inserted, None),
             tagged(joined.where(F.col(_ACTION) == "update"), updated, None)]
    rewritten = {by_name[name].path: by_name[name].size for name in sorted(touched)}
    if touched:
        changed_ids = joined.where(F.col(_ACTION).isin("update", "delete")).select(
            F.col(f"t.{_FILE}").alias(_FILE), F.col(f"t.{_ROW}").alias(_ROW))
        if gone is not None:
            changed_ids = changed_ids.unionByName(gone.select(_FILE, _ROW))
        copied = read_target(spark, [by_name[n] for n in sorted(touched)], schema).join(
            changed_ids, [_FILE, _ROW], "left_anti")
        parts.append(tagged(copied, [F.col(f"`{c}`") for c in columns], None))
    # An insert-only commit needs no change files: the change feed reads its add actions as inserts.
    with_changes = with_changes and bool(touched)
    if with_changes:
        parts += [tagged(joined.where(F.col(_ACTION) == "insert"), inserted, "insert"),
                  tagged(joined.where(F.col(_ACTION) == "update"), target_row(), "update_preimage"),
                  tagged(joined.where(F.col(_ACTION) == "update"), updated, "update_postimage"),
                  tagged(joined.where(F.col(_ACTION) == "delete"), target_row(), "delete")]
        if gone is not None:
            parts.append(tagged(gone, [F.col(f"`{c}`") for c in columns], "delete"))
    rows = cast(parts[0])
    for more in parts[1:]:
        rows = rows.unionByName(cast(more))
    metrics = {"num_target_files_scanned": len(files), "num_target_files_removed": len(rewritten),
               "num_target_rows_inserted": counts["insert"], "num_target_rows_updated": counts["update"],
               "num_target_rows_deleted": counts["delete"]}
    return MergePlan(rows, rewritten, metrics, [joined] if gone is None else [joined, gone], with_changes)


def plan_delete_where(spark: Any, files: list[TargetFile], schema: pa.Schema, predicate: str,
                      *, with_changes: bool) -> tuple[DataFrame | None, dict[str, int], int]:
    """The rows an overwrite by `predicate` keeps from the files holding rows it replaces (and, with changes, the
    delete rows), the files it rewrites ({path: size}) and how many rows it deletes."""
    from pyspark.sql import functions as F

    columns = [F.col(f"`{f.name}`") for f in schema]
    target = read_target(spark, files, schema)
    hit = _truth(predicate)
    found = target.where(hit).groupBy(_FILE).count().collect()
    if not found:
        return None, {}, 0
    by_name = {os.path.basename(f.uri): f for f in files}
    names = sorted(r[_FILE] for r in found)
    rows = read_target(spark, [by_name[n] for n in names], schema)
    kept = rows.where(~hit).select(*columns, F.lit(None).cast("string").alias(CHANGE_COLUMN))
    if with_changes:
        kept = kept.unionByName(rows.where(hit).select(*columns, F.lit("delete").alias(CHANGE_COLUMN)))
    return kept, {by_name[n].path: by_name[n].size for n in names}, sum(r["count"] for r in found)


# -- reading a change feed ---------------------------------------------------------------------------------------
def commit_infos(table_path: str, start: int, end: int) -> dict[int, dict[str, Any]]:
    """{version: commitInfo} of the versions start..end, read from the log's commit files."""
    out = {}
    for v in range(start, end + 1):
        with open(os.path.join(table_path, "_delta_log", f"{v:020d}.json"), encoding="utf-8") as fh:
            for line in fh:
                action = json.loads(line)
                if "commitInfo" in action:
                    out[v] = action["commitInfo"]
                    break
    return out


# -- a merge source's checks and bounds, in one Spark job ----------------------------------------------------------
@dataclass(frozen=True)
class SourceFacts:
    rows: int
    distinct_keys: int
    bounds: dict[str, tuple[Any, Any] | None]  # as base.arrow_bounds gives them


def source_facts(source: DataFrame, spec: MergeSpec) -> SourceFacts:
    """Row count, distinct keys and the prune_by ranges of a merge source (what base.arrow_bounds computes on
    Arrow), in one pass. Times come back as aware UTC (TIMESTAMP) or naive wall-clock (TIMESTAMP_NTZ)."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import DoubleType, FloatType, TimestampNTZType, TimestampType

    types = {f.name: f.dataType for f in source.schema.fields}
    aggs = [F.count(F.lit(1)).alias("n"), F.count_distinct(F.struct(*[F.col(f"`{k}`") for k in spec.keys]))
            .alias("distinct")]
    if spec.prune_if is not None:
        column, values = spec.prune_if
        if column not in types:
            raise UsageError(f"prune_if column {column!r} is not in the merge source ({list(types)})")
        aggs.append(F.min(F.when(F.col(f"`{column}`").isin(list(values)), 1).otherwise(0)).alias("qualifies"))
    for i, c in enumerate(spec.prune_by):
        if c not in types:
            raise UsageError(f"prune_by column {c!r} is not in the merge source ({list(types)})")
        col = F.col(f"`{c}`")
        if isinstance(types[c], TimestampType | TimestampNTZType):
            col = F.unix_micros(col.cast("timestamp") if isinstance(types[c], TimestampNTZType) else col)
        aggs += [F.min(col).alias(f"lo{i}"), F.max(col).alias(f"hi{i}"),
                 F.sum(F.col(f"`{c}`").isNull().cast("long")).alias(f"nulls{i}")]
        if isinstance(types[c], DoubleType | FloatType):
            aggs.append(F.sum(F.isnan(F.col(f"`{c}`")).cast("long")).alias(f"nans{i}"))
    row = source.agg(*aggs).first()
    bounds: dict[str, tuple[Any, Any] | None] = {}
    if spec.prune_if is None or row["qualifies"] == 1:
        for i, c in enumerate(spec.prune_by):
            if row["n"] == 0 or row[f"nulls{i}"] or (f"nans{i}" in row and row[f"nans{i}"]):
                bounds[c] = None
                continue
            lo, hi = row[f"lo{i}"], row[f"hi{i}"]
            if isinstance(types[c], TimestampType | TimestampNTZType):
                zone = UTC if isinstance(types[c], TimestampType) else None
                lo, hi = (datetime.fromtimestamp(0, UTC) + timedelta(microseconds=v) for v in (lo, hi))
                if zone is None:
                    lo, hi = lo.replace(tzinfo=None), hi.replace(tzinfo=None)
            bounds[c] = (lo, hi)
    return SourceFacts(int(row["n"]), int(row["distinct"]), bounds)


def latest_per_key(source: DataFrame, keys: tuple[str, ...], latest_by: tuple[str, ...]) -> DataFrame:
    """One row per key: the one with the largest latest_by values (base.keep_latest on Spark)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    order = Window.partitionBy(*[F.col(f"`{k}`") for k in keys]).orderBy(
        *[F.col(f"`{c}`").desc_nulls_last() for c in latest_by])
    return source.withColumn("_cl_rank", F.row_number().over(order)).where("_cl_rank = 1").drop("_cl_rank")


def duplicate_key_examples(source: DataFrame, keys: tuple[str, ...], limit: int = 3) -> list[dict[str, Any]]:
    from pyspark.sql import functions as F

    grouped = source.groupBy(*[F.col(f"`{k}`") for k in keys]).count().where("count > 1").limit(limit)
    return [{k: r[k] for k in keys} for r in grouped.collect()]
