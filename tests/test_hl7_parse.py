"""silver.hl7_parse: parsing what real feeds send, HL7 timestamps, and the exact records extract() returns."""

from __future__ import annotations

import pickle
import random
from collections import Counter
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from bronze.hl7_wire import split_messages
from silver.hl7_parse import (
    ENCOUNTER_KEYS,
    NULL,
    OBSERVATION_KEYS,
    ORDER_KEYS,
    REPORT_KEYS,
    Delimiters,
    Extracted,
    Hl7ParseError,
    extract,
    parse,
    parse_ts,
    parse_ts_precision,
)

BERLIN = ZoneInfo("Europe/Berlin")  # the hospital's zone in these tests: +01:00 in March, +02:00 in July


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def seg(name: str, fields: dict[int, str]) -> str:
    """A segment line from {field number: value}; fields not given are empty."""
    return "|".join([name, *(fields.get(i, "") for i in range(1, max(fields) + 1))])


def msh(message_type: str = "ORU^R01^ORU_R01", control_id: str = "MSG001", **more: str) -> str:
    """An MSH line (fields from MSH-3); `more` sets fields by name f<n>."""
    fields = {3: "MONITOR", 4: "ICU^1.2.3^ISO", 5: "CARELAKE", 6: "HOSP", 7: "20240305101500+0100",
              9: message_type, 10: control_id, 11: "P", 12: "2.5.1"}
    fields.update({int(k[1:]): v for k, v in more.items()})
    return "MSH|^~\\&|" + "|".join(fields.get(i, "") for i in range(3, max(fields) + 1))


def message(*lines: str, terminator: str = "\r") -> bytes:
    return terminator.join(lines).encode()


PID = seg("PID", {1: "1", 3: "12345^^^HOSP^MR~999-99-9999^^^SSA^SS", 5: "Doe^Jane^Q", 7: "19700101", 8: "F",
                  11: "1 Main St^Apt 2^Springfield^IL^62701^USA", 13: "(555)555-1234", 30: "N"})
PV1 = seg("PV1", {1: "1", 2: "I", 3: "ICU^12^A^HOSP", 7: "1234^Smith^John", 19: "V100^^^HOSP^VN",
                  44: "20240301080000"})
ORC = seg("ORC", {1: "RE", 2: "P100", 3: "F100"})
OBR = seg("OBR", {1: "1", 2: "P100", 3: "F100", 4: "VITALS^Vital signs^L", 7: "20240305101400+0100"})
OBX_HR = seg("OBX", {1: "1", 2: "NM", 3: "8867-4^Heart rate^LN", 5: "72", 6: "/min^beats per minute^UCUM",
                     7: "60-100", 8: "N", 11: "F", 14: "20240305101300+0100"})
OBX_TEMP = seg("OBX", {1: "2", 2: "NM", 3: "8310-5^Body temperature^LN", 5: "37.2", 6: "Cel^degC^UCUM", 7: "36-38",
                       11: "F"})
VITALS = [msh(f18="UNICODE UTF-8"), PID, PV1, ORC, OBR, OBX_HR, OBX_TEMP]

HEADER = {
    "control_id": "MSG001", "message_code": "ORU", "trigger_event": "R01", "message_structure": "ORU_R01",
    "sent_at": utc(2024, 3, 5, 9, 15), "event_at": utc(2024, 3, 5, 9, 15), "sending_application": "MONITOR",
    "sending_facility": "ICU", "receiving_application": "CARELAKE", "receiving_facility": "HOSP", "version": "2.5.1",
    "processing_id": "P", "encoding": "utf-8", "charset": "UNICODE UTF-8",
}
PATIENT = {
    "record_index": 1, "source_system": "HOSP", "mrn": "12345",
    "identifiers": [{"value": "12345", "type": "MR", "authority": "HOSP"},
                    {"value": "999-99-9999", "type": "SS", "authority": "SSA"}],
    "family_name": "Doe", "given_name": "Jane", "middle_name": "Q", "birth_date": date(1970, 1, 1),
    "birth_date_precision": "day", "sex": "female", "address_line": "1 Main St", "address_line2": "Apt 2",
    "address_city": "Springfield", "address_state": "IL", "address_postal_code": "62701", "address_country": "USA",
    "phone": "(555)555-1234", "deceased": False, "deceased_at": None, "event_at": utc(2024, 3, 5, 9, 15), "nulled": [],
}
ENCOUNTER = {
    "record_index": 2, "visit_number": "V100", "visit_authority": "HOSP", "patient_mrn": "12345",
    "patient_source_system": "HOSP", "event_code": None, "event": None, "patient_class": "I",
    "location_point_of_care": "ICU", "location_room": "12", "location_bed": "A", "location_facility": "HOSP",
    "prior_location_point_of_care": None, "prior_location_room": None, "prior_location_bed": None,
    "prior_location_facility": None, "attending_doctor_id": "1234", "admit_at": utc(2024, 3, 1, 7, 0),
    "discharge_at": None, "event_at": utc(2024, 3, 5, 9, 15), "nulled": [],
}
HEART_RATE = {
    "record_index": 5, "set_id": "1", "value_type": "NM", "code": "8867-4", "code_system": "LN",
    "display": "Heart rate", "alt_code": None, "alt_code_system": None, "alt_display": None, "sub_id": None,
    "value_num": 72.0, "comparator": None, "value_text": None, "value_code": None, "value_code_system": None,
    "missing_value": False, "value_error": None, "units_code": "/min", "units_system": "UCUM",
    "units_text": "beats per minute", "reference_range": "60-100", "abnormal_flags": ["N"], "status_code": "F",
    "status": "final", "effective_at": utc(2024, 3, 5, 9, 13), "effective_source": "OBX-14",
    "placer_order_number": "P100", "filler_order_number": "F100", "service_code": "VITALS",
    "service_display": "Vital signs", "order_control": "RE", "patient_mrn": "12345", "patient_source_system": "HOSP",
    "visit_number": "V100", "nulled": [],
}
TEMPERATURE = {
    **HEART_RATE, "record_index": 6, "set_id": "2", "code": "8310-5", "display": "Body temperature", "value_num": 37.2,
    "units_code": "Cel", "units_text": "degC", "reference_range": "36-38", "abnormal_flags": [],
    "effective_at": utc(2024, 3, 5, 9, 14), "effective_source": "OBR-7",
}
VALUE_KEYS = ("value_num", "comparator", "value_text", "value_code", "value_code_system", "missing_value",
              "value_error")


