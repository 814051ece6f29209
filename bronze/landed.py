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

from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import pyarrow as pa
from pyspark.sql import DataFrame
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
_ARROW_SCHEMA = pa.schema([
    ("landing_file", pa.string()),
    ("landing_position", pa.int64()),
    ("received_at", pa.timestamp("us", tz="UTC")),
    ("peer", pa.string()),
    ("landing_status", pa.string()),
    ("landing_reason", pa.string()),
    ("payload", pa.binary()),
])

# How a record body (or a dropped file) divides into units: (offset, length) pairs within it.
Splitter = Callable[[bytes], list[tuple[int, int]]]


def whole(body: bytes) -> list[tuple[int, int]]:
    return [(0, len(body))] if body.strip() else []


def lines(body: bytes) -> list[tuple[int, int]]:
    """Non-blank lines; the LF is removed, a CR before it is kept (bytes as sent)."""
    out, pos = [], 0
    for piece in body.split(b"\n"):
        if piece.strip():
            out.append((pos, len(piece)))
        pos += len(piece) + 1
    return out


def _received(header: dict, fallback: datetime) -> datetime:
    try:
        return datetime.fromisoformat(str(header["received_at"])).astimezone(UTC)
    except (KeyError, ValueError):
        return fallback


class _Columns:
    def __init__(self) -> None:
        self.cols: dict[str, list] = {f.name: [] for f in _ARROW_SCHEMA}

    def add(self, path: str, pos: int, at: datetime, peer: str | None, status: str, reason: str | None,
            payload: bytes) -> None:
        for name, value in zip(self.cols, (path, pos, at, peer, status, reason, payload), strict=True):
            self.cols[name].append(value)

    def batch(self) -> pa.RecordBatch:
        return pa.RecordBatch.from_arrays([pa.array(v, type=f.type) for v, f in zip(self.cols.values(), _ARROW_SCHEMA,
                                                                                    strict=True)],
                                          schema=_ARROW_SCHEMA)


def _segment_units(out: _Columns, path: str, content: bytes, modified: datetime, split: Splitter) -> None:
    for item in iter_records(content):
        if isinstance(item, Record):
            h = item.header
            at, peer = _received(h, modified), h.get("peer")
            status, reason = str(h.get("status", "accepted")), h.get("reason")
            for off, n in split(item.body):
                out.add(path, item.body_offset + off, at, peer, status, reason, item.body[off:off + n])
        elif isinstance(item, Scan) and item.problem is not None and item.torn_bytes:
            out.add(path, item.valid_end, modified, None, "corrupt", item.problem, content[item.valid_end:])


def explode(split: Splitter) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """A mapInArrow function: binaryFile rows -> LANDED_SCHEMA rows, one per unit."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            out = _Columns()
            cols = batch.to_pydict()
            for path, modified, content in zip(cols["path"], cols["modificationTime"], cols["content"], strict=True):
                modified = modified if modified.tzinfo else modified.replace(tzinfo=UTC)
                if is_segment(content):
                    try:
                        _segment_units(out, path, content, modified, split)
                        continue
                    except SegmentFormatError:
                        pass
                for off, n in split(content):
                    out.add(path, off, modified, None, "accepted", None, content[off:off + n])
            yield out.batch()

    return run


def landed_units(files: DataFrame, split: Splitter) -> DataFrame:
    """binaryFile rows (path, modificationTime, length, content) -> one row per unit, in LANDED_SCHEMA."""
    return files.select("path", "modificationTime", "content").mapInArrow(explode(split), LANDED_SCHEMA)
