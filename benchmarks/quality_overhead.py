"""Data-quality overhead: rows/s of pipelines.quality.validate with the silver.observations suite.

Builds device-like observation batches of 100k and 1M rows (about 0.1% planted problems: future times, missing
patients, non-canonical units, unusual values), validates each 3 times and reports the median, with every row
checked (sample_rows unset) and with warn expectations on a 100k-row sample. One JSON line.
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime

from _common import REPO, emit, median

SIZES = (100_000, 1_000_000)
RUNS = 3
SAMPLE_ROWS = 100_000
CONCEPTS = (("hr", "8867-4", "/min", 80.0, 15.0), ("rr", "9279-1", "/min", 16.0, 4.0),
            ("spo2", "59408-5", "%", 96.0, 2.0), ("sbp", "8480-6", "mm[Hg]", 120.0, 20.0),
            ("temp", "8310-5", "Cel", 37.0, 0.6))


def observations(n: int, seed: int = 7):
    """n silver.observations rows as Arrow, about 0.1% of them with a planted problem."""
    import numpy as np
    import pyarrow as pa
    from pyspark.sql.pandas.types import to_arrow_schema

    from silver.observations import SCHEMA

    rng = np.random.default_rng(seed)
    now = np.datetime64(datetime(2025, 3, 1, 12, tzinfo=UTC).replace(tzinfo=None), "us")
    pick = rng.integers(0, len(CONCEPTS), n)
    concept = np.array([c[0] for c in CONCEPTS], dtype=object)[pick]
    code = np.array([c[1] for c in CONCEPTS], dtype=object)[pick]
    unit = np.array([c[2] for c in CONCEPTS], dtype=object)[pick]
    value = rng.normal(np.array([c[3] for c in CONCEPTS])[pick], np.array([c[4] for c in CONCEPTS])[pick])
    effective = now - rng.integers(1, 3_600_000_000, n).astype("timedelta64[us]")
    bad = rng.random(n)
    effective[bad < 0.0005] = now + np.timedelta64(2, "h")
    unit[(bad >= 0.0005) & (bad < 0.0008)] = "kg"
    value[(bad >= 0.0008) & (bad < 0.001)] = 400.0
    patients = np.array([f"{i:032x}" for i in range(2_000)], dtype=object)[rng.integers(0, 2_000, n)]
    patients[(bad >= 0.001) & (bad < 0.0011)] = None
    ids = [f"{i:032x}" for i in range(n)]
    ts = pa.timestamp("us", tz="UTC")
    cols = {"observation_id": ids, "patient_key": patients, "code": code, "code_system": ["http://loinc.org"] * n,
            "concept": concept, "value": value, "unit": unit, "effective_at": pa.array(effective, ts),
            "status": ["final"] * n, "source_feed": ["devices"] * n, "source_system": ["dev"] * n,
            "source_id": ["dev"] * n, "source_version": ["0"] * n,
            "source_record": [{"table": "bronze.device_readings", "landing_file": "f", "landing_position": i,
                               "sha256": "s"} for i in range(n)],
            "received_at": pa.array(np.full(n, now), ts), "ingested_at": pa.array(np.full(n, now), ts)}
    schema = to_arrow_schema(SCHEMA)
    return pa.table({f.name: pa.array(cols[f.name], f.type) if f.name in cols else pa.nulls(n, f.type)
                     for f in schema}, schema=schema)


def measure(table, suite, sample_rows: int | None) -> tuple[float, object]:
    """Median seconds of RUNS validations, and the last validation."""
    from pipelines.quality import validate

    times, last = [], None
    for i in range(RUNS):
        t0 = time.perf_counter()
        last = validate(table, suite, batch=str(i), job="bench", at=datetime(2025, 3, 1, 12, tzinfo=UTC),
                        sample_rows=sample_rows)
        times.append(time.perf_counter() - t0)
    return median(times), last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=list(SIZES))
    args = parser.parse_args()
    from pipelines.quality import load_suite, validate

    suite = load_suite("silver.observations", REPO / "expectations")
    warm = observations(100)
    validate(warm, suite, batch="warm", job="bench", at=datetime(2025, 3, 1, 12, tzinfo=UTC))  # import, context
    figures: dict[str, object] = {"expectations": len(suite.rules), "runs": RUNS, "sample_rows": SAMPLE_ROWS}
    for n in args.sizes:
        table = observations(n)
        full_s, v = measure(table, suite, None)
        sampled_s, _ = measure(table, suite, SAMPLE_ROWS)
        figures[f"rows_per_s_{n}"] = round(n / full_s)
        figures[f"rows_per_s_{n}_sampled"] = round(n / sampled_s)
        figures[f"seconds_{n}"] = round(full_s, 2)
        figures[f"quarantined_{n}"] = len(v.quarantine_rows)
    small = observations(1_000)
    small_s, _ = measure(small, suite, None)
    figures["fixed_overhead_ms_1000_rows"] = round(small_s * 1000)
    emit(figures)


if __name__ == "__main__":
    main()