def run(*lines: str, terminator: str = "\r") -> Extracted:
    return extract(message(*lines, terminator=terminator), default_tz=BERLIN)


def observation_value(value_type: str, value: str) -> dict:
    """The value keys of the observation an ORU with one OBX of this type and OBX-5 yields."""
    obx = seg("OBX", {1: "1", 2: value_type, 3: "X^x^L", 5: value, 11: "F"})
    record = run(msh(), PID, OBR, obx).observations[0]
    return {k: record[k] for k in VALUE_KEYS}


def test_vitals_message_extracts_exact_records():
    got = run(*VITALS)
    assert got.header == HEADER
    assert got.patients == [PATIENT]
    assert got.encounters == [ENCOUNTER]
    assert got.observations == [HEART_RATE, TEMPERATURE]
    assert (got.merges, got.orders, got.issues) == ([], [], [])
    assert list(got.observations[0]) == list(OBSERVATION_KEYS)


@pytest.mark.parametrize("terminator", ["\r", "\n", "\r\n"], ids=["CR", "LF", "CRLF"])
def test_every_segment_terminator_gives_the_same_records(terminator):
    assert run(*VITALS, terminator=terminator) == run(*VITALS)
    assert run(*VITALS, terminator=terminator + terminator).observations == [HEART_RATE, TEMPERATURE]


def test_utf8_byte_order_mark_and_mllp_framing_are_ignored():
    data = message(*VITALS)
    assert extract(b"\xef\xbb\xbf" + data, default_tz=BERLIN) == extract(data, default_tz=BERLIN)
    assert extract(b"\x0b" + data + b"\x1c\r", default_tz=BERLIN) == extract(data, default_tz=BERLIN)


def test_custom_encoding_characters_from_msh1_and_msh2():
    data = (b"MSH#$*@!#APP#FAC$9.9$ISO#RCV#RFAC#20240305101500##ORU$R01#C1#P#2.5\r"
            b"PID###77$$$HOSP!1.2!ISO$MR*88$$$SSA$SS##Roe$Ann\r"
            b"OBX#1#TX#c$Code$L##a@F@b@S@c@T@d@R@e@E@f#####F")
    msg = parse(data)
    assert msg.delimiters == Delimiters("#", "$", "*", "@", "!")
    got = extract(data, default_tz=BERLIN)
    assert got.header["sending_facility"] == "FAC"
    assert got.patients[0]["identifiers"] == [{"value": "77", "type": "MR", "authority": "HOSP"},
                                              {"value": "88", "type": "SS", "authority": "SSA"}]
    assert (got.patients[0]["family_name"], got.patients[0]["given_name"]) == ("Roe", "Ann")
    assert got.observations[0]["value_text"] == "a#b$c!d*e@f"


def test_two_encoding_characters_leave_escape_and_subcomponent_unused():
    data = b"MSH|^~|APP|FAC|||20240305||ORU^R01|C2|P|2.5\rPID|||1^^^H&X^MR||A\\B&C"
    got = extract(data, default_tz=BERLIN)
    assert got.patients[0]["family_name"] == "A\\B&C"
    assert got.patients[0]["source_system"] == "H&X"


@pytest.mark.parametrize(("sent", "text"), [  # written with / for the escape character
    ("a/F/b/S/c/T/d/R/e/E/f", "a|b^c&d~e\\f"),
    ("/H/bold/N/ plain", "bold plain"),
    ("line/.br/next", "line\nnext"),
    ("gap/.sp2/end", "gap\n\nend"),
    ("/.in+4//.ti-2//.fi//.nf//.sk3//.ce/x", "x"),
    ("/X41//X4243/", "ABC"),
    ("caf/XC3A9/", "café"),  # UTF-8 bytes
    ("caf/XE9/", "café"),  # not UTF-8: ISO-8859-1
    ("/C2842//M2442/x/Zlocal/", "x"),
    ("C:/temp/x", "C:\\temp\\x"),  # not an escape sequence: kept as sent
    ("trailing /", "trailing \\"),
    ("/XZZ/ bad hex", "\\XZZ\\ bad hex"),
])
def test_escape_sequences_in_text(sent, text):
    assert observation_value("TX", sent.replace("/", "\\"))["value_text"] == text


def test_escapes_are_decoded_after_splitting_components():
    obx = seg("OBX", {1: "1", 2: "NM", 3: "2951-2^Na\\S\\K ratio^L", 5: "1", 11: "F"})
    assert run(msh(), PID, obx).observations[0]["display"] == "Na^K ratio"


def test_text_repetitions_are_joined_by_line_breaks_and_keep_unescaped_delimiters():
    assert observation_value("FT", "first\\.br\\line~second & third^part") == {
        "value_num": None, "comparator": None, "value_text": "first\nline\nsecond & third^part", "value_code": None,
        "value_code_system": None, "missing_value": False, "value_error": None}


def test_identifier_repetitions_choose_the_mr_one_with_its_authority():
    pid = seg("PID", {3: "555^^^SSA^SS~777^^^&2.16.840.1.113883.19&ISO^MR~^^^X^PI~888"})
    patient = run(msh(), pid).patients[0]
    assert patient["identifiers"] == [{"value": "555", "type": "SS", "authority": "SSA"},
                                      {"value": "777", "type": "MR", "authority": "2.16.840.1.113883.19"},
                                      {"value": "888", "type": None, "authority": None}]
    assert (patient["mrn"], patient["source_system"]) == ("777", "2.16.840.1.113883.19")


