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

import contextlib
import hashlib
import mmap
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np
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

# In place of `payload`, for feeds whose bytes stay in the landing zone (DICOM): the bytes' digest and size.
DIGEST_FIELDS = [StructField("payload_sha256", StringType(), False), StructField("payload_bytes", LongType(), False)]


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


def line_spans(body: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, lengths) of the non-blank lines, computed on the whole body at once.

    The LF is removed and a CR before it kept (bytes as sent); a line holding only ASCII whitespace is blank,
    exactly as bytes.strip() decides.
    """
    data = np.frombuffer(body, dtype=np.uint8)
    breaks = np.flatnonzero(data == 10)
    starts = np.concatenate(([0], breaks + 1)).astype(np.int64)
    ends = np.concatenate((breaks, [len(data)])).astype(np.int64)
    visible = np.concatenate(([0], np.cumsum(~np.isin(data, _ASCII_WHITESPACE), dtype=np.int64)))
    keep = visible[ends] - visible[starts] > 0
    return starts[keep], (ends - starts)[keep]


def lines(body: bytes, _meta: Mapping[str, Any] = _NONE) -> list[Unit]:
    """Non-blank lines, one unit each (the bulk path, `line_spans`, is what explode uses)."""
    offsets, lengths = line_spans(body)
    return [(int(o), int(n), _NONE) for o, n in zip(offsets, lengths, strict=True)]


lines.spans = line_spans  # type: ignore[attr-defined]  # units without keys, as arrays: the fast path
_ASCII_WHITESPACE = np.array([9, 10, 11, 12, 13, 32], dtype=np.uint8)


def _received(header: Mapping[str, Any], fallback: datetime) -> datetime:
    try:
        return datetime.fromisoformat(str(header["received_at"])).astimezone(UTC)
    except (KeyError, ValueError):
        return fallback


class _Columns:
    """Rows for the output Arrow batches: the landed columns, then the feed's extra keys.

    Units come one at a time (`add`) or as whole arrays of line spans (`add_spans`, no Python per line);
    both keep their order.
    """

    def __init__(self, schema: pa.Schema, extra: tuple[str, ...]):
        self.schema = schema
        self.extra = extra
        self.digest = "payload" not in schema.names  # keep the bytes' sha256 and size instead of the bytes
        self.cols: dict[str, list] = {f.name: [] for f in schema}
        self.done: list[pa.RecordBatch] = []

    def add(self, path: str, pos: int, at: datetime, peer: str | None, status: str, reason: str | None,
            payload: bytes, keys: Mapping[str, Any]) -> None:
        data = (hashlib.sha256(payload).hexdigest(), len(payload)) if self.digest else (payload,)
        for name, value in zip(self.cols, (path, pos, at, peer, status, reason, *data), strict=False):
            self.cols[name].append(value)
        for name in self.extra:
            self.cols[name].append(keys.get(name))

    def add_spans(self, path: str, base: int, at: datetime, peer: str | None, status: str, reason: str | None,
                  body: bytes, offsets: np.ndarray, lengths: np.ndarray) -> None:
        """Many units of one body at once: payload bytes gathered with numpy, constants repeated by Arrow."""
        self._flush()
        n = len(offsets)
        if not n:
            return
        edges = np.zeros(len(body) + 1, dtype=np.int64)
        np.add.at(edges, offsets, 1)
        np.add.at(edges, offsets + lengths, -1)
        data = np.frombuffer(body, dtype=np.uint8)[np.cumsum(edges[:-1]) > 0]
        value_offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int32)
        payload = pa.BinaryArray.from_buffers(pa.binary(), n, [None, pa.py_buffer(value_offsets),
                                                                pa.py_buffer(data.tobytes())])
        zeros = pa.array(np.zeros(n, dtype=np.int64))
        constants = {"landing_file": path, "received_at": at, "peer": peer, "landing_status": status,
                     "landing_reason": reason}
        arrays = []
        for f in self.schema:
            if f.name == "landing_position":
                arrays.append(pa.array(offsets + base, type=f.type))
            elif f.name == "payload":
                arrays.append(payload.cast(f.type))
            elif f.name in constants:
                arrays.append(pa.array([constants[f.name]], type=f.type).take(zeros))
            else:
                arrays.append(pa.nulls(n, type=f.type))
        self.done.append(pa.RecordBatch.from_arrays(arrays, schema=self.schema))

    def _flush(self) -> None:
        if self.cols[self.schema[0].name]:
            arrays = [pa.array(self.cols[f.name], type=f.type) for f in self.schema]
            self.done.append(pa.RecordBatch.from_arrays(arrays, schema=self.schema))
            self.cols = {f.name: [] for f in self.schema}

    def batches(self) -> list[pa.RecordBatch]:
        self._flush()
        return self.done


def _units(out: _Columns, split: Splitter, path: str, base: int, at: datetime, peer: str | None, status: str,
           reason: str | None, body: bytes, meta: Mapping[str, Any]) -> None:
    """Add the units of one record body (or dropped file) through the splitter's fastest path."""
    spans = getattr(split, "spans", None)
    if spans is not None:
        offsets, lengths = spans(body)
        out.add_spans(path, base, at, peer, status, reason, body, offsets, lengths)
        return
    for off, n, keys in split(body, meta):
        out.add(path, base + off, at, peer, status, reason, body[off:off + n], keys)


