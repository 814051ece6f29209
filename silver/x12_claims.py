"""ASC X12 5010 837P, 837I and 835 into claims, read with pyx12.

pyx12's X12Reader takes the delimiters from the ISA segment and checks the envelopes as it reads: ISA/IEA, GS/GE and
ST/SE control numbers and counts, HL parent chains, LX order. Its findings are kept per interchange, group and
transaction, so one bad transaction is quarantined with pyx12's words while the others of the file flow. The reader
here (_Reader) is pyx12's X12Reader with its segment stream (RawX12File) and its checks (_parse_segment), which builds
pyx12's Segment object (a Composite and an Element object per element) only for the segments those checks read values
from; every other segment is handed to the same checks as its id, its text and whether it is empty, and to the claim
readers as lists of strings (as pyx12 splits them): ~3x faster than the object tree, the same segments and findings
(tests/test_claims_x12.py holds them equal). With
`implementation_guide` validation pyx12's map validator (x12n_document) also runs and its 999 findings (IK3 segment,
IK4 element) join the transaction's.

What is accepted (conf claims.x12_versions): a transaction whose GS08 is listed. Others are quarantined: a listed
set of another version (4010: x12_unsupported_version), a set that is not a claim or remittance (834 enrollment,
999/997/TA1 acknowledgments: x12_unsupported_transaction). Loops followed: 2000A billing provider (HL 20), 2000B
subscriber (22), 2000C patient (23), 2300 claim (CLM), 2310x claim providers, 2400 lines (LX, SV1/SV2, DTP*472,
LIN*N4 NDC); 835: 1000A/B payer and payee, 2100 claim payment (CLP, CAS, NM1), 2110 service payment (SVC, AMT*B6).
"""

from __future__ import annotations

import functools
import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal
from typing import Any

from silver.claim_docs import ClaimDoc, Line, Member, Party, Problem, ccyymmdd, money, number

UNREADABLE = "x12_unreadable"
INTERCHANGE_ERROR = "x12_interchange_error"
GROUP_ERROR = "x12_group_error"
TRANSACTION_ERROR = "x12_transaction_error"
UNSUPPORTED_VERSION = "x12_unsupported_version"
UNSUPPORTED_TRANSACTION = "x12_unsupported_transaction"
UNMAPPED_VERSION = "x12_unmapped_version"
CLAIM_INCOMPLETE = "x12_claim_incomplete"

# A replacement or void removes the claim's earlier lines up to the most a claim of its kind may have (TR3 2400 loop).
MAX_LINES = {"x12-837P": 50, "x12-837I": 999}
_FREQUENCIES = {"7": "replacement", "8": "void"}
_CLP_STATUS = {"1": "paid", "2": "paid", "3": "paid", "4": "denied", "19": "paid", "20": "paid", "21": "paid",
               "22": "reversed", "23": "paid", "25": "pended"}
_SEX = {"M": "male", "F": "female", "U": "unknown"}
_PRINCIPAL = {"ABK": "ICD-10-CM", "BK": "ICD-9-CM"}
_OTHER_DX = {"ABF", "BF", "ABJ", "BJ", "APR", "PR", "ABN", "BN"}
_PROCEDURE_QUALIFIERS = {"BBR", "BBQ"}

Seg = list[list[str]]  # [[segment id], [element 1 components...], [element 2 components...], ...]


def _v(seg: Seg, ele: int, comp: int = 0) -> str | None:
    """Element `ele` (1-based), component `comp` (0-based) of a segment, None when absent or empty."""
    if ele >= len(seg) or comp >= len(seg[ele]):
        return None
    return seg[ele][comp] or None


@dataclass
class _Transaction:
    set_id: str
    control: str
    version: str | None
    isa: dict
    gs: dict
    segments: list[Seg] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def item(self) -> str:
        return f"ISA {self.isa['control']}/GS {self.gs['control']}/ST {self.control}"