def test_without_an_mr_identifier_the_first_is_the_mrn_and_the_facility_its_source():
    patient = run(msh(), seg("PID", {3: "A1~B2^^^ELSEWHERE^PI"})).patients[0]
    assert (patient["mrn"], patient["source_system"]) == ("A1", "ICU")


def test_z_segments_are_kept_by_the_parser_and_ignored_by_extraction():
    lines = [*VITALS[:3], "ZPI|1|custom^stuff|OBX-looking", *VITALS[3:]]
    assert [s.name for s in parse(message(*lines)).segments] == ["MSH", "PID", "PV1", "ZPI", "ORC", "OBR", "OBX", "OBX"]
    got = run(*lines)
    assert [o["code"] for o in got.observations] == ["8867-4", "8310-5"]
    assert got.issues == []


def test_explicit_null_is_distinguished_from_empty():
    pid = seg("PID", {3: "12345^^^HOSP^MR", 5: '""', 7: '""', 8: "", 11: "", 13: '""', 30: '""'})
    patient = run(msh("ADT^A08^ADT_A01"), pid).patients[0]
    assert patient == {
        **PATIENT, "identifiers": [{"value": "12345", "type": "MR", "authority": "HOSP"}], "family_name": None,
        "given_name": None, "middle_name": None, "birth_date": None, "birth_date_precision": None, "sex": None,
        "address_line": None, "address_line2": None, "address_city": None, "address_state": None,
        "address_postal_code": None, "address_country": None, "phone": None, "deceased": None,
        "nulled": ["family_name", "given_name", "middle_name", "birth_date", "birth_date_precision", "phone",
                   "deceased"]}


def test_parser_returns_the_null_sentinel_for_a_component_sent_as_null():
    segment = parse(message(msh(), seg("PID", {5: '""^Jane', 7: ""}))).segments[1]
    assert segment.parts(5, 3) == [NULL, "Jane", None]
    assert segment.value(7) is None
    assert not NULL and repr(NULL) == "NULL"


@pytest.mark.parametrize(("value", "expected"), [
    ("<^5", {"value_num": 5.0, "comparator": "<"}),
    (">=^10.5", {"value_num": 10.5, "comparator": ">="}),
    ("<=^-1", {"value_num": -1.0, "comparator": "<="}),
    (">^0.5", {"value_num": 0.5, "comparator": ">"}),
    ("=^3", {"value_num": 3.0, "comparator": "="}),
    ("^182", {"value_num": 182.0}),
    ("^10^-^20", {"value_text": "10-20"}),
    ("^1^:^128", {"value_text": "1:128"}),
    (">^1^:^64", {"value_text": ">1:64", "comparator": ">"}),
    ("^abc", {"value_text": "^abc", "value_error": "not_a_number"}),
    ("~^5", {"value_text": "~^5", "value_error": "bad_comparator"}),
    ("<^", {"comparator": "<", "missing_value": True}),
])
def test_structured_numeric_values(value, expected):
    value = value.replace("~", "!")  # `~` would be a repetition; a bad comparator is any other text
    expected = {k: v.replace("~", "!") if isinstance(v, str) else v for k, v in expected.items()}
    base = {k: None for k in VALUE_KEYS} | {"missing_value": False}
    assert observation_value("SN", value) == base | expected


@pytest.mark.parametrize(("value", "num", "error"), [
    ("72", 72.0, None), ("-0.5", -0.5, None), (" +3. ", 3.0, None), (".25", 0.25, None),
    ("<5", None, "not_a_number"), ("1e3", None, "not_a_number"), ("nan", None, "not_a_number"),
    ("1_000", None, "not_a_number"), ("12 mg", None, "not_a_number"),
])
def test_numeric_values_and_values_that_are_not_numbers(value, num, error):
    got = observation_value("NM", value)
    assert (got["value_num"], got["value_text"], got["value_error"]) == (num, None if error is None else value, error)
    assert got["missing_value"] is False


@pytest.mark.parametrize(("value_type", "value"), [("NM", ""), ("ST", ""), ("CWE", ""), ("NM", '""'), ("TX", "~")])
def test_missing_values_are_flagged(value_type, value):
    obx = seg("OBX", {1: "1", 2: value_type, 3: "X^x^L", 5: value, 11: "F"})
    got = run(msh(), PID, obx).observations[0]
    assert (got["value_num"], got["value_text"], got["missing_value"]) == (None, None, True)
    assert got["nulled"] == (["value_num", "value_text"] if value == '""' else [])


def test_coded_values():
    assert observation_value("CWE", "LA6576-8^Positive^LN^POS^Pos^L") == {
        "value_num": None, "comparator": None, "value_text": "Positive", "value_code": "LA6576-8",
        "value_code_system": "LN", "missing_value": False, "value_error": None}
    assert observation_value("CE", "260385009^Negative^SCT")["value_code"] == "260385009"


def test_extra_repetitions_of_a_numeric_value_are_reported():
    got = run(msh(), PID, seg("OBX", {1: "1", 2: "NM", 3: "X^x^L", 5: "60~120", 11: "F"}))
    assert got.observations[0]["value_num"] == 60.0
    assert got.issues == [{"code": "extra_repetitions", "segment": "OBX", "field": "OBX-5", "record_index": 2,
                           "detail": "OBX-5 (segment 2): 2 repetitions of a NM value; only the first is read"}]


@pytest.mark.parametrize(("code", "status"), [
    ("F", "final"), ("C", "corrected"), ("P", "preliminary"), ("W", "entered_in_error"), ("X", "cannot_obtain"),
    ("D", "deleted"), ("R", "not_verified"), ("I", "pending"), ("Q", None),
])
def test_result_status_and_corrections(code, status):
    obx = seg("OBX", {1: "1", 2: "NM", 3: "8867-4^Heart rate^LN", 5: "75", 11: code, 14: "20240305101300+0100"})
    got = run(*VITALS[:5], obx).observations[0]
    assert got == {**HEART_RATE, "value_num": 75.0, "units_code": None, "units_system": None, "units_text": None,
                   "reference_range": None, "abnormal_flags": [], "status_code": code, "status": status}


