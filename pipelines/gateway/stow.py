"""DICOMweb STOW-RS (PS3.18 10.5): `POST /dicomweb/studies[/{study}]`, multipart/related; type="application/dicom".

The HTTP gateway reads the body under the same bounds as every other (size, time), then this module splits it
into parts, checks each is a DICOM Part 10 instance (file meta with SOP class, instance and transfer syntax;
within the study the URL names, if it names one), and builds the STOW response: a DICOM JSON data set with
(0008,1199) ReferencedSOPSequence for every instance stored and (0008,1198) FailedSOPSequence, with a
(0008,1197) FailureReason, for every part that was not. Good parts are landed like C-STORE instances (fsync
before the answer); bad parts are kept in the rejects with their reason. 200: all stored; 202: some failed;
409: none stored (PS3.18 Table 10.5.3-1). A body that is not multipart/related at all is a 4xx for the whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from email.message import Message

from bronze.dicom_wire import DicomFormatError, read_meta
from pipelines.gateway.http import BadBody

DICOM_TYPE = "application/dicom"
# PS3.18 Table 10.5.3-3 / PS3.4 Annex B: why an instance was not stored.
PROCESSING_FAILURE = 0x0110
OUT_OF_RESOURCES = 0xA700
DATA_SET_DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000


@dataclass(frozen=True)
class Part:
    number: int  # 1-based, as a person counts them in the Warning header
    content_type: str
    data: bytes


@dataclass(frozen=True)
class Verdict:
    part: Part
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    transfer_syntax_uid: str | None = None
    failure: int | None = None  # a FailureReason code, or None when the part may be stored
    why: str = ""


def _params(content_type_header: str) -> Message:
    msg = Message()
    msg["Content-Type"] = content_type_header
    return msg


def boundary_of(content_type_header: str) -> tuple[str, str]:
    """(boundary, part type) of a STOW request; BadBody naming what is wrong with its Content-Type."""
    msg = _params(content_type_header)
    if msg.get_content_type() != "multipart/related":
        raise BadBody(415, "not-supported", [
            f"content type {msg.get_content_type()!r} is not accepted here: STOW-RS takes multipart/related; "
            f'type="{DICOM_TYPE}"; boundary=...'])
    part_type = (msg.get_param("type") or DICOM_TYPE).lower()
    if part_type != DICOM_TYPE:
        raise BadBody(415, "not-supported", [
            f"multipart/related type {part_type!r} is not accepted: only {DICOM_TYPE} (Part 10 instances); the "
            "DICOM JSON/XML metadata with bulk data form is not supported"])
    boundary = msg.get_param("boundary")
    if not boundary:
        raise BadBody(400, "structure", ["multipart/related without a boundary parameter"])
    return str(boundary), part_type


def _headers(block: bytes) -> dict[str, str]:
    out = {}
    for line in block.split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if sep:
            out[name.strip().decode("latin-1").lower()] = value.strip().decode("latin-1")
    return out


def split_parts(body: bytes, boundary: str, default_type: str) -> list[Part]:
    """The body parts of a multipart body (RFC 2046 5.1); BadBody if it is not framed as one."""
    delim = b"--" + boundary.encode("latin-1")
    pos = 0 if body.startswith(delim) else body.find(b"\r\n" + delim) + 2
    if pos < 2 and not body.startswith(delim):
        raise BadBody(400, "structure", [f"the body holds no boundary line --{boundary}"])
    parts: list[Part] = []
    while True:
        pos += len(delim)
        if body[pos:pos + 2] == b"--":
            break  # the close delimiter
        line_end = body.find(b"\r\n", pos)
        following = body.find(b"\r\n" + delim, max(line_end, pos))
        if line_end < 0 or following < 0:
            raise BadBody(400, "structure", [f"the multipart body ends inside part {len(parts) + 1} (no closing "
                                             f"--{boundary}--): the upload was cut short; send it again"])
        raw = body[line_end + 2:following]
        head, sep, data = raw.partition(b"\r\n\r\n")
        if not sep and raw.startswith(b"\r\n"):
            head, data = b"", raw[2:]
        elif not sep:
            head, data = raw, b""
        kind = _params(_headers(head).get("content-type", default_type)).get_content_type()
        parts.append(Part(len(parts) + 1, kind, data))
        pos = following + 2
    if not parts:
        raise BadBody(400, "required", ["the multipart body holds no parts"])
    return parts


def judge(part: Part, study: str | None) -> Verdict:
    """May this part be stored, and under which UIDs."""
    if part.content_type != DICOM_TYPE:
        return Verdict(part, failure=CANNOT_UNDERSTAND,
                       why=f"part {part.number}: content type {part.content_type!r}, expected {DICOM_TYPE}")
    try:
        meta = read_meta(part.data)
    except DicomFormatError as exc:
        return Verdict(part, failure=CANNOT_UNDERSTAND, why=f"part {part.number}: {exc}")
    ids = {"sop_class_uid": meta.sop_class_uid, "sop_instance_uid": meta.sop_instance_uid,
           "transfer_syntax_uid": meta.transfer_syntax_uid}
    if study and meta.study_instance_uid != study:
        return Verdict(part, **ids, failure=DATA_SET_DOES_NOT_MATCH,
                       why=f"part {part.number}: Study Instance UID {meta.study_instance_uid!r} is not the study "
                           f"{study!r} the URL names")
    return Verdict(part, **ids)


def _ui(value: str | None) -> dict:
    return {"vr": "UI", "Value": [value]} if value else {"vr": "UI"}


def response(verdicts: list[Verdict]) -> tuple[int, dict]:
    """The HTTP status and the STOW-RS response data set (DICOM JSON)."""
    stored = [v for v in verdicts if v.failure is None]
    failed = [v for v in verdicts if v.failure is not None]
    doc: dict = {}
    if failed:
        doc["00081198"] = {"vr": "SQ", "Value": [
            {"00081150": _ui(v.sop_class_uid), "00081155": _ui(v.sop_instance_uid),
             "00081197": {"vr": "US", "Value": [v.failure]}} for v in failed]}
    if stored:
        doc["00081199"] = {"vr": "SQ", "Value": [
            {"00081150": _ui(v.sop_class_uid), "00081155": _ui(v.sop_instance_uid)} for v in stored]}
    status = 200 if not failed else 202 if stored else 409
    return status, doc