@dataclass
class _Envelope:
    control: str | None
    errors: list[str] = field(default_factory=list)
    children: list = field(default_factory=list)


def _finding(err: tuple) -> str:
    level, code, text, value, line = err
    tag = {"isa": "TA1", "gs": "AK9", "st": "IK5", "seg": "IK3"}.get(level, level)
    where = f" (line {line})" if line else ""
    return f"{tag} {code}: {text}{where}"


# The segments whose element values pyx12's envelope checks read (X12Base/X12Reader._parse_segment); LX and CLM only
# when its 837 LX count is switched on.
_CHECKED = frozenset({"ISA", "IEA", "GS", "GE", "ST", "SE", "HL"})
_CHECKED_LX = _CHECKED | {"LX", "CLM"}


class _Counted:
    """A segment pyx12's checks only count: what X12Base._parse_segment asks of it (its id, whether the id is valid
    — pyx12's own test —, whether it is empty, its text for a message)."""

    __slots__ = ("seg_id", "text", "empty", "terms")

    def __init__(self, seg_id: str, text: str, empty: bool, terms: tuple[str, str, str]):
        self.seg_id, self.text, self.empty, self.terms = seg_id, text, empty, terms

    def get_seg_id(self) -> str:
        return self.seg_id

    def is_empty(self) -> bool:
        return self.empty

    def is_seg_id_valid(self) -> bool:
        import pyx12.segment

        return pyx12.segment.Segment.is_seg_id_valid(self)  # type: ignore[arg-type]

    def __str__(self) -> str:  # only for a finding's message: as pyx12 writes the segment
        import pyx12.segment

        return str(pyx12.segment.Segment(self.text, *self.terms))


def _reader(text: str) -> Any:
    """pyx12's X12Reader over `text`, iterating segments as Seg lists (see the module doc)."""
    return _reader_class()(io.StringIO(text))


@functools.cache
def _reader_class() -> type:
    import pyx12.segment
    import pyx12.x12file

    class _Reader(pyx12.x12file.X12Reader):
        def __iter__(self) -> Iterator[Seg]:  # X12Reader.__iter__, without the object tree where no check reads it
            self.err_list = []
            ele, sub, seg_term = self.ele_term, self.subele_term, self.seg_term
            checked = _CHECKED_LX if self.check_837_lx else _CHECKED
            for line in self.raw:
                if line.startswith(" "):
                    self._seg_error("1", "Segment contains a leading space", None, src_line=self.cur_line + 1)
                    line = line.lstrip()
                if line[-1] == ele:
                    self._seg_error("SEG1", "Segment contains trailing element terminators", None,
                                    src_line=self.cur_line + 1)
                parts = line.split(ele)
                sid = parts[0]
                if sid in checked:
                    self._parse_segment(pyx12.segment.Segment(line, seg_term, ele, sub))
                else:
                    empty = not line[len(sid):].replace(ele, "").replace(sub, "")
                    self._parse_segment(_Counted(sid, line, empty, (seg_term, ele, sub)))
                if sid == "ISA":  # pyx12 never splits ISA elements into components (ISA16 is the separator)
                    yield [[sid], *([p] for p in parts[1:])]
                else:
                    yield [[sid], *(p.split(sub) for p in parts[1:])]

    return _Reader


