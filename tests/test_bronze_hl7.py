"""bronze.hl7_messages: one row per message from dropped files and gateway segments, bytes exact."""

from __future__ import annotations

import hashlib
from datetime import datetime

import pytest

from bronze.hl7_messages import SCHEMA, hl7_messages
from bronze.hl7_wire import split_messages
from bronze.records import FILE_MAGIC, encode_record
from pipelines.runner import LANDING_FILE_SCHEMA
from tests.test_gateway import oru


def _bronze(spark, *files: tuple[str, bytes]):
    df = spark.createDataFrame([(p, datetime(2026, 11, 21, 3, 0), len(c), c) for p, c in files], LANDING_FILE_SCHEMA)
    out = hl7_messages(df, ingest_batch_id="b-7")
    assert [(f.name, f.dataType) for f in out.schema] == [(f.name, f.dataType) for f in SCHEMA]
    return sorted(out.collect(), key=lambda r: (r.landing_file, r.landing_position))


def test_dropped_file_messages_are_keyed_and_kept_byte_for_byte(spark):
    content = b"\xef\xbb\xbf" + oru("D-1") + oru("D-2", b"\n") + b"MSH|^~\\&|X||||20260101||ORU^R01|\r" + oru("D-4")
    rows = _bronze(spark, ("file:/l/drop.hl7", content))
    assert [(r.control_id, r.message_type, r.parse_status) for r in rows] == [
        ("D-1", "ORU^R01^ORU_R01", "ok"), ("D-2", "ORU^R01^ORU_R01", "ok"),
        (None, "ORU^R01", "missing_control_id"), ("D-4", "ORU^R01^ORU_R01", "ok")]
    for r in rows:
        assert content[r.landing_position:r.landing_position + len(r.payload)] == bytes(r.payload)
        assert r.sha256 == hashlib.sha256(bytes(r.payload)).hexdigest()
    assert rows[0].message_time == "20261121030000+0100" and rows[0].sending_application == "MONITOR"
    assert rows[2].parse_detail == "MSH-10 message control id is empty"
    assert {r.landing_status for r in rows} == {"accepted"} and {r.feed for r in rows} == {"hl7"}


def test_gateway_records_batches_and_a_corrupt_tail(spark):
    batch = b"BHS|^~\\&|LAB\r" + oru("B-1") + oru("B-2") + b"BTS|2\r"
    segment = (FILE_MAGIC
               + encode_record({"received_at": "2026-11-21T05:00:00Z", "status": "accepted"}, oru("M-1"))
               + encode_record({"received_at": "2026-11-21T05:00:01Z", "status": "rejected"}, b"garbage\r")
               + encode_record({"received_at": "2026-11-21T05:00:02Z", "status": "accepted"}, batch))
    tail = b"CR\x00\x00\x00"
    rows = _bronze(spark, ("file:/l/seg.clrec", segment + tail))
    assert [(r.control_id, r.landing_status, r.parse_status) for r in rows] == [
        ("M-1", "accepted", "ok"), (None, "rejected", "missing_msh"),
        ("B-1", "accepted", "ok"), ("B-2", "accepted", "ok"), (None, "corrupt", "corrupt_landing_record")]
    whole = segment + tail
    for r in rows:
        assert whole[r.landing_position:r.landing_position + len(r.payload)] == bytes(r.payload)
    assert rows[0].received_at == datetime(2026, 11, 21, 5, 0, 0)
    assert "incomplete record header" in rows[-1].parse_detail


@pytest.mark.realdata
def test_every_real_hl7_message_lands_with_a_status(spark, realdata):
    files = sorted(p for p in (realdata / "hl7v2").rglob("*") if p.is_file())
    rows = _bronze(spark, *((f"file:{p}", p.read_bytes()) for p in files))
    expected = sum(len(split_messages(p.read_bytes())) for p in files)
    assert len(rows) == expected
    statuses: dict[str, int] = {}
    for r in rows:
        statuses[r.parse_status] = statuses.get(r.parse_status, 0) + 1
    print(f"real HL7 in bronze: {len(files)} files, {len(rows)} messages, {statuses}")
    assert statuses["ok"] >= 140 and set(statuses) <= {"ok", "missing_msh", "missing_control_id",
                                                       "missing_message_type", "bad_delimiters"}
