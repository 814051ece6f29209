"""Helpers shared by the benchmarks: a throwaway lakehouse and robust statistics."""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def temp_config(root: Path | None = None, **overrides: str):
    from pipelines.config import load_config

    root = root or Path(tempfile.mkdtemp(prefix="carelake-bench-"))
    return load_config(env="test", root=root, conf_dir=REPO / "conf", environ={}, overrides=overrides)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def median(values: list[float]) -> float:
    return statistics.median(values)


def emit(figures: dict) -> None:
    """One JSON line of figures on stdout: the benchmark's whole output."""
    print(json.dumps(figures, sort_keys=True))


def available_now(cfg, spark, job: str):
    """Run `job` available-now in process (the Runner as the CLI builds it); (seconds, the store)."""
    import time

    from pipelines.jobs import load_registry
    from pipelines.runner import Runner, Trigger
    from pipelines.store import open_store

    store = open_store(cfg, spark)
    runner = Runner(cfg, spark, store, load_registry(cfg))
    t0 = time.perf_counter()
    summaries = runner.run([job], Trigger(available_now=True))
    seconds = time.perf_counter() - t0
    assert summaries[-1].status == "done", summaries[-1].line()
    return seconds, store