def _segments(text: str) -> tuple[list[_Envelope], list[_Transaction]]:
    """Read every segment through pyx12; return interchanges (with groups) and their transactions, with findings."""

    reader = _reader(text)
    interchanges: list[_Envelope] = []
    transactions: list[_Transaction] = []
    isa: dict = {"control": None, "date": None, "time": None}
    gs: dict = {"control": None, "version": None, "fic": None}
    isa_env = gs_env = None
    txn: _Transaction | None = None
    for seg in reader:
        sid = seg[0][0]
        if sid == "ISA":
            isa = {"control": _v(seg, 13), "date": _v(seg, 9), "time": _v(seg, 10)}
            isa_env = _Envelope(isa["control"])
            interchanges.append(isa_env)
        elif sid == "GS":
            gs = {"control": _v(seg, 6), "version": _v(seg, 8), "fic": _v(seg, 1), "date": _v(seg, 4),
                  "time": _v(seg, 5)}
            gs_env = _Envelope(gs["control"])
            (isa_env or _orphan(interchanges)).children.append(gs_env)
        elif sid == "ST":
            txn = _Transaction(_v(seg, 1) or "", _v(seg, 2) or "", _v(seg, 3) or gs["version"], isa, gs)
            transactions.append(txn)
            (gs_env or _orphan_group(interchanges)).children.append(txn)
        elif txn is not None and sid not in ("GE", "IEA"):
            txn.segments.append(seg)
        _attribute(reader.pop_errors(), isa_env, gs_env, txn)
        if sid == "SE":
            txn = None
        elif sid == "GE":
            gs_env = None
        elif sid == "IEA":
            isa_env = None
    reader.cleanup()
    _attribute(reader.pop_errors(), isa_env or (interchanges[-1] if interchanges else None), gs_env, txn)
    return interchanges, transactions


def _orphan(interchanges: list[_Envelope]) -> _Envelope:
    env = _Envelope(None, ["TA1 024: a GS segment outside any interchange (no ISA before it)"])
    interchanges.append(env)
    return env


def _orphan_group(interchanges: list[_Envelope]) -> _Envelope:
    env = _Envelope(None, ["AK9 2: an ST segment outside any functional group (no GS before it)"])
    (interchanges[-1] if interchanges else _orphan(interchanges)).children.append(env)
    return env


def _attribute(errors: list[tuple], isa_env: _Envelope | None, gs_env: _Envelope | None,
               txn: _Transaction | None) -> None:
    for err in errors:
        level = err[0]
        target = txn if level in ("st", "seg") and txn is not None else gs_env if level in ("gs", "st", "seg") \
            else isa_env
        target = target or gs_env or isa_env
        if target is not None:
            target.errors.append(_finding(err))


def _flagged(interchanges: list[_Envelope]) -> dict[int, tuple[str, list[str]]]:
    """id(transaction) -> (reason, findings) for every transaction inside an envelope with findings."""
    out: dict[int, tuple[str, list[str]]] = {}
    for isa_env in interchanges:
        for gs_env in isa_env.children:
            for txn in gs_env.children:
                if isa_env.errors:
                    out[id(txn)] = (INTERCHANGE_ERROR, isa_env.errors)
                elif gs_env.errors:
                    out[id(txn)] = (GROUP_ERROR, gs_env.errors)
                elif txn.errors:
                    out[id(txn)] = (TRANSACTION_ERROR, txn.errors)
    return out


def implementation_guide_findings(text: str) -> dict[tuple[str, str, str], list[str]] | str:
    """pyx12's map validation: {(ISA13, GS06, ST02): 999-style findings}, or why it could not validate the file."""
    import pyx12.errors
    import pyx12.params
    import pyx12.x12n_document

    out = io.StringIO()
    logging.getLogger("pyx12").setLevel(logging.CRITICAL)
    try:
        pyx12.x12n_document.x12n_document(pyx12.params.params(), io.StringIO(text), None, None, None, out)
    except pyx12.errors.EngineError as exc:
        return str(exc)
    found: dict[tuple[str, str, str], list[str]] = {}
    for isa in json.loads(out.getvalue() or '{"interchanges": []}').get("interchanges", []):
        for gs in isa.get("groups", []):
            for st in gs.get("transactions", []):
                key = (isa.get("isa_trn_set_id"), gs.get("gs_control_num"), st.get("trn_set_control_num"))
                found[key] = _ik_findings(st)
    return found


