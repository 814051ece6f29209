"""kill -9 the streaming gold jobs mid-batch, restart them: no score or alert row is duplicated or lost.

silver.observations grows by many small appends (one silver version each: three patients' vital signs at
successive times, crossing NEWS2 bands so alerts open, escalate and resolve) while a continuous
`carelake run gold.early_warning_scores` scores them (the silver rows are written directly, so only the score job
runs: bronze and silver would find nothing). The score job writes gold.deterioration_alerts,
gold.vitals_features, gold.spo2_scale2_markers and gold.vitals_minutes in the same batch, each a commit before
gold.early_warning_scores. The whole process group is
SIGKILLed twice: first once the first score batch is committed, while the next one is in flight (offsets logged,
no commit); then between a score batch's commits (gold.vitals_features written, gold.early_warning_scores not).
A third run catches up and stops on SIGTERM. Then the gold tables hold one row per key, one score (and features)
row per scored input time, and equal, row for row, what one clean run over the same silver rows writes.

The restart is continuous + SIGTERM; the last test covers --available-now after a crash (it must also
process the upstream versions committed after the interrupted batch).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pytest
from pyspark.sql.pandas.types import to_arrow_schema

from gold.deterioration_alerts import ALERTS
from gold.early_warning_scores import FEATURES, INPUTS, SCORES
from pipelines.store.deltars import DeltaRsStore
from silver.observations import OBSERVATIONS
from silver.observations import SCHEMA as OBS_SCHEMA
from tests.conftest import carelake_cmd, carelake_env, make_config

pytestmark = pytest.mark.slow

T0 = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)
CODES = {"rr": "9279-1", "spo2": "59408-5", "fio2": "3150-0", "sbp": "8480-6", "hr": "8867-4", "acvpu": "67775-7",
         "temp": "8310-5"}
# NEWS2 (qSOFA) of each state: n 0 low; w 3 low-medium (HR 135); m 6 medium (1); h 8 high (1); s 13 high (3);
# p is a pulse reading alone (HR 135, the rest carried forward from earlier rows).
STATES = {
    "n": {"rr": 16, "spo2": 97, "fio2": 21, "sbp": 120, "hr": 75, "acvpu": "A", "temp": 37.0},
    "w": {"rr": 16, "spo2": 97, "fio2": 21, "sbp": 120, "hr": 135, "acvpu": "A", "temp": 37.0},
    "m": {"rr": 22, "spo2": 95, "fio2": 21, "sbp": 105, "hr": 95, "acvpu": "A", "temp": 38.5},
    "h": {"rr": 25, "spo2": 91, "fio2": 21, "sbp": 115, "hr": 115, "acvpu": "A", "temp": 37.5},
    "s": {"rr": 25, "spo2": 93, "fio2": 21, "sbp": 95, "hr": 115, "acvpu": "C", "temp": 38.5},
    "p": {"hr": 135},
}
# One step per silver append and patient (a patient's step k is measured at minute 5k + its index).
PATTERNS = {
    "p1": "nnmmhhmmnnwwmmssssmnnnnmhhhnnpnnmmmnnnss",
    "p2": "mmmnnwwhhhhnnnmmpmssnnnnmmhhmmnnsnnnwmmn",
    "p3": "wnnnssnnmmhmmnnpnmmmmhhnnnwwnnssshnnmmhh",
}
STEPS = 40
APPEND_EVERY = 1.5  # seconds between silver appends while carelake runs
PROVENANCE = {"silver_version", "scores_version", "code_version", "computed_by", "computed_at"}


def step_rows(step: int) -> list[dict]:
    rows = []
    for index, (patient, pattern) in enumerate(PATTERNS.items()):
        at = T0 + timedelta(minutes=5 * step + index)
        for concept, value in STATES[pattern[step]].items():
            oid = hashlib.sha256(f"{patient}|{concept}|{at.isoformat()}".encode()).hexdigest()[:32]
            text = value if isinstance(value, str) else None
            rows.append({
                "observation_id": oid, "patient_key": patient, "encounter_key": f"enc-{patient}",
                "code": CODES[concept], "concept": concept, "value": None if text else float(value),
                "value_text": text, "effective_at": at, "status": "final", "source_feed": "devices",
                "source_version": "1",
                "source_record": {"table": "bronze.device_readings", "landing_file": "f", "landing_position": 0,
                                  "sha256": oid},
                "ingested_at": T0})
    return rows


def add(store: DeltaRsStore, rows: list[dict]) -> None:
    store.append(OBSERVATIONS, pa.Table.from_pylist(rows, schema=to_arrow_schema(OBS_SCHEMA)))


def start(root: Path, log, *mode: str) -> subprocess.Popen:
    # Steps are 5 min apart: alerts resolve after 8 min out of their level (two steps), so the patterns resolve
    # and reopen episodes, and one step out continues an alert (the hysteresis is crash-tested too).
    env = carelake_env(root, CARELAKE_GOLD__ALERT_RESOLVE_AFTER="8m")
    return subprocess.Popen(carelake_cmd("run", SCORES, *mode), env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def clean_run(root: Path, spark) -> None:
    """What `carelake run all --available-now` does for the score job, with start()'s settings."""
    from pipelines.jobs import load_registry
    from pipelines.runner import Runner, Trigger
    from pipelines.store import open_store

    cfg = make_config(root, **{"gold.alert_resolve_after": "8m"})
    Runner(cfg, spark, open_store(cfg, spark), load_registry(cfg)).run([SCORES], Trigger(available_now=True))


