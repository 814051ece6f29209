"""The same jobs on a Spark standalone cluster (a master and two workers, separate processes on loopback) as in
local mode: same table contents, and the data files written by the workers' executors, not the driver."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, carelake_cmd, carelake_env
from tests.sparkcluster import StandaloneCluster

pytestmark = pytest.mark.slow
READINGS = 16_000
# bronze (append), a copy (append) and running totals (merge); the silver jobs with expectation suites still
# collect their batches to validate them on the driver, so they stay out of a run with a 1 MB result limit
JOBS = ("bronze.device_readings", "silver.toy_readings", "gold.toy_device_totals")


def _land(root: Path, tmp: Path) -> None:
    src = tmp / "readings.jsonl"
    # ~4 MB of readings: more than the driver may receive (spark.driver.maxResultSize=1m below)
    src.write_text("".join(json.dumps({"device_id": f"m{i % 4}", "time": f"2026-11-21T03:{i % 60:02d}:00Z",
                                       "hr": 60 + i % 90, "note": f"{i:08d}" * 24}) + "\n" for i in range(READINGS)))
    subprocess.run(carelake_cmd("ingest", str(src), "--feed", "devices"), env=carelake_env(root), check=True,
                   capture_output=True, cwd=REPO, timeout=120)


def _submit(root: Path, master: str, zip_path: Path) -> subprocess.CompletedProcess:
    # every batch written by the executors, however small (by default small batches are written from the driver)
    env = carelake_env(root, CARELAKE_JOBS__MODULES="tests.toyjobs", PYSPARK_PYTHON=sys.executable,
                       CARELAKE_STORAGE__DRIVER_WRITE_MAX_ROWS="0", CARELAKE_STORAGE__DRIVER_WRITE_MAX_MB="0")
    argv = [str(Path(sys.executable).parent / "spark-submit"), "--master", master, "--py-files", str(zip_path),
            "--conf", "spark.executor.memory=768m", "--conf", "spark.cores.max=2",
            "--conf", "spark.driver.maxResultSize=1m",
            str(REPO / "bin" / "carelake-spark.py"), "run", *JOBS, "--available-now"]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)


def _tables(root: Path) -> dict[str, list[tuple]]:
    from deltalake import DeltaTable

    out = {}
    for name, cols in (("bronze/device_readings", ("device_id", "sha256", "parse_status")),
                       ("silver/toy_readings", ("device_id", "sha256")),
                       ("gold/toy_device_totals", ("device_id", "readings"))):
        rows = DeltaTable(str(root / name)).to_pyarrow_table(columns=list(cols)).to_pylist()
        out[name] = sorted(tuple(r[c] for c in cols) for r in rows)
    return out


def test_the_jobs_on_a_standalone_cluster_write_what_local_mode_writes(tmp_path):
    from pipelines.packaging import build_zip

    zip_path = build_zip(tmp_path / "dist" / "carelake.zip")
    local, remote = tmp_path / "local", tmp_path / "cluster"
    for root in (local, remote):
        _land(root, tmp_path)
    done = _submit(local, "local[2]", zip_path)
    assert done.returncode == 0, done.stderr[-3000:]
    # the workers' environment: this interpreter for their Python, the repo for the test-only toy jobs
    with StandaloneCluster(tmp_path / "spark", workers=2, env=carelake_env(remote)) as cluster:
        done = _submit(remote, cluster.master_url, zip_path)
        assert done.returncode == 0, done.stderr[-3000:]
        apps = cluster.state()["completedapps"] + cluster.state()["activeapps"]
    assert len(apps) == 1
    assert _tables(remote) == _tables(local)
    assert len(_tables(remote)["bronze/device_readings"]) == READINGS
    # both workers ran executors (their work folders hold the application); the batches were larger than the
    # driver may receive, so the executors wrote the files; each file names the process that wrote it
    for n in range(2):
        assert list(cluster.work_dir(n).glob("app-*/*/stderr")), f"worker {n} ran no executor"
    files = list((remote / "bronze" / "device_readings").glob("*.parquet"))
    assert sum(f.stat().st_size for f in files) > 1 << 20
    writers = {pq.read_schema(f).metadata[b"carelake.writer"].decode() for f in files}
    assert writers and all(w.rsplit(":", 1)[1].isdigit() for w in writers)
