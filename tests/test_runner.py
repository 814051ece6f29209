"""The streaming runner in-process: landing -> bronze -> silver (append) -> gold (merge), exactly once."""

from __future__ import annotations

import json
import shutil

import pytest

from pipelines.jobs import load_registry
from pipelines.landing import ingest
from pipelines.runner import METRICS_TABLE, Runner, Trigger
from pipelines.store import open_store
from tests.conftest import make_config

NOW = Trigger(available_now=True)
# The toy jobs alone (landing -> bronze -> silver append -> gold merge): the runner's mechanics without the
# built-in silver and gold jobs, which have their own tests.
TOY_CHAIN = ["bronze.device_readings", "silver.toy_readings", "gold.toy_device_totals"]


def readings_file(path, device_ids, start=0):
    lines = [json.dumps({"device_id": d, "time": f"2026-11-21T03:00:{(start + i) % 60:02d}Z", "value": i})
             for i, d in enumerate(device_ids)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def lake(tmp_path, spark):
    cfg = make_config(tmp_path / "lake", **{"jobs.modules": "tests.toyjobs"})
    store = open_store(cfg, spark)
    return cfg, store, Runner(cfg, spark, store, load_registry(cfg))


def totals(store):
    return {r["device_id"]: r["readings"] for r in store.read_arrow("gold.toy_device_totals").to_pylist()}


def test_bronze_admits_landing_files_by_bytes_a_backlog_in_several_batches(tmp_path, spark):
    """streaming.max_mb_per_trigger bounds what one bronze batch reads: 5 files of ~0.4 MB with a 1 MB bound are
    three batches, none above the bound but a file larger than it, which comes alone; every reading once."""
    cfg = make_config(tmp_path / "lake", **{"streaming.max_mb_per_trigger": "1"})
    for k in range(4):
        ingest(cfg, [readings_file(tmp_path / f"r{k}.jsonl", [f"m{i % 7}" for i in range(6000)])], "devices")
    big = tmp_path / "big.jsonl"
    big.write_text(json.dumps({"device_id": "big", "time": "2026-11-21T03:00:00Z", "blob": "x" * 1_500_000}) + "\n")
    ingest(cfg, [big], "devices")
    store = open_store(cfg, spark)
    (summary,) = Runner(cfg, spark, store, load_registry(cfg)).run(["bronze.device_readings"], NOW)
    assert summary.batches == 3 and summary.rows_out == 4 * 6000 + 1
    per_batch = store.read("bronze.device_readings").groupBy("ingest_batch_id", "landing_file").count().collect()
    files = {}
    for r in per_batch:
        files.setdefault(r["ingest_batch_id"], set()).add(r["landing_file"])
    assert sorted(len(v) for v in files.values()) == [1, 2, 2]


def test_executor_and_driver_writes_give_the_same_tables(tmp_path, spark):
    """The toy chain (append, merge), silver.observations with its suite and silver.claims with its side tables'
    suites (claim lines, providers, members: each judged in Spark), once with every batch written by the executors
    and once from the driver: the same rows in every table, the same quality results. A batch with a row to
    quarantine takes Great Expectations' exact path on both."""
    from datetime import UTC, datetime

    from tests.test_claims_x12 import claim_837p, interchange

    x12 = tmp_path / "claims.837"
    x12.write_text(interchange("000000001", [claim_837p("C1", lines=(("99213", "80"), ("87070", "15"))),
                                             claim_837p("C2", mrn="MRN1")]))

    def readings(path, start):
        lines = [json.dumps({"device_id": f"bed-{i % 3}", "patient_mrn": f"MRN{i % 3}", "code": "8867-4",
                             "unit": "/min", "value": 60.0 + i,
                             "time": f"2026-11-21T03:{(start + i) % 60:02d}:{i % 60:02d}Z"}) for i in range(40)]
        path.write_text("\n".join(lines) + "\n")
        return path

    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    late = tmp_path / "future.jsonl"  # a reading from 2099: silver's suite quarantines it (in the future)
    late.write_text("".join(json.dumps({"device_id": "bed-9", "patient_mrn": "MRN9", "code": "8867-4", "unit": "/min",
                                        "value": v, "time": t}) + "\n"
                            for v, t in ((70.0, "2099-01-01T00:00:00Z"), (71.0, now))))
    jobs = [*TOY_CHAIN, "silver.observations", "bronze.claim_files", "silver.claims"]
    tables = {}
    for way, limit in (("executors", "0"), ("driver", "1000000")):
        cfg = make_config(tmp_path / way, **{"jobs.modules": "tests.toyjobs", "storage.driver_write_max_rows": limit,
                                             "storage.driver_write_max_mb": limit,
                                             "silver.key_secret": "same-secret-for-both-lakehouses-0123456789"})
        store = open_store(cfg, spark)
        runner = Runner(cfg, spark, store, load_registry(cfg))
        ingest(cfg, [readings(tmp_path / "a.jsonl", 0)], "devices")
        ingest(cfg, [x12], "x12")
        runner.run(jobs, NOW)
        ingest(cfg, [readings(tmp_path / "b.jsonl", 30), late], "devices")
        runner.run(jobs, NOW)
        tables[way] = {
            "bronze": sorted(r["sha256"] for r in store.read_arrow("bronze.device_readings").to_pylist()),
            "toy": totals(store),
            "silver": sorted((r["observation_id"], r["concept"], r["value"], r["patient_key"])
                             for r in store.read_arrow("silver.observations").to_pylist()),
            "quarantine": sorted(r["reason"] for r in store.read_arrow("silver.quarantine").to_pylist()),
            "dq": sorted((r["table"], r["expectation"], r["success"], r["unexpected_rows"])
                         for r in store.read_arrow("silver.dq_results").to_pylist()),
            "claims": {t: sorted(tuple(sorted((k, str(v)) for k, v in r.items()
                                              if k not in ("ingested_at", "received_at", "source_record")))
                                 for r in store.read_arrow(t).to_pylist())
                       for t in ("silver.claims", "silver.claim_lines", "silver.providers", "silver.members")},
        }
        # which way the files were written: the executors tag each data file with the process that wrote it (the
        # batch holding the quarantined reading went Great Expectations' exact way: written from the driver)
        import pyarrow.parquet as pq

        tagged = [b"carelake.writer" in (pq.read_schema(f).metadata or {})
                  for f in store.ref("silver.observations").path.glob("*.parquet")]
        assert (sum(tagged) >= 2) if way == "executors" else (tagged and not any(tagged)), (way, tagged)
        for table in ("silver.claims", "silver.claim_lines", "silver.providers", "silver.members"):
            tagged = [b"carelake.writer" in (pq.read_schema(f).metadata or {})
                      for f in store.ref(table).path.glob("*.parquet")]
            assert tagged and all(tagged) == (way == "executors") and any(tagged) == all(tagged), (way, table)
    assert tables["executors"] == tables["driver"]
    assert len(tables["driver"]["silver"]) == 80 + 1 and "dq_effective_in_future" in tables["driver"]["quarantine"]
    assert [len(tables["driver"]["claims"][t]) for t in ("silver.claims", "silver.claim_lines")] == [2, 3]
    assert {t for t, *_ in tables["driver"]["dq"]} >= {"silver.claims", "silver.claim_lines", "silver.providers",
                                                      "silver.members"}


def test_exactly_one_landing_bound_is_configured(tmp_path):
    from pipelines.errors import ConfigError

    with pytest.raises(ConfigError, match="set exactly one of streaming.max_mb_per_trigger"):
        make_config(tmp_path, **{"streaming.max_files_per_trigger": "100"})
    cfg = make_config(tmp_path, **{"streaming.max_files_per_trigger": "100", "streaming.max_mb_per_trigger": "0"})
    assert cfg.streaming.landing_admission == ("maxFilesPerTrigger", 100)
    assert make_config(tmp_path).streaming.landing_admission == ("maxBytesPerTrigger", 128 * 1024 * 1024)


def test_available_now_runs_every_job_in_dependency_order(lake, tmp_path):
    cfg, store, runner = lake
    ingest(cfg, [readings_file(tmp_path / "a.jsonl", ["m1", "m2", "m1"])], "devices")
    ingest(cfg, [readings_file(tmp_path / "b.jsonl", ["m2"])], "devices")
    summaries = runner.run(runner.registry.names(), NOW)
    names = [s.job for s in summaries]
    assert sorted(names) == sorted(runner.registry.names())
    assert names.index("bronze.device_readings") < names.index("silver.toy_readings") < names.index(
        "gold.toy_device_totals")
    by_name = {s.job: s for s in summaries}
    # Jobs reading only HL7/FHIR (nothing landed there) are skipped; everything else ran.
    assert all(s.status == "done" or (s.status == "skipped" and "has no data yet" in s.detail) for s in summaries)
    assert by_name["silver.toy_readings"].status == "done"
    # silver.observations' own stream reads FHIR only (devices and HL7 are fused into their bronze batches).
    assert by_name["silver.observations"].status == "skipped"
    assert by_name["bronze.hl7_messages"].batches == by_name["bronze.fhir_resources"].batches == 0  # ran, nothing
    assert store.row_count("bronze.device_readings") == 4
    assert totals(store) == {"m1": 2, "m2": 2}
    metrics = store.read_arrow(METRICS_TABLE).to_pylist()
    assert {m["job"] for m in metrics} == {s.job for s in summaries if s.batches} | {"silver.observations"}
    # The bronze batches computed silver.observations from the same readings: they name no patient, so all four
    # are quarantined.
    assert [q["reason"] for q in store.read_arrow("silver.quarantine").to_pylist()] == ["missing_patient"] * 4
    assert all(m["rows_out"] >= 0 and m["duration_ms"] >= 0 for m in metrics)


def test_second_run_without_new_input_changes_nothing_then_new_input_counts_once(lake, tmp_path):
    cfg, store, runner = lake
    ingest(cfg, [readings_file(tmp_path / "a.jsonl", ["m1", "m2"])], "devices")
    runner.run(TOY_CHAIN, NOW)
    versions = {t: store.version(t) for t in ("bronze.device_readings", "gold.toy_device_totals")}
    runner.run(TOY_CHAIN, NOW)
    assert {t: store.version(t) for t in versions} == versions
    ingest(cfg, [readings_file(tmp_path / "c.jsonl", ["m2", "m3"])], "devices")
    runner.run(TOY_CHAIN, NOW)
    assert totals(store) == {"m1": 1, "m2": 2, "m3": 1}


def test_batch_replayed_after_crash_between_commit_and_checkpoint_is_skipped(lake, tmp_path):
    """Delta commit done, Spark's checkpoint commit lost (the kill -9 window): the replay must not duplicate."""
    cfg, store, runner = lake
    ingest(cfg, [readings_file(tmp_path / "a.jsonl", ["m1", "m2", "m3"])], "devices")
    runner.run(TOY_CHAIN, NOW)
    for job in ("bronze.device_readings", "gold.toy_device_totals"):
        folder = cfg.path("_checkpoints", job, "commits")
        last = max(int(p.name) for p in folder.iterdir() if p.name.isdigit())
        (folder / str(last)).unlink()  # as if the process died right after the Delta commit
        (folder / f".{last}.crc").unlink(missing_ok=True)
    summaries = runner.run(TOY_CHAIN, NOW)
    replayed = {s.job: s.replayed for s in summaries}
    assert replayed["bronze.device_readings"] == 1 and replayed["gold.toy_device_totals"] == 1
    assert store.row_count("bronze.device_readings") == 3
    assert totals(store) == {"m1": 1, "m2": 1, "m3": 1}


def test_reset_checkpoint_reprocesses_under_a_new_query_id(lake, tmp_path):
    """Deleting a checkpoint is a deliberate reprocess: it must not be mistaken for a replay and dropped."""
    cfg, store, runner = lake
    ingest(cfg, [readings_file(tmp_path / "a.jsonl", ["m1"])], "devices")
    runner.run(["bronze.device_readings"], NOW)
    shutil.rmtree(cfg.path("_checkpoints", "bronze.device_readings"))
    runner.run(["bronze.device_readings"], NOW)
    assert store.row_count("bronze.device_readings") == 2


def test_downstream_job_is_skipped_until_upstream_has_data(lake):
    cfg, store, runner = lake
    summaries = runner.run(["silver.toy_readings"], NOW)
    assert summaries[0].status == "skipped" and "bronze.device_readings" in summaries[0].detail


def test_one_job_reads_several_feeds_and_writes_a_side_output(tmp_path, spark):
    cfg = make_config(tmp_path / "lake", **{"jobs.modules": "tests.toyjobs_multi"})
    store = open_store(cfg, spark)
    runner = Runner(cfg, spark, store, load_registry(cfg))
    names = ["bronze.device_readings", "bronze.hl7_messages", "silver.toy_feed_rows"]
    ingest(cfg, [readings_file(tmp_path / "a.jsonl", ["m1", "m2"])], "devices")
    runner.run(names, NOW)  # no HL7 yet: its bronze table is created empty so the stream has both sources
    assert store.exists("bronze.hl7_messages") and store.row_count("bronze.hl7_messages") == 0
    rows = sorted((r["feed"], r["key"]) for r in store.read_arrow("silver.toy_feed_rows").to_pylist())
    assert rows == [("devices", "m1"), ("devices", "m2")]
    (tmp_path / "m.hl7").write_bytes(b"MSH|^~\\&|A|B|||20261121||ADT^A01|C-9|P|2.5\rPID|1\rnot hl7\r")
    (tmp_path / "bad.hl7").write_bytes(b"garbage only\r")
    ingest(cfg, [tmp_path / "m.hl7", tmp_path / "bad.hl7"], "hl7")
    ingest(cfg, [readings_file(tmp_path / "b.jsonl", ["m3"])], "devices")
    runner.run(names, NOW)
    rows = sorted((r["feed"], r["key"]) for r in store.read_arrow("silver.toy_feed_rows").to_pylist())
    assert rows == [("devices", "m1"), ("devices", "m2"), ("devices", "m3"), ("hl7", "C-9")]
    assert [(r["feed"], r["parse_status"]) for r in store.read_arrow("silver.toy_rejects").to_pylist()] == [
        ("hl7", "missing_msh")]
    history = store.history("silver.toy_rejects")
    assert {c.metadata.get("carelake.job") for c in history} == {"silver.toy_feed_rows"}


@pytest.fixture
def small_batches(tmp_path, spark):
    # Unfused: bronze commits the file's 5 readings as one version, which the table source cannot split, so silver
    # gets one batch over the bound. (Fused, bronze itself commits in pieces of the bound: tests/test_fused.py.)
    cfg = make_config(tmp_path / "lake", **{"jobs.modules": "tests.toyjobs", "streaming.max_rows_per_batch": "2",
                                            "streaming.fuse": "[]"})
    store = open_store(cfg, spark)
    return cfg, store, Runner(cfg, spark, store, load_registry(cfg))


def chunk_commits(store, table):
    return sorted((int(c.metadata["carelake.batch"]), c.metadata.get("carelake.chunk"))
                  for c in store.history(table) if "carelake.batch" in c.metadata)


def test_batch_larger_than_the_bound_commits_in_chunks_and_a_replay_changes_nothing(small_batches, tmp_path):
    cfg, store, runner = small_batches
    ingest(cfg, [readings_file(tmp_path / "a.jsonl", ["m1", "m2", "m1", "m3", "m2"])], "devices")
    names = ["bronze.device_readings", "silver.toy_readings", "gold.toy_device_totals"]
    first = {s.job: s for s in runner.run(names, NOW)}
    assert chunk_commits(store, "silver.toy_readings") == [(0, "1of3"), (0, "2of3"), (0, "3of3")]
    assert sorted(r["landing_position"] for r in store.read_arrow("silver.toy_readings").to_pylist()) == [
        r["landing_position"] for r in store.read_arrow("bronze.device_readings").to_pylist()]
    assert (first["silver.toy_readings"].batches, first["silver.toy_readings"].rows_out) == (1, 5)
    assert totals(store) == {"m1": 2, "m2": 2, "m3": 1}  # gold read the three chunk commits, each once
    metrics = [m for m in store.read_arrow(METRICS_TABLE).to_pylist() if m["job"] == "silver.toy_readings"]
    assert [(m["batch_id"], m["rows_in"], m["rows_out"]) for m in metrics] == [(0, 5, 5)]
    folder = cfg.path("_checkpoints", "silver.toy_readings", "commits")
    (folder / "0").unlink()  # the process died after the last chunk's commit, before Spark's
    (folder / ".0.crc").unlink(missing_ok=True)
    versions = {t: store.version(t) for t in names}
    again = {s.job: s for s in runner.run(names, NOW)}
    assert again["silver.toy_readings"].replayed == 1 and again["silver.toy_readings"].rows_out == 0
    assert {t: store.version(t) for t in names} == versions


def test_replay_after_a_crash_between_chunks_writes_only_the_missing_chunks(small_batches, tmp_path, monkeypatch):
    cfg, store, runner = small_batches
    ingest(cfg, [readings_file(tmp_path / "a.jsonl", ["m1", "m2", "m1", "m3", "m2"])], "devices")
    runner.run(["bronze.device_readings"], NOW)
    real, calls, crash = Runner._write_chunk, [], [True]

    def crash_on_second(self, job, rows, batch, label, txn, query_id, at):
        calls.append(label)
        if len(calls) == 2 and crash and crash.pop():
            raise RuntimeError("killed between chunks")
        return real(self, job, rows, batch, label, txn, query_id, at)

    monkeypatch.setattr(Runner, "_write_chunk", crash_on_second)
    with pytest.raises(Exception, match="killed between chunks"):
        runner.run(["silver.toy_readings"], NOW)
    assert chunk_commits(store, "silver.toy_readings") == [(0, "1of3")]
    calls.clear()
    summary = runner.run(["silver.toy_readings"], NOW)[0]
    assert [c.rsplit("#", 1)[1] for c in calls] == ["2of3", "3of3"]  # the committed chunk is not computed again
    assert chunk_commits(store, "silver.toy_readings") == [(0, "1of3"), (0, "2of3"), (0, "3of3")]
    assert store.row_count("silver.toy_readings") == 5 and summary.rows_in == 5