def test_alternate_coding_sub_id_and_abnormal_flag_repetitions():
    obx = seg("OBX", {1: "3", 2: "NM", 3: "8480-6^Systolic BP^LN^SYS^Systolic^L", 4: "1", 5: "180",
                      6: "mm[Hg]^mmHg^UCUM", 8: "H~HH^Critical high", 11: "F"})
    got = run(msh(), PID, obx).observations[0]
    assert {k: got[k] for k in ("code", "display", "code_system", "alt_code", "alt_display", "alt_code_system",
                                "sub_id", "abnormal_flags", "effective_at", "effective_source")} == {
        "code": "8480-6", "display": "Systolic BP", "code_system": "LN", "alt_code": "SYS", "alt_display": "Systolic",
        "alt_code_system": "L", "sub_id": "1", "abnormal_flags": ["H", "HH"], "effective_at": utc(2024, 3, 5, 9, 15),
        "effective_source": "MSH-7"}


def test_a_bad_observation_time_is_an_issue_and_the_other_observations_survive():
    bad = seg("OBX", {1: "1", 2: "NM", 3: "8867-4^Heart rate^LN", 5: "72", 11: "F", 14: "2024-03-05 10:13"})
    got = run(*VITALS[:5], bad, OBX_TEMP)
    assert got.observations[0]["effective_at"] is None
    assert got.observations[1] == TEMPERATURE
    assert got.issues == [{"code": "bad_timestamp", "segment": "OBX", "field": "OBX-14", "record_index": 5,
                           "detail": "OBX-14 (segment 5): '2024-03-05 10:13' is not an HL7 timestamp "
                                     "(YYYY[MM[DD[HH[MM[SS[.S]]]]]][+/-ZZZZ])"}]


def test_observations_take_the_patient_and_order_context_they_follow():
    second_pid = seg("PID", {3: "999^^^HOSP^MR"})
    second_obr = seg("OBR", {1: "2", 2: "P200", 4: "LAB^Lab^L", 7: "20240305080000"})
    got = run(*VITALS, second_pid, second_obr, OBX_TEMP)
    last = got.observations[-1]
    assert {k: last[k] for k in ("patient_mrn", "visit_number", "placer_order_number", "order_control",
                                 "effective_at", "service_code")} == {
        "patient_mrn": "999", "visit_number": None, "placer_order_number": "P200", "order_control": None,
        "effective_at": utc(2024, 3, 5, 7, 0), "service_code": "LAB"}


@pytest.mark.parametrize(("text", "expected", "precision"), [
    ("2024", utc(2023, 12, 31, 23, 0), "year"),
    ("202403", utc(2024, 2, 29, 23, 0), "month"),
    ("20240305", utc(2024, 3, 4, 23, 0), "day"),
    ("2024030510", utc(2024, 3, 5, 9, 0), "hour"),
    ("202403051015", utc(2024, 3, 5, 9, 15), "minute"),
    ("20240305101530", utc(2024, 3, 5, 9, 15, 30), "second"),
    ("20240305101530.1234", utc(2024, 3, 5, 9, 15, 30, 123400), "fraction"),
    ("20240305101530.5", utc(2024, 3, 5, 9, 15, 30, 500000), "fraction"),
    ("20240305101530+0100", utc(2024, 3, 5, 9, 15, 30), "second"),
    ("20240305101530-0500", utc(2024, 3, 5, 15, 15, 30), "second"),
    ("20240305101530.25+0530", utc(2024, 3, 5, 4, 45, 30, 250000), "fraction"),
    ("202403051015+0000", utc(2024, 3, 5, 10, 15), "minute"),
    ("20240305-0500", utc(2024, 3, 5, 5, 0), "day"),
    ("20240705120000", utc(2024, 7, 5, 10, 0), "second"),  # summer time in the default zone
    (" 20240705120000 ", utc(2024, 7, 5, 10, 0), "second"),
])
def test_parse_ts(text, expected, precision):
    assert parse_ts(text, BERLIN) == expected
    assert parse_ts(text, BERLIN).tzinfo is UTC
    assert parse_ts_precision(text, BERLIN) == (expected, precision)


def test_parse_ts_default_zone_is_a_parameter():
    assert parse_ts("20240305101500", UTC) == utc(2024, 3, 5, 10, 15)
    assert parse_ts("20240305101500", timezone(timedelta(hours=-3))) == utc(2024, 3, 5, 13, 15)
    assert parse_ts("20240305101500", ZoneInfo("America/New_York")) == utc(2024, 3, 5, 15, 15)


@pytest.mark.parametrize("text", ["", "abc", "2024-03-05", "20241305", "20240230", "2024030525", "202403051",
                                  "20240305106000", "20240305101530+2500", "20240305101530+01", "2024030510.5",
                                  "20240305101530.1234567"])
def test_parse_ts_rejects_what_is_not_a_timestamp(text):
    with pytest.raises(Hl7ParseError) as e:
        parse_ts(text, BERLIN)
    assert e.value.code == "bad_timestamp"
    assert repr(text.strip()) in e.value.detail


def test_batch_pieces_are_extracted_one_message_at_a_time():
    second = [msh(control_id="MSG002"), PID, OBR, OBX_TEMP]
    batch = message("FHS|^~\\&|LAB|HOSP", "BHS|^~\\&|LAB|HOSP", *VITALS, *second, "BTS|2", "FTS|1") + b"\r"
    got = [extract(batch[off:off + n], default_tz=BERLIN) for off, n in split_messages(batch)]
    assert [g.header["control_id"] for g in got] == ["MSG001", "MSG002"]
    assert got[0].observations == [HEART_RATE, TEMPERATURE]
    assert [o["value_num"] for o in got[1].observations] == [37.2]


