"""streaming.fuse: silver.observations computed inside the bronze batches of the hot feeds (devices, HL7).

The fused path must write exactly what the separate silver job writes, commit silver before bronze with the
batch's transaction (so a crash between the two commits replays without duplicates), and refuse a fuse
configuration that cannot work with a message that names the fix.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from pipelines.errors import ConfigError
from pipelines.jobs import load_registry
from pipelines.landing import ingest
from pipelines.runner import JobFailed, Runner, Trigger
from pipelines.store import open_store
from silver.observations import OBSERVATIONS
from silver.quarantine import QUARANTINE
from tests.conftest import make_config
from tests.test_silver_observations import FHIR_SPO2, oru, reading

BRONZE = ("bronze.hl7_messages", "bronze.fhir_resources", "bronze.device_readings")
# What differs between two lakehouses fed the same bytes: when each row was written, and the ids hashed from the
# landing file's full path (its root differs) or the query's id.
VARIES = {"ingested_at", "quarantined_at", "quarantine_id", "ingest_batch_id"}


def _feeds(src: Path) -> dict[str, list[Path]]:
    src.mkdir()
    (src / "a.hl7").write_bytes(oru("C-1", "20261121100100+0000", "72") + b"garbage\r")
    (src / "b.hl7").write_bytes(oru("C-2", "20261121101500+0000", "75", status="C"))
    future = reading(time="2099-01-01T00:00:00.000Z", value=70.0)
    (src / "m.jsonl").write_text("\n".join([reading(), reading(), reading(value=64.0, time="2026-11-21T09:00:00Z"),
                                            future, "{broken", reading(value="x")]) + "\n")
    (src / "o.ndjson").write_text(json.dumps({**FHIR_SPO2, "meta": {"versionId": "1"}}) + "\n")
    return {"hl7": [src / "a.hl7", src / "b.hl7"], "devices": [src / "m.jsonl"], "fhir": [src / "o.ndjson"]}


def _lake(tmp_path: Path, spark, name: str, **overrides):
    cfg = make_config(tmp_path / name, **overrides)
    store = open_store(cfg, spark)
    return cfg, store, Runner(cfg, spark, store, load_registry(cfg))


def _rows(cfg, store, table: str) -> list[str]:
    rows = [{k: v for k, v in r.items() if k not in VARIES} for r in store.read_arrow(table).to_pylist()]
    for r in rows:  # a data-quality detail quotes the row's ingested_at
        r["detail"] = re.sub(r"\(value: .*\)$", "", r.get("detail") or "")
    return sorted(json.dumps(r, sort_keys=True, default=str).replace(str(cfg.root), "<root>") for r in rows)


def test_fused_bronze_batches_write_the_silver_the_separate_job_writes(tmp_path, spark):
    feeds = _feeds(tmp_path / "src")
    same = {"silver.key_secret": "a-shared-test-secret"}  # the same patient keys in both lakehouses
    fused = _lake(tmp_path, spark, "fused", **same)
    separate = _lake(tmp_path, spark, "separate", **same, **{"streaming.fuse": []})
    # A landing batch that carries silver commits it in chunks of at most max_rows_per_batch of its bronze rows.
    chunked = _lake(tmp_path, spark, "chunked", **same, **{"streaming.max_rows_per_batch": "2"})
    for feed, files in feeds.items():
        ingest(fused[0], files, feed)
    for other in (separate, chunked):  # the same landed bytes, times, names
        shutil.copytree(fused[0].path("landing"), other[0].path("landing"))
    # The fused lakehouse's device and HL7 readings reach silver with their bronze jobs alone.
    fused[2].run(["bronze.device_readings", "bronze.hl7_messages"], Trigger(available_now=True))
    assert {r["source_feed"] for r in fused[1].read_arrow(OBSERVATIONS).to_pylist()} == {"devices", "hl7"}
    for _cfg, _store, runner in (fused, separate, chunked):
        runner.run([*BRONZE, OBSERVATIONS], Trigger(available_now=True))

    for table in (OBSERVATIONS, QUARANTINE, *BRONZE):
        b = _rows(separate[0], separate[1], table)
        for lake in (fused, chunked):
            a = _rows(lake[0], lake[1], table)
            assert a == b, (table, sorted(set(a) - set(b)), sorted(set(b) - set(a)))
    from pipelines.store.deltars import change_rows

    path = str(chunked[1].ref(OBSERVATIONS).path)
    carried = [(c.metadata.get("carelake.chunk"), change_rows(path, c.version))
               for c in chunked[1].history(OBSERVATIONS)
               if c.metadata.get("carelake.job") == OBSERVATIONS and c.metadata.get("carelake.chunk")]
    assert len(carried) >= 2 and all(n <= 2 for _chunk, n in carried), carried
    observed = fused[1].read_arrow(OBSERVATIONS).to_pylist()
    assert {r["source_feed"] for r in observed} == {"devices", "hl7", "fhir"}
    reasons = {q["reason"] for q in fused[1].read_arrow(QUARANTINE).to_pylist()}
    assert {"invalid_json", "bad_value", "dq_effective_in_future"} <= reasons  # the suite ran on the fused rows
    # Each fused batch is in ops.metrics under silver.observations too, beside its carrier's row.
    metrics = fused[1].read_arrow("ops.metrics").to_pylist()
    carriers = {(m["query_id"], m["batch_id"]) for m in metrics if m["job"] in ("bronze.device_readings",
                                                                               "bronze.hl7_messages")}
    carried = {(m["query_id"], m["batch_id"]): m["rows_out"] for m in metrics if m["job"] == OBSERVATIONS}
    assert carriers and carriers <= set(carried) and all(carried[c] > 0 for c in carriers)


def test_a_crash_after_the_fused_commit_replays_bronze_without_writing_silver_twice(tmp_path, spark, monkeypatch):
    cfg, store, runner = _lake(tmp_path, spark, "lake")
    ingest(cfg, _feeds(tmp_path / "src")["devices"], "devices")
    write = Runner._write

    def crash_on_bronze(self, output, data, txn, meta):
        if output.table == "bronze.device_readings":
            raise OSError("disk gone between the silver commit and the bronze commit")
        return write(self, output, data, txn, meta)

    monkeypatch.setattr(Runner, "_write", crash_on_bronze)
    with pytest.raises(JobFailed, match="disk gone"):
        runner.run(["bronze.device_readings"], Trigger(available_now=True))
    assert not store.exists("bronze.device_readings")
    silver_version, silver = store.version(OBSERVATIONS), store.read_arrow(OBSERVATIONS).num_rows
    assert silver == 2  # two distinct good readings (one was sent twice); the other lines are quarantined

    monkeypatch.setattr(Runner, "_write", write)
    Runner(cfg, spark, store, load_registry(cfg)).run(["bronze.device_readings"], Trigger(available_now=True))
    assert store.read_arrow("bronze.device_readings").num_rows == 6
    assert store.version(OBSERVATIONS) == silver_version  # the replay found silver committed and skipped it
    assert store.read_arrow(OBSERVATIONS).num_rows == silver


def test_a_crash_between_a_carried_batchs_chunks_resumes_with_the_missing_chunks(tmp_path, spark, monkeypatch):
    """A landing batch committed in chunks (streaming.max_rows_per_batch of bronze rows): a crash after chunk 2's
    silver commit, before its bronze commit, replays chunk 2's bronze and chunk 3 whole; silver gets each chunk once."""
    cfg, store, runner = _lake(tmp_path, spark, "lake", **{"streaming.max_rows_per_batch": "2"})
    ingest(cfg, _feeds(tmp_path / "src")["devices"], "devices")
    write, bronze_writes = Runner._write, []

    def crash_on_second_bronze(self, output, data, txn, meta):
        if output.table == "bronze.device_readings":
            bronze_writes.append(meta.get("carelake.chunk"))
            if len(bronze_writes) == 2:
                raise OSError("killed between the silver and the bronze commit of chunk 2")
        return write(self, output, data, txn, meta)

    monkeypatch.setattr(Runner, "_write", crash_on_second_bronze)
    with pytest.raises(JobFailed, match="killed between"):
        runner.run(["bronze.device_readings"], Trigger(available_now=True))
    assert store.read_arrow("bronze.device_readings").num_rows == 2
    monkeypatch.setattr(Runner, "_write", write)
    Runner(cfg, spark, store, load_registry(cfg)).run(["bronze.device_readings"], Trigger(available_now=True))
    assert store.read_arrow("bronze.device_readings").num_rows == 6
    def chunks(table):
        return sorted(c.metadata["carelake.chunk"] for c in store.history(table)
                      if c.metadata.get("carelake.job") == OBSERVATIONS and "carelake.chunk" in c.metadata)

    assert chunks(OBSERVATIONS) == ["1of3", "2of3"]  # chunk 3 ("{broken", a value "x") is all quarantine
    assert chunks(QUARANTINE) == ["3of3"]
    assert store.read_arrow(OBSERVATIONS).num_rows == 2  # the same distinct good readings as one batch gives


