"""The device path on a Spark standalone cluster (a master and 2 workers) vs local[2], same run, same input.

Landing files of bedside-device JSON lines -> `bronze.device_readings` -> `silver.observations`: with
`streaming.fuse` (conf/base.yaml) silver.observations is computed inside the bronze.device_readings batches,
so `carelake run bronze.device_readings --available-now` writes both tables. Each run is a real
`spark-submit --py-files carelake.zip bin/carelake-spark.py --set ... run bronze.device_readings
--available-now` (tests/test_cluster.py's way), on a fresh lakehouse into which the same files were first
landed with `carelake ingest --feed devices` (not timed), once with `--master local[2]` and once with
`--master spark://...` (tests/sparkcluster.py: a master and 2 workers of 1 core each, on loopback, started
once for the whole benchmark). Both with the executors writing every batch
(`storage.driver_write_max_rows=0`, `storage.driver_write_max_mb=0`, as conf/cluster.yaml does), the test
overlay otherwise (shuffle partitions 2), delta-rs.

Figures (medians of --repeats; within a repeat the two modes run back to back, their order alternating):
- `*_readings_per_s`: readings / the time the job's batches took (ops.metrics: first batch start to last
  batch end): what the path costs once Spark is up;
- `*_wall_readings_per_s`: readings / the spark-submit process's whole life (JVM start, executors
  registered, queries started and stopped): what one `carelake run` costs at this size;
- `ratio_cluster_to_local` (and `_wall`): the median of each repeat's cluster/local ratio;
- `rows_equal`: bronze.device_readings and silver.observations compared row by row between the two
  lakehouses of every repeat (the columns that name the root, the run or the time of processing left out).

The machine has 2 cores and is shared with other work: absolute readings/s move with its load (reported
before and after). The ratio measured in the same run, on the same input, is the figure that matters; never
compare an absolute figure with one from another run. On one 2-core machine a "cluster" of 2 one-core
workers adds process hops (executors in their own JVMs, task results and file actions over loopback RPC)
and no hardware: expect a ratio at or below 1.

Run: .venv/bin/python benchmarks/device_cluster.py [--readings 200000] [--repeats 3] [--files 8] [--keep]
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, emit, median
from silver_observations import device_lines

from tests.conftest import carelake_cmd, carelake_env
from tests.sparkcluster import StandaloneCluster

JOB = "bronze.device_readings"
TABLES = ("bronze.device_readings", "silver.observations")
# the executors write every batch (the cluster way: the driver holds no table data)
EXECUTOR_WRITES = ("storage.driver_write_max_rows=0", "storage.driver_write_max_mb=0")
# columns that differ between two lakehouses holding the same data: the run's ids and clock; landing paths
# (the root, the time landed, a random part) are compared by the file's own name
VARYING = ("ingest_batch_id", "received_at", "ingested_at")
LANDED_PREFIX = r"^.*/[0-9]{8}T[0-9]+Z-[0-9a-f]+-"
WORKER_CORES, WORKER_MEMORY, EXECUTOR_MEMORY = 1, "1200m", "1g"
LOCAL_DRIVER_MEMORY, CLUSTER_DRIVER_MEMORY = "2g", "1g"  # local: the driver is both executors' memory too


def write_input(readings: int, files: int, folder: Path) -> list[Path]:
    """The same generator as benchmarks/silver_observations.py, split into `files` landing files (a landing
    file is read whole by one task: fewer files than cores would leave cores idle in both modes)."""
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-readings // files)
    out = []
    for k, start in enumerate(range(0, readings, per)):
        path = folder / f"readings-{k:03d}.jsonl"
        path.write_text(device_lines(start, min(per, readings - start)))
        out.append(path)
    return out


def land(root: Path, input_dir: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(carelake_cmd("ingest", str(input_dir), "--feed", "devices"), env=carelake_env(root), check=True,
                   capture_output=True, cwd=REPO, timeout=600)
    return time.perf_counter() - t0


class Procs:
    """spark-submit processes, each in its own process group, killed with their children on the way out."""

    def __init__(self):
        self.live: set[subprocess.Popen] = set()

    def run(self, argv: list[str], env: dict[str, str], log: Path, timeout: float) -> int:
        with open(log, "wb") as out:
            p = subprocess.Popen(argv, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
            self.live.add(p)
            try:
                return p.wait(timeout)
            finally:
                self.kill(p)

    def kill(self, p: subprocess.Popen) -> None:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # its Python workers too, if it left any
        except ProcessLookupError:
            pass
        p.wait()
        self.live.discard(p)

    def kill_all(self) -> None:
        for p in list(self.live):
            self.kill(p)


def submit(procs: Procs, root: Path, master: str, zip_path: Path, log: Path, key_secret: str,
           events: Path) -> float:
    """One `carelake run bronze.device_readings --available-now` through spark-submit; its wall seconds.
    Every lakehouse gets the same silver.key_secret (in the environment, not on the command line), so their
    patient keys compare equal. Spark's event log goes to `events` (an empty folder): see profile()."""
    events.mkdir(parents=True)
    env = carelake_env(root, short_lived=False, PYSPARK_PYTHON=sys.executable,
                       CARELAKE_SILVER__KEY_SECRET=key_secret)
    local = master.startswith("local")
    argv = [str(Path(sys.executable).parent / "spark-submit"), "--master", master, "--py-files", str(zip_path),
            "--driver-memory", LOCAL_DRIVER_MEMORY if local else CLUSTER_DRIVER_MEMORY,
            "--conf", f"spark.executor.memory={EXECUTOR_MEMORY}", "--conf", "spark.cores.max=2",
            "--conf", "spark.eventLog.enabled=true", "--conf", f"spark.eventLog.dir={events.as_uri()}",
            "--conf", "spark.eventLog.compress=false", "--conf", "spark.eventLog.rolling.enabled=false",
            str(REPO / "bin" / "carelake-spark.py"), *(a for s in EXECUTOR_WRITES for a in ("--set", s)),
            "run", JOB, "--available-now"]
    t0 = time.perf_counter()
    rc = procs.run(argv, env, log, timeout=1800)
    wall = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"spark-submit --master {master} failed ({rc}):\n{log.read_text(errors='replace')[-4000:]}")
    return wall