def batch_ids(root: Path, job: str, kind: str) -> set[int]:
    folder = root / "_checkpoints" / job / kind
    return {int(p.name) for p in folder.iterdir() if p.name.isdigit()} if folder.is_dir() else set()


def in_flight(root: Path, job: str) -> int | None:
    """The batch the job's query has planned (offsets logged) but not finished (no commit), if any."""
    pending = batch_ids(root, job, "offsets") - batch_ids(root, job, "commits")
    return max(pending) if pending else None


def log_version(store: DeltaRsStore, table: str) -> int:
    """The table's newest commit, from a listing of its Delta log (cheap enough to poll)."""
    log = store.ref(table).path / "_delta_log"
    names = [p.name[:-5] for p in log.glob("*.json")] if log.is_dir() else []
    return max((int(n) for n in names if n.isdigit()), default=-1)


def scores_batches_written(store: DeltaRsStore, root: Path) -> tuple[int | None, int | None]:
    """The newest batch transaction of the score job's query in gold.vitals_features and in
    gold.early_warning_scores (a batch commits the features first, then the scores)."""
    meta = root / "_checkpoints" / SCORES / "metadata"
    app = f"carelake:{SCORES}:{json.loads(meta.read_text().splitlines()[0])['id']}:chunked"
    features, scores = (store.txn_version(t, app) if store.exists(t) else None for t in (FEATURES, SCORES))
    return features, scores


def consumed(root: Path, job: str) -> int | None:
    """The upstream version up to which the job's query has committed batches."""
    done = batch_ids(root, job, "commits")
    if not done:
        return None
    return json.loads((root / "_checkpoints" / job / "offsets" / str(max(done))).read_text().splitlines()[-1])[
        "version"]


def caught_up(store: DeltaRsStore, root: Path) -> bool:
    """The score job has committed batches up to silver's newest version, none running."""
    return in_flight(root, SCORES) is None and consumed(root, SCORES) == log_version(store, OBSERVATIONS)


def wait_for(predicate, timeout: float, proc: subprocess.Popen) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            raise AssertionError(f"carelake exited early with {proc.returncode}")
        time.sleep(0.3)
    return False


def kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def rows_of(store: DeltaRsStore, table: str) -> list[dict]:
    return store.read_arrow(table).to_pylist() if store.exists(table) else []


def comparable(row: dict) -> tuple:
    """A row without provenance, floats rounded (sums over other batchings may differ in the last bits)."""
    def norm(v):
        if isinstance(v, float):
            return round(v, 9)
        if isinstance(v, list):
            return tuple(sorted(v))
        return v

    return tuple(sorted((k, norm(v)) for k, v in row.items() if k not in PROVENANCE))