@pytest.mark.parametrize(("fuse", "message"), [
    (["bronze.device_readings silver.observations"], "'upstream > downstream'"),
    (["bronze.device_readings > silver.nothing"], "no job writes 'silver.nothing'"),
    (["silver.observations > gold.early_warning_scores"], "only a job that reads a landing feed"),
    (["bronze.device_readings > silver.patients"], "silver.patients does not read bronze.device_readings"),
    (["bronze.hl7_messages > silver.patients", "bronze.hl7_messages > silver.observations"], "at most one"),
])
def test_a_fuse_that_cannot_work_is_refused_with_the_fix(tmp_path, fuse, message):
    with pytest.raises(ConfigError, match=message):
        load_registry(make_config(tmp_path, **{"streaming.fuse": fuse}))


def test_fused_jobs_run_before_what_reads_their_tables(tmp_path):
    registry = load_registry(make_config(tmp_path))
    order = registry.names()
    assert order.index("bronze.device_readings") < order.index("gold.early_warning_scores")
    assert order.index("bronze.hl7_messages") < order.index("gold.early_warning_scores")
    assert registry.get(OBSERVATIONS).upstream == ("bronze.fhir_resources",)
    assert [j.name for j in registry.get("bronze.device_readings").fused] == [OBSERVATIONS]


