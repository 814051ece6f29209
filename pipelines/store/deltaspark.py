"""The native engine: delta-spark's format("delta") where the Delta jars are on Spark's classpath.

Selected by storage.engine=auto when the JVM can load io.delta.tables.DeltaTable (Databricks, or a
cluster started with the Delta packages). Same contract, same table properties, same names.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from datetime import UTC
from typing import TYPE_CHECKING, Any

from pipelines import __version__
from pipelines.config import Config
from pipelines.errors import CommitConflict, TableNotFound, UsageError, VersionNotFound
from pipelines.store.base import CommitInfo, MergeSpec, TableStore, Txn, WriteResult, since_condition
from pipelines.store.schema import check_evolution
from pipelines.timeutil import parse_timestamp

if TYPE_CHECKING:
    import pyarrow as pa
    from pyspark.sql import DataFrame, SparkSession

    from pipelines.store.base import Data

_CONFLICTS = ("ConcurrentAppendException", "ConcurrentDeleteReadException", "ConcurrentDeleteDeleteException",
              "ConcurrentTransactionException", "MetadataChangedException", "ProtocolChangedException",
              "ConcurrentWriteException")


class DeltaSparkStore(TableStore):
    """TableStore on delta-spark (io.delta.tables.DeltaTable through PySpark)."""

    engine = "delta-spark"

    def __init__(self, cfg: Config, spark: SparkSession):
        super().__init__(cfg)
        if spark is None:
            raise UsageError("the delta-spark engine needs a SparkSession")
        self.spark = spark

    def _path(self, name: str) -> str:
        return str(self.ref(name).path)

    def _table(self, name: str):
        from delta.tables import DeltaTable

        if not self.exists(name):
            raise TableNotFound(f"table {name} does not exist yet at {self.ref(name).path}; run: carelake run {name}")
        return DeltaTable.forPath(self.spark, self._path(name))

    def exists(self, name: str) -> bool:
        from delta.tables import DeltaTable

        return (self.ref(name).path / "_delta_log").is_dir() and DeltaTable.isDeltaTable(self.spark, self._path(name))

    def _df(self, data: Data) -> DataFrame:
        if hasattr(data, "sparkSession"):
            return data
        return self.spark.createDataFrame(data)

    def _arrow_schema(self, df: DataFrame) -> pa.Schema:
        from pyspark.sql.pandas.types import to_arrow_schema

        return to_arrow_schema(df.schema)

    def _check(self, name: str, df: DataFrame) -> bool:
        if not self.exists(name):
            return False
        current = self._arrow_schema(self.spark.read.format("delta").load(self._path(name)))
        return check_evolution(name, current, self._arrow_schema(df)).evolves

    def _with_retries(self, name: str, txn: Txn | None, op: Callable[[], WriteResult]) -> WriteResult:
        attempts = self.cfg.storage.commit_retries
        for attempt in range(attempts):
            if txn is not None:
                done = self.txn_version(name, txn.app_id)
                if done is not None and done >= txn.version:
                    return WriteResult(name, self.version(name), 0, skipped=True)
            try:
                return op()
            except Exception as exc:
                if not any(c in str(exc) for c in _CONFLICTS) or attempt == attempts - 1:
                    if any(c in str(exc) for c in _CONFLICTS):
                        raise CommitConflict(f"{name}: conflicting writers after {attempts} attempts: {exc}") from exc
                    raise
                time.sleep(0.05 * (attempt + 1))
        raise CommitConflict(f"{name}: conflicting writers after {attempts} attempts")

    def _writer(self, df: DataFrame, name: str, mode: str, txn: Txn | None, metadata, evolves: bool):
        w = df.write.format("delta").mode(mode)
        if txn is not None:
            w = w.option("txnAppId", txn.app_id).option("txnVersion", txn.version)
        meta = {"carelake.version": __version__, **(metadata or {})}
        w = w.option("userMetadata", ";".join(f"{k}={v}" for k, v in meta.items()))
        if evolves:
            w = w.option("mergeSchema", "true")
        return w

    def _ensure_table(self, name: str, df: DataFrame) -> None:
        """Create the table empty with its properties first, so the change feed covers version 0's data."""
        from delta.tables import DeltaTable

        if self.exists(name):
            return
        builder = DeltaTable.createIfNotExists(self.spark).location(self._path(name)).addColumns(df.schema)
        for key, value in self.table_properties(name).items():
            builder = builder.property(key, value)
        builder.execute()

    def _set_properties(self, name: str) -> None:
        props = ", ".join(f"'{k}' = '{v}'" for k, v in self.table_properties(name).items())
        self.spark.sql(f"ALTER TABLE delta.`{self._path(name)}` SET TBLPROPERTIES ({props})")

    def append(self, name, data, *, txn=None, metadata=None) -> WriteResult:
        df = self._df(data)

        def op() -> WriteResult:
            self._ensure_table(name, df)
            self._writer(df, name, "append", txn, metadata, self._check(name, df)).save(self._path(name))
            return WriteResult(name, self.version(name), df.count())

        return self._with_retries(name, txn, op)

    def overwrite(self, name, data, *, predicate=None, txn=None, metadata=None) -> WriteResult:
        df = self._df(data)

        def op() -> WriteResult:
            self._ensure_table(name, df)
            w = self._writer(df, name, "overwrite", txn, metadata, self._check(name, df))
            if predicate:
                w = w.option("replaceWhere", predicate)
            w.save(self._path(name))
            return WriteResult(name, self.version(name), df.count())

        return self._with_retries(name, txn, op)

    def merge(self, name, data, spec: MergeSpec, *, txn=None, metadata=None) -> WriteResult:
        df = self._df(data)
        if spec.latest_by:
            from pyspark.sql import Window
            from pyspark.sql import functions as F

            w = Window.partitionBy(*spec.keys).orderBy(*(F.col(c).desc() for c in spec.latest_by))
            df = df.withColumn("_latest", F.row_number().over(w)).where("_latest = 1").drop("_latest")
        dup = df.groupBy(*spec.keys).count().where("count > 1").limit(3).collect()
        if dup:
            raise UsageError(f"merge into {name}: the source has several rows for one key, e.g. "
                             f"{[r.asDict() for r in dup]}; deduplicate the batch before merging")

        def op() -> WriteResult:
            self._ensure_table(name, df)
            evolves = self._check(name, df)
            self.spark.conf.set("spark.databricks.delta.schema.autoMerge.enabled", str(evolves).lower())
            if txn is not None:
                self.spark.conf.set("spark.databricks.delta.write.txnAppId", txn.app_id)
                self.spark.conf.set("spark.databricks.delta.write.txnVersion", str(txn.version))
            try:
                predicate = spec.pruned_predicate(_spark_bounds(df, spec)) if spec.prune_by else spec.predicate
                m = self._table(name).alias("t").merge(df.alias("s"), predicate)
                if spec.delete_when is not None:
                    m = m.whenMatchedDelete(condition=spec.delete_when)
                if spec.update == "all":
                    m = m.whenMatchedUpdateAll(condition=spec.update_when)
                elif spec.update is not None:
                    m = m.whenMatchedUpdate(condition=spec.update_when, set=dict(spec.update))
                if spec.insert:
                    m = m.whenNotMatchedInsertAll(condition=spec.insert_when)
                if spec.delete_not_matched_by_source:
                    m = m.whenNotMatchedBySourceDelete()
                m.execute()
            finally:
                self.spark.conf.unset("spark.databricks.delta.write.txnAppId")
                self.spark.conf.unset("spark.databricks.delta.write.txnVersion")
            return WriteResult(name, self.version(name), df.count())

        return self._with_retries(name, txn, op)

    def read(self, name, *, version=None, timestamp=None, since=None) -> DataFrame:
        df = self._read(name, version, timestamp)
        return df if since is None else df.where(since_condition(*since))  # Delta skips files by their stats

    def _read(self, name, version, timestamp) -> DataFrame:
        self._table(name)
        reader = self.spark.read.format("delta")
        if version is not None:
            latest = self.version(name)
            if not 0 <= version <= latest:
                raise VersionNotFound(f"{name} has versions 0..{latest}; version {version} does not exist")
            reader = reader.option("versionAsOf", version)
        elif timestamp is not None:
            reader = reader.option("timestampAsOf", parse_timestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S.%f"))
        try:
            return reader.load(self._path(name))
        except Exception as exc:
            if "VersionNotFound" in str(exc) or "TIMESTAMP_EARLIER" in str(exc) or "before the earliest" in str(exc):
                raise VersionNotFound(f"{name}: {exc}") from exc
            raise

    def read_arrow(self, name, *, version=None, timestamp=None, columns=None) -> pa.Table:
        df = self.read(name, version=version, timestamp=timestamp)
        return (df.select(*columns) if columns else df).toArrow()

    def changes(self, name, start_version, end_version=None) -> DataFrame:
        self._table(name)
        latest = self.version(name)
        end = latest if end_version is None else end_version
        if not 0 <= start_version <= end <= latest:
            raise VersionNotFound(f"{name} has versions 0..{latest}; cannot read changes {start_version}..{end}")
        return (self.spark.read.format("delta").option("readChangeFeed", "true")
                .option("startingVersion", start_version).option("endingVersion", end).load(self._path(name)))

    def version(self, name) -> int:
        return int(self._table(name).history(1).collect()[0]["version"])

    def row_count(self, name) -> int:
        return self.spark.read.format("delta").load(self._path(name)).count()

    def txn_version(self, name, app_id) -> int | None:
        # delta-spark exposes SetTransaction versions only through JVM internals that change between
        # releases; the Delta log is the same for every engine, so read it with delta-rs.
        if not self.exists(name):
            return None
        from deltalake import DeltaTable as LogReader

        return LogReader(self._path(name)).transaction_version(app_id)

    def history(self, name, limit=None) -> list[CommitInfo]:
        rows = self._table(name).history(limit) if limit else self._table(name).history()
        out = []
        for r in rows.collect():
            meta = dict(kv.split("=", 1) for kv in (r["userMetadata"] or "").split(";") if "=" in kv)
            ts = r["timestamp"]
            out.append(CommitInfo(int(r["version"]), ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts,
                                  r["operation"], dict(r["operationParameters"] or {}),
                                  dict(r["operationMetrics"] or {}), meta))
        return out

    def optimize(self, name) -> Mapping[str, Any]:
        self.spark.conf.set("spark.databricks.delta.optimize.maxFileSize",
                            str(self.cfg.storage.target_file_size_mb * 1024 * 1024))
        row = self._table(name).optimize().executeCompaction().collect()[0]
        return row.asDict(recursive=True)

    def vacuum(self, name, *, retention_hours=None, dry_run=False) -> list[str]:
        hours = self.check_vacuum_retention(name, retention_hours)
        self._set_properties(name)
        dry = " DRY RUN" if dry_run else ""
        rows = self.spark.sql(f"VACUUM delta.`{self._path(name)}` RETAIN {hours} HOURS{dry}").collect()
        return [r[0] for r in rows] if dry_run else []

    def restore(self, name, *, version=None, timestamp=None, metadata=None) -> Mapping[str, Any]:
        if (version is None) == (timestamp is None):
            raise UsageError("restore needs exactly one of a version or a timestamp")
        table = self._table(name)
        # Delta's commit userMetadata, in the `k=v;k=v` form history() reads back, for this commit only.
        key = "spark.databricks.delta.commitInfo.userMetadata"
        self.spark.conf.set(key, ";".join(f"{k}={v.replace(';', ',')}" for k, v in (metadata or {}).items()))
        try:
            if version is not None:
                self.read(name, version=version)
                df = table.restoreToVersion(version)
            else:
                df = table.restoreToTimestamp(parse_timestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S"))
        finally:
            self.spark.conf.unset(key)
        return {"changed": True, **df.collect()[0].asDict()}


def _spark_bounds(df: DataFrame, spec: MergeSpec) -> dict[str, tuple[Any, Any] | None]:
    """{column: (min, max)} of a merge source (see MergeSpec.pruned_predicate); None where a null or NaN leaves
    the range unknown; nothing when a row fails spec.prune_if. Times as UTC instants (collected as microseconds:
    no session or local zone involved)."""
    from datetime import datetime, timedelta

    from pyspark.sql import functions as F
    from pyspark.sql.types import DoubleType, FloatType, TimestampNTZType, TimestampType

    columns = spec.prune_by
    missing = [c for c in (*columns, *(spec.prune_if[:1] if spec.prune_if else ())) if c not in df.columns]
    if missing:
        raise UsageError(f"prune_by column(s) {missing} are not in the merge source ({df.columns})")
    types = {c: df.schema[c].dataType for c in columns}

    def value(c: str):
        if isinstance(types[c], TimestampType | TimestampNTZType):
            return F.unix_micros(F.col(c).cast("timestamp"))
        return F.col(c)

    aggs = []
    for c in columns:
        unknown = F.col(c).isNull()
        if isinstance(types[c], DoubleType | FloatType):
            unknown = unknown | F.isnan(c)
        aggs += [F.min(value(c)).alias(f"lo_{c}"), F.max(value(c)).alias(f"hi_{c}"),
                 F.max(unknown.cast("int")).alias(f"unknown_{c}")]
    if spec.prune_if is not None:
        column, values = spec.prune_if
        aggs.append(F.min(F.coalesce(F.col(column).isin(*values), F.lit(False)).cast("int")).alias("_prunable"))
    row = df.agg(*aggs).first()
    out: dict[str, tuple[Any, Any] | None] = {}
    if spec.prune_if is not None and not row["_prunable"]:
        return out
    for c in columns:
        lo, hi = row[f"lo_{c}"], row[f"hi_{c}"]
        if lo is None or row[f"unknown_{c}"]:
            out[c] = None
        elif isinstance(types[c], TimestampType | TimestampNTZType):
            epoch = datetime(1970, 1, 1, tzinfo=UTC)
            out[c] = (epoch + timedelta(microseconds=lo), epoch + timedelta(microseconds=hi))
        else:
            out[c] = (lo, hi)
    return out
