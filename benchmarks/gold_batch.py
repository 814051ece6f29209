"""Batch scoring, available-now: silver.observations -> gold.early_warning_scores (+ gold.vitals_features), rows/s.

Input: `--rows` silver.observations rows (default 10,000,000) written straight into a temp lakehouse with the
table store, in appends of `--append-rows` (default 1,000,000), as monitors would have produced them: `--patients`
people (default 1,000), one frame of 6 vitals (HR, RR, SpO2, SBP, temperature, FiO2) every `--every` seconds
each, values spread over the NEWS2 bands, time-ordered across the appends.

End to end = `carelake run gold.early_warning_scores --available-now` in process (the Runner, as the CLI builds
it): the change feed of every silver version as one stream batch through the per-person state (gold.scoring in
applyInPandasWithState), MERGEd into the gold tables. Compute-only = the job's batch recompute (one fresh
scoring pass per person over the whole table, as `--recompute` runs it) written to Spark's no-op sink: no stream
source, no state store, no MERGE. Both are measured in the same run on the same input; the ratio says how much
the stream's state store and the storage/merge path cost.
Before them, both paths run twice on a 6,000-row table (what 1,000 readings/s bring in 6 s): the first warms the
JVM, Python workers and MLflow's registry; the second is reported as `small_*_s`, the fixed cost of one batch.
The runner's per-batch lines (chunks, rows written, seconds) go to stderr.

Run: .venv/bin/python benchmarks/gold_batch.py [--rows 10000000] [--runs 1] [--max-rows-per-batch N]
     [--no-compute-only]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from _common import available_now, emit, median, temp_config

# (code, concept, unit, mean, sd, low, high): spread so that NEWS2 lands in every band.
VITALS = (("8867-4", "hr", "/min", 88, 22, 30, 180), ("9279-1", "rr", "/min", 18, 5, 6, 40),
          ("59408-5", "spo2", "%", 95, 3, 80, 100), ("8480-6", "sbp", "mm[Hg]", 120, 22, 60, 220),
          ("8310-5", "temp", "Cel", 37.1, 0.7, 34.5, 40.5), ("3150-0", "fio2", "%", 21, 0, 21, 21))
T0 = datetime(2026, 1, 5, tzinfo=UTC)
SMALL = 6_000  # rows of the small batch: what 1,000 readings/s bring in 6 s


def silver_batch(first_row: int, n: int, patients: int, every_s: float, seed: int):
    """Rows first_row .. first_row + n of the observation stream, vectorized (numpy + pyarrow)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    from pyspark.sql.pandas.types import to_arrow_schema

    from silver.observations import SCHEMA

    schema = to_arrow_schema(SCHEMA)
    rng = np.random.default_rng(seed + first_row)
    row = np.arange(first_row, first_row + n, dtype=np.int64)
    vital = row % len(VITALS)
    frame = row // len(VITALS)
    patient = frame % patients
    tick = frame // patients
    # Patient p's frames at T0 + tick * every + p * every / patients: interleaved, strictly increasing per patient.
    at_us = (tick * every_s * 1e6 + patient * (every_s * 1e6 / patients)).astype(np.int64)
    at_us += int(T0.timestamp() * 1e6)
    mean = np.array([v[3] for v in VITALS])[vital]
    sd = np.array([v[4] for v in VITALS])[vital]
    value = np.clip(rng.normal(mean, sd), np.array([v[5] for v in VITALS])[vital],
                    np.array([v[6] for v in VITALS])[vital])
    oxygen = (vital == 5) & (rng.random(n) < 0.1)  # one FiO2 in ten is supplemental oxygen
    value = np.where(oxygen, rng.uniform(24, 60, n), value).round(1)

    def pick(options: list[str], index: np.ndarray) -> pa.Array:
        return pa.DictionaryArray.from_arrays(pa.array(index.astype(np.int32)), pa.array(options)).cast(pa.string())

    patients_text = [f"pat-{p:06d}" for p in range(patients)]
    ids = pc.utf8_lpad(pc.cast(pa.array(row), pa.string()), 32, "0")
    timestamps = pa.array(at_us, pa.timestamp("us", tz="UTC"))
    device = pick([f"icu-bed-{p:06d}" for p in range(patients)], patient)
    columns = {
        "observation_id": ids, "patient_key": pick(patients_text, patient),
        "encounter_key": pick([f"enc-{p:06d}" for p in range(patients)], patient),
        "code": pick([v[0] for v in VITALS], vital), "code_system": pa.array(["http://loinc.org"] * n),
        "display": pa.nulls(n, pa.string()), "concept": pick([v[1] for v in VITALS], vital),
        "value": pa.array(value), "value_text": pa.nulls(n, pa.string()),
        "unit": pick([v[2] for v in VITALS], vital), "effective_at": timestamps,
        "status": pa.array(["final"] * n), "source_feed": pa.array(["devices"] * n), "source_system": device,
        "source_id": device, "source_version": pa.array(["0"] * n), "original_code": pa.nulls(n, pa.string()),
        "original_unit": pa.nulls(n, pa.string()), "original_value": pa.nulls(n, pa.float64()),
        "source_record": pa.StructArray.from_arrays(
            [pa.array(["bronze.device_readings"] * n), pa.array(["bench"] * n), pa.array(row), ids],
            fields=list(schema.field("source_record").type)),
        "received_at": pa.array(at_us + 500_000, pa.timestamp("us", tz="UTC")),
        "ingested_at": pa.array(np.full(n, int(time.time() * 1e6)), pa.timestamp("us", tz="UTC")),
    }
    return pa.Table.from_arrays([columns[f.name].cast(f.type) for f in schema], schema=schema)


