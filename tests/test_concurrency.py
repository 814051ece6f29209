"""Four processes appending and merging into one table at once lose no commit."""

from __future__ import annotations

import multiprocessing as mp

import pyarrow as pa

from pipelines.store import MergeSpec
from tests.conftest import make_config

ROUNDS = 6
WORKERS = 4
T = "silver.shared"


def worker(root: str, wid: int) -> int:
    # Runs in a spawned interpreter: delta-rs is first touched here, never across a fork.
    from pipelines.store.deltars import DeltaRsStore

    store = DeltaRsStore(make_config(root, **{"storage.commit_retries": 60}))
    for r in range(ROUNDS):
        ids = pa.array([wid * 1000 + r], pa.int64())
        one = pa.array([wid], pa.int64())
        store.append(T, pa.table({"id": ids, "writer": one, "value": pa.array([0], pa.int64())}))
        # update this writer's earlier row and insert a new one: touches files other writers also rewrite
        upd = pa.table({"id": pa.array([wid * 1000 + r, wid * 1000 + 500 + r], pa.int64()),
                        "writer": pa.array([wid, wid], pa.int64()), "value": pa.array([1, 1], pa.int64())})
        store.merge(T, upd, MergeSpec(keys=("id",)))
    return wid


def test_four_processes_append_and_merge_without_losing_a_commit(tmp_path):
    root = tmp_path / "lake"
    ctx = mp.get_context("spawn")
    with ctx.Pool(WORKERS) as pool:
        assert sorted(pool.starmap(worker, [(str(root), w) for w in range(WORKERS)])) == list(range(WORKERS))

    from pipelines.store.deltars import DeltaRsStore

    store = DeltaRsStore(make_config(root))
    got = sorted((r["id"], r["value"]) for r in store.read_arrow(T).to_pylist())
    want = sorted([(w * 1000 + r, 1) for w in range(WORKERS) for r in range(ROUNDS)]
                  + [(w * 1000 + 500 + r, 1) for w in range(WORKERS) for r in range(ROUNDS)])
    assert got == want
    ops = [c.operation for c in store.history(T)]
    assert ops.count("WRITE") + ops.count("CREATE TABLE") >= WORKERS * ROUNDS
    assert ops.count("MERGE") == WORKERS * ROUNDS
