"""Landing files -> the units bronze stores: one row per message, resource batch or line, bytes exact.

The landing zone holds two kinds of file: segments written by the gateways (`bronze.records`: many
records, each with its received time, peer and status) and files dropped by `carelake ingest` (the
file is the content; its modification time is when it landed). Both come out of `landed_units` in
one shape, so every bronze job reads either without knowing which it got.

`landing_position` is the byte offset of the unit's first byte in its landing file, so any bronze row
can be found again with `dd`. A segment whose tail is torn or corrupt yields its whole records and one
row holding the unreadable bytes with `landing_status = 'corrupt'`: kept, never half-parsed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
from pyspark.sql import DataFrame
from pyspark.sql.pandas.types import to_arrow_schema
from pyspark.sql.types import BinaryType, LongType, StringType, StructField, StructType, TimestampType

from bronze.records import Record, Scan, SegmentFormatError, is_segment, iter_records

LANDED_SCHEMA = StructType([
    StructField("landing_file", StringType(), False),
    StructField("landing_position", LongType(), False),
    StructField("received_at", TimestampType(), False),
    StructField("peer", StringType(), True),
    StructField("landing_status", StringType(), False),  # accepted | error | rejected (gateway) | corrupt
    StructField("landing_reason", StringType(), True),
    StructField("payload", BinaryType(), False),
])

def lineage_fields() -> list[StructField]:
    """The columns every bronze table starts with: where the bytes came from, and the bytes."""
    return [
        StructField("feed", StringType(), False),
        StructField("landing_file", StringType(), False),
        StructField("landing_position", LongType(), False),  # byte offset of the unit in the landing file
        StructField("received_at", TimestampType(), False),
        StructField("ingest_batch_id", StringType(), False),
        StructField("sha256", StringType(), False),
        StructField("payload", BinaryType(), False),
    ]


def lineage_columns(feed: str, ingest_batch_id: str) -> list:
    """lineage_fields() as columns over landed_units' output."""
    from pyspark.sql import functions as F

    return [F.lit(feed).alias("feed"), "landing_file", "landing_position", "received_at",
            F.lit(ingest_batch_id).alias("ingest_batch_id"), F.sha2(F.col("payload"), 256).alias("sha256"), "payload"]


# How a record body (or a dropped file) divides into units: (offset, length, extra columns) within it.
# The extra columns are the feed's cheap keys, named as in the `extra` schema given to landed_units.
# A splitter also gets what is known about the body: the gateway record's header (content_type, peer,
# ...) or, for a dropped file, {"landing_file": path}.
Unit = tuple[int, int, Mapping[str, Any]]
Splitter = Callable[[bytes, Mapping[str, Any]], Iterable[Unit]]
_NONE: Mapping[str, Any] = {}


def whole(body: bytes, _meta: Mapping[str, Any] = _NONE) -> list[Unit]:
    return [(0, len(body), _NONE)] if body.strip() else []


def lines(body: bytes, _meta: Mapping[str, Any] = _NONE) -> list[Unit]:
    """Non-blank lines; the LF is removed, a CR before it is kept (bytes as sent)."""
    out, pos = [], 0
    for piece in body.split(b"\n"):
        if piece.strip():
            out.append((pos, len(piece), _NONE))
        pos += len(piece) + 1
    return out


def _received(header: Mapping[str, Any], fallback: datetime) -> datetime:
    try:
        return datetime.fromisoformat(str(header["received_at"])).astimezone(UTC)
    except (KeyError, ValueError):
        return fallback


class _Columns:
    """Column lists for one output Arrow batch: the landed columns, then the feed's extra keys."""

    def __init__(self, schema: pa.Schema, extra: tuple[str, ...]):
        self.schema = schema
        self.extra = extra
        self.cols: dict[str, list] = {f.name: [] for f in schema}

    def add(self, path: str, pos: int, at: datetime, peer: str | None, status: str, reason: str | None,
            payload: bytes, keys: Mapping[str, Any]) -> None:
        for name, value in zip(self.cols, (path, pos, at, peer, status, reason, payload), strict=False):
            self.cols[name].append(value)
        for name in self.extra:
            self.cols[name].append(keys.get(name))

    def batch(self) -> pa.RecordBatch:
        arrays = [pa.array(self.cols[f.name], type=f.type) for f in self.schema]
        return pa.RecordBatch.from_arrays(arrays, schema=self.schema)


def _segment_units(out: _Columns, path: str, content: bytes, modified: datetime, split: Splitter) -> None:
    for item in iter_records(content):
        if isinstance(item, Record):
            h = item.header
            at, peer = _received(h, modified), h.get("peer")
            status, reason = str(h.get("status", "accepted")), h.get("reason")
            for off, n, keys in split(item.body, h):
                out.add(path, item.body_offset + off, at, peer, status, reason, item.body[off:off + n], keys)
        elif isinstance(item, Scan) and item.problem is not None and item.torn_bytes:
            out.add(path, item.valid_end, modified, None, "corrupt", item.problem, content[item.valid_end:], _NONE)


def explode(split: Splitter, schema: pa.Schema, extra: tuple[str, ...] = ()
            ) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """A mapInArrow function: binaryFile rows -> one row per unit (landed columns + extra keys)."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            out = _Columns(schema, extra)
            cols = batch.to_pydict()
            for path, modified, content in zip(cols["path"], cols["modificationTime"], cols["content"], strict=True):
                modified = modified if modified.tzinfo else modified.replace(tzinfo=UTC)
                if is_segment(content):
                    try:
                        _segment_units(out, path, content, modified, split)
                        continue
                    except SegmentFormatError:
                        pass
                for off, n, keys in split(content, {"landing_file": path}):
                    out.add(path, off, modified, None, "accepted", None, content[off:off + n], keys)
            yield out.batch()

    return run


def landed_units(files: DataFrame, split: Splitter, extra: StructType | None = None) -> DataFrame:
    """binaryFile rows (path, modificationTime, length, content) -> one row per unit: LANDED_SCHEMA + extra."""
    out_schema = StructType(LANDED_SCHEMA.fields + (extra.fields if extra else []))
    arrow = to_arrow_schema(out_schema)
    names = tuple(f.name for f in extra.fields) if extra else ()
    return files.select("path", "modificationTime", "content").mapInArrow(explode(split, arrow, names), out_schema)
