"""X12 837/835 reading (pyx12), code shapes and the claims bronze sniffing: pure Python, no Spark."""

from __future__ import annotations

import pytest

from bronze.claim_files import sniff
from pipelines.simulator.claims import npi as simulator_npi
from silver import claim_codes as codes
from silver.claim_docs import ClaimDoc, Problem
from silver.x12_claims import (
    INTERCHANGE_ERROR,
    TRANSACTION_ERROR,
    UNMAPPED_VERSION,
    UNREADABLE,
    UNSUPPORTED_TRANSACTION,
    UNSUPPORTED_VERSION,
    read_x12,
)

VERSIONS = ("005010X222A1", "005010X222A2", "005010X223A1", "005010X223A2", "005010X223A3", "005010X221A1")
BILLING = "1234567893"  # Luhn-valid (the CMS example NPI)


def isa(control: str, ele: str = "*", comp: str = ":", rep: str = "^") -> str:
    """An ISA segment of exactly 106 characters with the given delimiters (ISA11 repetition, ISA16 component)."""
    fields = ["ISA", "00", " " * 10, "00", " " * 10, "ZZ", "SENDER".ljust(15), "ZZ", "RECEIVER".ljust(15), "261201",
              "1200", rep, "00501", control, "0", "T", comp]
    return ele.join(fields)


def claim_837p(claim_id: str, *, frequency: str = "1", lines: tuple[tuple[str, str], ...] = (("99213", "80"),),
               billing: str = BILLING, ref_f8: str | None = None, mrn: str | None = None, hl_parent: str = "1",
               bht_time: str = "1200") -> list[str]:
    """The segments of one 837P transaction body (ST..SE), subscriber is the patient."""
    total = sum(float(c) for _, c in lines)
    segs = [f"BHT*0019*00*{claim_id}*20261201*{bht_time}*CH", "NM1*41*2*SUBMITTER*****46*S1",
            "NM1*40*2*PAYER*****46*P1", "HL*1**20*1", f"NM1*85*2*CLINIC*****XX*{billing}", "N4*TOWN*ST*12345",
            "REF*EI*123456789",
            f"HL*2*{hl_parent}*22*0", "SBR*P*18*******CI", "NM1*IL*1*DOE*JANE****MI*M123", "DMG*D8*19800101*F",
            "NM1*PR*2*ACME HEALTH*****PI*PAYER1",
            f"CLM*{claim_id}*{total:.2f}***11:B:{frequency}*Y*A*Y*Y"]
    if ref_f8:
        segs.append(f"REF*F8*{ref_f8}")
    if mrn:
        segs.append(f"REF*EA*{mrn}")
    segs.append("HI*ABK:E119*ABF:I10")
    for n, (code, charge) in enumerate(lines, start=1):
        segs += [f"LX*{n}", f"SV1*HC:{code}*{charge}*UN*1***1:2", "DTP*472*D8*20261130"]
    return segs


def interchange(control: str, transactions: list[list[str]], *, version: str = "005010X222A1", se_count=None,
                ele: str = "*", comp: str = ":", term: str = "~") -> str:
    """A whole interchange: ISA, one GS, the transactions (each ST..SE with a right count unless se_count), GE, IEA."""
    segs = [f"GS*HC*SENDER*RECEIVER*20261201*1200*{control[-4:]}*X*{version}"]
    for n, body in enumerate(transactions, start=1):
        count = len(body) + 2 if se_count is None else se_count
        segs += [f"ST*837*{n:04d}*{version}", *body, f"SE*{count}*{n:04d}"]
    segs += [f"GE*{len(transactions)}*{control[-4:]}", f"IEA*1*{control}"]
    text = term.join(s.replace("*", ele).replace(":", comp) for s in segs) + term
    return isa(control, ele, comp) + term + text


def docs(text: str | bytes, **kw) -> list[ClaimDoc | Problem]:
    payload = text.encode() if isinstance(text, str) else text
    return list(read_x12(payload, versions=VERSIONS, **kw))


def test_npi_luhn_check_digit():
    assert codes.npi_valid("1234567893")
    assert not codes.npi_valid("1234567890")  # wrong check digit
    assert not codes.npi_valid("123456789")  # 9 digits
    assert not codes.npi_valid("123456789X")
    assert all(codes.npi_valid(simulator_npi(f"1{n:08d}")) for n in range(3001, 3050))
    assert sum(codes.npi_valid(f"1{n:08d}{d}") for n in range(100) for d in range(10)) == 100  # one digit in ten


@pytest.mark.parametrize(("code", "shaped"), [("E119", "E11.9"), ("E11.9", "E11.9"), ("I10", "I10"), ("S72001A",
                                              "S72.001A"), ("U071", None), ("1234", None), ("E1", None)])
