"""The table-store contract every storage engine implements, and the names it speaks."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pipelines.config import LAYERS, Config
from pipelines.errors import UsageError

if TYPE_CHECKING:
    import pyarrow as pa
    from pyspark.sql import Column, DataFrame

    Data = pa.Table | DataFrame

_NAME = re.compile(r"^(?P<layer>[a-z]+)\.(?P<entity>[a-z][a-z0-9_]*)$")
# Column names carelake adds to change feeds, as Delta's change data feed names them.
CHANGE_COLUMNS = ("_change_type", "_commit_version", "_commit_timestamp")


def since_condition(column: str, at: datetime, until: datetime | None = None) -> Column:
    """The rows a `read(..., since=(column, at))` or `since=(column, at, until)` keeps: at <= column < until."""
    from pyspark.sql import functions as F

    kept = F.col(column) >= F.lit(at)
    return kept if until is None else kept & (F.col(column) < F.lit(until))


def split_table_name(name: str) -> tuple[str, str]:
    """(layer, entity) of a table name, or a UsageError saying what a name looks like."""
    m = _NAME.match(name)
    if not m or m["layer"] not in LAYERS:
        raise UsageError(
            f"{name!r} is not a table name: use <layer>.<entity> with layer one of"
            f" {', '.join(LAYERS)} and a lowercase entity, e.g. silver.observations"
        )
    return m["layer"], m["entity"]


@dataclass(frozen=True)
class TableRef:
    """A table's name (`silver.observations`) and where it lives under the lakehouse root."""

    layer: str
    entity: str
    path: Path

    @property
    def name(self) -> str:
        return f"{self.layer}.{self.entity}"

    @classmethod
    def parse(cls, name: str, root: Path) -> TableRef:
        layer, entity = split_table_name(name)
        # Operational tables sit beside the layers: ops.metrics -> <root>/_metrics.
        path = root / f"_{entity}" if layer == "ops" else root / layer / entity
        return cls(layer, entity, path)


@dataclass(frozen=True)
class Txn:
    """An idempotent-write marker: (app_id, version) commits once; a replay is skipped."""

    app_id: str
    version: int

    def __post_init__(self) -> None:
        if not self.app_id:
            raise ValueError("Txn.app_id must not be empty")
        if self.version < 0:
            raise ValueError(f"Txn.version must be >= 0, got {self.version}")


@dataclass(frozen=True)
class WriteResult:
    """What a write did: the version it committed, or that it was skipped as a replay."""

    table: str
    version: int | None
    rows: int
    skipped: bool = False
    metrics: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CommitInfo:
    """One entry of a table's history."""

    version: int
    timestamp: datetime
    operation: str
    parameters: Mapping[str, Any]
    metrics: Mapping[str, Any]
    metadata: Mapping[str, Any]


@dataclass(frozen=True)
class TableInfo:
    """A table's current state, for `carelake tables`."""

    name: str
    version: int
    rows: int
    last_commit: datetime
    last_operation: str
    path: Path


@dataclass(frozen=True)
class MergeSpec:
    """How a merge treats matched and unmatched rows. Aliases: `s` = source, `t` = target.

    update: "all" updates every column from the source; a mapping sets named target columns
    to SQL expressions; None leaves matched rows alone. Conditions are SQL over s and t.
    """

    keys: tuple[str, ...]
    update: Literal["all"] | Mapping[str, str] | None = "all"
    # Several source rows for one key: keep the one with the largest values of these columns (compared in
    # order); with none given, such a batch is refused.
    latest_by: tuple[str, ...] = ()
    update_when: str | None = None
    delete_when: str | None = None
    insert: bool = True
    insert_when: str | None = None
    delete_not_matched_by_source: bool = False
    # Columns a key determines (rows with the same key always hold the same value, e.g. a time that is part of
    # the key or of the hash the key is): the merge then reads only the target files whose statistics overlap
    # the source's range of each, not the whole table, so its cost follows the batch, not the table's age.
    prune_by: tuple[str, ...] = ()
    # ... and only when every source row's column `prune_if[0]` holds one of the values `prune_if[1]`: the rows
    # whose key determines the prune_by columns (e.g. a source whose ids include the time and one whose do not).
    prune_if: tuple[str, tuple[str, ...]] | None = None

    def __post_init__(self) -> None:
        if not self.keys:
            raise UsageError("a merge needs at least one key column")
        if self.update is None and self.delete_when is None and not self.insert:
            raise UsageError("a merge that neither updates, deletes nor inserts does nothing")
        if self.prune_by and self.delete_not_matched_by_source:
            raise UsageError("a merge that deletes target rows the source lacks must see the whole target: "
                             "prune_by and delete_not_matched_by_source do not go together")

    @property
    def predicate(self) -> str:
        return " AND ".join(f"t.`{k}` = s.`{k}`" for k in self.keys)

    def pruned_predicate(self, bounds: Mapping[str, tuple[Any, Any] | None]) -> str:
        """The key predicate, plus `t.c BETWEEN lo AND hi` (literals) for each prune_by column whose source
        range `bounds[c]` is known. A column whose range is unknown (None: a null or no rows) is not pruned:
        a target row with a null there would fall outside any range and be inserted twice."""
        ranges = [f"t.`{c}` BETWEEN {sql_literal(lo)} AND {sql_literal(hi)}"
                  for c in self.prune_by if (b := bounds.get(c)) is not None for lo, hi in [b]]
        return " AND ".join([self.predicate, *ranges])


