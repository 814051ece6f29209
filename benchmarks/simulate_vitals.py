"""ICU vital-sign readings generated and written to JSON-lines files by `carelake simulate` (devices feed).

Goal: >= 200,000 readings/s on 2 cores, measured over the device stage (Spark generation + file writing).
Run: .venv/bin/python benchmarks/simulate_vitals.py [--patients 400] [--hours 24] [--icu-beds 40] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from _common import emit, median, temp_config


def main() -> None:
    from pipelines.simulator.params import resolve_params
    from pipelines.simulator.run import simulate
    from pipelines.spark import create_spark

    ap = argparse.ArgumentParser()
    ap.add_argument("--patients", type=int, default=400)
    ap.add_argument("--hours", type=int, default=24)
    ap.add_argument("--icu-beds", type=int, default=40)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    cfg = temp_config()
    spark = create_spark(cfg.spark)
    runs = []
    for _ in range(a.runs):
        out = Path(tempfile.mkdtemp(prefix="carelake-sim-"))
        params = resolve_params(cfg.simulator, out, force=True, patients=a.patients, hours=a.hours, feeds="devices",
                                icu_beds=a.icu_beds, icu_admission_fraction=0.3, icu_cadence_max_s=5)
        summary = simulate(spark, params)
        runs.append({"readings": summary.readings, "seconds": round(summary.device_seconds, 2),
                     "readings_per_s": round(summary.readings / summary.device_seconds)})
        shutil.rmtree(out, ignore_errors=True)
    spark.stop()
    emit({
        "benchmark": "simulate_vitals", "cores": os.cpu_count(), "patients": a.patients, "hours": a.hours,
        "icu_beds": a.icu_beds, "readings": runs[-1]["readings"],
        "seconds_median": median([r["seconds"] for r in runs]),
        "readings_per_s_median": round(median([r["readings_per_s"] for r in runs])), "runs": runs,
        "goal": {"readings_per_s": 200_000},
    })


if __name__ == "__main__":
    main()