def test_kill_9_mid_gold_batch_then_restart_duplicates_and_loses_no_score_or_alert(tmp_path, spark):
    t_start = time.monotonic()
    root, clean_root = tmp_path / "lake", tmp_path / "clean"
    store, clean = DeltaRsStore(make_config(root)), DeltaRsStore(make_config(clean_root))
    log_path = tmp_path / "run.log"
    appended = 0

    def append_until(step: int) -> None:
        nonlocal appended
        while appended < min(step, STEPS):
            add(store, step_rows(appended))
            appended += 1

    def kill_when(proc: subprocess.Popen, ready, cap, timeout: float) -> None:
        """Append a step every APPEND_EVERY s (up to step `cap()`) until `ready()`, then SIGKILL the process group."""
        deadline, next_append = time.monotonic() + timeout, 0.0
        try:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise AssertionError(f"carelake exited with {proc.returncode}: {log_path.read_text()[-3000:]}")
                if time.monotonic() >= next_append and appended < cap():
                    append_until(appended + 1)
                    next_append = time.monotonic() + APPEND_EVERY
                if ready():
                    return
                time.sleep(0.02)
            raise AssertionError(f"the kill point was not reached in {timeout} s: {log_path.read_text()[-3000:]}")
        finally:
            kill_group(proc)

    with contextlib.ExitStack() as stack:
        log = stack.enter_context(open(log_path, "ab"))
        # Kill 1: once the first score batch is committed, while the next one is running.
        append_until(6)
        killed = {}

        def next_running() -> bool:
            killed[SCORES] = in_flight(root, SCORES)
            return bool(batch_ids(root, SCORES, "commits")) and None not in killed.values()

        def cap1() -> int:  # keep steps for after the first (slow, cold) batch, so that more batches follow it
            return 24 if batch_ids(root, SCORES, "commits") else 12

        kill_when(start(root, log, "--continuous", "--interval", "300ms"), next_running, cap1, 240)
        assert rows_of(store, SCORES)  # gold rows were visible
        assert {job: in_flight(root, job) for job in killed} == killed  # it died unfinished

        # Kill 2: between a score batch's two commits (gold.vitals_features written, the scores not yet). The kill is
        # sent when the features commit is seen; on a loaded machine it can land after the scores commit too: then
        # the run is killed elsewhere in a batch (still a valid crash) and the window is tried again.
        for attempt in range(3):
            features_first = scores_batches_written(store, root)
            between = features_first[0] is not None and (features_first[1] is None
                                                         or features_first[0] > features_first[1])
            apart = log_version(store, FEATURES) - log_version(store, SCORES) - between

            def features_ahead(apart: int = apart) -> bool:
                return log_version(store, FEATURES) - log_version(store, SCORES) > apart  # features read first

            def cap2(more: int = 2 * attempt) -> int:  # steps held back arrive one by one: each makes a new batch
                return min(STEPS - 1, (28 if in_flight(root, SCORES) is not None else 34) + more)

            kill_when(start(root, log, "--continuous", "--interval", "300ms"), features_ahead, cap2, 240)
            features_done, scores_done = scores_batches_written(store, root)
            if scores_done is None or features_done > scores_done:
                break
        assert scores_done is None or features_done > scores_done, "no kill landed between the two commits"

        append_until(STEPS)  # the rest; restart, catch up, stop with SIGTERM
        proc = start(root, log, "--continuous", "--interval", "300ms")
        try:
            assert wait_for(lambda: caught_up(store, root), 300, proc), log_path.read_text()[-3000:]
            proc.send_signal(signal.SIGTERM)  # the runner finishes a running batch and stops
            rc = proc.wait(timeout=120)
        finally:
            kill_group(proc)  # leftover Python workers, if any
        assert rc == 0, log_path.read_text()[-3000:]
        assert caught_up(store, root)
        # Nothing is left to replay or rewrite: one more run over the same checkpoints commits no version anywhere.
        settled = {t: log_version(store, t) for t in (SCORES, FEATURES, ALERTS)}
        clean_run(root, spark)
        assert {t: log_version(store, t) for t in settled} == settled
    crash_seconds = time.monotonic() - t_start
    # The reference: the same silver rows in one append, scored by one clean run (in this process: it needs no
    # JVM of its own).
    add(clean, [r for step in range(STEPS) for r in step_rows(step)])
    clean_run(clean_root, spark)

    for job, batch in killed.items():
        assert batch in batch_ids(root, job, "commits"), f"{job} batch {batch} was not replayed"
    assert scores_batches_written(store, root)[1] >= features_done  # the half-written batch was completed

    # (1) one row per key, (2) one score row per scored input time: none lost.
    silver = rows_of(store, OBSERVATIONS)
    assert len(silver) == len({r["observation_id"] for r in silver}) == sum(len(step_rows(s)) for s in range(STEPS))
    expected = {(r["patient_key"], r["effective_at"]) for r in silver if r["concept"] in INPUTS}
    assert len(expected) == STEPS * len(PATTERNS)
    scores = rows_of(store, SCORES)
    for table, rows in ((SCORES, scores), (FEATURES, rows_of(store, FEATURES))):
        keys = [(r["patient_key"], r["scored_at"]) for r in rows]
        assert len(keys) == len(set(keys)), f"{table} has duplicate (patient_key, scored_at) rows"
        assert set(keys) == expected, f"{table}: missing {sorted(expected - set(keys))[:5]}"

    # (3) alert ids unique, at most one open alert per patient and level.
    alerts = rows_of(store, ALERTS)
    ids = [a["alert_id"] for a in alerts]
    assert len(ids) == len(set(ids))
    open_ones = [(a["patient_key"], a["level"]) for a in alerts if a["status"] == "open"]
    assert len(open_ones) == len(set(open_ones))

    # (4) the crashes changed nothing: the clean run's rows (provenance aside), and alerts worth comparing.
    clean_alerts = rows_of(clean, ALERTS)
    assert {(a["level"], a["status"]) for a in clean_alerts} >= {
        ("news2_medium", "resolved"), ("news2_high", "resolved"), ("qsofa", "resolved"), ("news2_medium", "open")}
    assert any(a["escalated_to"] for a in clean_alerts)
    score_cols = ("patient_key", "scored_at", "news2_score", "news2_band", "qsofa_score")
    assert {tuple(r[c] for c in score_cols) for r in scores} == {
        tuple(r[c] for c in score_cols) for r in rows_of(clean, SCORES)}
    episode = ("patient_key", "level", "status", "opened_at", "resolved_at")
    assert {tuple(a[c] for c in episode) for a in alerts} == {tuple(a[c] for c in episode) for a in clean_alerts}
    for table in (SCORES, FEATURES, ALERTS):
        got, want = Counter(map(comparable, rows_of(store, table))), Counter(map(comparable, rows_of(clean, table)))
        assert got == want, f"{table} differs from the clean run: {list((got - want).items())[:1]}"
    print(f"crash runs {crash_seconds:.0f} s, total {time.monotonic() - t_start:.0f} s")