def sql_literal(value: Any) -> str:
    """A literal both engines' SQL (Spark, DataFusion) read as `value`: a time (with its zone), a date or a
    finite number; other types are refused (their quoting differs between the two dialects)."""
    import math
    from datetime import UTC, date

    if isinstance(value, datetime):
        at = value if value.tzinfo else value.replace(tzinfo=UTC)
        return f"CAST('{at.astimezone(UTC).isoformat(timespec='microseconds')}' AS TIMESTAMP)"
    if isinstance(value, date):
        return f"CAST('{value.isoformat()}' AS DATE)"
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return repr(value)
    raise UsageError(f"prune_by: cannot bound a merge by the value {value!r} ({type(value).__name__}); prune by "
                     "a time, a date or a number column")


class TableStore(ABC):
    """Delta tables addressed by name. Engines differ in how they commit, never in what they mean."""

    engine: str

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def ref(self, name: str) -> TableRef:
        return TableRef.parse(name, self.cfg.root)

    def retention_days(self, name: str) -> int:
        """The table's layer retention, raised to the audit retention for what audits walk (pipelines.retention)."""
        from pipelines.retention import table_retention_days

        return table_retention_days(self.cfg, name)

    def table_properties(self, name: str) -> dict[str, str]:
        """Delta properties every table carries: change feed on, retention from its layer."""
        days = self.retention_days(name)
        return {
            "delta.enableChangeDataFeed": "true",
            "delta.logRetentionDuration": f"interval {days} days",
            "delta.deletedFileRetentionDuration": f"interval {days} days",
        }

    def list_tables(self) -> list[str]:
        """Names of every Delta table under the root, sorted."""
        root = self.cfg.root
        names = []
        for layer in LAYERS:
            if layer == "ops":
                candidates = [p for p in root.glob("_*") if p.name != "_checkpoints"]
                names += [f"ops.{p.name[1:]}" for p in candidates if (p / "_delta_log").is_dir()]
            else:
                names += [f"{layer}.{p.name}" for p in (root / layer).glob("*") if (p / "_delta_log").is_dir()]
        return sorted(names)

    @abstractmethod
    def exists(self, name: str) -> bool: ...

    @abstractmethod
    def version(self, name: str) -> int: ...

    @abstractmethod
    def append(self, name: str, data: Data, *, txn: Txn | None = None,
               metadata: Mapping[str, str] | None = None) -> WriteResult: ...

    @abstractmethod
    def merge(self, name: str, data: Data, spec: MergeSpec, *, txn: Txn | None = None,
              metadata: Mapping[str, str] | None = None) -> WriteResult: ...

    @abstractmethod
    def overwrite(self, name: str, data: Data, *, predicate: str | None = None, txn: Txn | None = None,
                  metadata: Mapping[str, str] | None = None) -> WriteResult: ...

    @abstractmethod
    def read(self, name: str, *, version: int | None = None, timestamp: datetime | str | None = None,
             since: tuple[str, datetime] | tuple[str, datetime, datetime] | None = None) -> DataFrame:
        """The table as a Spark DataFrame, now or as of a version or a timestamp.

        `since=(column, t)`: only the rows whose timestamp `column` is t or later, and only the data files whose
        statistics allow such rows are read (data skipping), so a job that looks back a few hours reads a few
        hours' files however old the table grows. `since=(column, t, until)`: the rows from t up to, not
        including, until (a slice of a table's past: a job that needs a few minutes of each of several hours
        reads those files only). A naive time is local time, as Spark gives it back.
        """

    @abstractmethod
    def read_arrow(self, name: str, *, version: int | None = None, timestamp: datetime | str | None = None,
                   columns: Sequence[str] | None = None) -> pa.Table:
        """The table (only `columns`, when given) as Arrow in this process, now or as of a version or timestamp."""

    @abstractmethod
    def changes(self, name: str, start_version: int, end_version: int | None = None) -> DataFrame:
        """Rows changed by versions start..end (inclusive), with _change_type/_commit_version/_commit_timestamp."""

    @abstractmethod
    def history(self, name: str, limit: int | None = None) -> list[CommitInfo]:
        """Commits, newest first."""

    @abstractmethod
    def optimize(self, name: str) -> Mapping[str, Any]: ...

    @abstractmethod
    def vacuum(self, name: str, *, retention_hours: int | None = None, dry_run: bool = False) -> list[str]: ...

    @abstractmethod
    def restore(self, name: str, *, version: int | None = None, timestamp: datetime | str | None = None,
                metadata: Mapping[str, str] | None = None) -> Mapping[str, Any]:
        """Make an old version current again as a new commit carrying `metadata` (e.g. carelake.reason)."""

    @abstractmethod
    def txn_version(self, name: str, app_id: str) -> int | None:
        """The highest Txn.version committed for app_id, or None."""

    @abstractmethod
    def row_count(self, name: str) -> int: ...

    def info(self, name: str) -> TableInfo:
        last = self.history(name, limit=1)[0]
        return TableInfo(name, last.version, self.row_count(name), last.timestamp, last.operation, self.ref(name).path)

    def check_vacuum_retention(self, name: str, retention_hours: int | None) -> int:
        """The retention vacuum must use: never shorter than the layer's time-travel window."""
        floor = self.retention_days(name) * 24
        if retention_hours is None:
            return floor
        if retention_hours < floor:
            raise UsageError(
                f"vacuum {name} with {retention_hours} h would delete files that time travel inside the"
                f" configured {floor // 24}-day retention needs; raise the hours to at least {floor}"
                f" or lower storage.retention_days.{self.ref(name).layer} (and .audit, for what audits walk)"
            )
        return retention_hours