def write_silver(cfg, rows: int, append_rows: int, patients: int, every_s: float) -> float:
    from pipelines.store.deltars import DeltaRsStore
    from silver.observations import OBSERVATIONS

    store = DeltaRsStore(cfg)
    t0 = time.perf_counter()
    for start in range(0, rows, append_rows):
        store.append(OBSERVATIONS, silver_batch(start, min(append_rows, rows - start), patients, every_s, 7))
    return time.perf_counter() - t0


def fresh_gold(cfg) -> None:
    """Remove what an earlier run wrote (gold tables, the job's checkpoint, metrics), keep silver."""
    for path in (cfg.path("gold"), cfg.path("_checkpoints"), cfg.path("_metrics"), cfg.path("_mlflow")):
        shutil.rmtree(path, ignore_errors=True)


def end_to_end(cfg, spark) -> tuple[float, int, int]:
    from gold.early_warning_scores import FEATURES, SCORES

    fresh_gold(cfg)
    seconds, store = available_now(cfg, spark, SCORES)
    return seconds, store.row_count(SCORES), store.row_count(FEATURES)


def compute_only(cfg, spark) -> tuple[float, int]:
    """The same rows through the job's batch recompute (one fresh scoring pass per person) into Spark's no-op sink:
    what computing the scores costs without the stream's state store, merges and commits."""
    from pyspark.sql import functions as F

    from gold.early_warning_scores import SCORES
    from pipelines.jobs import load_registry
    from pipelines.store import open_store

    fresh_gold(cfg)
    store = open_store(cfg, spark)
    job = load_registry(cfg).get(SCORES)
    batch = {"batch_id": 0, "ingest_batch_id": "bench", "processed_at": datetime.now(UTC),
             "read_table": lambda name, since=None: store.read(name, since=since),
             "table_version": lambda name: store.version(name) if store.exists(name) else None,
             "table_path": lambda name: str(store.ref(name).path)}
    t0 = time.perf_counter()
    out = job.state.recompute(batch, datetime(2000, 1, 1, tzinfo=UTC), datetime(2100, 1, 1, tzinfo=UTC))
    out.write.format("noop").mode("overwrite").save()
    seconds = time.perf_counter() - t0
    return seconds, out.where(F.col("_output") == SCORES).count()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000_000, help="silver.observations rows (default 10M)")
    ap.add_argument("--append-rows", type=int, default=1_000_000, help="rows per silver append (default 1M)")
    ap.add_argument("--patients", type=int, default=1000)
    ap.add_argument("--every", type=float, default=60, help="seconds between a patient's frames (default 60)")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--driver-memory", default="6g")
    ap.add_argument("--max-rows-per-batch", type=int, help="streaming.max_rows_per_batch (default: conf)")
    ap.add_argument("--keep", action="store_true", help="keep the lakehouse root")
    ap.add_argument("--no-compute-only", action="store_true",
                    help="skip the compute-only pass on the large input (no ratio; for 10M on a slow machine)")
    a = ap.parse_args()
    import logging

    from pipelines.cli import _configure_logging
    from pipelines.spark import create_spark

    _configure_logging(verbose=False, quiet=False)  # the runner's per-batch lines (chunks, seconds) on stderr
    logging.getLogger("carelake").info("gold_batch: %s silver rows, streaming.max_rows_per_batch %s", f"{a.rows:,}",
                                       a.max_rows_per_batch or "from conf")

    overrides = {"spark.driver_memory": a.driver_memory}
    if a.max_rows_per_batch:
        overrides["streaming.max_rows_per_batch"] = str(a.max_rows_per_batch)
    root = Path(tempfile.mkdtemp(prefix="carelake-bench-gold-batch-"))
    cfg = temp_config(root, **overrides)
    warm = temp_config(Path(tempfile.mkdtemp(prefix="carelake-bench-gold-warm-")), **overrides)
    spark = create_spark(cfg.spark)
    try:
        write_s = write_silver(cfg, a.rows, a.append_rows, a.patients, a.every)
        # A continuous-mode-sized batch (SMALL rows), twice: the first warms the JVM, Python workers and MLflow's
        # registry outside the timing; the second is the fixed cost of one batch, whatever its size.
        write_silver(warm, SMALL, SMALL, 100, a.every)
        for _ in range(2):
            small_comp, _points = compute_only(warm, spark)
            small_e2e, _scores, _features = end_to_end(warm, spark)
        e2e, comp, score_rows, feature_rows, points = [], [], 0, 0, 0
        for _ in range(a.runs):
            if not a.no_compute_only:
                s, points = compute_only(cfg, spark)
                comp.append(s)
            s, score_rows, feature_rows = end_to_end(cfg, spark)
            e2e.append(s)
    finally:
        spark.stop()
        shutil.rmtree(warm.root, ignore_errors=True)
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)
    if comp:
        assert score_rows == points, f"end to end wrote {score_rows} score rows, compute-only made {points}"
    emit({"benchmark": "gold_batch", "rows": a.rows, "append_rows": a.append_rows, "patients": a.patients,
          "every_s": a.every, "score_rows": score_rows, "feature_rows": feature_rows, "runs": a.runs,
          "cores": os.cpu_count(), "load_1min": round(os.getloadavg()[0], 2),
          "max_rows_per_batch": cfg.streaming.max_rows_per_batch, "silver_write_rows_per_s": round(a.rows / write_s),
          "end_to_end_s_median": round(median(e2e), 1),
          "compute_only_s_median": round(median(comp), 1) if comp else None,
          "end_to_end_observations_per_s": round(a.rows / median(e2e)),
          "end_to_end_score_rows_per_s": round(score_rows / median(e2e)),
          "compute_only_observations_per_s": round(a.rows / median(comp)) if comp else None,
          "ratio_end_to_end_to_compute_only":
              round(median([c / e for e, c in zip(e2e, comp, strict=True)]), 3) if comp else None,
          "small_batch_rows": SMALL, "small_compute_only_s": round(small_comp, 1),
          "small_end_to_end_s": round(small_e2e, 1),
          "end_to_end_runs_s": [round(x, 1) for x in e2e], "compute_only_runs_s": [round(x, 1) for x in comp],
          "root": str(root) if a.keep else None})


if __name__ == "__main__":
    main()