def batches(root: Path) -> dict:
    """The job's batches as ops.metrics recorded them: count, rows, first start to last end."""
    from deltalake import DeltaTable

    rows = [r for r in DeltaTable(str(root / "_metrics")).to_pyarrow_table().to_pylist() if r["job"] == JOB]
    if not rows:
        raise RuntimeError(f"no {JOB} batches in {root}/_metrics (ops.metrics)")
    window = (min(r["started_at"] for r in rows), max(r["finished_at"] for r in rows))
    return {"batches": len(rows), "files_in": sum(r["rows_in"] for r in rows), "window": window,
            "bronze_rows": sum(r["rows_out"] for r in rows), "seconds": (window[1] - window[0]).total_seconds(),
            "batch_seconds": [round(r["duration_ms"] / 1000, 2) for r in sorted(rows, key=lambda r: r["batch_id"])]}


def profile(events: Path, window: tuple) -> dict[str, float]:
    """Where the batches' time went, from Spark's event log (the events inside the batches' window):
    `in_jobs_s` the time at least one Spark job was running, `driver_only_s` the rest (planning, the driver's
    Python, commits), `spark_jobs`, and summed over the tasks: `task_s` (launch to finish), `task_run_s`
    (executor run time, Python workers' time included), `task_cpu_s` (the executor JVM's CPU), `deserialize_s`,
    `gc_s`, `shuffle_wait_s`, `scheduler_delay_s` (task time outside deserialize, run and result
    serialization: shipping the task and its result)."""
    import json

    lo, hi = (t.timestamp() * 1000 for t in window)
    logs = sorted(p for p in events.rglob("*") if p.is_file() and not p.name.startswith("appstatus"))
    jobs, out = {}, dict.fromkeys(("task_s", "task_run_s", "task_cpu_s", "deserialize_s", "gc_s",
                                   "shuffle_wait_s", "scheduler_delay_s"), 0.0)
    tasks = 0
    for e in (json.loads(line) for log in logs for line in log.read_text().splitlines()):
        kind = e["Event"]
        if kind == "SparkListenerJobStart":
            jobs[e["Job ID"]] = [e["Submission Time"], None]
        elif kind == "SparkListenerJobEnd" and e["Job ID"] in jobs:
            jobs[e["Job ID"]][1] = e["Completion Time"]
        elif kind == "SparkListenerTaskEnd" and e.get("Task Metrics"):
            info, m = e["Task Info"], e["Task Metrics"]
            if not lo <= info["Launch Time"] <= hi:
                continue
            tasks += 1
            span = info["Finish Time"] - info["Launch Time"]
            out["task_s"] += span / 1000
            out["task_run_s"] += m["Executor Run Time"] / 1000
            out["task_cpu_s"] += m["Executor CPU Time"] / 1e9
            out["deserialize_s"] += m["Executor Deserialize Time"] / 1000
            out["gc_s"] += m["JVM GC Time"] / 1000
            out["shuffle_wait_s"] += m.get("Shuffle Read Metrics", {}).get("Fetch Wait Time", 0) / 1000
            out["scheduler_delay_s"] += max(0, span - m["Executor Deserialize Time"] - m["Executor Run Time"]
                                            - m["Result Serialization Time"]) / 1000
    spans = sorted((max(a, lo), min(b, hi)) for a, b in jobs.values() if b is not None and b > lo and a < hi)
    busy, end = 0.0, lo
    for a, b in spans:  # the union of the jobs' intervals
        if b > end:
            busy += b - max(a, end)
            end = b
    out = {k: round(v, 1) for k, v in out.items()}
    return {"spark_jobs": len(spans), "tasks": tasks, "in_jobs_s": round(busy / 1000, 1),
            "driver_only_s": round((hi - lo - busy) / 1000, 1), **out}


