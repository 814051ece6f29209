"""HL7 v2 messages to plain records for the silver layer: parse, decode, extract clinical content.

Pure Python, no I/O: a Spark `mapInArrow` calls `extract` once per message. Parsing accepts what real
feeds send (CR, LF or CRLF terminators, a UTF-8 byte-order mark, the sender's own delimiters, escape
sequences, ISO-8859-1 or UTF-8 text). A message whose header cannot be used raises `Hl7ParseError`
with a stable reason code; a problem inside one segment becomes an entry in `Extracted.issues` and
the rest of the message is still extracted.

Empty vs null: an empty field was not sent (unknown, keep what is stored); the HL7 null `""` asks to
delete the stored value. The parser returns `NULL` for the latter; extracted records hold None and
name such keys in their `nulled` list.

Reason codes. Raised (`Hl7ParseError.code`): missing_msh, bad_delimiters, missing_message_type,
missing_control_id (and bad_timestamp from `parse_ts`). In `Extracted.issues`: bad_timestamp,
missing_patient_id, unsupported_message_type, extra_repetitions, continuation_line.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone, tzinfo
from functools import lru_cache

from bronze.hl7_wire import strip_bom

__all__ = [
    "ENCOUNTER_KEYS", "HEADER_KEYS", "ISSUE_KEYS", "MERGE_KEYS", "NULL", "OBSERVATION_KEYS", "ORDER_KEYS",
    "PATIENT_KEYS", "REPORT_KEYS", "Delimiters", "Extracted", "Hl7Null", "Hl7ParseError", "Message", "Segment",
    "decode", "extract", "parse", "parse_ts", "parse_ts_precision",
]

_FRAMING = "\r\n\x0b\x1c\x00"
_TS = re.compile(r"(\d{4})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:\.(\d{1,6}))?)?)?)?)?)?"
                 r"(?:([+-])(\d{2})(\d{2}))?")
_PRECISIONS = ("year", "month", "day", "hour", "minute", "second")
_COMPARATORS = frozenset({"<", ">", "<=", ">=", "=", "<>"})
_SEX = {"M": "male", "F": "female", "O": "other", "A": "other", "U": "unknown", "N": "unknown"}
_STATUS = {"F": "final", "C": "corrected", "P": "preliminary", "W": "entered_in_error", "X": "cannot_obtain",
           "D": "deleted", "R": "not_verified", "I": "pending", "S": "partial", "U": "final", "N": "not_asked",
           "O": "order_detail"}
_PRIORITY = {"S": "stat", "STAT": "stat", "A": "asap", "ASAP": "asap", "R": "routine", "ROUTINE": "routine"}
_EVENTS = {"A01": "admit", "A02": "transfer", "A03": "discharge", "A04": "register", "A05": "pre_admit",
           "A06": "outpatient_to_inpatient", "A07": "inpatient_to_outpatient", "A08": "update",
           "A11": "cancel_admit", "A12": "cancel_transfer", "A13": "cancel_discharge", "A14": "pending_admit",
           "A21": "leave_of_absence", "A22": "return_from_leave", "A27": "cancel_pending_admit",
           "A38": "cancel_pre_admit"}
_READ_AS_VALUE = frozenset({"NM", "SN", "CWE", "CE", "CNE", "CF"})  # other types (ST, TX, FT...) are read as text
_MODALITIES = frozenset({"CR", "CT", "DX", "ES", "IO", "MG", "MR", "NM", "OT", "PT", "RF", "US", "XA", "XC"})
_PATIENT_MERGES = frozenset({"A18", "A30", "A34", "A36", "A39", "A40", "A46", "A47"})
_SUPPORTED = frozenset({"ADT", "ORU", "ORM", "OML", "OMI"})
_OBSERVATION_MESSAGES = frozenset({"ADT", "ORU"})
_ORDER_MESSAGES = frozenset({"ORM", "OML", "OMI"})


class Hl7ParseError(ValueError):
    """A message, or one value in it, that cannot be used; `code` is the stable reason silver quarantines on."""

    def __init__(self, code: str, detail: str):
        super().__init__(code, detail)  # both in args, so the error pickles (Spark ships it between processes)
        self.code = code
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.code}: {self.detail}"


class Hl7Null:
    """The explicit HL7 null `""` (delete the stored value); falsy like an empty field, but not the same."""

    _instance: Hl7Null | None = None

    def __new__(cls) -> Hl7Null:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "NULL"


NULL = Hl7Null()
Value = str | Hl7Null | None

_ABSENT = "\x00"  # stands in for an encoding character the sender left out: it never occurs in text


@dataclass(frozen=True, slots=True)
class Delimiters:
    """The encoding characters from MSH-1 and MSH-2 (one the sender leaves out is NUL, which matches nothing)."""

    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"
    truncation: str = _ABSENT

    def unescape(self, text: str) -> str:
        """Text with HL7 escape sequences replaced; unknown or unterminated sequences are kept as sent."""
        esc = self.escape
        if esc not in text:
            return text
        table = _escape_table(self)
        out, i = [], 0
        while (j := text.find(esc, i)) >= 0 and (k := text.find(esc, j + 1)) >= 0:
            seq = text[j + 1:k]
            replacement = table.get(seq)
            if replacement is None:
                replacement = _escape_command(seq)
            out.append(text[i:j])
            if replacement is None:  # not an escape sequence: keep the escape character, rescan from the next one
                out.append(text[j:k])
                i = k
            else:
                out.append(replacement)
                i = k + 1
        out.append(text[i:])
        return "".join(out)

    def leaf(self, raw: str) -> Value:
        """One component as sent to its value: first subcomponent, decoded; None when empty, NULL when ""."""
        if not raw:
            return None
        if self.subcomponent in raw:
            raw = raw.split(self.subcomponent, 1)[0]
            if not raw:
                return None
        if raw == '""':
            return NULL
        return self.unescape(raw) if self.escape in raw else raw


@lru_cache(maxsize=64)
def _escape_table(d: Delimiters) -> dict[str, str]:
    """The delimiter and highlighting escapes of one set of delimiters."""
    table = {"F": d.field, "S": d.component, "T": d.subcomponent, "R": d.repetition, "E": d.escape, "P": d.truncation,
             "H": "", "N": "", ".br": "\n"}
    return {seq: text for seq, text in table.items() if text != _ABSENT}


def _escape_command(seq: str) -> str | None:
    """What a hex, character-set or formatting escape stands for; None when `seq` is not an escape."""
    head = seq[:1]
    if head == "X":
        return _hex_text(seq[1:])
    if head in ("C", "M", "Z"):  # character-set switches and locally defined escapes carry no text
        return ""
    if head == ".":
        if seq.startswith(".sp"):
            count = seq[3:].strip().lstrip("+")
            return "\n" * (int(count) if count.isdigit() else 1)
        return ""  # the other formatting commands (.fi .nf .in .ti .sk .ce) only affect layout
    return None


def _hex_text(digits: str) -> str | None:
    """The text of an `\\Xhh..\\` escape: UTF-8 when the bytes are valid UTF-8, else ISO-8859-1."""
    try:
        data = bytes.fromhex(digits)
    except ValueError:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("iso-8859-1")


class Segment:
    """One segment: `fields[n]` is field n as sent (for MSH, fields[1] is the field separator itself).

    Values come back decoded: a str, None when not sent, NULL when sent as "". `plain` says the segment has
    no repetition, escape or subcomponent character and no quote, so its fields need splitting only;
    `has_null` says whether it contains "" anywhere.
    """

    __slots__ = ("name", "fields", "index", "delimiters", "plain", "has_null")

    def __init__(self, name: str, fields: list[str], index: int, delimiters: Delimiters, line: str):
        d = delimiters
        self.name = name
        self.fields = fields
        self.index = index
        self.delimiters = d
        self.plain = not (d.repetition in line or d.escape in line or d.subcomponent in line or '"' in line)
        self.has_null = not self.plain and '""' in line

    def __repr__(self) -> str:
        return f"Segment({self.delimiters.field.join(self.fields)!r})"

    def raw(self, n: int) -> str:
        """Field n exactly as sent ("" when absent)."""
        return self.fields[n] if n < len(self.fields) else ""

    def repetition_count(self, n: int) -> int:
        """How many repetitions field n has (0 when empty)."""
        raw = self.fields[n] if n < len(self.fields) else ""
        return raw.count(self.delimiters.repetition) + 1 if raw else 0

    def repetition(self, n: int, rep: int = 0) -> str:
        """One repetition of field n as sent ("" when absent)."""
        raw = self.fields[n] if n < len(self.fields) else ""
        sep = self.delimiters.repetition
        if sep in raw:
            reps = raw.split(sep)
            return reps[rep] if rep < len(reps) else ""
        return "" if rep else raw

    def parts(self, n: int, width: int = 1, rep: int = 0) -> list[Value]:
        """Components 1..width of one repetition of field n, decoded (first subcomponent of each)."""
        d = self.delimiters
        if self.plain:
            raw = self.fields[n] if n < len(self.fields) and not rep else ""
            out = raw.split(d.component, width)[:width] if raw else []
            if "" in out:
                out = [c or None for c in out]
        else:
            raw = self.repetition(n, rep)
            if raw == '""':
                return [NULL] * width
            out = [d.leaf(c) for c in raw.split(d.component, width)[:width]] if raw else []
        if len(out) < width:
            out += [None] * (width - len(out))
        return out

    def value(self, n: int, component: int = 1, rep: int = 0) -> Value:
        """One component of one repetition of field n, decoded."""
        if self.plain and component == 1:
            raw = self.fields[n] if n < len(self.fields) and not rep else ""
            return raw.split(self.delimiters.component, 1)[0] or None
        return self.parts(n, component, rep)[component - 1]

    def values(self, n: int, component: int = 1) -> list[str]:
        """One component of every repetition of field n, decoded, empty and null ones left out."""
        if self.plain:
            value = self.value(n, component)
            return [value] if value else []
        return [v for rep in range(self.repetition_count(n)) if (v := self.value(n, component, rep))]

    def subparts(self, n: int, component: int = 1, rep: int = 0) -> list[Value]:
        """Every subcomponent of one component of field n, decoded."""
        raw = self.repetition(n, rep)
        d = self.delimiters
        if raw == '""':
            return [NULL]
        comps = raw.split(d.component)
        raw = comps[component - 1] if component <= len(comps) else ""
        if not raw:
            return []
        return [d.leaf(sub) for sub in raw.split(d.subcomponent)]

    def text(self, n: int, rep: int = 0) -> Value:
        """One repetition of field n as text (component and subcomponent characters kept), decoded."""
        raw = self.repetition(n, rep)
        if self.plain or not raw:
            return raw or None
        return NULL if raw == '""' else self.delimiters.unescape(raw)


@dataclass(frozen=True, slots=True)
class Message:
    """A parsed message: its delimiters, segments (MSH first), how its bytes were decoded, and parse issues."""

    delimiters: Delimiters
    segments: list[Segment]
    encoding: str  # "utf-8" or "latin-1"
    charset: str | None  # MSH-18 as declared (first repetition), e.g. "UNICODE UTF-8", "8859/1"
    issues: list[dict]

    @property
    def header(self) -> Segment:
        return self.segments[0]

    def first(self, name: str) -> Segment | None:
        """The first segment named `name`, or None."""
        return next((s for s in self.segments if s.name == name), None)

    def all(self, name: str) -> list[Segment]:
        """Every segment named `name`, in message order."""
        return [s for s in self.segments if s.name == name]


def decode(data: bytes) -> tuple[str, str]:
    """Message bytes as text and the encoding used: UTF-8 when valid, else ISO-8859-1 (which never fails)."""
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return data.decode("iso-8859-1"), "latin-1"


def _lines(text: str) -> list[str]:
    """Non-blank lines of a message, whatever the terminator (CR, LF, CRLF)."""
    if "\n" in text:
        text = text.replace("\r\n", "\r").replace("\n", "\r")
    return [line for line in text.split("\r") if line and not line.isspace()]


@lru_cache(maxsize=64)
def _delimiters(sep: str, enc: str) -> Delimiters:
    """The delimiters MSH-1 and MSH-2 declare; bad_delimiters when they cannot be used."""
    if sep.isalnum() or sep.isspace():
        raise Hl7ParseError("bad_delimiters", f"MSH-1 field separator {sep!r} is not a delimiter character")
    if not 2 <= len(enc) <= 5 or len(set(enc)) != len(enc) or any(c.isalnum() or c.isspace() for c in enc):
        raise Hl7ParseError("bad_delimiters", f"MSH-2 encoding characters {enc!r} are not 2 to 5 distinct "
                                              "delimiter characters")
    return Delimiters(sep, *enc, *[_ABSENT] * (5 - len(enc)))


def _header_delimiters(line: str) -> Delimiters:
    """The delimiters of an MSH line."""
    if len(line) < 8:
        raise Hl7ParseError("bad_delimiters", f"MSH segment {line[:20]!r} is too short to hold its delimiters")
    sep = line[3]
    end = line.find(sep, 4)
    return _delimiters(sep, line[4:end] if end >= 0 else line[4:])


@lru_cache(maxsize=64)
def _segment_start(sep: str) -> re.Pattern[str]:
    """A pattern matching lines that begin a segment: a name (letter, then two letters or digits), then `sep`."""
    return re.compile(f"[A-Z][A-Z0-9]{{2}}(?:{re.escape(sep)}|$)")


def _join_continuations(lines: list[str], starts: Callable[[str], object], issues: list[dict]) -> list[str]:
    """Lines with each one that does not begin a segment (`starts` fails) joined to the previous one by a line break."""
    joined = [lines[0]]
    for line in lines[1:]:
        if starts(line):
            joined.append(line)
        else:
            issues.append(_issue("continuation_line", f"line {line[:20]!r} does not start a segment; joined to the "
                                 "previous segment as a line break", joined[-1][:3], "", len(joined) - 1))
            joined[-1] += "\n" + line
    return joined


def parse(data: bytes) -> Message:
    """Parse one message (not a batch: split those with `bronze.hl7_wire.split_messages`)."""
    text, encoding = decode(strip_bom(data))
    lines = _lines(text.lstrip(_FRAMING + " \t").rstrip(_FRAMING))
    if not lines or not lines[0].startswith("MSH"):
        start = lines[0][:20] if lines else ""
        raise Hl7ParseError("missing_msh", f"message does not start with an MSH segment (starts with {start!r})")
    d = _header_delimiters(lines[0])
    sep = d.field
    issues: list[dict] = []
    starts = _segment_start(sep).match
    joined = lines if all(map(starts, lines)) else _join_continuations(lines, starts, issues)
    first = joined[0]
    segments = [Segment("MSH", ["MSH", sep, *first[4:].split(sep)], 0, d, first[first.find(sep, 4) + 1:])]
    segments += [Segment(line[:3], line.split(sep), i, d, line) for i, line in enumerate(joined) if i]
    msh = segments[0]
    if not msh.value(9):
        raise Hl7ParseError("missing_message_type", "MSH-9 message type is empty")
    if not msh.value(10):
        raise Hl7ParseError("missing_control_id", "MSH-10 message control id is empty")
    return Message(d, segments, encoding, msh.text(18) or None, issues)


def parse_ts_precision(text: str, default_tz: tzinfo) -> tuple[datetime, str]:
    """An HL7 TS/DTM as an aware UTC datetime and its precision (year, month, day, hour, minute, second, fraction).

    A value without a UTC offset is local time in `default_tz`. Raises Hl7ParseError("bad_timestamp").
    """
    return _parse_ts(text.strip(), default_tz)


def parse_ts(text: str, default_tz: tzinfo) -> datetime:
    """An HL7 TS/DTM (`YYYY[MM[DD[HH[MM[SS[.S]]]]]][+/-ZZZZ]`) as an aware UTC datetime."""
    return _parse_ts(text.strip(), default_tz)[0]


@lru_cache(maxsize=8192)
def _parse_ts(text: str, default_tz: tzinfo) -> tuple[datetime, str]:
    """parse_ts_precision of stripped text, cached: a feed repeats its timestamps within and across messages."""
    m = _TS.fullmatch(text)
    if m is None:
        raise Hl7ParseError("bad_timestamp", f"{text[:40]!r} is not an HL7 timestamp "
                                             "(YYYY[MM[DD[HH[MM[SS[.S]]]]]][+/-ZZZZ])")
    year, month, day, hour, minute, second, fraction, sign, off_h, off_m = m.groups()
    parts = (year, month, day, hour, minute, second)
    precision = "fraction" if fraction else _PRECISIONS[sum(p is not None for p in parts) - 1]
    zone = default_tz
    if sign:
        if int(off_h) > 14 or int(off_m) > 59:
            raise Hl7ParseError("bad_timestamp", f"{text[:40]!r} has an impossible UTC offset {sign}{off_h}{off_m}")
        offset = timedelta(hours=int(off_h), minutes=int(off_m))
        zone = timezone(-offset if sign == "-" else offset)
    try:
        local = datetime(int(year), int(month or 1), int(day or 1), int(hour or 0), int(minute or 0),
                         int(second or 0), int((fraction or "0").ljust(6, "0")), tzinfo=zone)
    except ValueError as e:
        raise Hl7ParseError("bad_timestamp", f"{text[:40]!r} is not a valid date and time ({e})") from None
    return local.astimezone(UTC), precision


@lru_cache(maxsize=8192)
def _parse_date(text: str) -> tuple[date, str]:
    """The calendar date an HL7 DT/TS names (no zone conversion: a birth date is a date) and its precision."""
    m = _TS.fullmatch(text.strip())
    if m is None:
        raise Hl7ParseError("bad_timestamp", f"{text[:40]!r} is not an HL7 date (YYYY[MM[DD]])")
    year, month, day = m.group(1, 2, 3)
    try:
        value = date(int(year), int(month or 1), int(day or 1))
    except ValueError as e:
        raise Hl7ParseError("bad_timestamp", f"{text[:40]!r} is not a valid date ({e})") from None
    return value, "day" if day else "month" if month else "year"


def _issue(code: str, detail: str, segment: str, field: str, index: int) -> dict:
    """One problem found inside a message: reason code, sentence, segment name, field (e.g. OBX-14), position."""
    return {"code": code, "detail": detail, "segment": segment, "field": field, "record_index": index}


def _finish(record: dict, may_hold_null: bool = True) -> dict:
    """Replace NULL values with None and list their keys in `nulled`."""
    nulled = [k for k, v in record.items() if v is NULL] if may_hold_null else []
    for k in nulled:
        record[k] = None
    record["nulled"] = nulled
    return record


HEADER_KEYS = ("control_id", "message_code", "trigger_event", "message_structure", "sent_at", "event_at",
               "sending_application", "sending_facility", "receiving_application", "receiving_facility", "version",
               "processing_id", "encoding", "charset")
PATIENT_KEYS = ("record_index", "source_system", "mrn", "identifiers", "family_name", "given_name", "middle_name",
                "birth_date", "birth_date_precision", "sex", "address_line", "address_line2", "address_city",
                "address_state", "address_postal_code", "address_country", "phone", "deceased", "deceased_at",
                "event_at", "nulled")
ENCOUNTER_KEYS = ("record_index", "visit_number", "visit_authority", "patient_mrn", "patient_source_system",
                  "event_code", "event", "patient_class", "location_point_of_care", "location_room", "location_bed",
                  "location_facility", "prior_location_point_of_care", "prior_location_room", "prior_location_bed",
                  "prior_location_facility", "attending_doctor_id", "admit_at", "discharge_at", "event_at", "nulled")
MERGE_KEYS = ("record_index", "surviving_mrn", "surviving_source_system", "prior_mrn", "prior_source_system",
              "event_code", "event_at", "nulled")
OBSERVATION_KEYS = ("record_index", "set_id", "value_type", "code", "code_system", "display", "alt_code",
                    "alt_code_system", "alt_display", "sub_id", "value_num", "comparator", "value_text", "value_code",
                    "value_code_system", "missing_value", "value_error", "units_code", "units_system", "units_text",
                    "reference_range", "abnormal_flags", "status_code", "status", "effective_at", "effective_source",
                    "placer_order_number", "filler_order_number", "service_code", "service_display", "order_control",
                    "patient_mrn", "patient_source_system", "visit_number", "nulled")
ORDER_KEYS = ("record_index", "order_control", "placer_order_number", "filler_order_number", "order_status",
              "priority", "priority_code", "service_code", "service_display", "service_code_system", "requested_at",
              "ordering_provider_id", "accession_number", "modality", "patient_mrn", "patient_source_system",
              "visit_number", "placer_system", "reason_codes", "reason_text", "transaction_at", "nulled")
REPORT_KEYS = ("record_index", "placer_order_number", "placer_system", "filler_order_number", "filler_system",
               "service_code", "service_display", "service_code_system", "diagnostic_service", "result_status",
               "observed_at", "results_at", "interpreter_id", "interpreter_name", "accession_number", "patient_mrn",
               "patient_source_system", "visit_number", "nulled")
ISSUE_KEYS = ("code", "detail", "segment", "field", "record_index")


@dataclass(frozen=True)
class Extracted:
    """The clinical content of one message as plain dicts; each kind has exactly the keys of its *_KEYS tuple.

    Times are aware UTC datetimes. Every record has `record_index` (position of its segment, MSH = 0) and
    `nulled` (the keys whose source was sent as "": clear the stored value). A value that cannot be read
    (a bad timestamp) is None and has an entry in `issues`; it never falls back to another field.

    header: MSH-10 control_id; MSH-9 message_code/trigger_event/message_structure; MSH-7 sent_at; event_at
      (EVN-2, else MSH-7); MSH-3..6 applications and facilities (HD namespace, else universal id); MSH-12
      version; MSH-11 processing_id; encoding ("utf-8"/"latin-1", how the bytes were decoded); charset (MSH-18).
    patients (PID): mrn (PID-3 repetition of type MR, else the first) and source_system (its assigning
      authority, else MSH-4); identifiers [{value, type, authority}]; PID-5 names; birth_date (a date) and
      birth_date_precision (year/month/day); sex (male/female/other/unknown); PID-11 address (address_line
      joins the street subcomponents); PID-13 phone; deceased (PID-30, or True when only PID-29 is sent),
      deceased_at; event_at.
    encounters (PV1): visit_number and visit_authority (PV1-19); patient_mrn/patient_source_system; event_code
      (ADT trigger) and event (admit, transfer, discharge, register, update, cancel_admit, ...; None for
      non-ADT messages); patient_class (PV1-2 as sent); location_* and prior_location_* (PV1-3, PV1-6: point of
      care, room, bed, facility); attending_doctor_id (PV1-7.1); admit_at (PV1-44); discharge_at (PV1-45).
    merges (MRG with MRG-1): surviving_* from the PID before it, prior_mrn/prior_source_system from MRG-1.
    observations (OBX in ORU and ADT): OBX-3 code/display/code_system and alt_*; OBX-4 sub_id; value_num
      (NM, SN), comparator (SN), value_text (text types joined by line breaks, SN ranges/ratios, the display
      of a coded value, or the unreadable text), value_code/value_code_system (CWE, CE, CNE, CF);
      missing_value; value_error (not_a_number, bad_comparator); OBX-6 units_code/units_text/units_system;
      OBX-7 reference_range; OBX-8 abnormal_flags (list); OBX-11 status_code and status (final, corrected,
      preliminary, entered_in_error, cannot_obtain, deleted, not_verified, pending, ...); effective_at from
      effective_source (OBX-14, else OBR-7, else MSH-7); OBR-2/3/4 and ORC-1 order context; patient context.
    orders (ORC/OBR in ORM and OML): ORC-1 order_control; placer/filler numbers (ORC, else OBR); ORC-5
      order_status; priority (stat/asap/routine) from priority_code (TQ1-9, else ORC-7.6, OBR-27.6, OBR-5);
      OBR-4 service_*; requested_at (TQ1-7, else ORC-7.4, OBR-27.4, OBR-6); ordering_provider_id (ORC-12,
      else OBR-16); accession_number (IPC-1, else OBR-18); modality (IPC-5, else OBR-24 when a DICOM modality);
      placer_system (the placer number's universal id, else its namespace); reason_codes [{code, display, system}]
      (OBR-31 repetitions, then DG1-3 of the order) and reason_text (OBR-31.2 texts joined, else OBR-13);
      transaction_at (ORC-9: when the order was placed or changed). OMI
      (imaging orders) is read like ORM.
    reports (OBR in ORU): the request a group of results answers. placer/filler numbers (OBR-2/3) with their
      systems; OBR-4 service_*; diagnostic_service (OBR-24); result_status (OBR-25 as sent); observed_at (OBR-7);
      results_at (OBR-22); interpreter_id and interpreter_name ("Family, Given") of OBR-32; accession_number
      (OBR-18); patient context. Its OBX are the observations whose record_index lies before the next OBR.
    issues: {code, detail, segment, field, record_index}.
    """

    header: dict
    patients: list[dict]
    encounters: list[dict]
    merges: list[dict]
    observations: list[dict]
    orders: list[dict]
    issues: list[dict]
    reports: list[dict] = dataclasses.field(default_factory=list)


_NO_PATIENT = {"patient_mrn": None, "patient_source_system": None, "visit_number": None}
_NO_ORDER = {"placer_order_number": None, "filler_order_number": None, "service_code": None,
             "service_display": None, "order_control": None}
# Records are copies of these templates (much cheaper than building a dict of 35 keys from scratch).
_HEADER, _PATIENT, _ENCOUNTER, _MERGE, _OBSERVATION, _ORDER, _REPORT = (
    dict.fromkeys(keys) for keys in (HEADER_KEYS, PATIENT_KEYS, ENCOUNTER_KEYS, MERGE_KEYS, OBSERVATION_KEYS,
                                     ORDER_KEYS, REPORT_KEYS))


class _Walker:
    """One pass over a parsed message, keeping the PID/PV1/ORC/OBR context each record needs."""

    def __init__(self, msg: Message, default_tz: tzinfo):
        self.msg = msg
        self.tz = default_tz
        self.issues = list(msg.issues)
        self.patients: list[dict] = []
        self.encounters: list[dict] = []
        self.merges: list[dict] = []
        self.observations: list[dict] = []
        self.orders: list[dict] = []
        self.reports: list[dict] = []
        msh = msg.header
        self.facility = _hd(msh.parts(4, 2))
        self.code, self.trigger, self.structure = msh.parts(9, 3)
        self.sent_at = self.ts(msh, 7)
        evn = msg.first("EVN")
        self.event_at = self.ts(evn, 2) if evn is not None and evn.raw(2) else self.sent_at
        self.patient = _NO_PATIENT  # patient_mrn, patient_source_system, visit_number of what follows
        self.order_context = _NO_ORDER  # OBR/ORC keys copied into each observation
        self.orc: Segment | None = None
        self.orc_fresh = False  # the ORC was the last order-level segment, so the next OBR belongs to it
        self.obr: Segment | None = None
        self.order: dict | None = None  # the order record being built (order messages)
        self.order_has_obr = False

    def ts(self, seg: Segment, n: int, component: int = 1) -> datetime | Hl7Null | None:
        """Field n (a TS) of `seg` in UTC; a bad value becomes an issue and None."""
        text = seg.value(n, component)
        if not text:
            return text
        try:
            return _parse_ts(text.strip(), self.tz)[0]
        except Hl7ParseError as e:
            self.issue(e.code, e.detail, seg, n)
            return None

    def issue(self, code: str, detail: str, seg: Segment, n: int | None = None) -> None:
        """Record a problem in field n of `seg` (or in the whole segment)."""
        where = f"{seg.name}-{n}" if n is not None else seg.name
        self.issues.append(_issue(code, f"{where} (segment {seg.index}): {detail}", seg.name,
                                  where if n is not None else "", seg.index))

    def run(self) -> Extracted:
        """Walk the segments and return everything extracted."""
        handlers = _HANDLERS_WITH_OBX if self.code in _OBSERVATION_MESSAGES else _HANDLERS
        for seg in self.msg.segments:
            handler = handlers.get(seg.name)
            if handler is not None:
                handler(self, seg)
        self.flush_order()
        self.check_message()
        return Extracted(self.header(), self.patients, self.encounters, self.merges, self.observations,
                         self.orders, self.issues, self.reports)

    def check_message(self) -> None:
        """Message-level issues: a type this extractor does not cover, a clinical message without a patient."""
        msh = self.msg.header
        if self.code not in _SUPPORTED:
            self.issue("unsupported_message_type", f"message type {self.code!r} is not extracted beyond its PID and "
                       "PV1 segments", msh, 9)
        elif not self.patients and self.code != "ADT":
            self.issue("missing_patient_id", f"{self.code} message has no PID segment", msh)

    def header(self) -> dict:
        """The message header record."""
        msh, r = self.msg.header, _HEADER.copy()
        r["control_id"] = msh.value(10)
        r["message_code"] = self.code
        r["trigger_event"] = self.trigger or None
        r["message_structure"] = self.structure or None
        r["sent_at"] = self.sent_at or None
        r["event_at"] = self.event_at or None
        r["sending_application"] = _hd(msh.parts(3, 2)) or None
        r["sending_facility"] = self.facility or None
        r["receiving_application"] = _hd(msh.parts(5, 2)) or None
        r["receiving_facility"] = _hd(msh.parts(6, 2)) or None
        r["version"] = msh.value(12) or None
        r["processing_id"] = msh.value(11) or None
        r["encoding"] = self.msg.encoding
        r["charset"] = self.msg.charset
        return r

    def identifiers(self, seg: Segment, n: int) -> tuple[list[dict], Value, Value]:
        """All identifiers of a CX field, and the MRN (type MR, else the first) with its assigning authority."""
        ids = []
        for rep in range(seg.repetition_count(n)):
            value, _, _, authority, kind = seg.parts(n, 5, rep)
            if value:
                ids.append({"value": value, "type": kind or None,
                            "authority": (authority or _hd(seg.subparts(n, 4, rep))) or None})
        chosen = next((i for i in ids if i["type"] == "MR"), ids[0] if ids else None)
        if chosen is None:
            missing = NULL if seg.raw(n) == '""' else None
            return ids, missing, missing
        return ids, chosen["value"], chosen["authority"] or self.facility

    def pid(self, seg: Segment) -> None:
        """PID: one patient record; it also becomes the patient context of what follows."""
        r = _PATIENT.copy()
        r["record_index"] = seg.index
        r["identifiers"], r["mrn"], r["source_system"] = ids, mrn, system = self.identifiers(seg, 3)
        if not mrn:
            self.issue("missing_patient_id", "no patient identifier", seg, 3)
        self.patient = {"patient_mrn": mrn or None, "patient_source_system": system or None, "visit_number": None}
        self.orc, self.obr, self.order_context = None, None, _NO_ORDER
        r["family_name"], r["given_name"], r["middle_name"] = seg.parts(5, 3)
        r["birth_date"], r["birth_date_precision"] = self.birth_date(seg)
        r["sex"] = _mapped(seg.value(8), _SEX, "unknown")
        r["address_line"] = _street(seg.subparts(11, 1))
        (_, r["address_line2"], r["address_city"], r["address_state"], r["address_postal_code"],
         r["address_country"]) = seg.parts(11, 6)
        r["phone"] = _phone(seg.parts(13, 7))
        r["deceased_at"] = deceased_at = self.ts(seg, 29)
        r["deceased"] = _deceased(seg.value(30), deceased_at)
        r["event_at"] = self.event_at
        self.patients.append(_finish(r, seg.has_null))

    def birth_date(self, seg: Segment) -> tuple[date | Hl7Null | None, str | Hl7Null | None]:
        """PID-7 as a date and its precision; a bad value becomes an issue."""
        text = seg.value(7)
        if not text:
            return text, text
        try:
            return _parse_date(text)
        except Hl7ParseError as e:
            self.issue(e.code, e.detail, seg, 7)
            return None, None

    def pv1(self, seg: Segment) -> None:
        """PV1: one encounter record; its visit number becomes the context of what follows."""
        r = _ENCOUNTER.copy()
        r["record_index"] = seg.index
        r["visit_number"] = visit = seg.value(19)
        r["visit_authority"] = _hd(seg.subparts(19, 4))
        self.patient = {**self.patient, "visit_number": visit or None}
        r["patient_mrn"] = self.patient["patient_mrn"]
        r["patient_source_system"] = self.patient["patient_source_system"]
        if self.code == "ADT":
            r["event_code"] = self.trigger
            r["event"] = _EVENTS.get(self.trigger or "")
        r["patient_class"] = seg.value(2)
        r["location_point_of_care"], r["location_room"], r["location_bed"] = seg.parts(3, 3)
        r["location_facility"] = _hd(seg.subparts(3, 4))
        r["prior_location_point_of_care"], r["prior_location_room"], r["prior_location_bed"] = seg.parts(6, 3)
        r["prior_location_facility"] = _hd(seg.subparts(6, 4))
        r["attending_doctor_id"] = seg.value(7)
        r["admit_at"] = self.ts(seg, 44)
        r["discharge_at"] = self.ts(seg, 45)
        r["event_at"] = self.event_at
        self.encounters.append(_finish(r, seg.has_null))

    def mrg(self, seg: Segment) -> None:
        """MRG with a prior patient identifier: one merge record pairing the current PID (surviving) with it.

        MRG also carries prior accounts and visits (A06, A41, A45...); without MRG-1 it is no patient merge.
        """
        _, prior, prior_system = self.identifiers(seg, 1)
        if not prior:
            if self.trigger in _PATIENT_MERGES:
                self.issue("missing_patient_id", "no prior patient identifier", seg, 1)
            return
        r = _MERGE.copy()
        r["record_index"] = seg.index
        r["surviving_mrn"] = self.patient["patient_mrn"]
        r["surviving_source_system"] = self.patient["patient_source_system"]
        r["prior_mrn"], r["prior_source_system"] = prior, prior_system
        r["event_code"] = self.trigger
        r["event_at"] = self.event_at
        self.merges.append(_finish(r, seg.has_null))

    def orc_segment(self, seg: Segment) -> None:
        """ORC: opens an order group (and, in order messages, an order record)."""
        self.orc, self.orc_fresh, self.obr = seg, True, None
        self.order_context = {**_NO_ORDER, "order_control": seg.value(1) or None}
        if self.code in _ORDER_MESSAGES:
            self.flush_order()
            self.order = self.new_order(seg)

    def obr_segment(self, seg: Segment) -> None:
        """OBR: the request the following OBX belong to; in order messages it fills or opens an order record."""
        if not self.orc_fresh:
            self.orc = None
        self.obr, self.orc_fresh = seg, False
        service_code, service_display = seg.parts(4, 2)
        self.order_context = {"placer_order_number": seg.value(2) or None, "filler_order_number": seg.value(3) or None,
                              "service_code": service_code or None, "service_display": service_display or None,
                              "order_control": (self.orc.value(1) if self.orc else None) or None}
        if self.code == "ORU":
            self.reports.append(self.report(seg))
        if self.code not in _ORDER_MESSAGES:
            return
        if self.order is None or self.order_has_obr:
            self.flush_order()
            self.order = self.new_order(None)
        self.fill_order(self.order, seg)
        self.order_has_obr = True

    def new_order(self, orc: Segment | None) -> dict:
        """A new order record from an ORC (or none) and the current patient context."""
        r = _ORDER.copy()
        r.update(self.patient)
        self.order_has_obr = False
        if orc is not None:
            r["record_index"] = orc.index
            r["order_control"] = orc.value(1)
            r["placer_order_number"] = orc.value(2)
            r["filler_order_number"] = orc.value(3)
            r["order_status"] = orc.value(5)
            r["priority_code"] = orc.value(7, 6)
            r["requested_at"] = self.ts(orc, 7, 4)
            r["ordering_provider_id"] = orc.value(12)
            r["placer_system"] = _ei_system(orc.parts(2, 4))
            r["transaction_at"] = self.ts(orc, 9)
        r["reason_codes"] = []
        return r

    def report(self, seg: Segment) -> dict:
        """OBR of a result message: one report record (its OBX follow it)."""
        r = _REPORT.copy()
        r.update(self.patient)
        r["record_index"] = seg.index
        r["placer_order_number"], r["placer_system"] = seg.value(2), _ei_system(seg.parts(2, 4))
        r["filler_order_number"], r["filler_system"] = seg.value(3), _ei_system(seg.parts(3, 4))
        r["service_code"], r["service_display"], r["service_code_system"] = seg.parts(4, 3)
        r["diagnostic_service"] = seg.value(24)
        r["result_status"] = seg.value(25)
        r["observed_at"] = self.ts(seg, 7)
        r["results_at"] = self.ts(seg, 22)
        interpreter = seg.subparts(32, 1)
        r["interpreter_id"] = interpreter[0] if interpreter else None
        r["interpreter_name"] = ", ".join(p for p in interpreter[1:3] if p) or None
        r["accession_number"] = seg.value(18)
        return _finish(r, seg.has_null)

    def fill_order(self, r: dict, seg: Segment) -> None:
        """Complete an order record with what its OBR says and the ORC left empty."""
        if r["record_index"] is None:
            r["record_index"] = seg.index
        r["placer_order_number"] = r["placer_order_number"] or seg.value(2)
        r["filler_order_number"] = r["filler_order_number"] or seg.value(3)
        r["service_code"], r["service_display"], r["service_code_system"] = seg.parts(4, 3)
        r["priority_code"] = r["priority_code"] or seg.value(27, 6) or seg.value(5)
        r["requested_at"] = r["requested_at"] or self.ts(seg, 27, 4) or self.ts(seg, 6)
        r["ordering_provider_id"] = r["ordering_provider_id"] or seg.value(16)
        r["accession_number"] = seg.value(18)
        r["placer_system"] = r["placer_system"] or _ei_system(seg.parts(2, 4))
        reasons = [_coded(seg.parts(31, 3, rep)) for rep in range(seg.repetition_count(31))]
        r["reason_codes"].extend(c for c in reasons if c)
        texts = [c["display"] for c in reasons if c and c["display"]]
        r["reason_text"] = "; ".join(texts) or seg.text(13)
        diagnostic_service = seg.value(24)
        if diagnostic_service in _MODALITIES:
            r["modality"] = diagnostic_service

    def tq1(self, seg: Segment) -> None:
        """TQ1: priority and start time of the current order (they win over ORC-7 and OBR-27)."""
        if self.order is not None:
            self.order["priority_code"] = seg.value(9) or self.order["priority_code"]
            self.order["requested_at"] = self.ts(seg, 7) or self.order["requested_at"]

    def ipc(self, seg: Segment) -> None:
        """IPC (imaging procedure control): accession number and modality of the current order."""
        if self.order is not None:
            self.order["accession_number"] = seg.value(1) or self.order["accession_number"]
            self.order["modality"] = seg.value(5) or self.order["modality"]

    def dg1(self, seg: Segment) -> None:
        """DG1 of an order: its diagnosis code joins the order's reasons for study."""
        coded = _coded(seg.parts(3, 3))
        if self.order is not None and coded:
            self.order["reason_codes"].append(coded)
            self.order["reason_text"] = self.order["reason_text"] or coded["display"]

    def flush_order(self) -> None:
        """Emit the order record being built, if any."""
        if self.order is None:
            return
        r, self.order = self.order, None
        code = r["priority_code"]
        r["priority"] = _PRIORITY.get(code.upper()) if code else code
        self.orders.append(_finish(r))

    def obx(self, seg: Segment) -> None:
        """OBX: one observation record with its order context, value, units and effective time."""
        r = _OBSERVATION.copy()
        r["record_index"] = seg.index
        r["set_id"] = seg.value(1)
        r["value_type"] = value_type = seg.value(2)
        r["code"], r["display"], r["code_system"], r["alt_code"], r["alt_display"], r["alt_code_system"] = \
            seg.parts(3, 6)
        r["sub_id"] = seg.value(4)
        self.read_value(seg, value_type.upper() if value_type else "", r)
        r["units_code"], r["units_text"], r["units_system"] = seg.parts(6, 3)
        r["reference_range"] = seg.text(7)
        r["abnormal_flags"] = seg.values(8)
        r["status_code"] = status = seg.value(11)
        r["status"] = _STATUS.get(status) if status else status
        r["effective_at"], r["effective_source"] = self.effective(seg)
        r.update(self.order_context)
        r.update(self.patient)
        self.observations.append(_finish(r, seg.has_null))

    def effective(self, seg: Segment) -> tuple[datetime | Hl7Null | None, str | None]:
        """When an observation holds: OBX-14, else OBR-7, else MSH-7, and which of them it came from."""
        if seg.raw(14):
            return self.ts(seg, 14), "OBX-14"
        if self.obr is not None and self.obr.raw(7):
            return self.ts(self.obr, 7), "OBR-7"
        return self.sent_at, "MSH-7" if self.sent_at else None

    def read_value(self, seg: Segment, value_type: str, r: dict) -> None:
        """Fill an observation's value keys from OBX-5 according to its type (OBX-2)."""
        raw = seg.raw(5)
        if not raw or raw == '""':
            r["value_num"] = r["value_text"] = NULL if raw else None
            r["missing_value"] = True
            return
        count = 1 if seg.plain else seg.repetition_count(5)
        if value_type not in _READ_AS_VALUE:
            texts = [t for rep in range(count) if (t := seg.text(5, rep))]
            r["value_text"] = "\n".join(texts) if texts else None
            r["missing_value"] = not texts
            return
        if count > 1:
            self.issue("extra_repetitions", f"{count} repetitions of a {value_type} value; only the first is read",
                       seg, 5)
        if value_type == "NM":
            text = seg.text(5) or ""
            r["value_num"] = number = _number(text)
            if number is None:
                r["value_text"], r["value_error"] = text, "not_a_number"
        elif value_type == "SN":
            r.update(_structured_number(seg))
        else:
            r["value_code"], r["value_text"], r["value_code_system"] = seg.parts(5, 3)
        r["missing_value"] = r["value_num"] is None and not r["value_text"] and not r["value_code"]


_HANDLERS: dict[str, Callable[[_Walker, Segment], None]] = {
    "PID": _Walker.pid, "PV1": _Walker.pv1, "MRG": _Walker.mrg, "ORC": _Walker.orc_segment, "OBR": _Walker.obr_segment,
    "TQ1": _Walker.tq1, "IPC": _Walker.ipc, "DG1": _Walker.dg1}
_HANDLERS_WITH_OBX = {**_HANDLERS, "OBX": _Walker.obx}  # OBX is read in result and ADT messages only


def _number(text: str) -> float | None:
    """An HL7 NM (optional sign, digits, optional decimal point) as a float; None when it is not one."""
    stripped = text.strip()
    digits = stripped[1:] if stripped[:1] in ("+", "-") else stripped
    return float(stripped) if digits.replace(".", "", 1).isdecimal() and digits.isascii() else None


def _structured_number(seg: Segment) -> dict:
    """An SN value in OBX-5: comparator and number, or a range/ratio (`^10^-^20`, `^1^:^128`) kept as text."""
    comparator, num1, separator, num2 = (p or "" for p in seg.parts(5, 4))
    if comparator and comparator not in _COMPARATORS:
        return {"value_text": seg.text(5), "value_error": "bad_comparator"}
    if separator or num2:
        return {"value_text": f"{comparator}{num1}{separator}{num2}", "comparator": comparator or None}
    if not num1:
        return {"comparator": comparator or None}
    number = _number(num1)
    if number is None:
        return {"value_text": seg.text(5), "value_error": "not_a_number"}
    return {"value_num": number, "comparator": comparator or None}


def _hd(parts: list[Value]) -> Value:
    """An HD (hierarchic designator) from its parts: the namespace id, else the universal id."""
    if not parts:
        return None
    if parts[0] or parts[0] is NULL or len(parts) < 2:
        return parts[0]
    return parts[1]


def _ei_system(parts: list[Value]) -> str | None:
    """The system of an EI (entity identifier): its universal id (component 3), else its namespace (2)."""
    return (parts[2] if len(parts) > 2 else None) or (parts[1] if len(parts) > 1 else None) or None


def _coded(parts: list[Value]) -> dict | None:
    """A CWE/CE (code^text^system) as {code, display, system}; None when it has neither code nor text."""
    code, display, system = (p or None for p in (*parts, None, None, None)[:3])
    return {"code": code, "display": display, "system": system} if code or display else None


def _street(subparts: list[Value]) -> Value:
    """An SAD street address (`1000&Hospital Lane`) as one line."""
    if len(subparts) == 1:
        return subparts[0]
    return " ".join(p for p in subparts if p) or None


def _phone(parts: list[Value]) -> Value:
    """An XTN telephone number: as formatted (component 1), else area code and local number (6 and 7)."""
    formatted = parts[0]
    if formatted or formatted is NULL:
        return formatted
    return "".join(p for p in (parts[5], parts[6]) if p) or None


def _mapped(code: Value, table: dict[str, str], other: str) -> Value:
    """A coded value through a lookup table, `other` when the code is not in it; None and NULL pass through."""
    return table.get(code.upper(), other) if code else code


def _deceased(flag: Value, deceased_at: datetime | Hl7Null | None) -> bool | Hl7Null | None:
    """PID-30 death indicator (Y/N); a death date/time without an indicator means deceased."""
    if flag:
        return flag.upper() == "Y"
    if flag is NULL:
        return NULL
    return True if deceased_at else None


def extract(message_bytes: bytes, *, default_tz: tzinfo) -> Extracted:
    """The clinical content of one HL7 v2 message as plain records (raises Hl7ParseError only for a bad header).

    Timestamps without a UTC offset are local time in `default_tz` (the hospital's zone); all come out UTC.
    Every record has `record_index` (the position of its segment, MSH = 0) and `nulled` (keys sent as "").
    """
    return _Walker(parse(message_bytes), default_tz).run()
