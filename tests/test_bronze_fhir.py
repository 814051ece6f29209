"""bronze.fhir_resources: one row per resource from gateway bodies and dropped files, bytes exact."""

from __future__ import annotations

import json
from datetime import datetime

import pytest

from bronze.fhir_resources import SCHEMA, fhir_resources
from bronze.records import FILE_MAGIC, encode_record
from pipelines.runner import LANDING_FILE_SCHEMA


def _bronze(spark, *files: tuple[str, bytes]):
    df = spark.createDataFrame([(p, datetime(2026, 11, 21, 3, 0), len(c), c) for p, c in files], LANDING_FILE_SCHEMA)
    out = fhir_resources(df, ingest_batch_id="b-3")
    assert [(f.name, f.dataType) for f in out.schema] == [(f.name, f.dataType) for f in SCHEMA]
    return sorted(out.collect(), key=lambda r: (r.landing_file, r.landing_position))


BUNDLE = json.dumps({"resourceType": "Bundle", "id": "bun-1", "type": "transaction", "entry": [
    {"fullUrl": "urn:uuid:1", "resource": {"resourceType": "Patient", "id": "p1", "name": [{"family": "Müller"}]},
     "request": {"method": "PUT", "url": "Patient/p1"}},
    {"resource": {"resourceType": "Observation", "id": "o1", "meta": {"versionId": "2"}, "status": "final"},
     "request": {"method": "PUT", "url": "Observation/o1"}},
    {"request": {"method": "DELETE", "url": "Observation/o0"}}]}, ensure_ascii=False).encode()


def test_gateway_bodies_explode_into_resources_with_exact_bytes(spark):
    ndjson = b'{"resourceType":"Observation","id":"o2"}\r\n{"resourceType":"Observation","id":"o3"}\n{oops\n'
    segment = (FILE_MAGIC
               + encode_record({"received_at": "2026-11-21T06:00:00Z", "content_type": "application/fhir+json"},
                               BUNDLE)
               + encode_record({"received_at": "2026-11-21T06:00:01Z", "content_type": "application/fhir+ndjson"},
                               ndjson))
    rows = _bronze(spark, ("file:/l/seg.clrec", segment))
    got = [(r.resource_type, r.resource_id, r.version_id, r.bundle_id, r.entry_index, r.request_method, r.parse_status)
           for r in rows]
    assert got == [
        ("Patient", "p1", None, "bun-1", 0, "PUT", "ok"),
        ("Observation", "o1", "2", "bun-1", 1, "PUT", "ok"),
        ("Observation", "o0", None, "bun-1", 2, "DELETE", "ok"),
        ("Observation", "o2", None, None, None, None, "ok"),
        ("Observation", "o3", None, None, None, None, "ok"),
        (None, None, None, None, None, None, "invalid_json"),
    ]
    for r in rows:
        assert segment[r.landing_position:r.landing_position + len(r.payload)] == bytes(r.payload)
    assert json.loads(bytes(rows[0].payload))["name"][0]["family"] == "Müller"
    assert bytes(rows[2].payload) == b"" and rows[5].parse_detail
    assert rows[3].received_at == datetime(2026, 11, 21, 6, 0, 1)


def test_dropped_ndjson_file_is_split_by_line(spark):
    content = b'{"resourceType":"Patient","id":"a"}\n{"resourceType":"Patient","id":"b"}\n'
    rows = _bronze(spark, ("file:/l/x-Patient.ndjson", content))
    assert [(r.resource_id, r.landing_position) for r in rows] == [("a", 0), ("b", 36)]


@pytest.mark.realdata
def test_every_real_fhir_file_lands_resource_by_resource(spark, realdata):
    files = sorted(p for p in (realdata / "fhir").rglob("*") if p.is_file() and p.suffix in (".json", ".ndjson"))
    rows = _bronze(spark, *((f"file:{p}", p.read_bytes()) for p in files))
    counts: dict[tuple[str, str], int] = {}
    for r in rows:
        key = (r.resource_type or "-", r.parse_status)
        counts[key] = counts.get(key, 0) + 1
    print(f"real FHIR in bronze: {len(files)} files, {len(rows)} rows, {sorted(counts.items())}")
    assert sum(n for (_, s), n in counts.items() if s == "ok") > 1000
    assert counts.get(("Observation", "ok"), 0) > 100 and counts.get(("Patient", "ok"), 0) >= 10
