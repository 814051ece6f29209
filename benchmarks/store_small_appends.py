"""Small appends (100 rows) through the table store: latency p50/p99 (goal p50 <= 25 ms, p99 <= 120 ms).

Run: .venv/bin/python benchmarks/store_small_appends.py [--appends 300] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import time

from _common import emit, median, percentile, temp_config


def one_run(appends: int) -> list[float]:
    import pyarrow as pa

    from pipelines.store.deltars import DeltaRsStore

    store = DeltaRsStore(temp_config())
    rows = pa.table({"id": pa.array(range(100), pa.int64()), "device_id": [f"d{i % 7}" for i in range(100)],
                     "value": pa.array([float(i) for i in range(100)])})
    store.append("bronze.bench", rows)  # create the table outside the timing
    out = []
    for _ in range(appends):
        t0 = time.perf_counter()
        store.append("bronze.bench", rows)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--appends", type=int, default=300)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    runs = [one_run(a.appends) for _ in range(a.runs)]
    emit({
        "benchmark": "store_small_appends", "engine": "delta-rs", "rows_per_append": 100,
        "appends_per_run": a.appends, "runs": a.runs, "cores": os.cpu_count(),
        "p50_ms_median_of_runs": round(median([percentile(r, 0.5) for r in runs]), 2),
        "p99_ms_median_of_runs": round(median([percentile(r, 0.99) for r in runs]), 2),
        "p50_ms_per_run": [round(percentile(r, 0.5), 2) for r in runs],
        "p99_ms_per_run": [round(percentile(r, 0.99), 2) for r in runs],
        "goal": {"p50_ms": 25, "p99_ms": 120},
    })


if __name__ == "__main__":
    main()