def _ik_findings(st: dict) -> list[str]:
    lines = [f"IK5 {e['err_cde']}: {e['err_str']}" for e in st.get("errors", [])]
    for seg in st.get("segments", []):
        where = f"IK3*{seg['seg_id']}*{seg['seg_count']}*{seg.get('ls_id') or ''}"
        lines += [f"{where}*{e['err_cde']}: {e['err_str']} (line {seg.get('cur_line')})" for e in seg["errors"]]
        for ele in seg.get("elements", []):
            lines += [f"{where} IK4*{ele['ele_pos']}*{ele.get('ele_ref_num') or ''}*{e['err_cde']}: {e['err_str']}"
                      for e in ele.get("errors", [])]
    return lines


def read_x12(payload: bytes, *, versions: tuple[str, ...], validation: str = "envelope"
             ) -> Iterator[ClaimDoc | Problem]:
    """Every claim and remittance of an X12 file, and a Problem for each part that cannot be used."""
    import pyx12.errors

    try:
        text = payload.decode("ascii")
    except UnicodeDecodeError as exc:
        yield Problem("file", UNREADABLE, f"byte {exc.start} is not ASCII: X12 uses the basic/extended character "
                                          "set; have the sender fix the encoding and resend")
        return
    try:
        interchanges, transactions = _segments(text)
    except pyx12.errors.X12Error as exc:
        yield Problem("file", UNREADABLE, f"pyx12: {exc}; the file must start with a 106-character ISA segment")
        return
    flagged = _flagged(interchanges)
    guide = implementation_guide_findings(text) if validation == "implementation_guide" else {}
    for txn in transactions:
        problem = _refusal(txn, flagged.get(id(txn)), versions, guide)
        if problem is not None:
            yield problem
            continue
        reader = _read_835 if txn.set_id == "835" else _read_837
        yield from reader(txn)


def _refusal(txn: _Transaction, flagged: tuple[str, list[str]] | None, versions: tuple[str, ...],
             guide: dict | str) -> Problem | None:
    if flagged is not None:
        return Problem(txn.item, flagged[0], "; ".join(flagged[1][:20]))
    if txn.set_id not in ("837", "835"):
        kind = "an acknowledgment" if txn.gs.get("fic") == "FA" or txn.set_id in ("997", "999", "TA1") \
            else "not a claim or remittance"
        return Problem(txn.item, UNSUPPORTED_TRANSACTION, f"transaction set {txn.set_id} ({kind}) is not read into "
                                                          "silver claims; carelake takes 837P, 837I and 835")
    if txn.version not in versions:
        return Problem(txn.item, UNSUPPORTED_VERSION, f"implementation guide {txn.version} is not accepted; "
                                                      f"claims.x12_versions lists {', '.join(versions)}")
    if isinstance(guide, str):
        return Problem(txn.item, UNMAPPED_VERSION, f"pyx12 cannot validate this file ({guide}); set "
                                                   "claims.x12_validation: envelope to take it on envelope checks")
    findings = guide.get((txn.isa["control"], txn.gs["control"], txn.control)) if guide else None
    if findings:
        return Problem(txn.item, TRANSACTION_ERROR, "999 IK5*R: " + "; ".join(findings[:20]))
    return None


def _created(txn: _Transaction, bht: Seg | None) -> tuple[datetime | None, str]:
    """When the transaction was created (BHT04/05, else GS04/05, else ISA09/10) and its control numbers."""
    day, clock = (_v(bht, 4), _v(bht, 5)) if bht else (None, None)
    day, clock = day or txn.gs.get("date"), clock or txn.gs.get("time")
    at = None
    if day and len(day) == 8 and day.isdigit():
        clock = (clock or "0000").ljust(4, "0")[:6].ljust(6, "0")
        try:
            at = datetime.strptime(day + clock, "%Y%m%d%H%M%S")
        except ValueError:
            at = None
    return at, f"{txn.isa['control']}/{txn.gs['control']}/{txn.control}"


def _d8(seg: Seg, ele: int = 3) -> tuple:
    """(from, to) of a DTP/DTM date: D8 or RD8 (CCYYMMDD-CCYYMMDD); DT (date and time) takes the date."""
    qualifier, value = _v(seg, 2), _v(seg, ele) or ""
    if qualifier == "RD8" and "-" in value:
        a, b = value.split("-", 1)
        return ccyymmdd(a), ccyymmdd(b)
    day = ccyymmdd(value[:8])
    return day, day