def keep_latest(rows: pa.Table, keys: Sequence[str], latest_by: Sequence[str]) -> pa.Table:
    """One row per key: the one with the largest `latest_by` values (ties: the first in `rows`)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if rows.num_rows < 2:
        return rows
    order = [(k, "ascending") for k in keys] + [(c, "descending") for c in latest_by]
    ordered = rows.take(pc.sort_indices(rows, sort_keys=order))
    same = None
    for k in keys:
        col = ordered[k].combine_chunks()
        eq = pc.fill_null(pc.equal(col.slice(1), col.slice(0, len(col) - 1)), False)
        same = eq if same is None else pc.and_(same, eq)
    return ordered.filter(pa.concat_arrays([pa.array([True]), pc.invert(same)]))


def arrow_bounds(rows: pa.Table, spec: MergeSpec) -> dict[str, tuple[Any, Any] | None]:
    """{column: (min, max)} of a merge source for MergeSpec.pruned_predicate; None where a null (or no row, or a
    NaN) leaves the range unknown; nothing when a row fails spec.prune_if."""
    import pyarrow as pa
    import pyarrow.compute as pc

    out: dict[str, tuple[Any, Any] | None] = {}
    if spec.prune_if is not None:
        column, values = spec.prune_if
        if column not in rows.column_names:
            raise UsageError(f"prune_if column {column!r} is not in the merge source ({rows.column_names})")
        if not pc.all(pc.is_in(rows[column], value_set=pa.array(values, rows[column].type))).as_py():
            return out
    for c in spec.prune_by:
        if c not in rows.column_names:
            raise UsageError(f"prune_by column {c!r} is not in the merge source ({rows.column_names})")
        col = rows[c]
        if rows.num_rows == 0 or col.null_count:
            out[c] = None
            continue
        if pa.types.is_floating(col.type) and pc.any(pc.is_nan(col)).as_py():
            out[c] = None  # NaN is outside every range
            continue
        mm = pc.min_max(col)
        out[c] = (mm["min"].as_py(), mm["max"].as_py())
    return out


def duplicate_keys(keys: Sequence[str], rows: pa.Table, limit: int = 3) -> list[dict[str, Any]]:
    """Key values that appear more than once in `rows` (a merge source must have each key once)."""
    import pyarrow.compute as pc

    if rows.num_rows < 2:
        return []
    counts = rows.group_by(list(keys)).aggregate([([], "count_all")])
    dups = counts.filter(pc.greater(counts["count_all"], 1))
    return dups.slice(0, limit).select(list(keys)).to_pylist()
