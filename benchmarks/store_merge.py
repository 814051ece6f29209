"""MERGE of 10k keys (half new, half updates) into a 1M-row table (goal <= 1 s).

Run: .venv/bin/python benchmarks/store_merge.py [--rows 1000000] [--keys 10000] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import time

from _common import emit, median, temp_config


def main() -> None:
    import numpy as np
    import pyarrow as pa

    from pipelines.store import MergeSpec
    from pipelines.store.deltars import DeltaRsStore

    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--keys", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    rng = np.random.default_rng(11)
    base = pa.table({"observation_id": pa.array(np.arange(a.rows, dtype=np.int64)),
                     "value": pa.array(rng.normal(80, 10, a.rows)),
                     "status": pa.array(["final"] * a.rows)})
    half = a.keys // 2
    existing = rng.choice(a.rows, half, replace=False).astype(np.int64)
    new = np.arange(a.rows, a.rows + (a.keys - half), dtype=np.int64)
    source = pa.table({"observation_id": pa.array(np.concatenate([existing, new])),
                       "value": pa.array(rng.normal(90, 10, a.keys)),
                       "status": pa.array(["amended"] * a.keys)})
    times = []
    for _ in range(a.runs):
        store = DeltaRsStore(temp_config())
        store.append("silver.bench_merge", base)
        t0 = time.perf_counter()
        result = store.merge("silver.bench_merge", source, MergeSpec(keys=("observation_id",)))
        times.append(time.perf_counter() - t0)
        assert store.row_count("silver.bench_merge") == a.rows + (a.keys - half), "merge lost or duplicated rows"
        assert result.metrics.get("num_target_rows_updated") == half
    emit({
        "benchmark": "store_merge", "engine": "delta-rs", "target_rows": a.rows, "source_keys": a.keys,
        "new_keys": a.keys - half, "runs": a.runs, "cores": os.cpu_count(),
        "seconds_median": round(median(times), 3), "seconds_per_run": [round(t, 3) for t in times],
        "goal": {"seconds": 1.0},
    })


if __name__ == "__main__":
    main()
