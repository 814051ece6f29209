"""Landing segment files: how the gateways store every received message, and how bronze reads it back.

A segment (`*.clrec`) is append-only. It starts with an 8-byte file magic, then records back to back:

    b"CR"  header_len:u32  body_len:u32  header (UTF-8 JSON)  body (bytes as received)  crc32:u32

(big-endian; the CRC covers header and body). The header says when and from whom the bytes came:
`received_at` (ISO-8601 UTC, microseconds), `peer`, `feed`, `protocol`, `content_type`, `status`
(`accepted`, or `error`/`rejected` with a `reason`). A crash can only tear the tail of a segment: the
reader stops at the first record that is incomplete or whose CRC does not match and reports the
offset and the bytes it skipped, so a half-written record is never parsed as if it were whole.

Pure Python (no Spark): the gateway writes with it, bronze reads with it.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

SEGMENT_SUFFIX = ".clrec"
FILE_MAGIC = b"CLREC01\n"
RECORD_MAGIC = b"CR"
_HEAD = struct.Struct(">2sII")
_CRC = struct.Struct(">I")
# A header is a few hundred bytes; anything past this is a corrupt length field, not a header.
MAX_HEADER_BYTES = 64 * 1024


class SegmentFormatError(ValueError):
    """The bytes are not a landing segment (wrong or missing file magic)."""


@dataclass(frozen=True)
class Record:
    offset: int  # byte offset of the record in its segment
    body_offset: int  # byte offset of the body (the bytes as received) in its segment
    header: Mapping[str, Any]
    body: bytes


@dataclass(frozen=True)
class Scan:
    """What a segment holds: its whole records, and where the intact part ends."""

    records: list[Record]
    valid_end: int  # bytes [0, valid_end) are the file magic plus whole records
    size: int
    problem: str | None = None  # why reading stopped before `size`, when it did

    @property
    def torn_bytes(self) -> int:
        return self.size - self.valid_end


def encode_record(header: Mapping[str, Any], body: bytes) -> bytes:
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    crc = zlib.crc32(body, zlib.crc32(head))
    return b"".join((_HEAD.pack(RECORD_MAGIC, len(head), len(body)), head, body, _CRC.pack(crc)))


def is_segment(data: bytes | memoryview) -> bool:
    return bytes(data[: len(FILE_MAGIC)]) == FILE_MAGIC


def _read_one(data: memoryview, pos: int) -> tuple[Record | None, int, str | None]:
    """The record at `pos`: (record, next position, None) or (None, pos, why it is not whole)."""
    size = len(data)
    if size - pos < _HEAD.size:
        return None, pos, f"incomplete record header at byte {pos}"
    magic, head_len, body_len = _HEAD.unpack_from(data, pos)
    if magic != RECORD_MAGIC:
        return None, pos, f"no record marker at byte {pos}"
    if head_len > MAX_HEADER_BYTES:
        return None, pos, f"implausible header length {head_len} at byte {pos}"
    head_at = pos + _HEAD.size
    body_at = head_at + head_len
    end = body_at + body_len + _CRC.size
    if end > size:
        return None, pos, f"record at byte {pos} needs {end - pos} bytes, only {size - pos} present"
    head = bytes(data[head_at:body_at])
    body = bytes(data[body_at:body_at + body_len])
    (crc,) = _CRC.unpack_from(data, body_at + body_len)
    if crc != zlib.crc32(body, zlib.crc32(head)):
        return None, pos, f"checksum mismatch in record at byte {pos}"
    try:
        header = json.loads(head)
    except ValueError:
        return None, pos, f"unreadable header in record at byte {pos}"
    return Record(pos, body_at, header, body), end, None


def iter_records(data: bytes | memoryview) -> Iterator[Record | Scan]:
    """Yield each whole record, then one final Scan summary (records left empty to save memory)."""
    view = memoryview(data)
    if not is_segment(view):
        raise SegmentFormatError("not a carelake landing segment (missing the CLREC01 file magic)")
    pos = len(FILE_MAGIC)
    problem = None
    while pos < len(view):
        record, pos, problem = _read_one(view, pos)
        if record is None:
            break
        yield record
    yield Scan(records=[], valid_end=pos, size=len(view), problem=problem)


def scan(data: bytes | memoryview) -> Scan:
    """Read a whole segment: its records and whether (and where) a torn or corrupt tail begins."""
    records: list[Record] = []
    for item in iter_records(data):
        if isinstance(item, Record):
            records.append(item)
        else:
            return Scan(records, item.valid_end, item.size, item.problem)
    raise AssertionError("iter_records always ends with a Scan")
