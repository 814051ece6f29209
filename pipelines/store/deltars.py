"""The embedded engine: delta-rs commits, Arrow carries the data, Spark (when given) computes.

Never import this module's deltalake objects before forking a process: delta-rs's async runtime
does not survive fork. Use the `spawn` start method for multiprocessing.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Callable, Collection, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake
from deltalake.exceptions import CommitFailedError, DeltaError, TableNotFoundError

from pipelines import __version__
from pipelines.config import Config
from pipelines.errors import CommitConflict, TableNotFound, UsageError, VersionNotFound
from pipelines.store.base import (
    CommitInfo,
    MergeSpec,
    TableStore,
    Txn,
    WriteResult,
    arrow_bounds,
    duplicate_keys,
    keep_latest,
    since_condition,
)
from pipelines.store.schema import canonical_schema, check_evolution, conform
from pipelines.timeutil import parse_timestamp

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from pipelines.store.base import Data

_STANDARD_HISTORY = {
    "timestamp", "operation", "operationParameters", "operationMetrics", "version", "readVersion",
    "clientVersion", "engineInfo", "isBlindAppend", "userMetadata",
}


def is_spark_frame(data: object) -> bool:
    """A Spark DataFrame (written by the executors), as opposed to Arrow data already on the driver."""
    return hasattr(data, "sparkSession") and hasattr(data, "mapInArrow")


def to_arrow(data: Data) -> pa.Table:
    """A pyarrow Table from a pyarrow Table or a Spark DataFrame (collected through Arrow)."""
    if isinstance(data, pa.Table):
        return _rebuild_valueless_lists(data)
    if isinstance(data, pa.RecordBatch):
        return _rebuild_valueless_lists(pa.Table.from_batches([data]))
    if hasattr(data, "toArrow"):
        return _rebuild_valueless_lists(data.toArrow())
    raise UsageError(f"cannot write a {type(data).__name__}: pass a pyarrow.Table or a Spark DataFrame")


def _rebuild_valueless_lists(table: pa.Table) -> pa.Table:
    """Spark's Arrow for a list column holding no values at all (every row null or empty) makes delta-rs' merge panic
    ("Max offset ... exceeds length of values 0"); such a column is rebuilt by pyarrow (cheap: it holds no values)."""
    for i, field in enumerate(table.schema):
        if pa.types.is_list(field.type) or pa.types.is_large_list(field.type):
            column = table.column(i)
            if len(column) and pc.list_value_length(column).fill_null(0).to_numpy().sum() == 0:
                table = table.set_column(i, field, pa.array(column.to_pylist(), field.type))
    return table


def table_arrow_schema(dt: DeltaTable) -> pa.Schema:
    return canonical_schema(pa.schema(dt.schema().to_arrow()))


def read_where(path: str, version: int, where, columns: list[str] | None = None,
               since: tuple[str, datetime] | None = None,
               keys: tuple[str, Collection[str]] | None = None) -> pa.Table:
    """The rows of a table version that match a pyarrow.compute expression, in plain Arrow types (for an executor
    that needs a few rows of one person). `since=(column, time)` skips the files whose statistics say they hold
    nothing from that time on; `keys=(column, values)` keeps only the rows whose string `column` is one of
    `values`, and skips the files whose statistics say they hold none of them, then the files whose key column
    (read alone) holds none of them. With `columns`, only those are read, and `where` may use only them (`where`
    None: every row). The files are read and filtered here: delta-rs writes view types into the Parquet schema,
    and pyarrow cannot compare those when it pushes a filter down to the files."""
    import pyarrow.parquet as pq

    if keys is not None:
        values = pa.array(sorted(keys[1]), pa.string())
        wanted = pc.field(keys[0]).isin(values)
        where = wanted if where is None else where & wanted
    dt = DeltaTable(path, version=version)
    schema = whole = table_arrow_schema(dt)
    if columns:
        schema = pa.schema([schema.field(c) for c in columns])
    if dt.metadata().partition_columns or dt.protocol().reader_features:
        table = dt.to_pyarrow_table(columns=columns)  # not a layout carelake writes
    else:
        actions = pa.table(dt.get_add_actions(flatten=True))
        keep = pa.array([True] * actions.num_rows, pa.bool_())
        if since is not None:
            keep = pc.and_(keep, _since_mask(actions, *since))
        if keys is not None:
            keep = pc.and_(keep, _keys_mask(actions, *keys))
        base = path.rstrip("/")
        files = [f"{base}/{unquote(p)}" for p in actions.filter(keep)["path"].to_pylist()]
        if keys is not None:  # a file whose key column holds none of the keys is not read further
            probe = pa.schema([whole.field(keys[0])])
            files = [f for f in files
                     if pc.any(pc.is_in(pq.read_table(f, schema=probe, columns=[keys[0]])[keys[0]], values)).as_py()]
        parts = [pq.read_table(f, schema=schema, columns=columns) for f in files]
        table = pa.concat_tables(parts) if parts else schema.empty_table()
    return table if where is None else table.filter(where)


def _keys_mask(actions: pa.Table, column: str, values: Collection[str]) -> pa.Array:
    """Per data file: whether its statistics allow a row whose `column` is one of `values` (a missing minimum or
    maximum bounds nothing: a writer leaves out a long string's maximum). A string statistic may be cut short: its
    minimum is then a prefix of the true minimum (still no greater), and a value is compared with its maximum only
    as far as the maximum goes."""
    low, high = f"min.{column}", f"max.{column}"
    if not values:
        return pa.array([False] * actions.num_rows, pa.bool_())
    none = [None] * actions.num_rows
    lows = actions[low].to_pylist() if low in actions.column_names else none
    highs = actions[high].to_pylist() if high in actions.column_names else none  # a writer may leave a long one out
    keep = [any((lo is None or lo <= v) and (hi is None or v[:len(hi)] <= hi) for v in values)
            for lo, hi in zip(lows, highs, strict=True)]
    return pa.array(keep, pa.bool_())


def _is_conflict(exc: Exception) -> bool:
    if isinstance(exc, CommitFailedError):
        return True
    text = str(exc).lower()
    return isinstance(exc, DeltaError) and ("already exists" in text or "conflict" in text or "concurrent" in text)


def _files_since(dt: DeltaTable, table_path: str, column: str, at: datetime,
                 until: datetime | None = None) -> list[str]:
    """The data files of `dt` that may hold rows with at <= `column` (< until)."""
    actions = pa.table(dt.get_add_actions(flatten=True))
    base = table_path.rstrip("/")
    return [f"{base}/{unquote(p)}" for p in actions.filter(_since_mask(actions, column, at, until))["path"].to_pylist()]


def _since_mask(actions: pa.Table, column: str, at: datetime, until: datetime | None = None) -> pa.Array:
    """Per data file: whether it may hold rows with at <= `column` (< until): a file whose statistics say its
    newest value is older than at (or its oldest is until or later) is not; a file without statistics for the
    column may."""
    newest, oldest = f"max.{column}", f"min.{column}"
    if newest not in actions.column_names:
        return pa.array([True] * actions.num_rows, pa.bool_())
    top = actions[newest]
    if not pa.types.is_timestamp(top.type):
        raise UsageError(f"read since {column}: the column is {top.type}, not a timestamp")

    from pipelines.store.executors import bound_scalar

    # A naive time is local time, as Spark gives it back: made aware first (astimezone reads a naive one as local).
    at, until = at.astimezone(UTC), until.astimezone(UTC) if until is not None else None
    # Delta's statistics keep timestamps to the millisecond, truncated: compare with the millisecond of `at`.
    keep = pc.or_kleene(pc.is_null(top), pc.greater_equal(top, bound_scalar(at, top.type, floor_ms=True)))
    if until is not None and oldest in actions.column_names:
        bottom = actions[oldest]
        keep = pc.and_kleene(keep, pc.or_kleene(pc.is_null(bottom),
                                                pc.less(bottom, bound_scalar(until, top.type, floor_ms=False))))
    return pc.fill_null(keep, True)


def _commit_properties(txn: Txn | None, metadata: Mapping[str, str] | None, retries: int) -> CommitProperties:
    meta = {"carelake.version": __version__, **(metadata or {})}
    return CommitProperties(
        custom_metadata=meta,
        max_commit_retries=retries,
        app_transactions=[Transaction(txn.app_id, txn.version, int(time.time() * 1000))] if txn else None,
    )


def load_changes(path: str, start_version: int, end_version: int) -> pa.Table:
    """Delta change-feed rows of versions start..end from the table at `path` (used by workers too).

    A version committed by an executor-written MERGE or predicate overwrite (pipelines.store.executors) is read
    from the change files its commit names; every other version through delta-rs's change feed."""
    import pyarrow.parquet as pq

    from pipelines.store import executors as ex

    dt = DeltaTable(path)
    infos = ex.commit_infos(path, start_version, end_version)
    pieces: list[pa.Table] = []
    run_start = start_version
    for v in range(start_version, end_version + 2):
        files = json.loads(infos[v].get(ex.CHANGE_FILES_KEY, "null") or "null") if v <= end_version else None
        if v <= end_version and files is None:
            continue
        if run_start < v:
            pieces.append(pa.table(dt.load_cdf(starting_version=run_start, ending_version=v - 1)))
        run_start = v + 1
        if files is not None:
            at = pa.scalar(infos[v]["timestamp"], pa.timestamp("ms"))
            for f in files:
                rows = pq.read_table(os.path.join(path, f))
                rows = rows.append_column("_commit_version", pa.array([v] * rows.num_rows, pa.int64()))
                pieces.append(rows.append_column("_commit_timestamp", pa.array([at] * rows.num_rows,
                                                                                 pa.timestamp("ms"))))
    if not pieces:  # every version was a copy-on-write commit that changed nothing
        schema = canonical_schema(pa.schema(dt.schema().to_arrow()))
        return schema.append(pa.field("_change_type", pa.string())).append(
            pa.field("_commit_version", pa.int64())).append(pa.field("_commit_timestamp", pa.timestamp("ms"))
                                                            ).empty_table()
    return _concat_changes(pieces)


def change_rows(path: str, version: int) -> int:
    """About how many change-feed rows `load_changes` reads for one version, from its commit file alone (no data
    read): the rows of its change files (carelake's or Delta's cdc files, from their Parquet footers), else the
    `numRecords` statistics of the files it adds. For admission control: an estimate, never a correctness input.
    A commit file the log no longer holds counts 0 rows."""
    import pyarrow.parquet as pq

    from pipelines.store import executors as ex

    try:
        with open(os.path.join(path, "_delta_log", f"{version:020d}.json"), encoding="utf-8") as fh:
            actions = [json.loads(line) for line in fh if line.strip()]
    except FileNotFoundError:
        return 0

    def footer(relative: str) -> int:
        return pq.ParquetFile(os.path.join(path, unquote(relative))).metadata.num_rows

    info = next((a["commitInfo"] for a in actions if "commitInfo" in a), {})
    listed = json.loads(info.get(ex.CHANGE_FILES_KEY, "null") or "null")
    if listed is not None:
        return sum(footer(f) for f in listed)
    cdc = [a["cdc"]["path"] for a in actions if "cdc" in a]
    if cdc:
        return sum(footer(f) for f in cdc)
    rows = 0
    for add in (a["add"] for a in actions if "add" in a and a["add"].get("dataChange", True)):
        stats = json.loads(add.get("stats") or "{}")
        rows += int(stats["numRecords"]) if "numRecords" in stats else footer(add["path"])
    return rows


def _concat_changes(pieces: list[pa.Table]) -> pa.Table:
    """Change rows from delta-rs and from change files as one table (plain layouts; a column missing from older
    versions is null)."""
    fields: dict[str, pa.Field] = {}
    for piece in pieces:
        for f in canonical_schema(piece.schema):
            if f.name == "_commit_version":
                f = pa.field(f.name, pa.int64())
            fields.setdefault(f.name, f)
    order = [n for n in fields if not n.startswith("_c")] + [n for n in fields if n.startswith("_c")]
    schema = pa.schema([fields[n].with_nullable(True) for n in order])
    return pa.concat_tables([
        pa.table([piece[f.name].cast(f.type) if f.name in piece.column_names else pa.nulls(piece.num_rows, f.type)
                  for f in schema], schema=schema) for piece in pieces])


class DeltaRsStore(TableStore):
    """TableStore on delta-rs: no JVM jars needed; safe for concurrent writers on one filesystem."""

    engine = "delta-rs"

    def __init__(self, cfg: Config, spark: SparkSession | None = None):
        super().__init__(cfg)
        self._spark = spark
        # Latest snapshot per table, refreshed incrementally (only new commits are read) before each write.
        self._latest: dict[str, DeltaTable] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def _lock(self, name: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(name, threading.Lock())

    def _current(self, name: str) -> DeltaTable | None:
        """The table's latest snapshot (cached, caught up with new commits), or None if it does not exist."""
        dt = self._latest.get(name)
        if dt is not None:
            dt.update_incremental()
            return dt
        if not self.exists(name):
            return None
        dt = self._latest[name] = self._open(name)
        return dt

    # -- opening -----------------------------------------------------------------------------
    def _path(self, name: str) -> str:
        return str(self.ref(name).path)

    def exists(self, name: str) -> bool:
        return (self.ref(name).path / "_delta_log").is_dir() and DeltaTable.is_deltatable(self._path(name))

    def _open(self, name: str, version: int | None = None, timestamp: datetime | str | None = None) -> DeltaTable:
        if not self.exists(name):
            raise TableNotFound(
                f"table {name} does not exist yet (no Delta log at {self.ref(name).path}); "
                f"run the job that writes it: carelake run {name}"
            )
        try:
            dt = DeltaTable(self._path(name))
        except TableNotFoundError as exc:
            raise TableNotFound(f"table {name} is not a readable Delta table: {exc}") from exc
        if version is not None:
            self._travel_to_version(name, dt, version)
        elif timestamp is not None:
            self._travel_to_time(name, dt, parse_timestamp(timestamp))
        return dt

    def _travel_to_version(self, name: str, dt: DeltaTable, version: int) -> None:
        latest = dt.version()
        if not 0 <= version <= latest:
            raise VersionNotFound(f"{name} has versions 0..{latest}; version {version} does not exist")
        try:
            dt.load_as_version(version)
        except (DeltaError, OSError) as exc:
            raise VersionNotFound(
                f"{name} version {version} can no longer be read (its log or files were cleaned up): {exc}"
            ) from exc

    def _travel_to_time(self, name: str, dt: DeltaTable, when: datetime) -> None:
        """Load the newest version committed at or before `when`, by the commit timestamps `history` shows.

        delta-rs resolves a datetime by the log files' modification times, which trail the commit
        timestamp by the time the write took: "as of the time history gives for version 1" could
        read version 0. An auditor's question must resolve against the times the table reports, so
        the version is chosen here. Like Delta, a timestamp earlier than its predecessor's (a
        writer's clock stepping back) counts as one millisecond after it.
        """
        commits = sorted((h["version"], h["timestamp"]) for h in dt.history())
        first_version, first_ms = commits[0]
        first_at = datetime.fromtimestamp(first_ms / 1000, tz=UTC)
        if when < first_at:
            raise VersionNotFound(
                f"{name} did not exist at {when.isoformat()}; its earliest kept commit is"
                f" version {first_version} at {first_at.isoformat()}"
            )
        wanted_ms = when.timestamp() * 1000
        chosen, previous_ms = first_version, None
        for version, ms in commits:
            ms = ms if previous_ms is None else max(ms, previous_ms + 1)
            if ms > wanted_ms:
                break
            chosen, previous_ms = version, ms
        self._travel_to_version(name, dt, chosen)

    def _open_or_none(self, name: str) -> DeltaTable | None:
        return self._open(name) if self.exists(name) else None

    # -- writing -----------------------------------------------------------------------------
    def _with_retries(self, name: str, txn: Txn | None, op: Callable[[DeltaTable | None], WriteResult]) -> WriteResult:
        """Run a write, retrying on concurrent-commit conflicts; skip it if `txn` is already committed."""
        attempts = self.cfg.storage.commit_retries
        last: Exception | None = None
        with self._lock(name):
            for attempt in range(attempts):
                dt = self._current(name)
                if txn is not None and dt is not None:
                    done = dt.transaction_version(txn.app_id)
                    if done is not None and done >= txn.version:
                        return WriteResult(name, dt.version(), 0, skipped=True)
                try:
                    return op(dt)
                except Exception as exc:  # delta-rs raises several types for one conflict
                    if not _is_conflict(exc):
                        raise
                    last = exc
                    self._latest.pop(name, None)
                    time.sleep(min(0.5, 0.01 * (2 ** min(attempt, 6))) * (0.5 + random.random()))
        raise CommitConflict(
            f"{name}: gave up after {attempts} attempts, each conflicting with a concurrent writer ({last});"
            " raise storage.commit_retries or reduce writers to this table"
        )

    def _committed_version(self, name: str) -> int:
        dt = self._current(name)
        assert dt is not None, f"{name} must exist after a commit"
        return dt.version()

    def _prepare(self, name: str, dt: DeltaTable | None, data: Data) -> tuple[pa.Table, bool]:
        arrow = to_arrow(data)
        if dt is None:
            return arrow, False
        current = table_arrow_schema(dt)
        change = check_evolution(name, current, arrow.schema)
        return conform(arrow, current), change.evolves

    def _sync_properties(self, name: str, dt: DeltaTable) -> None:
        want = self.table_properties(name)
        have = dt.metadata().configuration
        stale = {k: v for k, v in want.items() if have.get(k) != v}
        if stale:
            dt.alter.set_table_properties(stale, raise_if_not_exists=False)

    def _create(self, name: str, schema: pa.Schema) -> DeltaTable:
        try:
            return DeltaTable.create(self._path(name), schema, mode="ignore", name=name,
                                     configuration=self.table_properties(name))
        except Exception as exc:
            if _is_conflict(exc) and self.exists(name):  # another writer created it first
                return self._open(name)
            raise

    def _write(self, name: str, data: Data, mode: str, predicate: str | None, txn: Txn | None,
               metadata: Mapping[str, str] | None) -> WriteResult:
        def op(dt: DeltaTable | None) -> WriteResult:
            arrow, evolves = self._prepare(name, dt, data)
            if dt is not None:
                self._sync_properties(name, dt)
            write_deltalake(
                dt if dt is not None else self._path(name), arrow, mode=mode, predicate=predicate,
                schema_mode="merge" if evolves else None, name=name if dt is None else None,
                configuration=self.table_properties(name) if dt is None else None,
                commit_properties=_commit_properties(txn, metadata, self.cfg.storage.commit_retries),
            )
            # write_deltalake advances a DeltaTable it is given to the version it committed.
            version = dt.version() if dt is not None else self._committed_version(name)
            return WriteResult(name, version, arrow.num_rows)

        return self._with_retries(name, txn, op)

    def _executors_can_write(self, name: str, data: Data) -> bool:
        """A Spark DataFrame into a table the executors' writer handles: new, or unpartitioned without reader
        features (deletion vectors, column mapping): tables carelake creates. Others are written from the driver."""
        if not is_spark_frame(data):
            return False
        dt = self._current(name)
        return dt is None or (not dt.metadata().partition_columns and not (dt.protocol().reader_features or []))

    def append(self, name, data, *, txn=None, metadata=None) -> WriteResult:
        if self._executors_can_write(name, data):
            return self._write_frame(name, data, None, txn, metadata, overwrite=False)
        return self._write(name, data, "append", None, txn, metadata)

    def overwrite(self, name, data, *, predicate=None, txn=None, metadata=None) -> WriteResult:
        if self._executors_can_write(name, data):
            return self._write_frame(name, data, predicate, txn, metadata, overwrite=True)
        return self._write(name, data, "overwrite", predicate, txn, metadata)

    # -- writing a Spark DataFrame: the executors write the files, this process commits the file actions ---------
    def _frame_schema(self, name: str, dt: DeltaTable | None, df: DataFrame) -> pa.Schema:
        """The schema the frame is written in: the table's (evolved by the frame's new columns, committed first),
        or the frame's own for a new table."""
        from deltalake.schema import Field

        from pipelines.store import executors as ex

        incoming = ex.arrow_schema_of(df)
        if dt is None:
            return incoming
        current = table_arrow_schema(dt)
        change = check_evolution(name, current, incoming)
        self._sync_properties(name, dt)
        if not change.added:
            return current
        added = [f.with_nullable(True) for f in incoming if f.name in change.added]
        # Additive and nullable: committed on its own before the data, harmless if the data commit never follows.
        dt.alter.add_columns([Field.from_arrow(f) for f in added],
                             commit_properties=_commit_properties(None, {"carelake.op": "add columns"},
                                                                  self.cfg.storage.commit_retries))
        return table_arrow_schema(dt)

    def _commit_files(self, name: str, dt: DeltaTable | None, schema: pa.Schema, adds: list, removes: list,
                      mode: str, txn: Txn | None, metadata: Mapping[str, str] | None, *, strict: bool = False) -> int:
        """Commit file actions written by the executors as one transaction; the version it made.

        `strict`: the actions were planned from `dt`'s version (a merge, a predicate overwrite). They commit as the
        very next version or not at all: delta-rs would otherwise rebase them past a concurrent commit it does
        not see as conflicting (a writer that inserted the same key), so the commit fails as a conflict and
        `_with_retries` plans the write again on the new version."""
        from deltalake import Schema as DeltaSchema
        from deltalake.transaction import create_table_with_add_actions

        props = _commit_properties(txn, metadata, 0 if strict else self.cfg.storage.commit_retries)
        if dt is None:
            create_table_with_add_actions(self._path(name), DeltaSchema.from_arrow(schema), adds, mode="append",
                                          name=name, configuration=self.table_properties(name),
                                          commit_properties=props)
            return self._committed_version(name)
        dt.create_write_transaction([*adds, *removes], mode=mode, schema=schema, commit_properties=props)
        return self._committed_version(name)

    def _write_frame(self, name: str, df: DataFrame, predicate: str | None, txn: Txn | None,
                     metadata: Mapping[str, str] | None, *, overwrite: bool) -> WriteResult:
        from pipelines.store import executors as ex

        def op(dt: DeltaTable | None) -> WriteResult:
            schema = self._frame_schema(name, dt, df)
            path = self._path(name)
            rows = ex.spark_frame(df, schema)
            meta = dict(metadata or {})
            removes: list = []
            kept_rows = 0
            if overwrite and predicate is not None and dt is not None:
                files = ex.target_files(dt, path, None)
                kept, rewritten, deleted = ex.plan_delete_where(df.sparkSession, files, schema, predicate,
                                                                with_changes=self._has_change_feed(dt))
                if kept is not None:
                    from pyspark.sql import functions as F

                    new = rows.select("*", F.lit(None).cast("string").alias(ex.CHANGE_COLUMN))
                    if self._has_change_feed(dt):
                        new = new.unionByName(rows.select("*", F.lit("insert").alias(ex.CHANGE_COLUMN)))
                    rows = new.unionByName(kept)
                    removes = ex.remove_actions(rewritten)
                    kept_rows = sum(f.records or 0 for f in files if f.path in rewritten) - deleted
            written = ex.write_files(rows, path, schema, with_changes=bool(removes))
            if dt is not None and not written and not removes and not (overwrite and predicate is None):
                return WriteResult(name, dt.version(), 0)  # nothing to commit: an empty batch leaves no version
            if removes:
                meta.update(ex.change_file_metadata(written))
            mode = "overwrite" if overwrite and predicate is None else "append"
            version = self._commit_files(name, dt, schema, ex.add_actions(written), removes, mode, txn, meta,
                                         strict=overwrite)
            added = sum(f.records for f in written if f.kind == "add")
            return WriteResult(name, version, added - kept_rows)

        return self._with_retries(name, txn, op)

    def _has_change_feed(self, dt: DeltaTable) -> bool:
        return dt.metadata().configuration.get("delta.enableChangeDataFeed", "false").lower() == "true"

    def _merge_frame(self, name: str, df: DataFrame, spec: MergeSpec, txn: Txn | None,
                     metadata: Mapping[str, str] | None) -> WriteResult:
        """Copy-on-write MERGE computed by Spark (see pipelines.store.executors)."""
        from pipelines.store import executors as ex
        from pipelines.store.base import sql_literal

        missing = [k for k in spec.keys if k not in df.columns]
        if missing:
            raise UsageError(f"merge into {name}: key column(s) {missing} are not in the data ({df.columns})")
        source = ex.latest_per_key(df, spec.keys, spec.latest_by) if spec.latest_by else df
        source = source.persist()
        try:
            facts = ex.source_facts(source, spec)
            if facts.distinct_keys != facts.rows:
                raise UsageError(
                    f"merge into {name}: the source has several rows for one key, e.g."
                    f" {ex.duplicate_key_examples(source, spec.keys)}; deduplicate the batch (keep the newest per"
                    " key) before merging")
            for b in facts.bounds.values():
                if b is not None:
                    sql_literal(b[0])  # refuses a column no engine can bound (e.g. text)
            if facts.rows == 0 and self.exists(name) and not spec.delete_not_matched_by_source:
                return WriteResult(name, self.version(name), 0)

            def op(dt: DeltaTable | None) -> WriteResult:
                if dt is None:
                    dt = self._create(name, ex.arrow_schema_of(source))
                schema = self._frame_schema(name, dt, source)
                path = self._path(name)
                files = ex.target_files(dt, path, facts.bounds if spec.prune_by else None)
                plan = ex.plan_merge(source.sparkSession, source, spec, files, schema,
                                     with_changes=self._has_change_feed(dt))
                try:
                    written = ex.write_files(plan.rows, path, schema, with_changes=plan.with_changes)
                finally:
                    for frame in plan.cached:
                        frame.unpersist()
                if not written and not plan.rewritten:
                    return WriteResult(name, dt.version(), 0, metrics=plan.metrics)  # the merge changes nothing
                meta = dict(metadata or {})
                if plan.with_changes:
                    meta.update(ex.change_file_metadata(written))
                version = self._commit_files(name, dt, schema, ex.add_actions(written),
                                             ex.remove_actions(plan.rewritten), "append", txn, meta, strict=True)
                metrics = {**plan.metrics, "num_source_rows": facts.rows,
                           "num_target_files_added": sum(1 for f in written if f.kind == "add")}
                return WriteResult(name, version, facts.rows, metrics=metrics)

            return self._with_retries(name, txn, op)
        finally:
            source.unpersist()

    def merge(self, name: str, data: Data, spec: MergeSpec, *, txn=None, metadata=None) -> WriteResult:
        if self._executors_can_write(name, data):
            return self._merge_frame(name, data, spec, txn, metadata)
        source = to_arrow(data)
        missing = [k for k in spec.keys if k not in source.schema.names]
        if missing:
            raise UsageError(f"merge into {name}: key column(s) {missing} are not in the data ({source.schema.names})")
        if spec.latest_by:
            source = keep_latest(source, spec.keys, spec.latest_by)
        dups = duplicate_keys(spec.keys, source)
        if dups:
            raise UsageError(
                f"merge into {name}: the source has several rows for one key, e.g. {dups};"
                " deduplicate the batch (keep the newest per key) before merging"
            )

        def op(dt: DeltaTable | None) -> WriteResult:
            if dt is None:
                dt = self._create(name, source.schema)
            arrow, evolves = self._prepare(name, dt, source)
            self._sync_properties(name, dt)
            predicate = spec.pruned_predicate(arrow_bounds(arrow, spec)) if spec.prune_by else spec.predicate
            merger = dt.merge(
                arrow, predicate, source_alias="s", target_alias="t", merge_schema=evolves,
                commit_properties=_commit_properties(txn, metadata, self.cfg.storage.commit_retries),
            )
            if spec.delete_when is not None:
                merger = merger.when_matched_delete(predicate=spec.delete_when)
            if spec.update == "all":
                merger = merger.when_matched_update_all(predicate=spec.update_when)
            elif spec.update is not None:
                merger = merger.when_matched_update(dict(spec.update), predicate=spec.update_when)
            if spec.insert:
                merger = merger.when_not_matched_insert_all(predicate=spec.insert_when)
            if spec.delete_not_matched_by_source:
                merger = merger.when_not_matched_by_source_delete()
            metrics = merger.execute()
            return WriteResult(name, self._committed_version(name), arrow.num_rows, metrics=metrics)

        return self._with_retries(name, txn, op)

    # -- reading -----------------------------------------------------------------------------
    def _require_spark(self) -> SparkSession:
        if self._spark is None:
            raise UsageError("this store was opened without a SparkSession; use read_arrow, or pass spark=")
        return self._spark

    def read_arrow(self, name, *, version=None, timestamp=None, columns=None) -> pa.Table:
        return self._open(name, version, timestamp).to_pyarrow_table(columns=list(columns) if columns else None)

    def read(self, name: str, *, version=None, timestamp=None, since=None) -> DataFrame:
        from pyspark.sql.pandas.types import from_arrow_schema

        spark = self._require_spark()
        dt = self._open(name, version, timestamp)
        schema = from_arrow_schema(table_arrow_schema(dt))
        plain = not dt.metadata().partition_columns and not (dt.protocol().reader_features or [])
        if plain:
            # Spark reads the version's own data files directly: no driver-side collect.
            files = dt.file_uris() if since is None else _files_since(dt, self._path(name), *since)
            df = spark.read.schema(schema).parquet(*files) if files else spark.createDataFrame([], schema)
        else:
            df = spark.createDataFrame(dt.to_pyarrow_table()) if dt.file_uris() else spark.createDataFrame([], schema)
        return df if since is None else df.where(since_condition(*since))

    def changes_arrow(self, name: str, start_version: int, end_version: int | None = None) -> pa.Table:
        dt = self._open(name)
        latest = dt.version()
        end = latest if end_version is None else end_version
        if not 0 <= start_version <= end <= latest:
            raise VersionNotFound(f"{name} has versions 0..{latest}; cannot read changes {start_version}..{end}")
        return load_changes(self._path(name), start_version, end)

    def changes(self, name: str, start_version: int, end_version: int | None = None) -> DataFrame:
        from pipelines.store.schema import canonical_schema

        spark = self._require_spark()
        changes = self.changes_arrow(name, start_version, end_version)
        # delta-rs returns view types (string_view, ...) and an unsigned _commit_version, which Spark's Arrow
        # conversion does not take: plain layouts and int64 instead.
        schema = canonical_schema(changes.schema)
        schema = pa.schema([pa.field(f.name, pa.int64(), f.nullable) if pa.types.is_unsigned_integer(f.type) else f
                            for f in schema])
        return spark.createDataFrame(changes.cast(schema))

    def version(self, name: str) -> int:
        return self._open(name).version()

    def row_count(self, name: str) -> int:
        return self._open(name).count()

    def txn_version(self, name: str, app_id: str) -> int | None:
        dt = self._open_or_none(name)
        return None if dt is None else dt.transaction_version(app_id)

    def history(self, name: str, limit: int | None = None) -> list[CommitInfo]:
        out = []
        for h in self._open(name).history(limit):
            out.append(CommitInfo(
                version=h["version"],
                timestamp=datetime.fromtimestamp(h["timestamp"] / 1000, tz=UTC),
                operation=h.get("operation", ""),
                parameters=h.get("operationParameters") or {},
                metrics=h.get("operationMetrics") or {},
                metadata={k: v for k, v in h.items() if k not in _STANDARD_HISTORY},
            ))
        return sorted(out, key=lambda c: c.version, reverse=True)

    # -- maintenance -------------------------------------------------------------------------
    def optimize(self, name: str) -> Mapping[str, Any]:
        dt = self._open(name)
        return dt.optimize.compact(
            target_size=self.cfg.storage.target_file_size_mb * 1024 * 1024,
            commit_properties=_commit_properties(None, {"carelake.op": "optimize"}, self.cfg.storage.commit_retries),
        )

    def vacuum(self, name: str, *, retention_hours: int | None = None, dry_run: bool = False) -> list[str]:
        hours = self.check_vacuum_retention(name, retention_hours)
        dt = self._open(name)
        self._sync_properties(name, dt)
        # Full mode: also the files no log action names, once older than the retention — data files written for a
        # commit that never happened (a crash, a conflict) and the change files of copy-on-write commits (their
        # versions' change feed is gone with the log past the same retention).
        return self._open(name).vacuum(retention_hours=hours, dry_run=dry_run, enforce_retention_duration=True,
                                       full=True)

    def restore(self, name: str, *, version=None, timestamp=None, metadata=None) -> Mapping[str, Any]:
        if (version is None) == (timestamp is None):
            raise UsageError("restore needs exactly one of a version or a timestamp")
        target_dt = self._open(name, version, timestamp)  # validates the target exists and is readable
        target = target_dt.version()
        dt = self._open(name)
        if target == dt.version():
            return {"restored_to": target, "changed": False}
        metrics = dt.restore(target, commit_properties=_commit_properties(
            None, {"carelake.op": "restore", **(metadata or {})}, self.cfg.storage.commit_retries))
        return {"restored_to": target, "changed": True, **metrics}
