"""MERGE of 10k keys (half new, half updates) into a 1M-row table (goal <= 1 s).

Also, in the same run, the layout a stream leaves: the same rows appended in `--files` time-ordered files, the
10k keys updating the newest rows and adding later ones, merged with and without `prune_by` on the time column
(the key determines it): how much of the table a merge reads when it may skip the files outside the batch's
time range. That ratio, not the absolute seconds, is the figure to compare across runs.

Run: .venv/bin/python benchmarks/store_merge.py [--rows 1000000] [--keys 10000] [--files 100] [--runs 3]
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
    ap.add_argument("--files", type=int, default=100)
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
    streamed = _streamed_layout(a, rng)
    emit({
        "benchmark": "store_merge", "engine": "delta-rs", "target_rows": a.rows, "source_keys": a.keys,
        "new_keys": a.keys - half, "runs": a.runs, "cores": os.cpu_count(),
        "seconds_median": round(median(times), 3), "seconds_per_run": [round(t, 3) for t in times],
        **streamed, "goal": {"seconds": 1.0},
    })


def _streamed_layout(a, rng) -> dict:
    """The same merge into `a.files` time-ordered files, without and with prune_by (alternating, same run)."""
    from datetime import datetime

    import numpy as np
    import pyarrow as pa

    from pipelines.store import MergeSpec
    from pipelines.store.deltars import DeltaRsStore

    t0 = np.datetime64(datetime(2026, 1, 5), "us")

    def rows(ids: np.ndarray, status: str) -> pa.Table:
        return pa.table({"observation_id": pa.array(ids), "value": pa.array(rng.normal(80, 10, len(ids))),
                         "status": pa.array([status] * len(ids)),
                         "effective_at": pa.array(t0 + ids.astype("timedelta64[s]"), pa.timestamp("us", tz="UTC"))})

    per_file = a.rows // a.files
    half = a.keys // 2
    source = rows(np.arange(a.rows - half, a.rows + (a.keys - half), dtype=np.int64), "amended")
    specs = {"full": MergeSpec(keys=("observation_id",)),
             "pruned": MergeSpec(keys=("observation_id",), prune_by=("effective_at",))}
    times: dict[str, list[float]] = {k: [] for k in specs}
    for _ in range(a.runs):
        for kind, spec in specs.items():
            store = DeltaRsStore(temp_config())
            for f in range(a.files):
                store.append("silver.bench_merge", rows(np.arange(f * per_file, (f + 1) * per_file, dtype=np.int64),
                                                        "final"))
            t = time.perf_counter()
            result = store.merge("silver.bench_merge", source, spec)
            times[kind].append(time.perf_counter() - t)
            assert store.row_count("silver.bench_merge") == per_file * a.files + (a.keys - half)
            assert result.metrics.get("num_target_rows_updated") == half
    full, pruned = median(times["full"]), median(times["pruned"])
    return {"streamed_files": a.files, "streamed_full_seconds_median": round(full, 3),
            "streamed_pruned_seconds_median": round(pruned, 3), "streamed_speedup": round(full / pruned, 1)}


if __name__ == "__main__":
    main()