def _party(seg: Seg, role: str) -> Party:
    """An NM1 segment as a party: XX in NM108 means NM109 is the NPI."""
    is_npi = _v(seg, 8) == "XX"
    person = _v(seg, 2) == "1"
    name = " ".join(x for x in (_v(seg, 4), _v(seg, 3)) if x) if person else _v(seg, 3)
    return Party(role, npi=_v(seg, 9) if is_npi else None, other_id=None if is_npi else _v(seg, 9), name=name,
                 entity="person" if person else "organization")


def _place(party: Party | Member | None, seg: Seg) -> None:
    if isinstance(party, Party):
        party.city = _v(seg, 1)
    if party is not None:
        party.state, party.postal_code = _v(seg, 2), _v(seg, 3)


def _member(seg: Seg, payer_id: str | None) -> Member:
    return Member(system=payer_id or "unknown-payer", member_id=_v(seg, 9) or "", family_name=_v(seg, 3),
                  given_name=_v(seg, 4))


@dataclass
class _Ctx837:
    """What the HL levels above a claim established: billing provider, subscriber, patient, payer."""

    billing: Party | None = None
    subscriber: Member | None = None
    patient: Member | None = None
    payer_id: str | None = None
    payer_name: str | None = None
    last: str = ""  # the entity the last NM1 opened: billing, pay_to, subscriber, payer, patient, or a claim role
    claim_filing: str | None = None


_CLAIM_ROLES = {"82": "rendering", "71": "attending", "72": "operating", "DN": "referring", "DK": "ordering",
                "77": "service_facility", "ZZ": "other_operating", "DQ": "supervising"}


def _read_837(txn: _Transaction) -> Iterator[ClaimDoc | Problem]:
    kind = "x12-837I" if "X223" in (txn.version or "") else "x12-837P"
    bht = next((s for s in txn.segments[:3] if s[0][0] == "BHT"), None)
    at, tiebreak = _created(txn, bht)
    ctx = _Ctx837()
    claim: ClaimDoc | None = None
    line: Line | None = None
    for seg in txn.segments:
        sid = seg[0][0]
        if sid == "HL":
            if claim is not None:
                yield _finish(claim)
                claim, line = None, None
            _hl(ctx, seg)
        elif sid == "CLM":
            if claim is not None:
                yield _finish(claim)
            claim, line = _clm(seg, txn, kind, ctx, at, tiebreak), None
        elif claim is None:
            _header_837(ctx, seg)
        elif sid == "LX":
            line = Line(number=int(_v(seg, 1) or 0) if (_v(seg, 1) or "").isdigit() else len(claim.lines) + 1)
            claim.lines.append(line)
        elif line is not None:
            _line_837(claim, line, seg)
        else:
            _claim_837(claim, ctx, seg)
    if claim is not None:
        yield _finish(claim)


def _finish(claim: ClaimDoc) -> ClaimDoc | Problem:
    missing = [what for what, ok in (("CLM01 claim id", claim.claim_id),
                                     ("billing provider (2010AA NM1*85)", claim.billing.npi or claim.billing.other_id),
                                     ("subscriber (2010BA NM1*IL member id)", claim.member and claim.member.member_id))
               if not ok]
    if missing:
        return Problem(claim.item, CLAIM_INCOMPLETE, f"the claim lacks {', '.join(missing)}; the sender must "
                                                    "supply it and resend the claim")
    return claim


def _hl(ctx: _Ctx837, seg: Seg) -> None:
    level = _v(seg, 3)
    if level == "20":
        ctx.billing, ctx.subscriber, ctx.patient = None, None, None
    elif level == "22":
        ctx.subscriber, ctx.patient = None, None
    elif level == "23":
        ctx.patient = None
    ctx.last = ""


