"""Shared fixtures: one SparkSession for the whole run, a fresh lakehouse root per test."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REALDATA = REPO.parent / "shared" / "realdata"


# Seconds each of the longest test files took in CI (2 cores, 2 workers, fresh clone, 2026-12-06; the suite prints
# them at its end, "longest test files"). `./dev test` hands whole files to workers in collection order (--dist
# loadfile --no-loadscope-reorder); starting the longest first keeps one of them from running alone at the end while
# the other worker idles. Only the order depends on these figures; a file not listed runs after the listed ones.
LONGEST_FILES = {
    "test_cli.py": 268, "test_gold_scores.py": 226, "test_crash_safety.py": 161, "test_runner.py": 118,
    "test_physionet2012.py": 116, "test_claims_fraud.py": 109, "test_gold_crash.py": 83, "test_notebooks.py": 76,
    "test_cluster.py": 74, "test_claims_flow.py": 66, "test_gold_cli.py": 66, "test_silver_vs_truth.py": 62,
    "test_backfill.py": 50, "test_store_contract.py": 47, "test_imaging_incremental.py": 45,
    "test_executor_writes.py": 40, "test_imaging_study_rows.py": 40, "test_silver_observations.py": 36,
    "test_silver_encounters.py": 36,
    "test_silver_patients.py": 32, "test_fused.py": 30, "test_imaging_worklist.py": 28, "test_sql_server.py": 25,
    "test_imaging_match.py": 22, "test_silver_imaging_orders.py": 19, "test_claims_rules.py": 19,
}
# With the realdata folder present (not in CI's clean clone) these run too (estimates from a loaded machine).
LONGEST_FILES.update({"test_realdata_flow.py": 226, "test_dicom_flow.py": 105, "test_imaging_realdata.py": 25})


def pytest_collection_modifyitems(config, items):
    """Longest files first (see LONGEST_FILES); the rest keep their order, tests within a file too."""
    items.sort(key=lambda item: -LONGEST_FILES.get(item.path.name, 0))


_FILE_SECONDS: dict[str, float] = {}


def pytest_runtest_logreport(report):
    """Seconds per test file (setup + call + teardown), summed where the reports arrive (the controller under
    xdist), for the summary that keeps LONGEST_FILES honest."""
    name = report.nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
    _FILE_SECONDS[name] = _FILE_SECONDS.get(name, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    """The 25 longest test files, beside the seconds LONGEST_FILES orders them by."""
    if not _FILE_SECONDS:
        return
    terminalreporter.section("longest test files (seconds; LONGEST_FILES in tests/conftest.py)")
    for name, seconds in sorted(_FILE_SECONDS.items(), key=lambda kv: -kv[1])[:25]:
        terminalreporter.write_line(f"{seconds:8.1f}  {name}  (listed: {LONGEST_FILES.get(name, '-')})")


def make_config(root: Path, **overrides):
    """The test overlay with `root`, isolated from the caller's CARELAKE_* environment."""
    from pipelines.config import load_config

    return load_config(env="test", root=root, overrides=overrides, conf_dir=REPO / "conf", environ={})


@pytest.fixture(scope="session")
def spark(tmp_path_factory):
    from pipelines.spark import create_spark

    cfg = make_config(tmp_path_factory.mktemp("spark-root"))
    session = create_spark(cfg.spark)
    yield session
    session.stop()


@pytest.fixture(autouse=True)
def _carelake_logging():
    """A test that runs the CLI in-process (`pipelines.cli.main`) points the carelake logger at that test's
    captured stderr and stops it propagating; put it back, so later tests on the same worker see their logs."""
    import logging

    logger = logging.getLogger("carelake")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]


@pytest.fixture
def cfg(tmp_path):
    return make_config(tmp_path / "lake")


@pytest.fixture
def store(cfg):
    """The embedded engine without Spark: Arrow in, Arrow out."""
    from pipelines.store.deltars import DeltaRsStore

    return DeltaRsStore(cfg)


@pytest.fixture
def realdata() -> Path:
    if not REALDATA.is_dir():
        pytest.skip(f"real sample data not found at {REALDATA}")
    return REALDATA


def carelake_env(root: Path, *, short_lived: bool = True, **extra: str) -> dict[str, str]:
    """Environment for a `carelake` subprocess: test overlay, this interpreter, the given root.

    A short-lived process's JVM runs with the JIT's C1 tier only: it would spend most of its CPU compiling
    with C2 code it runs for seconds (about a third less CPU on two cores). A process measured at steady
    state (a benchmark) keeps the full JIT."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARELAKE_")}
    env.update({"CARELAKE_ENV": "test", "CARELAKE_ROOT": str(root), "CARELAKE_CONF_DIR": str(REPO / "conf"),
                "PYTHONPATH": str(REPO)})
    if short_lived:
        env["JAVA_TOOL_OPTIONS"] = f"{os.environ.get('JAVA_TOOL_OPTIONS', '')} -XX:TieredStopAtLevel=1".strip()
    env.update(extra)
    return env


def carelake_cmd(*args: str) -> list[str]:
    exe = shutil.which("carelake", path=str(Path(sys.executable).parent))
    return [exe, *args] if exe else [sys.executable, "-m", "pipelines.cli", *args]
