"""`carelake notebook` and `carelake mlflow-ui`: the data scientist's workbench on one lakehouse.

`carelake notebook` starts JupyterLab in `notebooks/` with the lakehouse's root and overlay in the environment; in
a notebook, `lake = open_lakehouse()` gives its configuration, a SparkSession (on this interpreter, configured like
every carelake job) and the table store. `carelake mlflow-ui` serves the lakehouse's MLflow tracking store (runs,
registered models and their aliases, model cards) on a local port.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.errors import UsageError

if TYPE_CHECKING:
    from pipelines.config import Config

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"


@dataclass
class Lakehouse:
    """What a notebook needs: `cfg`, `spark`, `store`; `lake.table("gold.x")` is a DataFrame of the newest version."""

    cfg: Any
    spark: Any
    store: Any

    def table(self, name: str, *, version: int | None = None):
        return self.store.read(name, version=version)


def open_lakehouse(root: str | os.PathLike | None = None, env: str | None = None) -> Lakehouse:
    """The lakehouse `carelake notebook` was started on (CARELAKE_ROOT / CARELAKE_ENV), or the one named here."""
    from pipelines.config import load_config
    from pipelines.spark import create_spark
    from pipelines.store import open_store

    cfg = load_config(env=env, root=root)
    if not cfg.root.is_dir():
        raise UsageError(f"no lakehouse at {cfg.root}: pass root=..., or start JupyterLab with "
                         "`carelake --root DIR notebook`")
    spark = create_spark(cfg.spark)
    return Lakehouse(cfg, spark, open_store(cfg, spark))


def _require(module: str, what: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise UsageError(f"{what} needs the Python package {module!r}, which this interpreter ({sys.executable}) "
                         "lacks: run `./dev setup` in the checkout, or use its .venv/bin/carelake")


def notebook_command(cfg: Config, *, host: str, port: int, browser: bool) -> list[str]:
    _require("jupyterlab", "carelake notebook")
    cmd = [sys.executable, "-m", "jupyterlab", f"--notebook-dir={NOTEBOOKS}", f"--ServerApp.ip={host}",
           f"--ServerApp.port={port}"]
    return cmd if browser else [*cmd, "--no-browser"]


def notebook_env(cfg: Config) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"CARELAKE_ROOT": str(cfg.root.resolve()), "CARELAKE_ENV": cfg.env, "PYSPARK_PYTHON": sys.executable,
                "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)})
    return env


def mlflow_command(cfg: Config, *, host: str, port: int) -> list[str]:
    from models.deterioration import default_tracking_uri

    _require("mlflow", "carelake mlflow-ui")
    uri = default_tracking_uri(cfg)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        raise UsageError(f"no MLflow tracking store at {uri.removeprefix('sqlite:///')} yet: train a model first "
                         "(`carelake train deterioration --labels ...`) or set models.tracking_uri")
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host, "--port", str(port),
           "--workers", "1"]  # one user on a local port: the default 4 workers only cost start time and memory
    if not cfg.models.tracking_uri:  # runs keep their artifacts (models, model cards, plots) beside the store
        cmd += ["--artifacts-destination", str(cfg.path("_mlflow", "artifacts").resolve())]
    return cmd


def run(cmd: list[str], env: dict[str, str] | None = None) -> int:
    """Run a server in the foreground until it ends or Ctrl-C; its exit code is ours."""
    proc = subprocess.Popen(cmd, env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        return proc.wait()
