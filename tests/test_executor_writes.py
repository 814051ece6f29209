"""Executors write the data files, the driver commits: no table data passes through the driver.

The store contract (tests/test_store_contract.py, engine `delta-rs-executors`) runs every operation on this path;
these tests pin what the contract does not: a batch larger than the driver may receive, the statistics the
executors write, and the change feed of a copy-on-write merge.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pytest

from pipelines.store import MergeSpec, Txn
from tests.conftest import REPO, carelake_env

LARGE = """
import dataclasses, json, os
from pyspark.sql import functions as F
from tests.conftest import make_config
from pipelines.spark import create_spark
from pipelines.store import MergeSpec, Txn
from pipelines.store.deltars import DeltaRsStore

cfg = make_config(os.environ["CARELAKE_ROOT"])
spark = create_spark(dataclasses.replace(cfg.spark, conf={**cfg.spark.conf, "spark.driver.maxResultSize": "1m"}))
store = DeltaRsStore(cfg, spark)
N = 300_000
rows = spark.range(N).select("id", F.sha2(F.col("id").cast("string"), 512).alias("payload"),
                             F.lit("v1").alias("rev"))
out = {}
try:
    rows.toArrow()  # the driver-side path this replaces: the result limit stops it
    out["driver_collect"] = "ok"
except Exception as exc:
    text = str(exc)
    out["driver_collect"] = text[text.find("Total size"):][:300] if "maxResultSize" in text else text[:2000]
r1 = store.append("silver.big", rows, txn=Txn("big", 0))
# every third row updated, 100k new rows inserted
src = spark.range(0, N + 100_000).where((F.col("id") % 3 == 0) | (F.col("id") >= N)).select(
    "id", F.sha2(F.col("id").cast("string"), 256).alias("payload"), F.lit("v2").alias("rev"))
