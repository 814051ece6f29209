"""DICOM instances as bytes: is it a Part 10 file, what are its keys, and its header in the DICOM JSON model.

The gateway (C-STORE, STOW-RS), `carelake send` and bronze share this. Everything works on the bytes of one
instance as stored (a Part 10 file: preamble, `DICM`, file meta group, data set), never decodes pixel data, and
never raises for bad input: `parse_instance` says what it found in a status and a readable detail.

Parse statuses (bronze.dicom_instances.parse_status):

| status          | meaning                                                                                   |
|-----------------|-------------------------------------------------------------------------------------------|
| ok              | a Part 10 file whose header reads whole, with SOP instance, series and study UIDs         |
| no_file_meta    | no preamble/`DICM`/file meta (ACR-NEMA style): the data set was read by guessing its encoding |
| bad_file_meta   | file meta present but unusable (no transfer syntax): the data set was read by guessing    |
| missing_uids    | read, but the SOP instance, series or study UID is missing (detail names which)           |
| truncated       | an element runs past the end of the bytes (a transfer cut short)                          |
| unreadable      | the header cannot be parsed (detail: pydicom's reason)                                    |
| not_dicom       | not DICOM at all                                                                          |

Character sets: text is decoded with the instance's (0008,0005) Specific Character Set by pydicom (ISO 2022 with
code extensions, GB18030, Latin-2, UTF-8, ...); ISO 2022 escape sequences pydicom leaves in a decoded value (it does
for ISO 2022 IR 58) are removed, since an escape is never part of the text.
"""

from __future__ import annotations

import io
import json
import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.tag import Tag

PREAMBLE_BYTES = 128
MAGIC = b"DICM"
# Binary values (OB, OW, UN, ...) at least this long are left out of header_json and named by a BulkDataURI.
BULK_DATA_BYTES = 1024
# Values longer than this are not read while checking that every element fits in the bytes.
_DEFER_BYTES = 256
_PIXEL_DATA = Tag(0x7FE0, 0x0010)
_UNDEFINED_LENGTH = 0xFFFFFFFF
# A data set without preamble and file meta (ACR-NEMA, old exports) starts with its first element's tag: group 0002
# or 0008, little or big endian. Anything else is not read as DICOM (a forced read of JSON "succeeds" with junk).
_BARE_STARTS = (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08")
_ISO2022_ESCAPE = re.compile("\x1b[\x20-\x2f]+[\x40-\x7e]")
_MAX_DETAIL = 2000


class DicomFormatError(ValueError):
    """Bytes that are not a usable DICOM Part 10 instance; `reason` is a parse status, the message says why."""

    def __init__(self, reason: str, text: str):
        super().__init__(text)
        self.reason = reason


@dataclass(frozen=True)
class Meta:
    """The keys a receiver answers with (STOW-RS ReferencedSOPSequence) and files an instance under."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    study_instance_uid: str | None


@dataclass(frozen=True)
class Instance:
    """What bronze keeps of one instance besides its bytes' address."""

    status: str
    detail: str | None
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    series_instance_uid: str | None = None
    study_instance_uid: str | None = None
    transfer_syntax_uid: str | None = None
    modality: str | None = None
    specific_character_set: str | None = None
    header_json: str | None = None


def is_part10(data: bytes) -> bool:
    return len(data) >= PREAMBLE_BYTES + len(MAGIC) and data[PREAMBLE_BYTES:PREAMBLE_BYTES + 4] == MAGIC


def _text(value: object) -> str | None:
    if value is None:
        return None
    text = "\\".join(str(v) for v in value) if isinstance(value, list | tuple | pydicom.multival.MultiValue) \
        else str(value)
    return text.strip().rstrip("\x00").strip() or None


def read_meta(data: bytes | Path) -> Meta:
    """The file meta's SOP class/instance and transfer syntax (and the study UID); DicomFormatError if unusable.
    Given a path, only the header is read from the file (a multi-frame instance can be hundreds of MB)."""
    if isinstance(data, Path):
        with open(data, "rb") as f:
            start = f.read(PREAMBLE_BYTES + len(MAGIC))
    else:
        start = data[:PREAMBLE_BYTES + len(MAGIC)]
    if not is_part10(start):
        raise DicomFormatError("not_dicom", "not a DICOM Part 10 file: no 'DICM' after the 128-byte preamble")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            source = str(data) if isinstance(data, Path) else io.BytesIO(data)
            ds = pydicom.dcmread(source, stop_before_pixels=True,
                                 specific_tags=[Tag(0x0020, 0x000D), Tag(0x0008, 0x0016), Tag(0x0008, 0x0018)])
    except Exception as exc:  # noqa: BLE001 - whatever the parser trips on, the part is refused with the reason
        raise DicomFormatError("unreadable", f"the header cannot be read: {_reason(exc)}") from None
    fm = ds.file_meta
    found = {"(0002,0002) Media Storage SOP Class UID": _text(fm.get("MediaStorageSOPClassUID")),
             "(0002,0003) Media Storage SOP Instance UID": _text(fm.get("MediaStorageSOPInstanceUID")),
             "(0002,0010) Transfer Syntax UID": _text(fm.get("TransferSyntaxUID"))}
    missing = [name for name, value in found.items() if not value]
    if missing:
        raise DicomFormatError("bad_file_meta", f"the file meta lacks {', '.join(missing)}")
    cls, inst, ts = found.values()
    return Meta(cls, inst, ts, _text(ds.get("StudyInstanceUID")))


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:_MAX_DETAIL]