def test_dicom_headers_reach_silver_in_the_bronze_batch_that_lands_them(tmp_path, spark):
    """silver.imaging_studies reads only bronze.dicom_instances: fused, it has no query of its own, `carelake run`
    of it runs its carrier, and it writes what its own job writes (bronze not yet holding the batch's rows)."""
    from pydicom.uid import generate_uid

    from silver.imaging_studies import STUDIES
    from tests.test_silver_imaging import instance

    src = tmp_path / "dcm"
    src.mkdir()
    study, series = generate_uid(), generate_uid()
    for name, body in (("a", instance(study, series)), ("b", instance(study, generate_uid(), modality="SR")),
                       ("c", b"not dicom at all")):
        (src / f"{name}.dcm").write_bytes(body)
    same = {"silver.key_secret": "a-shared-test-secret"}
    fused = _lake(tmp_path, spark, "fused", **same)
    separate = _lake(tmp_path, spark, "separate", **same, **{"streaming.fuse": []})
    ingest(fused[0], sorted(str(f) for f in src.iterdir()), "dicom")
    shutil.copytree(fused[0].path("landing"), separate[0].path("landing"))
    registry = fused[2].registry
    assert registry.get(STUDIES).carried_only
    assert [j.name for j in registry.runnable([STUDIES])] == ["bronze.dicom_instances"]
    assert STUDIES not in [j.name for j in registry.runnable()]
    summaries = fused[2].run([STUDIES], Trigger(available_now=True))
    assert [(s.job, s.status) for s in summaries] == [("bronze.dicom_instances", "done"), (STUDIES, "done")]
    assert "written in the batches of bronze.dicom_instances" in summaries[1].line()
    separate[2].run(["bronze.dicom_instances", STUDIES], Trigger(available_now=True))
    for table in (STUDIES, QUARANTINE, "bronze.dicom_instances"):
        a, b = _rows(fused[0], fused[1], table), _rows(separate[0], separate[1], table)
        assert a == b, (table, sorted(set(a) - set(b)), sorted(set(b) - set(a)))
    (row,) = fused[1].read_arrow(STUDIES).to_pylist()
    assert (row["study_instance_uid"], row["series_count"], row["instance_count"]) == (study, 2, 2)
    assert [q["reason"] for q in fused[1].read_arrow(QUARANTINE).to_pylist()] == ["dicom_not_dicom"]
