"""Bulk append through the table store vs a raw pyarrow Parquet write of the same data, same run.

Goal: store rows/s / raw Parquet rows/s >= 0.6.
Run: .venv/bin/python benchmarks/store_bulk_append.py [--rows 2000000] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from _common import emit, median, temp_config


def make_rows(n: int):
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(7)
    return pa.table({
        "reading_id": pa.array(np.arange(n, dtype=np.int64)),
        "device_id": pa.array([f"icu-bed-{i:03d}" for i in rng.integers(0, 400, n)]),
        "code": pa.array(np.where(rng.random(n) < 0.5, "8867-4", "59408-5")),
        "value": pa.array(rng.normal(80, 10, n)),
        "observed_at": pa.array((1_795_000_000_000_000 + np.arange(n, dtype=np.int64) * 1000),
                                pa.timestamp("us", tz="UTC")),
    })


def main() -> None:
    import pyarrow.parquet as pq

    from pipelines.store.deltars import DeltaRsStore

    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    data = make_rows(a.rows)
    store_rates, raw_rates, ratios = [], [], []
    for _ in range(a.runs):
        raw_dir = Path(tempfile.mkdtemp(prefix="carelake-raw-"))
        t0 = time.perf_counter()
        pq.write_table(data, raw_dir / "part-0.parquet", compression="snappy")
        raw = a.rows / (time.perf_counter() - t0)
        store = DeltaRsStore(temp_config())
        t0 = time.perf_counter()
        store.append("bronze.bench_bulk", data)
        ours = a.rows / (time.perf_counter() - t0)
        store_rates.append(ours)
        raw_rates.append(raw)
        ratios.append(ours / raw)
    emit({
        "benchmark": "store_bulk_append", "engine": "delta-rs", "rows": a.rows, "runs": a.runs,
        "cores": os.cpu_count(),
        "store_rows_per_s_median": round(median(store_rates)),
        "raw_parquet_rows_per_s_median": round(median(raw_rates)),
        "ratio_median": round(median(ratios), 3), "ratio_per_run": [round(r, 3) for r in ratios],
        "goal": {"ratio": 0.6},
    })


if __name__ == "__main__":
    main()