def _header_837(ctx: _Ctx837, seg: Seg) -> None:
    """Segments of the billing provider, subscriber and patient levels (2000A-2010CA)."""
    sid = seg[0][0]
    if sid == "NM1":
        who = _v(seg, 1)
        if who == "85":
            ctx.billing, ctx.last = _party(seg, "billing"), "billing"
        elif who == "IL":
            ctx.subscriber, ctx.last = _member(seg, ctx.payer_id), "subscriber"
            ctx.subscriber.relationship = "self"
        elif who == "PR":
            ctx.payer_id, ctx.payer_name, ctx.last = _v(seg, 9), _v(seg, 3), "payer"
            if ctx.subscriber is not None:
                ctx.subscriber.system, ctx.subscriber.payer_name = ctx.payer_id or "unknown-payer", ctx.payer_name
        elif who == "QC" and ctx.subscriber is not None:
            ctx.patient = Member(system=ctx.subscriber.system, member_id=ctx.subscriber.member_id,
                                 family_name=_v(seg, 3), given_name=_v(seg, 4), relationship="dependent",
                                 payer_name=ctx.subscriber.payer_name)
            ctx.last = "patient"
        else:
            ctx.last = who or ""
    elif sid == "N4":
        _place({"billing": ctx.billing, "subscriber": ctx.subscriber, "patient": ctx.patient}.get(ctx.last), seg)
    elif sid == "DMG":
        person = ctx.patient if ctx.last == "patient" else ctx.subscriber if ctx.last == "subscriber" else None
        if person is not None:
            person.birth_date, person.sex = ccyymmdd(_v(seg, 2)), _SEX.get(_v(seg, 3) or "")
    elif sid == "PRV" and _v(seg, 1) == "BI" and ctx.billing is not None:
        ctx.billing.taxonomy = _v(seg, 3)
    elif sid == "SBR":
        ctx.claim_filing = _v(seg, 9)


def _clm(seg: Seg, txn: _Transaction, kind: str, ctx: _Ctx837, at: datetime | None, tiebreak: str) -> ClaimDoc:
    place = seg[5] if len(seg) > 5 else []
    facility, frequency = (place[0] or None) if place else None, (place[2] or None) if len(place) > 2 else None
    institutional = kind == "x12-837I"
    member = ctx.patient or ctx.subscriber
    if member is not None:
        member = replace(member, system=ctx.payer_id or member.system)
    claim_id = _v(seg, 1) or ""
    return ClaimDoc(
        item=f"{txn.item}/CLM {claim_id}", source_format=kind, claim_id=claim_id,
        billing=ctx.billing or Party("billing"), version_at=at, version_tiebreak=tiebreak,
        claim_type="institutional" if institutional else "professional",
        setting=None if not institutional else _setting(facility), frequency_code=frequency,
        status="void" if frequency == "8" else "active", payer_id=ctx.payer_id, payer_name=ctx.payer_name,
        member=member, bill_type=f"{facility or ''}{frequency or ''}" if institutional else None,
        place_of_service=None if institutional else facility, billed=money(_v(seg, 2)),
        max_lines=MAX_LINES[kind] if frequency in _FREQUENCIES else 0)


def _setting(facility: str | None) -> str | None:
    """837I type of bill (facility code, first two digits): the care setting."""
    return {"11": "inpatient", "12": "inpatient", "13": "outpatient", "14": "outpatient", "18": "swing_bed",
            "21": "snf", "22": "snf", "23": "snf", "32": "hha", "33": "hha", "34": "hha", "81": "hospice",
            "82": "hospice"}.get(facility or "", "institutional")