def _segment_units(out: _Columns, path: str, content: bytes, modified: datetime, split: Splitter) -> None:
    for item in iter_records(content):
        if isinstance(item, Record):
            h = item.header
            at, peer = _received(h, modified), h.get("peer")
            status, reason = str(h.get("status", "accepted")), h.get("reason")
            meta = {**h, "landing_file": path, "landing_position": item.body_offset}
            _units(out, split, path, item.body_offset, at, peer, status, reason, item.body, meta)
        elif isinstance(item, Scan) and item.problem is not None and item.torn_bytes:
            out.add(path, item.valid_end, modified, None, "corrupt", item.problem, content[item.valid_end:], _NONE)


def _file_units(out: _Columns, split: Splitter, path: str, modified: datetime, content: bytes | mmap.mmap) -> None:
    modified = modified if modified.tzinfo else modified.replace(tzinfo=UTC)
    if is_segment(content):
        try:
            _segment_units(out, path, content, modified, split)
            return
        except SegmentFormatError:
            pass
    _units(out, split, path, 0, modified, None, "accepted", None, content,
           {"landing_file": path, "landing_position": 0})


@contextlib.contextmanager
def _mapped(uri: str) -> Iterator[bytes | mmap.mmap]:
    """A landing file's bytes, mapped rather than read: only the records being parsed are ever in memory."""
    with open(unquote(urlsplit(uri).path), "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            yield b""
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            yield mapped


def explode(split: Splitter, schema: pa.Schema, extra: tuple[str, ...] = ()
            ) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """A mapInArrow function: binaryFile rows -> one row per unit (landed columns + extra keys). Rows without
    `content` (LandingSource(content=False)) are read here, from their path, one file at a time."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            out = _Columns(schema, extra)
            cols = batch.to_pydict()
            for i, (path, modified) in enumerate(zip(cols["path"], cols["modificationTime"], strict=True)):
                if "content" in cols:
                    _file_units(out, split, path, modified, cols["content"][i])
                    continue
                with _mapped(path) as content:
                    _file_units(out, split, path, modified, content)
                    yield from out.batches()  # before the mapping closes: rows of one file at a time
                    out = _Columns(schema, extra)
            yield from out.batches()

    return run


def landed_units(files: DataFrame, split: Splitter, extra: StructType | None = None, *,
                 keep_payload: bool = True) -> DataFrame:
    """binaryFile rows (path, modificationTime, length, content) -> one row per unit: LANDED_SCHEMA + extra.

    With keep_payload=False, `payload` is replaced by DIGEST_FIELDS (for bytes that stay in the landing zone)."""
    landed = LANDED_SCHEMA.fields if keep_payload else [*LANDED_SCHEMA.fields[:-1], *DIGEST_FIELDS]
    out_schema = StructType(landed + (extra.fields if extra else []))
    arrow = to_arrow_schema(out_schema)
    names = tuple(f.name for f in extra.fields) if extra else ()
    read = [c for c in ("path", "modificationTime", "content") if c in files.columns]
    return files.select(*read).mapInArrow(explode(split, arrow, names), out_schema)
