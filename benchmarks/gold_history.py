"""One continuous-mode score batch against a growing history: what a score batch costs as the lakehouse ages.

A continuous deployment scores every few seconds, and each batch reads the touched patients' silver history back
`gold.history` (12 h by default, for the 12 h feature windows). This measures that cost: silver.observations holds
`--hours` of history for `--patients` monitors sending a frame of 6 vitals every `--every` seconds (default 100
beds at 0.6 s: the 1,000 readings/s of gold_latency.py), written straight with the table store; then one more
append brings the next ~10 s of frames, and the score job's transform (scores, features, alerts, markers, minutes)
runs on that version's change feed and is collected as Arrow, as the runner does. gold.vitals_minutes is filled
from the history first, as the score job would have kept it; `--every-row` reads the history row by row instead
(what a batch cost before the table). `--runs` times per history (the first
also warms up); the median is reported. A history that fails (e.g. the driver runs out of memory) is reported
with its error and ends the run.

Run: .venv/bin/python benchmarks/gold_history.py [--hours 0.1 1 2] [--patients 100] [--every 0.6] [--runs 3]
     [--driver-memory 2g] [--every-row]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from _common import emit, median, temp_config
from gold_batch import silver_batch

VITALS_PER_FRAME = 6
TAIL_SECONDS = 10
APPEND_ROWS = 1_000_000


def one_history(spark, hours: float, a) -> dict:
    from gold import early_warning_scores as ews
    from pipelines.jobs import load_registry
    from pipelines.store import open_store
    from silver.observations import OBSERVATIONS

    root = Path(tempfile.mkdtemp(prefix="carelake-bench-gold-history-"))
    try:
        cfg = temp_config(root, **{"spark.driver_memory": a.driver_memory})
        store = open_store(cfg, spark)
        frames = int(a.patients * hours * 3600 / a.every)
        rows = frames * VITALS_PER_FRAME
        for start in range(0, rows, APPEND_ROWS):
            store.append(OBSERVATIONS, silver_batch(start, min(APPEND_ROWS, rows - start), a.patients, a.every, 7))
        if not a.every_row:  # the minutes the score job would have kept while the history streamed in
            store.append(ews.MINUTES, ews.vitals_minutes(
                store.read(OBSERVATIONS), silver_version=store.version(OBSERVATIONS), ingest_batch_id="bench-history",
                processed_at=datetime.now(UTC)))
        tail = int(a.patients * TAIL_SECONDS / a.every) * VITALS_PER_FRAME
        store.append(OBSERVATIONS, silver_batch(rows, tail, a.patients, a.every, 7))
        version = store.version(OBSERVATIONS)
        job = load_registry(cfg).get(ews.SCORES)

        def read_table(name, since=None):
            return store.read(name, since=since)

        def table_version(name):
            return store.version(name) if store.exists(name) else None

        seconds, routed = [], 0
        for _ in range(a.runs):
            t0 = time.perf_counter()
            out = job.apply(store.changes(OBSERVATIONS, version, version),
                            {"batch_id": 0, "ingest_batch_id": "bench", "processed_at": datetime.now(UTC),
                             "read_table": read_table, "table_version": table_version})
            routed = out.toArrow().num_rows
            seconds.append(time.perf_counter() - t0)
        return {"hours": hours, "history_rows": rows, "batch_rows": tail, "routed_rows": routed,
                "batch_s_median": round(median(seconds[1:] or seconds), 2),
                "batch_runs_s": [round(s, 2) for s in seconds]}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hours", type=float, nargs="+", default=[0.1, 1.0, 2.0], help="history lengths (hours)")
    ap.add_argument("--patients", type=int, default=100)
    ap.add_argument("--every", type=float, default=0.6, help="seconds between a patient's frames (default 0.6)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--driver-memory", default="2g", help="as conf/base.yaml ships (default 2g)")
    ap.add_argument("--every-row", action="store_true", help="read the history row by row (no gold.vitals_minutes)")
    a = ap.parse_args()
    from gold import early_warning_scores as ews

    ews.ROLL_UP = not a.every_row
    from pipelines.spark import create_spark

    session_root = Path(tempfile.mkdtemp(prefix="carelake-bench-gold-history-"))
    spark = create_spark(temp_config(session_root, **{"spark.driver_memory": a.driver_memory}).spark)
    results, failed = [], None
    try:
        for hours in a.hours:
            try:
                results.append(one_history(spark, hours, a))
            except Exception as exc:  # noqa: BLE001 - reported in the figures: the point of the benchmark
                failed = {"hours": hours, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
                break
    finally:
        spark.stop()
        shutil.rmtree(session_root, ignore_errors=True)
    emit({"benchmark": "gold_history", "patients": a.patients, "every_s": a.every,
          "readings_per_s": round(a.patients * VITALS_PER_FRAME / a.every), "driver_memory": a.driver_memory,
          "history_read": "every row" if a.every_row else "gold.vitals_minutes",
          "cores": os.cpu_count(), "load_1min": round(os.getloadavg()[0], 2), "runs": a.runs,
          "by_hours": results, "failed": failed})


if __name__ == "__main__":
    main()