def _claim_837(claim: ClaimDoc, ctx: _Ctx837, seg: Seg) -> None:
    """Loop 2300 / 2310x segments."""
    sid = seg[0][0]
    if sid == "DTP":
        qualifier = _v(seg, 1)
        start, end = _d8(seg)
        if qualifier in ("434", "472"):
            claim.service_from, claim.service_to = start, end
        elif qualifier == "435":
            claim.admitted_on = start
        elif qualifier == "096":
            claim.discharged_on = start
    elif sid == "CL1":
        claim.discharge_status = _v(seg, 3)
    elif sid == "REF":
        if _v(seg, 1) == "F8":
            claim.payer_claim_id = _v(seg, 2)
        elif _v(seg, 1) == "EA" and claim.member is not None:
            claim.member.mrn = _v(seg, 2)
    elif sid == "HI":
        _hi(claim, seg)
    elif sid == "NM1":
        role = _CLAIM_ROLES.get(_v(seg, 1) or "")
        if role:
            claim.parties.append(_party(seg, role))
        ctx.last = role or ""
    elif sid == "PRV" and claim.parties and ctx.last in _CLAIM_ROLES.values():
        claim.parties[-1].taxonomy = _v(seg, 3)


def _hi(claim: ClaimDoc, seg: Seg) -> None:
    """Health care information codes: diagnoses (principal first), DRG, ICD-10-PCS procedures."""
    for comp in seg[1:]:
        qualifier, code = (comp[0] if comp else None), (comp[1] if len(comp) > 1 else None)
        if not code:
            continue
        if qualifier in _PRINCIPAL:
            claim.diagnosis_system = _PRINCIPAL[qualifier]
            claim.diagnoses.insert(0, code)
        elif qualifier in _OTHER_DX:
            if qualifier in ("BF", "BJ", "PR", "BN"):
                claim.diagnosis_system = "ICD-9-CM"
            claim.diagnoses.append(code)
        elif qualifier == "DR":
            claim.drg = code
        elif qualifier in _PROCEDURE_QUALIFIERS:
            claim.procedures.append(code)


def _procedure(line: Line, comp: list[str]) -> None:
    """A composite medical procedure id (HC:99213:25:59) into the line: code, system, modifiers, and as sent."""
    line.procedure_system = {"HC": "CPT/HCPCS", "ER": "HCPCS", "IV": "HIEC", "WK": "ABC"}.get(comp[0] if comp else "")
    line.procedure_code = comp[1] if len(comp) > 1 and comp[1] else None
    line.modifiers = [m for m in comp[2:6] if m]
    line.procedure_sent = ":".join(comp) or None


def _line_837(claim: ClaimDoc, line: Line, seg: Seg) -> None:
    """Loop 2400 segments."""
    sid = seg[0][0]
    if sid == "SV1":
        _procedure(line, seg[1] if len(seg) > 1 else [])
        line.billed, line.unit_type, line.units = money(_v(seg, 2)), _v(seg, 3), number(_v(seg, 4))
        line.place_of_service = _v(seg, 5)
        line.diagnosis_pointers = [int(p) for p in (seg[7] if len(seg) > 7 else []) if p.isdigit()]
    elif sid == "SV2":
        line.revenue_code = _v(seg, 1)
        if len(seg) > 2 and seg[2] and seg[2][0]:
            _procedure(line, seg[2])
        line.billed, line.unit_type, line.units = money(_v(seg, 3)), _v(seg, 4), number(_v(seg, 5))
    elif sid == "DTP" and _v(seg, 1) == "472":
        line.service_from, line.service_to = _d8(seg)
    elif sid == "LIN" and _v(seg, 2) == "N4":
        line.ndc = _v(seg, 3)
    elif sid == "NM1" and _v(seg, 1) == "82" and _v(seg, 8) == "XX":
        line.rendering_npi = _v(seg, 9)
    elif sid == "SVD":
        line.paid = money(_v(seg, 2))