r2 = store.merge("silver.big", src, MergeSpec(keys=("id",)), txn=Txn("big", 1))
r3 = store.merge("silver.big", src, MergeSpec(keys=("id",)), txn=Txn("big", 1))
table = store.read("silver.big")
out["rows"] = table.count()
out["revs"] = {r["rev"]: r["count"] for r in table.groupBy("rev").count().collect()}
out["distinct"] = table.select("id").distinct().count()
changes = store.changes("silver.big", r2.version, r2.version)
out["changes"] = {r["_change_type"]: r["count"] for r in changes.groupBy("_change_type").count().collect()}
out["versions"] = [r1.version, r2.version, r3.skipped]
out["metrics"] = dict(r2.metrics)
out["bytes"] = sum(f.stat().st_size for f in (store.ref("silver.big").path).glob("*.parquet"))
print(json.dumps(out))
"""


def test_a_batch_larger_than_the_driver_may_receive_is_appended_and_merged(tmp_path):
    """spark.driver.maxResultSize=1m: collecting the batch fails, writing and merging it through the store works."""
    proc = subprocess.run([sys.executable, "-c", LARGE], env=carelake_env(tmp_path / "lake"), cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "maxResultSize" in out["driver_collect"], out["driver_collect"]
    assert out["bytes"] > 20 * 1024 * 1024  # the table is many times the limit
    n, updated = 300_000, 100_000  # ids 0, 3, ..., 299_997
    assert out["rows"] == out["distinct"] == n + 100_000
    assert out["revs"] == {"v1": n - updated, "v2": updated + 100_000}
    assert out["changes"] == {"update_preimage": updated, "update_postimage": updated, "insert": 100_000}
    assert out["versions"][2] is True  # the replay of the merge is skipped
    assert out["metrics"]["num_target_rows_updated"] == updated
    assert out["metrics"]["num_target_rows_inserted"] == 100_000


@pytest.fixture
def rs(cfg, spark):
    from pipelines.store.deltars import DeltaRsStore

    return DeltaRsStore(cfg, spark)


def _stats(store, name):
    return pa.table(store._open(name).get_add_actions(flatten=True)).to_pylist()


def test_executor_files_carry_the_statistics_readers_skip_by(rs, spark):
    """min/max/nullCount per file; times to the millisecond with the maximum rounded up (never below a value);
    long text keeps a prefix as its minimum and no maximum; NaN leaves a column without a range."""
    at = datetime(2026, 1, 5, 10, 0, 0, 123456, tzinfo=UTC)
    long = "x" * 40
    data = pa.table({"id": pa.array([3, 1, None], pa.int64()),
                     "at": pa.array([at, at, None], pa.timestamp("us", "UTC")),
                     "text": pa.array(["b", long, "a"]), "v": pa.array([1.0, float("nan"), 2.0]),
                     "tags": pa.array([[1], [], None], pa.list_(pa.int64()))})
    rs.append("silver.stats_test", spark.createDataFrame(data).coalesce(1))
    [f] = _stats(rs, "silver.stats_test")
    assert f["num_records"] == 3
    assert (f["min.id"], f["max.id"], f["null_count.id"]) == (1, 3, 1)
    assert f["min.at"] == datetime(2026, 1, 5, 10, 0, 0, 123000, tzinfo=UTC)
    assert f["max.at"] == datetime(2026, 1, 5, 10, 0, 0, 124000, tzinfo=UTC)
    assert f["min.text"] == "a" and f["max.text"] is None
    assert f["min.v"] is None and f["max.v"] is None
    later = data.slice(0, 1).set_column(1, "at", pa.array([at + timedelta(hours=1)], pa.timestamp("us", "UTC")))
    rs.append("silver.stats_test", spark.createDataFrame(later).coalesce(1))
    from pipelines.store.deltars import _files_since

    dt, path = rs._open("silver.stats_test"), str(rs.ref("silver.stats_test").path)
    # a read from half an hour on skips the first file by its statistics (its null row cannot match either)
    assert len(_files_since(dt, path, "at", at + timedelta(minutes=30))) == 1
    assert len(_files_since(dt, path, "at", at)) == 2
    assert rs.read("silver.stats_test", since=("at", at + timedelta(minutes=30))).count() == 1


def test_a_copy_on_write_merge_change_feed_names_only_the_rows_it_changed(rs, spark):
    """The rewritten file's other rows are copied, not changed: the change feed has only the update and the delete,
    exactly as a delta-rs MERGE gives it; an insert-only merge rewrites no file."""
    base = pa.table({"id": pa.array(range(10), pa.int64()), "name": [f"n{i}" for i in range(10)],
                     "gone": pa.array([False] * 10)})
    rs.append("silver.cow_test", spark.createDataFrame(base).coalesce(1))
    src = pa.table({"id": pa.array([2, 5], pa.int64()), "name": ["TWO", "x"], "gone": pa.array([False, True])})
    r = rs.merge("silver.cow_test", spark.createDataFrame(src), MergeSpec(keys=("id",), delete_when="s.gone"))
    assert r.metrics["num_target_files_removed"] == 1
    got = sorted((c["_change_type"], c["id"], c["name"]) for c in rs.changes_arrow("silver.cow_test", 1, 1).to_pylist())
    assert got == [("delete", 5, "n5"), ("update_postimage", 2, "TWO"), ("update_preimage", 2, "n2")]
    ins = rs.merge("silver.cow_test", spark.createDataFrame(pa.table({"id": pa.array([20], pa.int64()),
                                                                       "name": ["new"], "gone": [False]})),
                   MergeSpec(keys=("id",)), txn=Txn("cow", 0))
    assert ins.metrics["num_target_files_removed"] == 0
    assert [(c["_change_type"], c["id"]) for c in rs.changes_arrow("silver.cow_test", 2, 2).to_pylist()] == [
        ("insert", 20)]
    assert sorted(r["id"] for r in rs.read_arrow("silver.cow_test").to_pylist()) == [0, 1, 2, 3, 4, 6, 7, 8, 9, 20]
    # other Delta readers (delta-rs's own change feed here) see the same net effect: the copied rows deleted and
    # inserted with the same values
    from deltalake import DeltaTable

    coarse = pa.table(DeltaTable(str(rs.ref("silver.cow_test").path)).load_cdf(starting_version=1, ending_version=1))
    assert coarse.num_rows == 10 + 9


def test_a_merge_planned_before_a_concurrent_insert_of_its_key_plans_again(rs, spark, cfg, monkeypatch):
    """Another writer inserts key 7 after the merge read the table and before it commits: the merge's commit must
    not be rebased past it (that would insert 7 twice); it fails as a conflict and is planned again, as an update."""
    from pipelines.store import executors as ex
    from pipelines.store.deltars import DeltaRsStore

    rs.append("silver.race_test", spark.createDataFrame(pa.table({"id": pa.array([1], pa.int64()), "name": ["a"]})))
    other = DeltaRsStore(cfg)  # another writer (its own snapshots and lock), on the driver path
    real, calls = ex.write_files, []

    def write_then_race(*args, **kwargs):
        written = real(*args, **kwargs)
        if not calls:
            other.append("silver.race_test", pa.table({"id": pa.array([7], pa.int64()), "name": ["other"]}))
        calls.append(1)
        return written

    monkeypatch.setattr(ex, "write_files", write_then_race)
    src = spark.createDataFrame(pa.table({"id": pa.array([7], pa.int64()), "name": ["mine"]}))
    r = rs.merge("silver.race_test", src, MergeSpec(keys=("id",)))
    assert len(calls) == 2  # planned and written twice
    assert sorted((x["id"], x["name"]) for x in rs.read_arrow("silver.race_test").to_pylist()) == [(1, "a"),
                                                                                                   (7, "mine")]
    assert r.metrics["num_target_rows_updated"] == 1


def test_vacuum_removes_files_no_version_names_once_past_retention(rs, spark):
    """A data file written for a commit that never happened (a kill -9 between the write and the commit) is removed
    by vacuum once it is older than the layer's retention; a file the table still needs is not."""
    import os
    import time as clock

    rs.append("ops.vacuum_test", spark.createDataFrame(pa.table({"id": pa.array([1, 2], pa.int64())})))
    folder = rs.ref("ops.vacuum_test").path
    orphan = folder / "part-00000-orphan-c000.snappy.parquet"
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": pa.array([99], pa.int64())}), orphan)
    old = clock.time() - (rs.retention_days("ops.vacuum_test") + 1) * 86400
    for f in folder.glob("*.parquet"):
        os.utime(f, (old, old))
    assert str(orphan.name) in " ".join(rs.vacuum("ops.vacuum_test", dry_run=True))
    rs.vacuum("ops.vacuum_test")
    assert not orphan.exists()
    assert sorted(r["id"] for r in rs.read_arrow("ops.vacuum_test").to_pylist()) == [1, 2]