def test_latin1_and_utf8_text_and_the_declared_character_set():
    lines = [msh(f18="8859/1"), seg("PID", {3: "1^^^H^MR", 5: "Müller^Jérôme"})]
    latin1 = "\r".join(lines).encode("iso-8859-1")
    got = extract(latin1, default_tz=BERLIN)
    assert (got.patients[0]["family_name"], got.patients[0]["given_name"]) == ("Müller", "Jérôme")
    assert (got.header["encoding"], got.header["charset"]) == ("latin-1", "8859/1")
    utf8 = extract(message(msh(), *lines[1:]), default_tz=BERLIN)
    assert (utf8.patients[0]["family_name"], utf8.header["encoding"], utf8.header["charset"]) == ("Müller", "utf-8",
                                                                                                  None)
    assert extract(b"\xef\xbb\xbf" + latin1, default_tz=BERLIN).patients[0]["family_name"] == "Müller"


def test_a_line_that_is_not_a_segment_continues_the_previous_one():
    obx = seg("OBX", {1: "1", 2: "TX", 3: "X^x^L", 5: "first line\nsecond line", 11: "F"})
    got = run(msh(), PID, obx)
    assert got.observations[0]["value_text"] == "first line\nsecond line"
    assert got.observations[0]["status"] == "final"
    assert [i["code"] for i in got.issues] == ["continuation_line"]


def adt(trigger: str, pv1: dict[int, str], evn: str = "20240305110000") -> Extracted:
    return run(msh(f"ADT^{trigger}^ADT_A01"), f"EVN|{trigger}|{evn}", PID, seg("PV1", pv1))


ADT_ENCOUNTER = {**ENCOUNTER, "record_index": 3, "admit_at": None, "attending_doctor_id": None,
                 "location_point_of_care": None, "location_room": None, "location_bed": None,
                 "location_facility": None, "event_at": utc(2024, 3, 5, 10, 0)}


@pytest.mark.parametrize(("trigger", "pv1", "expected"), [
    ("A01", {2: "I", 3: "W3^301^B^GEN", 7: "D1^Who^Doc", 19: "V1^^^GEN^VN", 44: "20240305103000"},
     {"event": "admit", "patient_class": "I", "location_point_of_care": "W3", "location_room": "301",
      "location_bed": "B", "location_facility": "GEN", "attending_doctor_id": "D1", "visit_number": "V1",
      "visit_authority": "GEN", "admit_at": utc(2024, 3, 5, 9, 30)}),
    ("A02", {2: "I", 3: "ICU^1^A^GEN", 6: "W3^301^B^GEN", 19: "V1"},
     {"event": "transfer", "patient_class": "I", "location_point_of_care": "ICU", "location_room": "1",
      "location_bed": "A", "location_facility": "GEN", "prior_location_point_of_care": "W3",
      "prior_location_room": "301", "prior_location_bed": "B", "prior_location_facility": "GEN", "visit_number": "V1",
      "visit_authority": None}),
    ("A03", {2: "I", 19: "V1", 44: "20240305103000", 45: "20240310140000+0000"},
     {"event": "discharge", "patient_class": "I", "visit_number": "V1", "visit_authority": None,
      "admit_at": utc(2024, 3, 5, 9, 30), "discharge_at": utc(2024, 3, 10, 14, 0)}),
    ("A08", {2: "O", 19: "V2", 3: "CLINIC"},
     {"event": "update", "patient_class": "O", "visit_number": "V2", "visit_authority": None,
      "location_point_of_care": "CLINIC"}),
    ("A11", {2: "E", 19: "V3^^^&1.2.3&ISO"},
     {"event": "cancel_admit", "patient_class": "E", "visit_number": "V3", "visit_authority": "1.2.3"}),
    ("A13", {2: "I", 19: "V1", 45: '""'},
     {"event": "cancel_discharge", "patient_class": "I", "visit_number": "V1", "visit_authority": None,
      "nulled": ["discharge_at"]}),
    ("A12", {2: "I", 3: "W3^301^B", 6: "ICU^1^A", 19: "V1"},
     {"event": "cancel_transfer", "patient_class": "I", "visit_number": "V1", "visit_authority": None,
      "location_point_of_care": "W3", "location_room": "301", "location_bed": "B",
      "prior_location_point_of_care": "ICU", "prior_location_room": "1", "prior_location_bed": "A"}),
])
def test_adt_events_and_their_pv1_fields(trigger, pv1, expected):
    got = adt(trigger, pv1)
    assert got.encounters == [{**ADT_ENCOUNTER, "event_code": trigger, **expected}]
    assert list(got.encounters[0]) == list(ENCOUNTER_KEYS)
    assert got.patients[0]["event_at"] == utc(2024, 3, 5, 10, 0)
    assert got.issues == []


def test_without_evn_the_event_time_is_the_message_time():
    got = run(msh("ADT^A04^ADT_A01"), PID, seg("PV1", {2: "O"}))
    assert got.encounters[0]["event_at"] == got.header["sent_at"] == utc(2024, 3, 5, 9, 15)
    assert got.encounters[0]["event"] == "register"


def test_death_and_observations_in_adt_messages():
    pid = seg("PID", {3: "12345^^^HOSP^MR", 29: "20240306020000", 30: "Y"})
    obx = seg("OBX", {1: "1", 2: "NM", 3: "29463-7^Body weight^LN", 5: "70", 6: "kg", 11: "F"})
    got = run(msh("ADT^A08^ADT_A01"), "EVN|A08|20240305110000", pid, seg("PV1", {2: "I"}), obx)
    assert (got.patients[0]["deceased"], got.patients[0]["deceased_at"]) == (True, utc(2024, 3, 6, 1, 0))
    assert [(o["code"], o["value_num"], o["effective_source"]) for o in got.observations] == [
        ("29463-7", 70.0, "MSH-7")]


