"""bronze.device_readings: every line lands with its exact bytes, lineage and a parse status."""

from __future__ import annotations

import hashlib
from datetime import datetime

from bronze.device_readings import SCHEMA, device_readings
from pipelines.runner import LANDING_FILE_SCHEMA


def test_lines_keep_their_bytes_and_get_a_status(spark):
    content = (b'{"device_id":"mon-1","time":"2026-11-21T03:00:00Z","value":88}\n'
               b'{"device_id":"mon-2","time":"t2"}\r\n'
               b"not json\n"
               b"\n"
               b'{"time":"no device"}\n'
               b'{"device_id":"caf\xe9"}\n'
               b'{"device_id":"last-no-newline"}')
    files = spark.createDataFrame([("file:/l/a.jsonl", datetime(2026, 11, 21, 3, 0), len(content), content)],
                                  LANDING_FILE_SCHEMA)
    out = device_readings(files, ingest_batch_id="b-1")
    assert [(f.name, f.dataType) for f in out.schema] == [(f.name, f.dataType) for f in SCHEMA]
    rows = sorted(out.collect(), key=lambda r: r.landing_position)
    assert [(r.landing_position, r.device_id, r.parse_status) for r in rows] == [
        (0, "mon-1", "ok"),
        (1, "mon-2", "ok"),
        (2, None, "invalid_json"),
        (4, None, "missing_device_id"),
        (5, "caf\ufffd", "invalid_utf8"),
        (6, "last-no-newline", "ok"),
    ]
    lines = content.split(b"\n")
    for r in rows:
        assert bytes(r.payload) == lines[r.landing_position]
        assert r.sha256 == hashlib.sha256(lines[r.landing_position]).hexdigest()
    assert bytes(rows[1].payload).endswith(b"\r")
    assert {r.ingest_batch_id for r in rows} == {"b-1"} and {r.feed for r in rows} == {"devices"}
    assert rows[0].reading_time == "2026-11-21T03:00:00Z"
