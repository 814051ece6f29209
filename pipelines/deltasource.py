"""A Structured Streaming source over a delta-rs table's new versions (its change data feed).

Spark's own `format("delta")` streaming needs the delta-spark jars; this Python data source gives
the embedded engine the same thing: offsets are table versions, each micro-batch is the change-feed
rows of the versions committed since the last one, with _change_type, _commit_version and
_commit_timestamp. Reads run in Spark's Python workers, which start fresh (never forked from a
process that has used delta-rs).

Admission control (option `maxRowsPerBatch`): a batch ends at the furthest version whose change rows, counted
from the commit files (`change_rows`, no data read), stay within the bound since the reader's position, and
takes at least one version, so one huge commit still moves on. Spark 4.0's Python reader API passes no start to
`latestOffset()`, so the reader keeps its position itself: the end of the last batch Spark planned, learnt from
`partitions(start, end)`; a restarted query tells it first (Spark calls `setLatestSeenOffset`, which the Python
side receives as `partitions(X, X)`) and a new query, whose offset log is empty, tells it nothing: it starts at
`initialOffset()`. Option `endingVersion` caps every offset (the runner's available-now target). An offset is
never behind the position: that would make Spark replay versions a stateful job has already folded into its state.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pyarrow as pa
from pyspark.sql.datasource import DataSource, DataSourceStreamReader, InputPartition
from pyspark.sql.pandas.types import from_arrow_schema, to_arrow_schema
from pyspark.sql.types import LongType, StringType, StructField, StructType, TimestampType

FORMAT = "carelake_delta"
CHANGE_FIELDS = [
    StructField("_change_type", StringType(), True),
    StructField("_commit_version", LongType(), True),
    StructField("_commit_timestamp", TimestampType(), True),
]
log = logging.getLogger("carelake.deltasource")
# Versions per partition: each partition is one Spark task reading that many versions' changes.
VERSIONS_PER_PARTITION = 8


def _current_version(path: str) -> int:
    from deltalake import DeltaTable

    return DeltaTable(path).version() if DeltaTable.is_deltatable(path) else -1


def change_schema(path: str) -> StructType:
    """The table's columns followed by the change-feed columns, as a Spark schema."""
    from deltalake import DeltaTable

    from pipelines.store.schema import canonical_schema

    table_schema = canonical_schema(pa.schema(DeltaTable(path).schema().to_arrow()))
    return StructType([*from_arrow_schema(table_schema).fields, *CHANGE_FIELDS])


class VersionRange(InputPartition):
    def __init__(self, start: int, end: int):
        super().__init__((start, end))
        self.start, self.end = start, end


class DeltaChangesReader(DataSourceStreamReader):
    def __init__(self, path: str, schema: StructType, starting_version: int, max_rows: int | None = None,
                 ending_version: int | None = None):
        self.path = path
        self.schema = schema
        self.starting_version = starting_version
        self.max_rows = max_rows
        self.ending_version = ending_version
        self.position: int | None = None  # the end version of the last batch Spark planned
        self._rows: dict[int, int] = {}  # change rows per version (commits never change)
        self._warned_behind = False

    def initialOffset(self) -> dict:
        return {"version": self.starting_version - 1}

    def latestOffset(self) -> dict:
        if self.position is None:  # no setLatestSeenOffset before the first call: a new query
            self.position = self.starting_version - 1
        return {"version": self.admit(self.position)}

    def admit(self, position: int) -> int:
        """The end version of the next batch from `position`: bounded by rows and endingVersion, never behind."""
        if self.ending_version is not None and self.ending_version <= position:
            return position  # the target is reached: no table read
        current = _current_version(self.path)
        last = current if self.ending_version is None else min(self.ending_version, current)
        if last < position and not self._warned_behind:
            self._warned_behind = True
            log.warning("%s is at version %d, behind this stream's position %d: nothing is read until it passes "
                        "it (a table recreated under a stream needs its job's checkpoint reset)", self.path, last,
                        position)
        if last <= position:
            return position
        if self.max_rows is None:
            return last
        end, rows = position + 1, self._version_rows(position + 1)
        while end < last and rows + self._version_rows(end + 1) <= self.max_rows:
            end += 1
            rows += self._version_rows(end)
        return end

    def _version_rows(self, version: int) -> int:
        if version not in self._rows:
            from pipelines.store.deltars import change_rows

            self._rows[version] = change_rows(self.path, version)
        return self._rows[version]

    def partitions(self, start: dict, end: dict) -> list[InputPartition]:
        first, last = start["version"] + 1, end["version"]
        self.position = last if self.position is None else max(self.position, last)
        return [VersionRange(v, min(v + VERSIONS_PER_PARTITION - 1, last))
                for v in range(first, last + 1, VERSIONS_PER_PARTITION)]

    def read(self, partition: VersionRange) -> Iterator[pa.RecordBatch]:
        from pipelines.store.deltars import load_changes

        target = to_arrow_schema(self.schema)
        changes = load_changes(self.path, partition.start, partition.end)
        columns = []
        for f in target:
            col = changes.column(f.name) if f.name in changes.schema.names else pa.nulls(changes.num_rows, f.type)
            columns.append(col.cast(f.type))
        yield from pa.Table.from_arrays(columns, schema=target).to_batches()

    def commit(self, end: dict) -> None:
        """Nothing to release: progress lives in Spark's checkpoint and the sink's Delta transactions."""


class DeltaChangesSource(DataSource):
    """spark.readStream.format("carelake_delta").option("path", ...).load()"""

    @classmethod
    def name(cls) -> str:
        return FORMAT

    def schema(self) -> StructType:
        return change_schema(self.options["path"])

    def streamReader(self, schema: StructType) -> DataSourceStreamReader:
        return DeltaChangesReader(self.options["path"], schema, _int_option(self.options, "startingVersion", 0),
                                  _int_option(self.options, "maxRowsPerBatch", None, low=1),
                                  _int_option(self.options, "endingVersion", None, low=-1))


def _int_option(options: dict, name: str, default: int | None, low: int = 0) -> int | None:
    """An integer reader option, or `default` when it is not given; anything else is refused by name."""
    text = options.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low:
        raise ValueError(f"{FORMAT} option {name} must be an integer of at least {low}, got {text!r}")
    return value