def test_a40_merge_pairs_each_pid_with_its_mrg():
    got = run(msh("ADT^A40^ADT_A39"), "EVN|A40|20240305110000", seg("PID", {3: "NEW1^^^HOSP^MR"}),
              seg("MRG", {1: "OLD1^^^HOSP^MR"}), seg("PID", {3: "NEW2^^^HOSP^MR"}),
              seg("MRG", {1: "X9^^^LAB^PI~OLD2^^^OTHER^MR"}))
    base = {"event_code": "A40", "event_at": utc(2024, 3, 5, 10, 0), "nulled": []}
    assert got.merges == [
        {"record_index": 3, "surviving_mrn": "NEW1", "surviving_source_system": "HOSP", "prior_mrn": "OLD1",
         "prior_source_system": "HOSP", **base},
        {"record_index": 5, "surviving_mrn": "NEW2", "surviving_source_system": "HOSP", "prior_mrn": "OLD2",
         "prior_source_system": "OTHER", **base}]
    assert [p["mrn"] for p in got.patients] == ["NEW1", "NEW2"]


def test_mrg_without_a_prior_patient_identifier():
    a40 = run(msh("ADT^A40^ADT_A39"), PID, seg("MRG", {3: "ACC1"}))
    assert a40.merges == [] and [i["code"] for i in a40.issues] == ["missing_patient_id"]
    a06 = run(msh("ADT^A06^ADT_A06"), PID, seg("MRG", {3: "ACC1"}), seg("PV1", {2: "I"}))
    assert (a06.merges, a06.issues) == ([], [])


ORDER = dict.fromkeys(ORDER_KEYS) | {"patient_mrn": "12345", "patient_source_system": "HOSP", "visit_number": "V100",
                                     "reason_codes": [], "nulled": []}


def test_orders_priority_accession_and_modality():
    got = run(msh("ORM^O01^ORM_O01"), PID, PV1,
              seg("ORC", {1: "NW", 2: "P1^EPIC", 3: "F1", 5: "SC", 7: "^^^20240305120000^^S", 12: "DOC1^Who"}),
              seg("OBR", {1: "1", 4: "71020^Chest X-ray^CPT4", 18: "ACC-1", 24: "CR"}),
              seg("ORC", {1: "NW", 2: "P2"}),
              seg("OBR", {1: "2", 4: "CBC^Blood count^L", 6: "20240305130000", 27: "^^^^^A"}),
              seg("ORC", {1: "NW", 2: "P3", 7: "^^^^^S"}),
              seg("TQ1", {1: "1", 7: "20240306080000", 9: "R^Routine^HL70485"}),
              seg("OBR", {1: "3", 4: "CT1^CT head^L", 16: "DOC2"}),
              seg("IPC", {1: "ACC-3", 2: "REQ3", 3: "1.2.3", 4: "SPS3", 5: "CT"}))
    assert got.orders == [
        ORDER | {"record_index": 3, "order_control": "NW", "placer_order_number": "P1", "filler_order_number": "F1",
                 "order_status": "SC", "priority": "stat", "priority_code": "S", "service_code": "71020",
                 "service_display": "Chest X-ray", "service_code_system": "CPT4",
                 "requested_at": utc(2024, 3, 5, 11, 0), "ordering_provider_id": "DOC1", "accession_number": "ACC-1",
                 "modality": "CR", "placer_system": "EPIC"},
        ORDER | {"record_index": 5, "order_control": "NW", "placer_order_number": "P2", "priority": "asap",
                 "priority_code": "A", "service_code": "CBC", "service_display": "Blood count",
                 "service_code_system": "L", "requested_at": utc(2024, 3, 5, 12, 0)},
        ORDER | {"record_index": 7, "order_control": "NW", "placer_order_number": "P3", "priority": "routine",
                 "priority_code": "R", "service_code": "CT1", "service_display": "CT head", "service_code_system": "L",
                 "requested_at": utc(2024, 3, 6, 7, 0), "ordering_provider_id": "DOC2", "accession_number": "ACC-3",
                 "modality": "CT"}]
    assert got.observations == [] and got.issues == []


def test_oml_order_with_stat_in_obr_27_and_no_orc():
    got = run(msh("OML^O21^OML_O21"), PID, seg("OBR", {1: "1", 2: "P9", 3: "F9", 4: "GLU^Glucose^L", 27: "^^^^^STAT"}))
    assert got.orders == [ORDER | {"record_index": 2, "placer_order_number": "P9", "filler_order_number": "F9",
                                   "priority": "stat", "priority_code": "STAT", "service_code": "GLU",
                                   "service_display": "Glucose", "service_code_system": "L", "visit_number": None}]


@pytest.mark.parametrize(("data", "code"), [
    (b"", "missing_msh"),
    (b"\r\n\r\n", "missing_msh"),
    (b"PID|1||123", "missing_msh"),
    (b"EVN|A04|2024\rMSH|^~\\&|A|B|||2024||ADT^A04|C1|P|2.5", "missing_msh"),
    (b"MSH|^~", "bad_delimiters"),
    (b"MSHA^~\\&A", "bad_delimiters"),
    (b"MSH|^^\\&|A|B|||2024||ADT^A04|C1|P|2.5", "bad_delimiters"),
    (b"MSH|^~\\\\&|A|B|||2024||ADT^A04|C1|P|2.5", "bad_delimiters"),
    (b"MSH|^~1&|A|B|||2024||ADT^A04|C1|P|2.5", "bad_delimiters"),
    (b"MSH||A|B|||2024||ADT^A04|C1|P|2.5", "bad_delimiters"),
    (b"MSH|^~\\&|A|B|||2024|||C1|P|2.5", "missing_message_type"),
    (b"MSH|^~\\&|A|B|||2024||^A04|C1|P|2.5", "missing_message_type"),
    (b"MSH|^~\\&|A|B|||2024||ADT^A04||P|2.5", "missing_control_id"),
    (b"MSH|^~\\&|A|B|||2024||ADT^A04", "missing_control_id"),
])
def test_unusable_messages_raise_with_a_reason_code(data, code):
    with pytest.raises(Hl7ParseError) as e:
        extract(data, default_tz=BERLIN)
    assert e.value.code == code
    assert e.value.detail and str(e.value).startswith(code)


