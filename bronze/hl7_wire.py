"""HL7 v2 on the wire: where messages begin and end, and the header fields needed to acknowledge one.

Real feeds end segments with CR (the standard), LF or CRLF, may start with a UTF-8 byte-order mark,
choose their own delimiters in MSH-1/MSH-2, and wrap messages in FHS/BHS batches. Everything here
works on bytes and decodes header fields as ISO-8859-1, which maps every byte to one character and
back, so an identifier echoed in an acknowledgement is byte-identical to what was sent.

Pure Python (no Spark): the gateway, the `send` client and bronze share it.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

BOM = b"\xef\xbb\xbf"
MLLP_START = b"\x0b"
MLLP_END = b"\x1c\x0d"
HEADER_SEGMENTS = (b"MSH", b"FHS", b"BHS")
DEFAULT_ENCODING = "^~\\&"
_BYTES_AS_TEXT = "iso-8859-1"
_SEGMENT_BREAK = re.compile(rb"\r\n|\r|\n")
_ENVELOPE_NAMES = (b"FHS", b"BHS", b"BTS", b"FTS")
_TERMINATORS = (0x0D, 0x0A)


class Hl7HeaderError(ValueError):
    """A message whose header cannot be read far enough to acknowledge or key it.

    `code` is the HL7 table 0357 error code an ERR segment reports (100 segment sequence error,
    101 required field missing, 102 data type error, 207 application internal error).
    """

    def __init__(self, code: str, text: str, header: Header | None = None, *, reason: str = "bad_header"):
        super().__init__(text)
        self.code = code
        self.text = text
        self.header = header
        self.reason = reason  # a stable short name for tables: missing_msh, bad_delimiters, ...


@dataclass(frozen=True)
class Header:
    """The first segment of a message or batch (MSH, FHS or BHS) and the fields an ACK echoes."""

    segment: str  # MSH, FHS or BHS
    field_separator: str
    encoding_characters: str
    sending_application: str
    sending_facility: str
    receiving_application: str
    receiving_facility: str
    timestamp: str  # MSH-7 as sent (HL7 TS, may carry an offset)
    message_type: str  # MSH-9 as sent, e.g. ORU^R01^ORU_R01
    control_id: str  # MSH-10
    processing_id: str  # MSH-11
    version: str  # MSH-12

    @property
    def component_separator(self) -> str:
        return self.encoding_characters[:1] or "^"

    @property
    def message_code(self) -> str:
        return self.message_type.split(self.component_separator)[0] if self.message_type else ""

    @property
    def trigger_event(self) -> str:
        parts = self.message_type.split(self.component_separator)
        return parts[1] if len(parts) > 1 else ""


def strip_bom(data: bytes) -> bytes:
    return data[len(BOM):] if data.startswith(BOM) else data


def segments(data: bytes) -> list[bytes]:
    """The segments of a message, whatever the terminator (CR, LF, CRLF); blank lines dropped."""
    return [s for s in _SEGMENT_BREAK.split(strip_bom(data)) if s.strip()]


def _field(fields: list[str], n: int) -> str:
    """HL7 field n of a header segment (MSH-1 is the separator itself, so MSH-n is fields[n-1])."""
    return fields[n - 1] if 0 < n - 1 < len(fields) else ""


def parse_header(data: bytes) -> Header:
    """Read the header segment of one message (or batch). Raises Hl7HeaderError saying what is wrong."""
    text = strip_bom(data).lstrip(b"\r\n\t ")
    if not text:
        raise Hl7HeaderError("100", "empty message: no MSH segment", reason="missing_msh")
    first = _SEGMENT_BREAK.split(text, maxsplit=1)[0]
    name = first[:3]
    if name not in HEADER_SEGMENTS:
        shown = first[:20].decode(_BYTES_AS_TEXT, "replace")
        raise Hl7HeaderError("100", f"message does not start with an MSH segment (starts with {shown!r})",
                             reason="missing_msh")
    if len(first) < 8:
        raise Hl7HeaderError("100", f"{name.decode()} segment too short to hold its delimiters",
                             reason="bad_delimiters")
    line = first.decode(_BYTES_AS_TEXT)
    sep = line[3]
    if sep.isalnum() or sep.isspace():
        raise Hl7HeaderError("102", f"{name.decode()}-1 field separator {sep!r} is not a delimiter character",
                             reason="bad_delimiters")
    fields = [line[:3], sep, *line[4:].split(sep)]
    # fields[0] = segment name, fields[1] = MSH-1, fields[2] = MSH-2, ...: shift so _field(n) = MSH-n.
    fields = fields[1:]
    encoding = _field(fields, 2)
    if not 2 <= len(encoding) <= 5 or sep in encoding:
        raise Hl7HeaderError("102", f"{name.decode()}-2 encoding characters {encoding!r} are not valid",
                             reason="bad_delimiters")
    header = Header(
        segment=name.decode(),
        field_separator=sep,
        encoding_characters=encoding,
        sending_application=_field(fields, 3),
        sending_facility=_field(fields, 4),
        receiving_application=_field(fields, 5),
        receiving_facility=_field(fields, 6),
        timestamp=_field(fields, 7),
        message_type=_field(fields, 9),
        control_id=_field(fields, 10),
        processing_id=_field(fields, 11),
        version=_field(fields, 12),
    )
    if header.segment == "MSH":
        if not header.message_type:
            raise Hl7HeaderError("101", "MSH-9 message type is empty", header, reason="missing_message_type")
        if not header.control_id:
            raise Hl7HeaderError("101", "MSH-10 message control id is empty", header, reason="missing_control_id")
    return header


# Bytes one find() or count() call scans. A C call holds the GIL throughout: on a worker thread of the gateway, a scan
# of a whole 16 MB batch in one call would keep the event loop from answering anyone for its length; 1 MB is ~1 ms.
_SCAN_WINDOW = 1 << 20


def _segment_starts(data: bytes, name: bytes) -> list[int]:
    """Offsets where a segment called `name` begins: at the start of the data or right after a CR or LF.

    bytes.find, one window at a time, rather than a regular expression: a look-behind pattern is tried at
    every offset, so one search through a 16 MB batch held the GIL for ~0.5 s."""
    out = []
    pos, size = 0, len(data)
    while pos < size:
        stop = min(size, pos + _SCAN_WINDOW)
        at = data.find(name, pos, stop + len(name) - 1)  # a match starting before `stop` may end after it
        if at < 0:
            pos = stop
            continue
        if at == 0 or data[at - 1] in _TERMINATORS:
            out.append(at)
        pos = at + 1
    return out


def count_messages(data: bytes) -> int:
    """How many messages (MSH segments at the start of a line) a file or batch holds, without splitting it."""
    count = data.startswith(b"MSH")
    for pos in range(0, len(data), _SCAN_WINDOW):
        end = pos + _SCAN_WINDOW + 3  # a 4-byte match starting in this window ends at most 3 bytes past it
        count += data.count(b"\rMSH", pos, end) + data.count(b"\nMSH", pos, end)
    return count


def split_messages(data: bytes) -> list[tuple[int, int]]:
    """(offset, length) of each message in a file or batch; FHS/BHS/BTS/FTS envelope segments excluded.

    Bytes before the first MSH that are not an envelope (garbage, a lone fragment) come back as a
    message of their own, so nothing is silently dropped; blank space between messages is skipped.
    """
    cuts = _segment_starts(data, b"MSH")  # in order; the few envelope segments are put in their places
    for name in _ENVELOPE_NAMES:
        for at in _segment_starts(data, name):
            bisect.insort(cuts, at)
    cuts.append(len(data))
    out = []
    lead = len(BOM) if data.startswith(BOM) else 0
    bounds = [lead, *[c for c in cuts if c > lead]]
    for begin, end in zip(bounds, bounds[1:], strict=False):
        if data[begin:begin + 3] in _ENVELOPE_NAMES:
            # The envelope segment is not a message; segments after it up to the next cut are
            # stray content (a batch with segments outside any MSH) and are kept as a piece of their own.
            brk = _SEGMENT_BREAK.search(data, begin, end)
            begin = brk.end() if brk else end
        if begin < end and data[begin:end].strip(b"\r\n\t \x00"):
            out.append((begin, end - begin))
    return out


def frame(message: bytes) -> bytes:
    """Wrap one message in MLLP framing."""
    return MLLP_START + message + MLLP_END
