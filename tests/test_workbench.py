"""`carelake notebook` and `carelake mlflow-ui`: what they start, on which lakehouse, and what they refuse."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from pipelines import workbench
from tests.conftest import make_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_ui_without_a_tracking_store_says_what_to_do_first(tmp_path, capsys):
    from pipelines.cli import main

    code = main(["--root", str(tmp_path / "lake"), "--env", "test", "mlflow-ui"])
    err = capsys.readouterr().err
    assert code != 0 and "no MLflow tracking store at" in err and "carelake train deterioration" in err


def test_notebook_runs_jupyterlab_of_this_interpreter_in_notebooks_on_the_lakehouse(tmp_path):
    cfg = make_config(tmp_path / "lake")
    cmd = workbench.notebook_command(cfg, host="127.0.0.1", port=8899, browser=False)
    assert cmd[:3] == [sys.executable, "-m", "jupyterlab"] and "--no-browser" in cmd
    assert f"--notebook-dir={workbench.NOTEBOOKS}" in cmd and "--ServerApp.port=8899" in cmd
    env = workbench.notebook_env(cfg)
    assert env["CARELAKE_ROOT"] == str((tmp_path / "lake").resolve()) and env["CARELAKE_ENV"] == "test"
    assert env["PYSPARK_PYTHON"] == sys.executable and str(workbench.REPO) in env["PYTHONPATH"]
    # the JupyterLab it names is installed and runs
    out = subprocess.run([*cmd[:3], "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().startswith("4."), out.stderr[-500:]


def test_open_lakehouse_refuses_a_root_that_is_not_there(tmp_path):
    from pipelines.errors import UsageError

    with pytest.raises(UsageError, match="no lakehouse at .*carelake --root DIR notebook"):
        workbench.open_lakehouse(root=tmp_path / "nowhere", env="test")


@pytest.mark.slow
def test_mlflow_ui_serves_the_runs_of_the_lakehouse(tmp_path):
    import mlflow

    cfg = make_config(tmp_path / "lake")
    from models.deterioration import default_tracking_uri

    mlflow.set_tracking_uri(default_tracking_uri(cfg))
    mlflow.set_experiment("carelake-workbench-test")
    with mlflow.start_run(run_name="a run"):
        mlflow.log_metric("auroc", 0.8)
    port = _free_port()
    proc = subprocess.Popen(workbench.mlflow_command(cfg, host="127.0.0.1", port=port), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        body, deadline = None, time.monotonic() + 120
        while body is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=10"
                body = json.loads(urllib.request.urlopen(url, timeout=5).read())
            except OSError:
                time.sleep(0.5)
        assert body is not None, proc.stderr.read()[-2000:] if proc.poll() is not None else "no answer in 120 s"
        assert "carelake-workbench-test" in {e["name"] for e in body["experiments"]}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