def test_parse_error_survives_pickling():
    error = pickle.loads(pickle.dumps(Hl7ParseError("missing_msh", "no MSH")))
    assert (error.code, error.detail, str(error)) == ("missing_msh", "no MSH", "missing_msh: no MSH")


def test_message_level_issues():
    siu = run(msh("SIU^S12^SIU_S12"), "SCH|1", PID, seg("PV1", {2: "O", 19: "V7"}))
    assert [p["mrn"] for p in siu.patients] == ["12345"] and siu.encounters[0]["visit_number"] == "V7"
    assert siu.issues == [{"code": "unsupported_message_type", "segment": "MSH", "field": "MSH-9", "record_index": 0,
                           "detail": "MSH-9 (segment 0): message type 'SIU' is not extracted beyond its PID and PV1 "
                                     "segments"}]
    no_pid = run(msh(), OBR, OBX_TEMP)
    assert [i["code"] for i in no_pid.issues] == ["missing_patient_id"]
    assert no_pid.observations[0]["patient_mrn"] is None
    blank_id = run(msh(), seg("PID", {3: "^^^HOSP^MR", 5: "Doe"}), OBX_TEMP)
    assert [(i["code"], i["field"]) for i in blank_id.issues] == [("missing_patient_id", "PID-3")]
    bad_birth = run(msh(), seg("PID", {3: "1^^^H^MR", 7: "19701340"}))
    assert bad_birth.patients[0]["birth_date"] is None
    assert [(i["code"], i["field"]) for i in bad_birth.issues] == [("bad_timestamp", "PID-7")]
    bad_sent = run(msh(f7="yesterday"), PID)
    assert bad_sent.header["sent_at"] is None and bad_sent.issues[0]["field"] == "MSH-7"


@pytest.mark.parametrize(("sent", "birth_date", "precision"), [
    ("1970", date(1970, 1, 1), "year"), ("197003", date(1970, 3, 1), "month"),
    ("198808181126+0215", date(1988, 8, 18), "day"),
])
def test_birth_date_is_a_calendar_date_with_its_precision(sent, birth_date, precision):
    patient = run(msh(), seg("PID", {3: "1^^^H^MR", 7: sent})).patients[0]
    assert (patient["birth_date"], patient["birth_date_precision"]) == (birth_date, precision)


def test_mangled_messages_only_ever_raise_hl7_parse_error():
    data = message(*VITALS, "MRG|OLD^^^H^MR", "ORC|NW|X", "TQ1|1||||||2024|x|S")
    alphabet = b'|^~\\&"\r\nMSHOBX0123456789+-.'
    rng = random.Random(7)
    outcomes = Counter()
    for _ in range(400):
        mangled = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            at = rng.randrange(len(mangled))
            action = rng.random()
            if action < 0.4:
                mangled[at] = rng.choice(alphabet)
            elif action < 0.7:
                del mangled[at:at + rng.randint(1, 20)]
            else:
                mangled[at:at] = bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 5)))
        try:
            extract(bytes(mangled), default_tz=BERLIN)
            outcomes["extracted"] += 1
        except Hl7ParseError as e:
            outcomes[e.code] += 1
    assert outcomes["extracted"] > 100


@pytest.mark.realdata
def test_every_real_message_extracts_or_raises_a_reason_code(realdata: Path, capsys):
    outcomes: Counter[str] = Counter()
    issues: Counter[str] = Counter()
    files = sorted(p for p in (realdata / "hl7v2").rglob("*") if p.is_file())
    for path in files:
        data = path.read_bytes()
        for off, n in split_messages(data):
            try:
                got = extract(data[off:off + n], default_tz=BERLIN)
            except Hl7ParseError as e:
                outcomes[e.code] += 1
                continue
            outcomes["extracted"] += 1
            issues.update(i["code"] for i in got.issues)
    with capsys.disabled():
        print(f"\nhl7v2 realdata: {len(files)} files, outcomes {dict(outcomes)}, issues {dict(issues)}")
    assert outcomes["extracted"] >= 140
    assert set(outcomes) <= {"extracted", "missing_msh", "bad_delimiters", "missing_control_id",
                             "missing_message_type"}


@pytest.mark.realdata
def test_real_oru_glucose_observation(realdata: Path):
    data = (realdata / "hl7v2/ms_fhir_converter/ORU-R01-RMGEAD.hl7").read_bytes()
    got = extract(data, default_tz=BERLIN)
    assert got.header | {"sent_at": None} == {
        "control_id": "CNTRL-3456", "message_code": "ORU", "trigger_event": "R01", "message_structure": None,
        "sent_at": None, "event_at": utc(2002, 2, 15, 3, 30), "sending_application": "GHH LAB",
        "sending_facility": "ELAB-3", "receiving_application": "GHH OE", "receiving_facility": "BLDG4",
        "version": "2.4", "processing_id": "P", "encoding": "utf-8", "charset": None}
    assert [(p["mrn"], p["source_system"], p["family_name"], p["birth_date"], p["sex"]) for p in got.patients] == [
        ("555-44-4444", "ELAB-3", "EVERYWOMAN", date(1962, 3, 20), "female")]
    assert got.observations == [{
        "record_index": 3, "set_id": "1", "value_type": "SN", "code": "1554-5",
        "code_system": "POST 12H CFST:MCNC:PT:SER/PLAS:QN", "display": "GLUCOSE", "alt_code": None,
        "alt_code_system": None, "alt_display": None, "sub_id": None, "value_num": 182.0, "comparator": None,
        "value_text": None, "value_code": None, "value_code_system": None, "missing_value": False,
        "value_error": None, "units_code": "mg/dl", "units_system": None, "units_text": None,
        "reference_range": "70_105", "abnormal_flags": ["H"], "status_code": "F", "status": "final",
        "effective_at": utc(2002, 2, 15, 1, 30), "effective_source": "OBR-7", "placer_order_number": "845439",
        "filler_order_number": "1045813", "service_code": "15545", "service_display": "GLUCOSE",
        "order_control": None, "patient_mrn": "555-44-4444", "patient_source_system": "ELAB-3",
        "visit_number": None, "nulled": []}]
    assert got.issues == []


