"""HL7 v2.5 messages: one escaping rule, one segment builder, one builder per message type.

Messages are strings of segments each terminated by CR; the caller picks the bytes (and, for dirt, the
terminator). Times are HL7 DTM with an explicit UTC offset (YYYYMMDDHHMMSS+0000).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from pipelines.simulator.clinical import BY_KEY, HL7_PRIORITY, O2_DEVICE, VITALS_PANEL, ImagingProcedure, Indication
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
    fields[1] = enc.patient_class
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
        procedure: ImagingProcedure, priority: str, at: datetime, indication: Indication,
        control: str = "NW") -> list[str]:
    """ORM^O01 imaging order (control NW new, CA cancel): ORC (placer number, status, timing with priority, ORC-9
    when placed or cancelled) and OBR (procedure, accession, modality, OBR-31 reason for study as ICD-10-CM)."""
    timing = component("", "", "", dtm(at), "", HL7_PRIORITY[priority])
    orc = segment("ORC", control, order_no, "", "", "CA" if control == "CA" else "", "", timing, "", dtm(at))
    fields = [""] * 27
    fields[0] = "1"
    fields[1] = order_no
    fields[3] = component(procedure.cpt, procedure.display, "C4")
    fields[5] = dtm(at)
    fields[17] = accession
    fields[23] = procedure.modality
    fields[26] = timing
    fields += [""] * 4
    fields[30] = component(indication.code, indication.text, "I10")
    return [msh(h), pid(person), pv1(enc, stay), orc, segment("OBR", *fields)]


@dataclass(frozen=True)
class Read:
    """A radiologist's read of one study: what the report says and when."""

    order_no: str
    accession: str
    procedure: ImagingProcedure
    study_uid: str
    study_at: datetime
    read_at: datetime
    reader: tuple[str, str, str]          # (id, family, given)
    finding: str                          # the critical finding, "" when none
    communicated_at: datetime | None      # when a critical finding was phoned through

    @property
    def impression(self) -> str:
        return f"{self.finding}." if self.finding else "No acute abnormality."


CRITICAL_COMMUNICATED = ("CRITCOMM", "Critical result communicated", "99CARELAKE")


def oru_report(h: Header, enc: Encounter, person: Person, stay: Stay | None, read: Read) -> list[str]:
    """ORU^R01 final radiology report: OBR (RAD section, OBR-22 read time, OBR-32 reader) with the findings, the
    impression (OBX-8 AA when critical), the Study Instance UID and, for a critical result, when it was phoned."""
    fields = [""] * 32
    fields[0], fields[1], fields[2] = "1", read.order_no, read.accession
    fields[3] = component(read.procedure.cpt, read.procedure.display, "C4")
    fields[6] = dtm(read.study_at)
    fields[17] = read.accession
    fields[21] = dtm(read.read_at)
    fields[23], fields[24] = "RAD", "F"
    reader_id, family, given = read.reader
    fields[31] = "&".join((reader_id, family, given))
    findings = f"{read.procedure.display}: {read.finding or 'no acute abnormality'}."
    obx = [segment("OBX", "1", "TX", component("18782-3", "Radiology Study observation (findings)", "LN"), "",
                   escape(findings), "", "", "", "", "", "F", "", "", dtm(read.read_at)),
           segment("OBX", "2", "TX", component("19005-8", "Radiology Imaging study [Impression]", "LN"), "",
                   escape(read.impression), "", "", "AA" if read.finding else "", "", "", "F", "", "",
                   dtm(read.read_at)),
           segment("OBX", "3", "HD", component("113014", "DICOM Study", "DCM"), "", read.study_uid, "", "", "", "",
                   "", "F", "", "", dtm(read.read_at))]
    if read.communicated_at is not None:
        obx.append(segment("OBX", "4", "DTM", component(*CRITICAL_COMMUNICATED), "", dtm(read.communicated_at), "",
                           "", "", "", "", "F", "", "", dtm(read.communicated_at)))
    orc = segment("ORC", "RE", read.order_no, read.accession)
    return [msh(h), pid(person), pv1(enc, stay), orc, segment("OBR", *fields), *obx]


def encode(segments: Sequence[str], terminator: str = "\r") -> bytes:
    """A message's bytes: every segment terminated (CR, or LF for dirt)."""
    return "".join(s + terminator for s in segments).encode("utf-8")
