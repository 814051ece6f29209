"""A Structured Streaming source over a delta-rs table's new versions (its change data feed).

Spark's own `format("delta")` streaming needs the delta-spark jars; this Python data source gives
the embedded engine the same thing: offsets are table versions, each micro-batch is the change-feed
rows of the versions committed since the last one, with _change_type, _commit_version and
_commit_timestamp. Reads run in Spark's Python workers, which start fresh (never forked from a
process that has used delta-rs).
"""

from __future__ import annotations

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
    def __init__(self, path: str, schema: StructType, starting_version: int):
        self.path = path
        self.schema = schema
        self.starting_version = starting_version

    def initialOffset(self) -> dict:
        return {"version": self.starting_version - 1}

    def latestOffset(self) -> dict:
        return {"version": _current_version(self.path)}

    def partitions(self, start: dict, end: dict) -> list[InputPartition]:
        first, last = start["version"] + 1, end["version"]
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
        return DeltaChangesReader(self.options["path"], schema, int(self.options.get("startingVersion", 0)))