@pytest.mark.realdata
def test_real_adt_a01_admission(realdata: Path):
    got = extract((realdata / "hl7v2/ms_fhir_converter/ADT-A01-01.hl7").read_bytes(), default_tz=BERLIN)
    assert got.encounters == [{
        "record_index": 8, "visit_number": "40007716", "visit_authority": "AccMng", "patient_mrn": "PATID1234",
        "patient_source_system": "test1", "event_code": "A01", "event": "admit", "patient_class": "P",
        "location_point_of_care": "HUH AE OMU", "location_room": "OMU B", "location_bed": "Bed 03",
        "location_facility": "HOMERTON UNIVER", "prior_location_point_of_care": "4 East, room 136, bed B 4E",
        "prior_location_room": "136", "prior_location_bed": "B", "prior_location_facility": "CommunityHospital",
        "attending_doctor_id": "1122334", "admit_at": utc(2015, 2, 8, 10, 24, 19), "discharge_at": None,
        "event_at": utc(2029, 8, 1, 5, 51, 24), "nulled": []}]
    patient = got.patients[0]
    assert {k: patient[k] for k in ("mrn", "source_system", "family_name", "given_name", "birth_date", "sex",
                                    "address_line", "address_city", "phone", "deceased", "deceased_at")} == {
        "mrn": "PATID1234", "source_system": "test1", "family_name": "EVERYMAN", "given_name": "ADAM",
        "birth_date": date(1988, 8, 18), "sex": "male", "address_line": "1000 Hospital Lane",
        "address_city": "Ann Arbor ", "phone": "78788788", "deceased": True,
        "deceased_at": utc(2008, 8, 25, 10, 1, 30)}


@pytest.mark.realdata
def test_real_a40_merge_and_batch_file(realdata: Path):
    a40 = extract((realdata / "hl7v2/ms_fhir_converter/ADT-A40-01.hl7").read_bytes(), default_tz=BERLIN)
    assert [(m["surviving_mrn"], m["surviving_source_system"], m["prior_mrn"], m["prior_source_system"])
            for m in a40.merges] == [("12345", "BCBS", "56789", "BCBS")]
    batch = (realdata / "hl7v2/python_hl7/sample_file.hl7").read_bytes()
    pieces = [extract(batch[off:off + n], default_tz=BERLIN) for off, n in split_messages(batch)]
    assert [(p.header["control_id"], p.header["charset"], p.patients[0]["mrn"]) for p in pieces] == [
        ("12334456778890", "ASCII", "0000112234")]


def test_imaging_order_reasons_transaction_time_and_omi():
    got = run(msh("OMI^O23^OMI_O23"), PID, PV1,
              seg("ORC", {1: "NW", 2: "P7^^urn:oid:1.2.3^ISO", 9: "20240305100000"}),
              seg("OBR", {1: "1", 4: "70450^CT head^C4", 13: "fell at home", 31: "R29.818^Stroke symptoms^I10~^chest"}),
              seg("DG1", {1: "1", 3: "I63.9^Cerebral infarction^I10"}))
    [order] = got.orders
    assert (order["placer_system"], order["transaction_at"], order["reason_text"]) == (
        "urn:oid:1.2.3", utc(2024, 3, 5, 9), "Stroke symptoms; chest")
    assert order["reason_codes"] == [{"code": "R29.818", "display": "Stroke symptoms", "system": "I10"},
                                     {"code": None, "display": "chest", "system": None},
                                     {"code": "I63.9", "display": "Cerebral infarction", "system": "I10"}]
    assert run(msh("ORM^O01"), PID, seg("ORC", {1: "NW", 2: "P8"}),
               seg("OBR", {1: "1", 4: "X^Y^L", 13: "fell at home"})).orders[0]["reason_text"] == "fell at home"


def test_result_messages_list_each_obr_as_a_report():
    got = run(msh(), PID, PV1,
              seg("OBR", {1: "1", 2: "P1^EPIC", 3: "F1^RIS^1.2.3^ISO", 4: "70450^CT head^C4", 7: "20240305090000",
                          18: "ACC1", 22: "20240305093000", 24: "CT", 25: "F", 32: "R7&Okafor&Ada"}),
              seg("OBX", {1: "1", 2: "TX", 3: "19005-8^Impression^LN", 5: "Bleed", 8: "AA", 11: "F"}),
              seg("OBR", {1: "2", 2: "P2", 4: "CBC^Blood count^L", 24: "LAB"}))
    first, second = got.reports
    assert first == dict.fromkeys(REPORT_KEYS) | {
        "record_index": 3, "placer_order_number": "P1", "placer_system": "EPIC", "filler_order_number": "F1",
        "filler_system": "1.2.3", "service_code": "70450", "service_display": "CT head", "service_code_system": "C4",
        "diagnostic_service": "CT", "result_status": "F", "observed_at": utc(2024, 3, 5, 8),
        "results_at": utc(2024, 3, 5, 8, 30), "interpreter_id": "R7", "interpreter_name": "Okafor, Ada",
        "accession_number": "ACC1", "patient_mrn": "12345", "patient_source_system": "HOSP", "visit_number": "V100",
        "nulled": []}
    assert (second["record_index"], second["diagnostic_service"], got.observations[0]["abnormal_flags"]) == (
        5, "LAB", ["AA"])
    assert run(msh("ORM^O01"), PID, seg("ORC", {1: "NW", 2: "P8"}), seg("OBR", {1: "1", 4: "X"})).reports == []