def _read_835(txn: _Transaction) -> Iterator[ClaimDoc | Problem]:
    """An 835: each CLP is a remittance of the claim whose CLM01 it repeats (CLP01), billed by the payee (N1*PE)."""
    at, tiebreak = _created(txn, None)
    payer_id = payer_name = None
    payee = Party("billing")
    claim: ClaimDoc | None = None
    line: Line | None = None
    for seg in txn.segments:
        sid = seg[0][0]
        if sid == "N1" and _v(seg, 1) == "PR":
            payer_name = _v(seg, 2)
        elif sid == "REF" and _v(seg, 1) == "2U" and claim is None:
            payer_id = _v(seg, 2)
        elif sid == "N1" and _v(seg, 1) == "PE":
            payee = Party("billing", npi=_v(seg, 4) if _v(seg, 3) == "XX" else None,
                          other_id=None if _v(seg, 3) == "XX" else _v(seg, 4), name=_v(seg, 2),
                          entity="organization")
        elif sid == "CLP":
            if claim is not None:
                yield _finish_835(claim)
            claim, line = _clp(seg, txn, payee, payer_id, payer_name, at, tiebreak), None
        elif claim is None:
            continue
        elif sid == "SVC":
            line = Line(number=len(claim.lines) + 1, status=None)
            _procedure(line, seg[1] if len(seg) > 1 else [])
            line.billed, line.paid, line.units = money(_v(seg, 2)), money(_v(seg, 3)), number(_v(seg, 5))
            claim.lines.append(line)
        else:
            _remit_segment(claim, line, seg)
    if claim is not None:
        yield _finish_835(claim)


def _clp(seg: Seg, txn: _Transaction, payee: Party, payer_id: str | None, payer_name: str | None,
         at: datetime | None, tiebreak: str) -> ClaimDoc:
    claim_id = _v(seg, 1) or ""
    return ClaimDoc(item=f"{txn.item}/CLP {claim_id}", source_format="x12-835", claim_id=claim_id,
                    billing=replace(payee), version_at=at, version_tiebreak=tiebreak,
                    payer_claim_id=_v(seg, 7), status=None, adjudicated=True,
                    adjudication_status=_CLP_STATUS.get(_v(seg, 2) or ""),
                    payer_id=payer_id, payer_name=payer_name, billed=money(_v(seg, 3)), paid=money(_v(seg, 4)))


def _remit_segment(claim: ClaimDoc, line: Line | None, seg: Seg) -> None:
    sid = seg[0][0]
    if sid == "NM1" and _v(seg, 1) in ("QC", "IL") and claim.member is None and _v(seg, 9):
        claim.member = Member(system=claim.payer_id or claim.payer_name or "unknown-payer", member_id=_v(seg, 9),
                              family_name=_v(seg, 3), given_name=_v(seg, 4), payer_name=claim.payer_name)
    elif sid == "NM1" and _v(seg, 1) == "82":
        claim.parties.append(_party(seg, "rendering"))
    elif sid == "AMT" and _v(seg, 1) == "B6" and line is not None:
        line.allowed = money(_v(seg, 2))
    elif sid == "DTM" and line is not None and _v(seg, 1) in ("472", "150", "151"):
        day = ccyymmdd(_v(seg, 2))
        if _v(seg, 1) in ("472", "150"):
            line.service_from = day
        if _v(seg, 1) in ("472", "151"):
            line.service_to = day
    elif sid == "DTM" and line is None and _v(seg, 1) in ("232", "233"):
        setattr(claim, "service_from" if _v(seg, 1) == "232" else "service_to", ccyymmdd(_v(seg, 2)))


def _finish_835(claim: ClaimDoc) -> ClaimDoc | Problem:
    """The claim's allowed amount: the sum of its lines' allowed amounts (AMT*B6) when every line states one."""
    allowed = [ln.allowed for ln in claim.lines]
    if allowed and all(a is not None for a in allowed):
        claim.allowed = sum(allowed, Decimal("0.00"))
    if not claim.claim_id or not (claim.billing.npi or claim.billing.other_id):
        return Problem(claim.item, CLAIM_INCOMPLETE, "the remittance lacks CLP01 (the claim it pays) or the payee "
                                                     "(1000B N1*PE with an id); the payer must resend it")
    return claim