def _json_ready(node: object) -> object:
    """A DICOM JSON tree as strict JSON: ISO 2022 escapes out of the text; a non-finite FL/FD/DS value (NaN,
    Infinity) as a string, which JSON has no number for (Python would write a bare NaN, and Spark's JSON reader
    then reads nothing of the whole header)."""
    if isinstance(node, str):
        return _ISO2022_ESCAPE.sub("", node)
    if isinstance(node, float) and not math.isfinite(node):
        return "NaN" if math.isnan(node) else ("Infinity" if node > 0 else "-Infinity")
    if isinstance(node, list):
        return [_json_ready(v) for v in node]
    if isinstance(node, dict):
        return {k: _json_ready(v) for k, v in node.items()}
    return node


def _overrun(data: bytes) -> str | None:
    """Why the bytes end inside an element (a transfer cut short), or None when every element fits."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(io.BytesIO(data), defer_size=_DEFER_BYTES, force=True)
        except Exception:  # noqa: BLE001 - the header read (parse_instance) reports why
            return None
    for w in caught:
        if "End of file reached" in str(w.message):
            return f"the bytes end inside an element: {w.message}"
    raw = ds.get_item(_PIXEL_DATA, keep_deferred=True)  # the raw element: its deferred value is not read
    tell, length = getattr(raw, "value_tell", None), getattr(raw, "length", None)
    if tell is not None and length not in (None, _UNDEFINED_LENGTH) and tell + length > len(data):
        return (f"(7FE0,0010) Pixel Data declares {length:,} bytes at byte {tell:,}, but only "
                f"{len(data) - tell:,} are present")
    return None


def _read_header(data: bytes) -> tuple[Dataset, list[str]]:
    """The data set up to the pixel data, and pydicom's warnings while reading it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=not is_part10(data))
    return ds, [" ".join(str(w.message).split()) for w in caught]


def header_json(ds: Dataset, bulk_uri: Callable[[int], str]) -> tuple[str, list[str]]:
    """The data set in the DICOM JSON model (PS3.18 F.2), bulk values as BulkDataURI; and any elements left out."""
    def handler(elem) -> str:
        return bulk_uri(int(elem.tag))

    problems: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            doc = ds.to_json_dict(bulk_data_threshold=BULK_DATA_BYTES, bulk_data_element_handler=handler)
        except Exception as exc:  # noqa: BLE001 - any element pydicom cannot convert: keep the rest, say so
            doc = ds.to_json_dict(bulk_data_threshold=BULK_DATA_BYTES, bulk_data_element_handler=handler,
                                  suppress_invalid_tags=True)
            problems.append(f"element(s) left out of header_json: {_reason(exc)}")
    problems += [" ".join(str(w.message).split()) for w in caught]
    text = json.dumps(_json_ready(doc), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    # A lone surrogate (a decoder's escape of an undecodable byte) cannot be stored as UTF-8: it becomes '?'.
    return text.encode("utf-8", "replace").decode("utf-8"), problems


def _status(ds: Dataset, part10: bool) -> tuple[str, str | None]:
    if not part10:
        return "no_file_meta", ("no 128-byte preamble, 'DICM' or file meta (ACR-NEMA style): the data set was read "
                                "with a guessed encoding")
    if not _text(ds.file_meta.get("TransferSyntaxUID")):
        return "bad_file_meta", ("the file meta has no (0002,0010) Transfer Syntax UID: the data set was read with a "
                                 "guessed encoding")
    return "ok", None


def _keys(ds: Dataset) -> dict[str, str | None]:
    fm = getattr(ds, "file_meta", None) or Dataset()
    return {
        "sop_class_uid": _text(ds.get("SOPClassUID")) or _text(fm.get("MediaStorageSOPClassUID")),
        "sop_instance_uid": _text(ds.get("SOPInstanceUID")) or _text(fm.get("MediaStorageSOPInstanceUID")),
        "series_instance_uid": _text(ds.get("SeriesInstanceUID")),
        "study_instance_uid": _text(ds.get("StudyInstanceUID")),
        "transfer_syntax_uid": _text(fm.get("TransferSyntaxUID")),
        "modality": _text(ds.get("Modality")),
        "specific_character_set": _text(ds.get("SpecificCharacterSet")),
    }


def _missing_uids(keys: dict[str, str | None]) -> str | None:
    names = {"sop_instance_uid": "(0008,0018) SOP Instance UID", "series_instance_uid": "(0020,000E) Series Instance "
             "UID", "study_instance_uid": "(0020,000D) Study Instance UID"}
    missing = [label for key, label in names.items() if not keys[key]]
    return f"no {', '.join(missing)}" if missing else None


def parse_instance(data: bytes, bulk_uri: Callable[[int], str]) -> Instance:
    """Everything bronze keeps of one stored instance; never raises for bad bytes."""
    part10 = is_part10(data)
    if not part10 and not data.startswith(_BARE_STARTS):
        return Instance("not_dicom", "not DICOM: no 'DICM' after a 128-byte preamble, and the bytes do not start "
                                     "with a group 0002/0008 element as a bare data set would")
    try:
        ds, warned = _read_header(data)
        keys = _keys(ds)
        text, problems = header_json(ds, bulk_uri)
    except Exception as exc:  # noqa: BLE001 - hostile bytes may break the parser anywhere: a status, never a crash
        return Instance("not_dicom" if not part10 and isinstance(exc, InvalidDicomError) else "unreadable",
                        f"the header cannot be read: {_reason(exc)}")
    status, detail = _status(ds, part10)
    if status == "ok" and (cut := _overrun(data)):
        status, detail = "truncated", cut
    if status == "ok" and (missing := _missing_uids(keys)):
        status, detail = "missing_uids", missing
    notes = [d for d in (detail, *dict.fromkeys(warned + problems)) if d]
    return Instance(status, "; ".join(notes)[:_MAX_DETAIL] or None, header_json=text, **keys)
