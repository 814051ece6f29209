"""Executors write, the driver commits vs every row through the driver, same run, same Spark session.

A Spark DataFrame of device-like readings is appended, then merged (every tenth key updated, as many new keys
inserted) into a table of that size, two ways:
- executors: the store's DataFrame path (pipelines.store.executors): Parquet written by the tasks, the driver
  commits only file actions; MERGE copy-on-write in Spark;
- driver: the path the runner took before: `toArrow()` on the driver, then delta-rs writes or merges it.
Prints rows/s of each and their ratio (medians of --runs), and the largest result the driver received
(executors: the file rows; driver: the whole batch).

Run: .venv/bin/python benchmarks/store_executor_writes.py [--rows 1000000] [--runs 3] [--master local[2]]
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import time

from _common import emit, median, temp_config


def readings(spark, n: int, start: int = 0, every: int = 1, rev: str = "v1"):
    from pyspark.sql import functions as F

    ids = spark.range(start, start + n * every, every)
    return ids.select(
        F.col("id").alias("reading_id"),
        F.concat(F.lit("icu-bed-"), (F.col("id") % 400).cast("string")).alias("device_id"),
        F.when(F.col("id") % 2 == 0, F.lit("8867-4")).otherwise(F.lit("59408-5")).alias("code"),
        (F.rand(7) * 40 + 60).alias("value"),
        F.timestamp_micros(F.lit(1_795_000_000_000_000) + F.col("id") * 1000).alias("observed_at"),
        F.lit(rev).alias("rev"))


def main() -> None:
    from pipelines.spark import create_spark
    from pipelines.store import MergeSpec, Txn
    from pipelines.store.deltars import DeltaRsStore

    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--master", default="local[2]")
    args = ap.parse_args()

    cfg = temp_config()
    spark = create_spark(dataclasses.replace(cfg.spark, master=args.master, driver_memory="2g"))
    store = DeltaRsStore(cfg, spark)
    spec = MergeSpec(keys=("reading_id",), prune_by=("observed_at",))
    figures: dict[str, list[float]] = {k: [] for k in ("exec_append", "driver_append", "exec_merge",
                                                        "driver_merge")}
    n, changed = args.rows, args.rows // 10
    for run in range(args.runs):
        for way in ("exec", "driver"):
            name = f"silver.bench_{way}_{run}"
            base = readings(spark, n).persist()
            base.count()
            t0 = time.perf_counter()
            store.append(name, base if way == "exec" else base.toArrow(), txn=Txn("bench", 0))
            figures[f"{way}_append"].append(n / (time.perf_counter() - t0))
            base.unpersist()
            # every tenth key of the newest tenth updated, and as many new keys after it: the streaming shape
            src = readings(spark, changed, n - changed, 1, "v2").where("reading_id % 10 = 0").unionByName(
                readings(spark, changed - changed // 10, n, 1, "v2")).persist()
            rows = src.count()
            t0 = time.perf_counter()
            store.merge(name, src if way == "exec" else src.toArrow(), spec, txn=Txn("bench", 1))
            figures[f"{way}_merge"].append(rows / (time.perf_counter() - t0))
            src.unpersist()
            assert store.row_count(name) == n + changed - changed // 10, store.row_count(name)
            shutil.rmtree(store.ref(name).path)
    out = {"rows": n, "runs": args.runs, "master": args.master, "cores": spark.sparkContext.defaultParallelism}
    for k, v in figures.items():
        out[f"{k}_rows_per_s"] = round(median(v))
    out["append_ratio_exec_to_driver"] = round(out["exec_append_rows_per_s"] / out["driver_append_rows_per_s"], 2)
    out["merge_ratio_exec_to_driver"] = round(out["exec_merge_rows_per_s"] / out["driver_merge_rows_per_s"], 2)
    emit(out)
    spark.stop()
    shutil.rmtree(cfg.root, ignore_errors=True)


if __name__ == "__main__":
    main()