def test_icd10_shape(code, shaped):
    assert codes.icd10(code) == shaped


def test_procedure_and_ndc_shapes():
    assert all(codes.procedure_valid(c) for c in ("99213", "0001F", "0042T", "J3301", "A0427"))
    assert not any(codes.procedure_valid(c) for c in ("9921", "992133", "W1234", "HC>55669", ""))
    assert codes.ndc11("0002-1433-80") == "00002143380"  # 4-4-2 padded to 5-4-2
    assert codes.ndc11("50090-443-01") == "50090044301"  # 5-3-2
    assert codes.ndc11("00004196501") == "00004196501"
    assert codes.ndc11("000000000") is None and codes.ndc11("12-34") is None and codes.ndc11("00000000000") is None


def test_part2_flags_substance_use_codes_only():
    p2 = codes.Part2Codes.of(["F10", "F11", "O99.32"], ["H0020"], ["894"])
    assert p2.flags(["F11.20"], [], None) and p2.flags(["O99.320"], [], None)
    assert p2.flags([], ["H0020"], None) and p2.flags([], [], "894")
    assert not p2.flags(["F17.210", "E11.9"], ["99213"], "470")  # nicotine is not Part 2


def test_several_interchanges_and_claims_with_lines_and_diagnosis_pointers():
    text = interchange("000000001", [claim_837p("C1", lines=(("99213", "80"), ("87070", "15.50"))),
                                     claim_837p("C2")]) + "\n" + interchange("000000002", [claim_837p("C3")])
    out = docs(text)
    assert [d.claim_id for d in out] == ["C1", "C2", "C3"]
    c1 = out[0]
    assert (c1.source_format, c1.billing.npi, c1.member.member_id, c1.member.system) == (
        "x12-837P", BILLING, "M123", "PAYER1")
    assert (c1.frequency_code, c1.place_of_service, str(c1.billed), c1.diagnoses) == ("1", "11", "95.50",
                                                                                     ["E119", "I10"])
    assert [(ln.number, ln.procedure_code, str(ln.billed), ln.diagnosis_pointers) for ln in c1.lines] == [
        (1, "99213", "80.00", [1, 2]), (2, "87070", "15.50", [1, 2])]
    assert c1.version_tiebreak == "000000001/0001/0001"


def test_delimiters_come_from_the_isa_segment():
    text = interchange("000000003", [claim_837p("C9", lines=(("J3301", "21.04"),))], ele="|", comp=">", term="\n")
    (doc,) = docs(text)
    assert (doc.claim_id, doc.lines[0].procedure_code, doc.diagnoses) == ("C9", "J3301", ["E119", "I10"])


def test_a_bad_transaction_is_quarantined_with_pyx12s_finding_and_the_rest_of_the_file_flows():
    good = interchange("000000004", [claim_837p("OK1")])
    bad = interchange("000000005", [claim_837p("BAD1")], se_count=99)
    out = docs(good + bad + interchange("000000006", [claim_837p("OK2")]))
    assert [d.claim_id for d in out if isinstance(d, ClaimDoc)] == ["OK1", "OK2"]
    (problem,) = [d for d in out if isinstance(d, Problem)]
    assert problem.item == "ISA 000000005/GS 0005/ST 0001" and problem.reason == TRANSACTION_ERROR
    assert "IK5" in problem.detail and "SE" in problem.detail  # pyx12's own words about the segment count


def test_a_broken_interchange_trailer_quarantines_its_transactions():
    text = interchange("000000007", [claim_837p("X1"), claim_837p("X2")]).replace("IEA*1*000000007", "IEA*1*000000999")
    out = docs(text)
    assert [(d.item, d.reason) for d in out] == [("ISA 000000007/GS 0007/ST 0001", INTERCHANGE_ERROR),
                                                 ("ISA 000000007/GS 0007/ST 0002", INTERCHANGE_ERROR)]
    assert "does not match ISA" in out[0].detail


def test_versions_and_transaction_sets_not_taken_are_quarantined_with_the_accepted_list():
    old = interchange("000000008", [claim_837p("OLD")], version="004010X098A1")
    (problem,) = docs(old)
    assert problem.reason == UNSUPPORTED_VERSION and "005010X222A1" in problem.detail
    enrollment = interchange("000000009", [claim_837p("E")]).replace("ST*837", "ST*834")
    assert [d.reason for d in docs(enrollment)] == [UNSUPPORTED_TRANSACTION]
    assert [d.reason for d in docs(b"not x12 at all, just text")] == [UNREADABLE]
    assert [d.reason for d in docs("ISA*00*\xe9".encode("latin-1"))] == [UNREADABLE]