def _seen(changes):
    """A cheap stand-in for the score job: the observations each batch brings."""
    return changes.where("_change_type = 'insert'").select("observation_id", "effective_at")


def test_available_now_after_a_crash_also_processes_the_versions_after_the_interrupted_batch(tmp_path, spark):
    from pipelines.jobs import Job, Registry, TableSource
    from pipelines.runner import Runner, Trigger
    from pipelines.store import open_store

    cfg = make_config(tmp_path / "lake")
    store = open_store(cfg, spark)
    job = Job("gold.toy_seen", TableSource(OBSERVATIONS), _seen)
    runner = Runner(cfg, spark, store, Registry([job]))
    root = cfg.root
    for step in range(2):
        add(store, step_rows(step))
        runner.run([job.name], Trigger(available_now=True))
    # What kill -9 in the middle of batch 1 leaves behind: its offsets logged, its commit not.
    commits = root / "_checkpoints" / job.name / "commits"
    for name in ("1", ".1.crc"):
        (commits / name).unlink(missing_ok=True)
    assert in_flight(root, job.name) == 1
    add(store, step_rows(2))  # committed while carelake was down

    runner.run([job.name], Trigger(available_now=True))
    assert consumed(root, job.name) == store.version(OBSERVATIONS)
    seen = {r["effective_at"] for r in store.read_arrow(job.name).to_pylist()}
    assert seen == {r["effective_at"] for step in range(3) for r in step_rows(step)}
