"""kill -9 a continuous `carelake run all` mid-work, restart it: every input row lands exactly once."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time

import pytest

from pipelines.jobs import load_registry
from pipelines.landing import ingest
from pipelines.runner import Runner, Trigger
from pipelines.store import open_store
from pipelines.store.deltars import DeltaRsStore
from tests.conftest import carelake_cmd, carelake_env, make_config

pytestmark = pytest.mark.slow
FILES, LINES = 12, 50


def write_file(folder, i):
    path = folder / f"batch-{i:03d}.jsonl"
    rows = [json.dumps({"device_id": f"dev-{(i * LINES + j) % 7}", "time": "2026-11-21T03:00:00Z", "value": j})
            for j in range(LINES)]
    path.write_text("\n".join(rows) + "\n")
    return path


def start(root, log):
    # the executors write every batch (small ones would go through the driver): kill -9 on the distributed path
    env = carelake_env(root, CARELAKE_JOBS__MODULES="tests.toyjobs", CARELAKE_STORAGE__DRIVER_WRITE_MAX_ROWS="0",
                       CARELAKE_STORAGE__DRIVER_WRITE_MAX_MB="0")
    return subprocess.Popen(carelake_cmd("run", "all", "--continuous", "--interval", "500ms"), env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(predicate, timeout, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"carelake exited early with {proc.returncode}")
        time.sleep(0.3)
    return False


def log_version(store: DeltaRsStore, table: str) -> int:
    """The table's newest commit, from a listing of its Delta log (cheap to poll)."""
    log = store.ref(table).path / "_delta_log"
    names = [p.name[:-5] for p in log.glob("*.json")] if log.is_dir() else []
    return max((int(n) for n in names if n.isdigit()), default=-1)


TABLES = ("bronze.device_readings", "silver.toy_readings", "gold.toy_device_totals")


def test_kill_9_mid_work_then_restart_loses_and_duplicates_nothing(tmp_path, spark):
    root = tmp_path / "lake"
    cfg = make_config(root)
    store = DeltaRsStore(cfg)
    src = tmp_path / "src"
    src.mkdir()
    log_path = tmp_path / "run.log"

    def gold_total():
        if not store.exists("gold.toy_device_totals"):
            return 0
        return sum(r["readings"] for r in store.read_arrow("gold.toy_device_totals").to_pylist())

    with open(log_path, "ab") as log:
        proc = start(root, log)
        try:
            for i in range(FILES // 2):
                ingest(cfg, [write_file(src, i)], "devices")
                time.sleep(0.4)
            assert wait_for(lambda: gold_total() > 0, 180, proc), log_path.read_text()
            # keep landing while it works; kill the moment bronze has committed a batch of this second wave,
            # before the hops behind it can have caught up
            bronze_before = log_version(store, "bronze.device_readings")
            for i in range(FILES // 2, FILES - 2):
                ingest(cfg, [write_file(src, i)], "devices")
            assert wait_for(lambda: log_version(store, "bronze.device_readings") > bronze_before, 120, proc)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        # what the kill interrupted: bronze had committed part of the second wave, gold had not counted it all
        bronze_at_kill = log_version(store, "bronze.device_readings")
        assert bronze_at_kill > bronze_before
        assert gold_total() < (FILES - 2) * LINES, "the kill came after all the work was done: it proves nothing"

        for i in range(FILES - 2, FILES):
            ingest(cfg, [write_file(src, i)], "devices")
        proc = start(root, log)
        try:
            done = wait_for(lambda: gold_total() >= FILES * LINES, 240, proc)
            assert done, log_path.read_text()[-3000:]
        finally:
            proc.send_signal(signal.SIGTERM)  # `kill PID`: the runner finishes its batch and stops
            try:
                rc = proc.wait(timeout=120)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # leftover Python workers, if any
    assert rc == 0, log_path.read_text()[-3000:]
    # nothing is left to replay: one more run over the same checkpoints commits no version of any table
    settled = {t: log_version(store, t) for t in TABLES}
    toy = make_config(root, **{"jobs.modules": "tests.toyjobs"})
    Runner(toy, spark, open_store(toy, spark), load_registry(toy)).run(list(TABLES), Trigger(available_now=True))
    assert {t: log_version(store, t) for t in TABLES} == settled

    bronze = store.read_arrow("bronze.device_readings").to_pylist()
    keys = [(r["landing_file"], r["landing_position"]) for r in bronze]
    assert len(keys) == len(set(keys)) == FILES * LINES
    silver = store.read_arrow("silver.toy_readings").to_pylist()
    assert len(silver) == len({(r["landing_file"], r["landing_position"]) for r in silver}) == FILES * LINES
    assert gold_total() == FILES * LINES
    assert "stopped" in log_path.read_text()


def test_kill_9_in_a_backlog_of_large_bodies_then_restart_lands_every_record_once(tmp_path):
    """Issue 22: a backlog the gateway accepted (bodies of several MB, one JSON line of 10 MB) is taken by bronze in
    batches bounded by bytes; a kill -9 in the middle of it, and a restart, leave every landed record in bronze
    exactly once, the huge line as a row like any other."""
    root = tmp_path / "lake"
    cfg = make_config(root, **{"streaming.max_mb_per_trigger": "2"})
    store = DeltaRsStore(cfg)
    src = tmp_path / "src"
    src.mkdir()
    expected = 0
    for i in range(8):  # ~1.2 MB of ordinary readings each
        path = src / f"body-{i}.jsonl"
        lines = [json.dumps({"device_id": f"bed-{j % 40}", "time": "2026-11-21T03:00:00Z", "code": "8867-4",
                             "value": j, "note": "n" * 60}) for j in range(12_000)]
        path.write_text("\n".join(lines) + "\n")
        expected += len(lines)
        ingest(cfg, [path], "devices")
    huge = src / "huge.jsonl"
    huge.write_text(json.dumps({"device_id": "bed-x", "time": "2026-11-21T03:00:00Z", "blob": "x" * 10_000_000}) + "\n")
    ingest(cfg, [huge], "devices")
    expected += 1

    def rows() -> int:
        return store.row_count("bronze.device_readings") if store.exists("bronze.device_readings") else 0

    log_path = tmp_path / "run.log"
    env = carelake_env(root, CARELAKE_STREAMING__MAX_MB_PER_TRIGGER="2")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(carelake_cmd("run", "bronze.device_readings", "--continuous", "--interval", "200ms"),
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            assert wait_for(lambda: log_version(store, "bronze.device_readings") >= 2, 240, proc), \
                log_path.read_text()[-3000:]
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    at_kill = rows()
    assert 0 < at_kill < expected, f"the kill came after the whole backlog ({at_kill} rows): it proves nothing"
    done = subprocess.run(carelake_cmd("run", "bronze.device_readings", "--available-now"), env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    bronze = store.read_arrow("bronze.device_readings").select(["landing_file", "landing_position"]).to_pylist()
    keys = [(r["landing_file"], r["landing_position"]) for r in bronze]
    assert len(keys) == len(set(keys)) == expected
    settled = log_version(store, "bronze.device_readings")
    again = subprocess.run(carelake_cmd("run", "bronze.device_readings", "--available-now"), env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and log_version(store, "bronze.device_readings") == settled
