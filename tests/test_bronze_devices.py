"""bronze.device_readings: every line lands with its exact bytes, lineage and a parse status."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

from bronze.device_readings import SCHEMA, device_readings
from bronze.records import FILE_MAGIC, encode_record
from pipelines.runner import LANDING_FILE_SCHEMA


def _bronze(spark, path: str, content: bytes):
    files = spark.createDataFrame([(path, datetime(2026, 11, 21, 3, 0), len(content), content)],
                                  LANDING_FILE_SCHEMA)
    out = device_readings(files, ingest_batch_id="b-1")
    assert [(f.name, f.dataType) for f in out.schema] == [(f.name, f.dataType) for f in SCHEMA]
    return sorted(out.collect(), key=lambda r: r.landing_position)


def test_dropped_file_lines_keep_their_bytes_and_get_a_status(spark):
    content = (b'{"device_id":"mon-1","time":"2026-11-21T03:00:00Z","value":88}\n'
               b'{"device_id":"mon-2","time":"t2"}\r\n'
               b"not json\n"
               b"\n"
               b'{"time":"no device"}\n'
               b'{"device_id":"caf\xe9"}\n'
               b'{"device_id":"last-no-newline"}')
    rows = _bronze(spark, "file:/l/a.jsonl", content)
    assert [(r.device_id, r.parse_status) for r in rows] == [
        ("mon-1", "ok"),
        ("mon-2", "ok"),
        (None, "invalid_json"),
        (None, "missing_device_id"),
        ("caf\ufffd", "invalid_utf8"),
        ("last-no-newline", "ok"),
    ]
    for r in rows:  # the position is the byte offset of the line in the landing file
        assert content[r.landing_position:r.landing_position + len(r.payload)] == bytes(r.payload)
        assert r.sha256 == hashlib.sha256(bytes(r.payload)).hexdigest()
    assert bytes(rows[1].payload).endswith(b"\r")
    assert {r.ingest_batch_id for r in rows} == {"b-1"} and {r.feed for r in rows} == {"devices"}
    assert rows[0].reading_time == "2026-11-21T03:00:00Z"
    assert {r.received_at for r in rows} == {datetime(2026, 11, 21, 3, 0)}


def test_gateway_segment_records_and_a_corrupt_tail(spark):
    first = b'{"device_id":"mon-1","time":"t1"}\n{"device_id":"mon-2","time":"t2"}\n'
    second = b'{"device_id":"mon-3","time":"t3"}'
    segment = (FILE_MAGIC
               + encode_record({"received_at": "2026-11-21T04:00:00.250000Z", "peer": "10.0.0.9:5000"}, first)
               + encode_record({"received_at": "2026-11-21T04:00:01Z"}, second))
    torn = encode_record({"received_at": "2026-11-21T04:00:02Z"}, b'{"device_id":"mon-4"}')[:-3]
    rows = _bronze(spark, "file:/l/seg.clrec", segment + torn)
    assert [(r.device_id, r.parse_status) for r in rows] == [
        ("mon-1", "ok"), ("mon-2", "ok"), ("mon-3", "ok"), (None, "corrupt_landing_record")]
    whole = segment + torn
    for r in rows:
        assert whole[r.landing_position:r.landing_position + len(r.payload)] == bytes(r.payload)
    assert bytes(rows[-1].payload) == torn  # kept byte for byte, never parsed as a reading
    # Spark returns naive timestamps in the session time zone (UTC).
    assert rows[0].received_at == datetime(2026, 11, 21, 4, 0, 0, 250000, tzinfo=UTC).replace(tzinfo=None)
    assert rows[2].received_at == datetime(2026, 11, 21, 4, 0, 1)


def test_line_spans_match_splitting_line_by_line():
    import random

    from bronze.landed import line_spans

    rng = random.Random(5)
    alphabet = [b"a", b"{", b"\n", b"\r", b" ", b"\t", b"\x0b", b"\xe9", b"}"]
    for _ in range(300):
        body = b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        expected, pos = [], 0
        for piece in body.split(b"\n"):
            if piece.strip():
                expected.append((pos, len(piece)))
            pos += len(piece) + 1
        offsets, lengths = line_spans(body)
        assert list(zip(offsets.tolist(), lengths.tolist(), strict=True)) == expected, body