def test_implementation_guide_validation_names_a_version_pyx12_has_no_map_for():
    a2 = interchange("000000010", [claim_837p("A2")], version="005010X222A2")
    assert [d.claim_id for d in docs(a2)] == ["A2"]  # envelope checks: taken
    (problem,) = docs(a2, validation="implementation_guide")
    assert problem.reason == UNMAPPED_VERSION and "Map not found" in problem.detail


def test_replacement_and_void_carry_frequency_status_and_line_limit():
    text = interchange("000000011", [claim_837p("R1", frequency="7", ref_f8="PAYER-9"),
                                     claim_837p("V1", frequency="8")])
    replacement, void = docs(text)
    assert (replacement.frequency_code, replacement.status, replacement.payer_claim_id, replacement.max_lines) == (
        "7", "active", "PAYER-9", 50)
    assert (void.frequency_code, void.status) == ("8", "void")


@pytest.mark.realdata
def test_835_remittance_names_its_claim_and_amounts(realdata):
    text = (realdata / "x12/linuxforhealth-x12/835_managed-care.835").read_bytes()
    out = docs(text)
    assert [(d.claim_id, d.billing.npi, str(d.billed), str(d.paid), d.adjudication_status) for d in out] == [
        ("5554555444", "5544667733", "800.00", "450.00", "paid"), ("8765432112", "5544667733", "1200.00", "495.00",
                                                                   "paid")]
    assert [(ln.procedure_code, str(ln.paid)) for ln in out[0].lines] == [("99211", "500.00")]


def test_sniffing_names_each_format():
    assert sniff(interchange("000000012", [claim_837p("S")]).encode())["format"] == "x12"
    assert sniff(b'{"resourceType": "Bundle", "entry": []}')["document_type"] == "Bundle"
    assert sniff(b"DML_IND|BENE_ID|CLM_ID|CARR_CLM_BLG_NPI_NUM\nINSERT|1|2|3\n")["document_type"] == "carrier"
    assert sniff(b"claim_id,line,bill_type\n")["format"] == "csv"
    assert sniff(b"   \n")["sniff_status"] == "empty"
    assert sniff(b"hello,world\n")["sniff_status"] == "unrecognized_format"


def _pyx12_object_tree(text: str) -> list[tuple[list[list[str]], list[tuple]]]:
    """Each segment as pyx12's own X12Reader reads it (Segment/Composite/Element objects), with the findings it raised
    on that segment; the end-of-file findings last."""
    import io

    import pyx12.x12file

    reader = pyx12.x12file.X12Reader(io.StringIO(text))
    out = [([[raw.seg_id or ""]] + [[e.value for e in comp.elements] for comp in raw.elements], reader.pop_errors())
           for raw in reader]
    reader.cleanup()
    return [*out, ([], reader.pop_errors())]


def _lean(text: str) -> list[tuple[list[list[str]], list[tuple]]]:
    from silver.x12_claims import _reader

    reader = _reader(text)
    out = [(seg, reader.pop_errors()) for seg in reader]
    reader.cleanup()
    return [*out, ([], reader.pop_errors())]


def _odd_inputs() -> list[str]:
    good = interchange("000000010", [claim_837p("A1", lines=(("99213", "80"), ("J3301", "21.04"))), claim_837p("A2")])
    return [good, interchange("000000011", [claim_837p("B1")], ele="|", comp=">", term="\n"),
            interchange("000000012", [claim_837p("C1")], se_count=99),
            good.replace("IEA*1*000000010", "IEA*1*000000999").replace("GE*2*0010", "GE*3*0011"),
            good.replace("HL*2*1*22*0", "HL*2*7*22*0", 1).replace("LX*2", "LX*5"),
            good.replace("REF*EI*123456789~", "REF*EI*123456789*~ N4***~***~:~1X*A~"),  # trailing *, leading space,
            good.rsplit("GE*", 1)[0]]  # empty segments, a bad id; no GE/IEA trailers


def test_the_lean_reader_reads_what_pyx12s_object_tree_reads_with_the_same_findings():
    for text in _odd_inputs():
        assert _lean(text) == _pyx12_object_tree(text)
    assert any(errs for _, errs in _lean(_odd_inputs()[-2]))  # the odd inputs do raise findings


@pytest.mark.realdata
def test_the_lean_reader_reads_the_real_samples_as_pyx12s_object_tree(realdata):
    for path in sorted((realdata / "x12").rglob("*")):
        if path.is_file() and path.read_bytes()[:3] == b"ISA":
            text = path.read_bytes().decode("ascii")
            assert _lean(text) == _pyx12_object_tree(text), path.name