def table_rows(root: Path, name: str):
    """A table's rows, comparable across lakehouses: structs flattened, landing paths reduced to the file's
    own name (a landed file is <root>/landing/devices/<time>-<random>-<name>), then sorted."""
    import pyarrow.compute as pc
    from deltalake import DeltaTable

    layer, table = name.split(".")
    t = DeltaTable(str(root / layer / table)).to_pyarrow_table().flatten()
    t = t.select([c for c in t.column_names if c.rsplit(".", 1)[-1] not in VARYING])
    for i, c in enumerate(t.column_names):
        if c.endswith("landing_file"):
            t = t.set_column(i, c, pc.replace_substring_regex(t[c], LANDED_PREFIX, ""))
    return t.sort_by([(c, "ascending") for c in t.column_names])


def compare(local: Path, cluster: Path) -> dict[str, int]:
    """Row counts of each table, after checking both lakehouses hold the same rows."""
    counts = {}
    for name in TABLES:
        a, b = table_rows(local, name), table_rows(cluster, name)
        if a.num_rows == 0 or not a.equals(b):
            raise RuntimeError(f"{name}: local[2] and the cluster differ ({a.num_rows:,} vs {b.num_rows:,} rows)")
        counts[name] = a.num_rows
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--readings", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--files", type=int, default=8, help="landing files the readings are split into")
    ap.add_argument("--keep", action="store_true", help="keep the lakehouses, logs and cluster folders")
    a = ap.parse_args()

    from pipelines.packaging import build_zip

    work = Path(tempfile.mkdtemp(prefix="carelake-bench-cluster-"))
    procs = Procs()
    key_secret = secrets.token_hex(32)
    # SIGTERM as an exception: the `with` below stops the master and workers, `finally` the spark-submits
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    try:
        zip_path = build_zip(work / "dist" / "carelake.zip")
        input_dir = work / "input"
        write_input(a.readings, a.files, input_dir)
        runs: dict[str, list[dict]] = {"local": [], "cluster": []}
        ingest_s, rows_equal = [], None
        # the workers' Python: this interpreter (the project's .venv, carelake's pinned dependencies); carelake's
        # own code reaches the executors in the zip
        with StandaloneCluster(work / "spark", workers=2, cores=WORKER_CORES, memory=WORKER_MEMORY,
                               env={"PYSPARK_PYTHON": sys.executable}) as cluster:
            masters = {"local": "local[2]", "cluster": cluster.master_url}
            for rep in range(a.repeats):
                order = ("local", "cluster") if rep % 2 == 0 else ("cluster", "local")
                roots = {}
                for mode in order:
                    root = roots[mode] = work / f"{mode}-{rep}"
                    ingest_s.append(land(root, input_dir))
                    wall = submit(procs, root, masters[mode], zip_path, work / f"{mode}-{rep}.log", key_secret,
                                  work / f"events-{mode}-{rep}")
                    facts = batches(root)
                    runs[mode].append({"wall": wall, **facts, "load": os.getloadavg()[0],
                                       "profile": profile(work / f"events-{mode}-{rep}", facts["window"])})
                    print(f"repeat {rep + 1}/{a.repeats} {mode}: {wall:.1f} s wall, batches "
                          f"{runs[mode][-1]['batch_seconds']} s, load {runs[mode][-1]['load']:.1f}", file=sys.stderr)
                counts = compare(roots["local"], roots["cluster"])
                if runs["local"][-1]["bronze_rows"] != a.readings or counts[TABLES[0]] != a.readings:
                    raise RuntimeError(f"expected {a.readings:,} bronze rows, got {counts}")
                rows_equal = counts
                if not a.keep:
                    for root in roots.values():
                        shutil.rmtree(root, ignore_errors=True)
            apps = len(cluster.state()["completedapps"]) + len(cluster.state()["activeapps"])
            executors_ran = all(list(cluster.work_dir(n).glob("app-*/*/stderr")) for n in range(2))
    finally:
        procs.kill_all()
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()

    n = a.readings
    out = {"benchmark": "device_cluster", "readings": n, "files": a.files, "repeats": a.repeats,
           "job": f"carelake run {JOB} --available-now (fused: {', '.join(TABLES)})",
           "writes": "executors (" + ", ".join(EXECUTOR_WRITES) + ")",
           "cluster": f"standalone, 2 workers x {WORKER_CORES} core, executor memory {EXECUTOR_MEMORY}, "
                      f"spark.cores.max=2, {apps} applications",
           "both_workers_ran_executors": executors_ran,
           "cores": os.cpu_count(), "load_avg_1m_before": round(load_before[0], 2),
           "load_avg_1m_after": round(load_after[0], 2), "load_avg_15m_after": round(load_after[2], 2),
           "rows_equal": rows_equal, "ingest_s_median": round(median(ingest_s), 2),
           "total_s": round(time.perf_counter() - t_start, 1)}
    for mode in ("local", "cluster"):
        rs = runs[mode]
        out[f"{mode}_readings_per_s"] = round(median([n / r["seconds"] for r in rs]))
        out[f"{mode}_wall_readings_per_s"] = round(median([n / r["wall"] for r in rs]))
        out[f"{mode}_batches_s"] = [round(r["seconds"], 2) for r in rs]
        out[f"{mode}_wall_s"] = [round(r["wall"], 2) for r in rs]
        out[f"{mode}_startup_and_stop_s_median"] = round(median([r["wall"] - r["seconds"] for r in rs]), 2)
        out[f"{mode}_batch_count"] = rs[0]["batches"]
        out[f"{mode}_load_avg_1m_at_end"] = [round(r["load"], 1) for r in rs]
        out[f"{mode}_profile_median"] = {k: round(median([r["profile"][k] for r in rs]), 1) for k in rs[0]["profile"]}
    pairs = list(zip(runs["local"], runs["cluster"], strict=True))
    out["ratio_cluster_to_local"] = round(median([loc["seconds"] / clu["seconds"] for loc, clu in pairs]), 3)
    out["ratio_cluster_to_local_wall"] = round(median([loc["wall"] / clu["wall"] for loc, clu in pairs]), 3)
    emit(out)


if __name__ == "__main__":
    main()
