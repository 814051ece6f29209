"""HL7 v2.5 messages: one escaping rule, one segment builder, one builder per message type.

Messages are strings of segments each terminated by CR; the caller picks the bytes (and, for dirt, the
terminator). Times are HL7 DTM with an explicit UTC offset (YYYYMMDDHHMMSS+0000).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from pipelines.simulator.clinical import BY_KEY, HL7_PRIORITY, O2_DEVICE, VITALS_PANEL, ImagingProcedure
from pipelines.simulator.population import AUTHORITY, FACILITY, Encounter, Person, Stay

SENDING_APP = "CARELAKE-SIM"
RECEIVING_APP = "CARELAKE"
_ESCAPES = (("\\", "\\E\\"), ("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"), ("~", "\\R\\"))


def escape(text: object) -> str:
    """Text with HL7's delimiter characters escaped (\\F\\ \\S\\ \\T\\ \\R\\ \\E\\)."""
    out = "" if text is None else str(text)
    for raw, escaped in _ESCAPES:
        out = out.replace(raw, escaped)
    return out


def component(*parts: object) -> str:
    """A field of ^-separated components, each escaped, trailing empty components dropped."""
    return "^".join(escape(p) for p in parts).rstrip("^")


def segment(name: str, *fields: str) -> str:
    """A segment: name and fields joined by |, trailing empty fields dropped (no terminator)."""
    parts = [name, *fields]
    while len(parts) > 1 and parts[-1] == "":
        parts.pop()
    return "|".join(parts)


def dtm(at: datetime) -> str:
    """HL7 DTM with seconds and the UTC offset."""
    return at.strftime("%Y%m%d%H%M%S%z")


@dataclass(frozen=True)
class Header:
    at: datetime
    message_type: str       # e.g. ORU^R01^ORU_R01
    control_id: str


def msh(h: Header) -> str:
    return segment("MSH", "^~\\&", SENDING_APP, component(FACILITY, "HOSPITAL"), RECEIVING_APP, RECEIVING_APP,
                   dtm(h.at), "", h.message_type, h.control_id, "P", "2.5")


def evn(event: str, at: datetime, occurred: datetime | None = None) -> str:
    return segment("EVN", event, dtm(at), "", "", "", dtm(occurred) if occurred else "")


def pid(p: Person) -> str:
    return segment(
        "PID", "1", "", component(p.mrn, "", "", AUTHORITY, "MR"), "", component(p.family, p.given, p.middle),
        "", p.birth_date.strftime("%Y%m%d"), p.sex, "", "", component(p.street, "", p.city, p.state, p.zip, "USA"),
        "", component(p.phone, "PRN", "PH") if p.phone else "")


def location(stay: Stay | None) -> str:
    """PV1-3 / PV1-6: point of care ^ room ^ bed ^ facility."""
    return component(stay.unit, stay.room, stay.bed, FACILITY) if stay else ""


def pv1(enc: Encounter, stay: Stay | None, *, prior: Stay | None = None, admit: datetime | None = None,
        discharge: datetime | None = None) -> str:
    fields = [""] * 45
    fields[0] = "1"
    fields[1] = "I"
    fields[2] = location(stay)
    fields[5] = location(prior)
    fields[18] = component(enc.visit, "", "", AUTHORITY, "VN")
    fields[43] = dtm(admit) if admit else ""
    fields[44] = dtm(discharge) if discharge else ""
    return segment("PV1", *fields)


def mrg(merged_mrn: str) -> str:
    return segment("MRG", component(merged_mrn, "", "", AUTHORITY, "MR"))


def obx(set_id: int, value_type: str, code: tuple[str, str], value: str, unit: str, at: datetime,
        ref_range: str = "") -> str:
    """One observation; units as UCUM (`unit^unit^UCUM`), OBX-14 the observation time."""
    return segment("OBX", str(set_id), value_type, component(code[0], code[1], "LN"), "", value,
                   component(unit, unit, "UCUM") if unit else "", ref_range, "", "", "", "F", "", "", dtm(at))


def number(value: float, decimals: int) -> str:
    return f"{value:.{decimals}f}"


def adt(h: Header, event: str, enc: Encounter, person: Person, stay: Stay | None, *, occurred: datetime,
        prior: Stay | None = None, admit: datetime | None = None, discharge: datetime | None = None,
        merged_mrn: str | None = None) -> list[str]:
    """ADT^A01/A02/A03/A08/A11 (PID + PV1) or ADT^A40 (PID + MRG), as segments."""
    segments = [msh(h), evn(event, h.at, occurred), pid(person)]
    if merged_mrn is not None:
        return [*segments, mrg(merged_mrn)]
    return [*segments, pv1(enc, stay, prior=prior, admit=admit, discharge=discharge)]


@dataclass(frozen=True)
class Result:
    """One OBX worth of content before formatting: a measure, its value and unit (None = value missing)."""

    key: str
    value: float | None
    unit: str
    text: str | None = None     # ST / CWE results
    coded: tuple[str, str] | None = None


def _result_obx(set_id: int, r: Result, at: datetime) -> str:
    if r.coded is not None:
        return obx(set_id, "CWE", (BY_KEY[r.key].loinc, BY_KEY[r.key].display), component(*r.coded, "ACVPU"),
                   "", at)
    if r.text is not None:
        return obx(set_id, "ST", O2_DEVICE, escape(r.text), "", at)
    m = BY_KEY[r.key]
    value = "" if r.value is None else number(r.value, 2 if r.unit == "1" else m.decimals)
    return obx(set_id, "NM", (m.loinc, m.display), value, r.unit, at)


def oru(h: Header, enc: Encounter, person: Person, stay: Stay | None, results: Sequence[Result], at: datetime,
        panel: tuple[str, str, str] = (*VITALS_PANEL, "LN"), order_no: str = "") -> list[str]:
    """ORU^R01: PID, PV1, OBR for the panel (code, display, system), one OBX per result."""
    obr = segment("OBR", "1", order_no, order_no, component(*panel), "", "", dtm(at))
    body = [_result_obx(i + 1, r, at) for i, r in enumerate(results)]
    return [msh(h), pid(person), pv1(enc, stay), obr, *body]


def orm(h: Header, enc: Encounter, person: Person, stay: Stay | None, *, order_no: str, accession: str,
        procedure: ImagingProcedure, priority: str, at: datetime) -> list[str]:
    """ORM^O01 new imaging order: ORC (placer number, timing with priority) and OBR (procedure, accession)."""
    timing = component("", "", "", dtm(at), "", HL7_PRIORITY[priority])
    orc = segment("ORC", "NW", order_no, "", "", "", "", timing, "", dtm(at))
    fields = [""] * 27
    fields[0] = "1"
    fields[1] = order_no
    fields[3] = component(procedure.cpt, procedure.display, "C4")
    fields[5] = dtm(at)
    fields[17] = accession
    fields[23] = procedure.modality
    fields[26] = timing
    return [msh(h), pid(person), pv1(enc, stay), orc, segment("OBR", *fields)]


def encode(segments: Sequence[str], terminator: str = "\r") -> bytes:
    """A message's bytes: every segment terminated (CR, or LF for dirt)."""
    return "".join(s + terminator for s in segments).encode("utf-8")
