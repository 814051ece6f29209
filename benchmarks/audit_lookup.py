"""What an audit costs as a table grows: a score-row lookup (`audit explain`'s hop), `audit diff` after a MERGE.

A score table is written the way the streaming job writes it (time-ordered appends, one file each); then, for the
same table: the lookup of one row by (patient_key, scored_at) through `find_rows` with its time window (only the files
whose statistics can hold the row are read) against reading the whole table and filtering; and `audit diff` of a
MERGE of 1,000 rows (half updates, half new) against the version before it (only the files that differ are read).
Prints one JSON line: medians of --runs, with the load average.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from datetime import UTC, datetime, timedelta

from _common import emit, median, temp_config

TABLE = "gold.bench_scores"


def _rows(start: int, n: int, t0: datetime, rng: random.Random):
    import pyarrow as pa

    return pa.table({
        "patient_key": [f"p{(start + i) % 5000:05d}" for i in range(n)],
        "scored_at": pa.array([t0 + timedelta(seconds=start + i) for i in range(n)], pa.timestamp("us", "UTC")),
        "news2_score": [rng.randrange(0, 15) for _ in range(n)],
        "silver_version": pa.array([start // n] * n, pa.int64()),
        "input_observation_ids": [[f"o{start + i}-{k}" for k in range(7)] for i in range(n)],
    })


def _timed(fn, runs: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(runs):
        began = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - began)
    return median(times), out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--files", type=int, default=100)
    p.add_argument("--runs", type=int, default=5)
    a = p.parse_args()

    from pipelines.audit import find_rows
    from pipelines.audit_tables import diff
    from pipelines.store import MergeSpec
    from pipelines.store.deltars import DeltaRsStore

    rng = random.Random(7)
    store = DeltaRsStore(temp_config())
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    per = a.rows // a.files
    began = time.perf_counter()
    for f in range(a.files):
        store.append(TABLE, _rows(f * per, per, t0, rng))
    write_s = time.perf_counter() - began

    target = a.rows * 3 // 4  # a row in an old file, as an audit of last quarter's alert would ask for
    key = {"patient_key": f"p{target % 5000:05d}", "scored_at": t0 + timedelta(seconds=target)}
    at = key["scored_at"]
    pruned_s, found = _timed(lambda: find_rows(store, TABLE, None, key, since=("scored_at", at,
                                                                             at + timedelta(milliseconds=1))), a.runs)
    assert len(found) == 1, found

    def whole():
        import pyarrow.compute as pc

        t = store.read_arrow(TABLE)
        return t.filter(pc.and_(pc.equal(t["patient_key"], key["patient_key"]), pc.equal(t["scored_at"], at)))

    full_s, rows = _timed(whole, max(1, a.runs // 2))
    assert rows.num_rows == 1

    before = store.version(TABLE)
    changes = _rows(target - 500, 1000, t0, rng)  # 500 existing keys (new scores) and ...
    new = _rows(a.rows, 500, t0, rng)  # ... 500 new ones
    import pyarrow as pa

    store.merge(TABLE, pa.concat_tables([changes.slice(0, 500), new]), MergeSpec(keys=("patient_key", "scored_at")))
    diff_s, d = _timed(lambda: diff(store, TABLE, before, before + 1, ("patient_key", "scored_at")), a.runs)
    s = d.summary()
    emit({"benchmark": "audit_lookup", "rows": a.rows, "files": a.files, "runs": a.runs,
          "write_s": round(write_s, 2), "lookup_pruned_s": round(pruned_s, 4), "lookup_full_read_s": round(full_s, 3),
          "lookup_speedup": round(full_s / pruned_s, 1), "diff_s": round(diff_s, 3), "diff_files_read": s["files_read"],
          "diff_rows_read": s["rows_read"], "diff_added": s["added"], "diff_changed": s["changed"],
          "load_avg_1m": round(os.getloadavg()[0], 1)})


if __name__ == "__main__":
    main()
