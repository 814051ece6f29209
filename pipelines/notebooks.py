"""Executed notebooks: `notebooks/NN_*.py` (Jupytext percent scripts) are the source, `.ipynb` files with outputs
are generated from them by running every cell on a Jupyter kernel of this interpreter (the project's .venv).

`./dev notebooks [NAME ...] [--set NAME=VALUE ...]` regenerates them; the tests run the same scripts in-process
(`run_in_process`) with tiny parameters. A notebook's first code cell is tagged `parameters`; `--set` adds a cell
after it that overrides those names (papermill's convention). A cell that cannot go on (its data is absent) raises
`NotebookStop`: the run ends there cleanly, the message is the last output, and the later cells stay unexecuted.

The helpers below are what more than one notebook does with the CLI's own functions (simulate, land, run jobs).
"""

from __future__ import annotations

import argparse
import ast
import pprint
import re
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.errors import CarelakeError, UsageError

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from pipelines.config import Config
    from pipelines.runner import JobSummary
    from pipelines.store import TableStore

FOLDER = Path(__file__).resolve().parents[1] / "notebooks"
KERNEL = {"name": "python3", "display_name": "Python 3 (carelake .venv)", "language": "python"}
PARAMETERS_TAG, INJECTED_TAG = "parameters", "injected-parameters"
MAX_BYTES = 1_500_000  # an executed notebook is committed: outputs stay small (downsampled plots, short tables)
SIMULATED_FEEDS = {"hl7": "*.hl7", "fhir": "*.json", "devices": "*.jsonl"}  # fhir/ndjson is a bulk-export copy


# Spark's log4j lines ("08:31:16 WARN BlockManager: ...", continuation lines of a WARN start with a tab or a
# space) and the JDK's notice about incubator modules.
_JVM_NOISE = re.compile(r"^(\d\d:\d\d:\d\d (WARN|INFO) |WARNING: Using incubator modules)")


class NotebookStop(CarelakeError):
    """A notebook ends here on purpose (e.g. its data folder is absent); the message says why and what to do."""


class NotebookFailed(CarelakeError):
    """A cell raised: the notebook, the cell and the error."""


# -- reading and parameters ----------------------------------------------------------------------------
def notebook_paths(names: Sequence[str] = ()) -> list[Path]:
    """notebooks/NN_*.py, all of them or those named (by file name, stem or number prefix)."""
    every = sorted(p for p in FOLDER.glob("[0-9][0-9]_*.py"))
    if not names:
        return every
    chosen = []
    for name in names:
        hits = [p for p in every if name in (p.name, p.stem, p.stem.split("_", 1)[0])]
        if not hits:
            raise UsageError(f"no notebook {name!r}: choose from {', '.join(p.stem for p in every)}")
        chosen += hits
    return list(dict.fromkeys(chosen))


def read(path: Path):
    """The notebook (nbformat) of a Jupytext percent script."""
    import jupytext

    if not path.is_file():
        raise UsageError(f"notebook script {path} does not exist")
    return jupytext.read(path, fmt="py:percent")


def parameter_names(nb) -> list[str]:
    """The names the notebook's `parameters` cell assigns."""
    cells = [c for c in nb.cells if c.cell_type == "code" and PARAMETERS_TAG in c.metadata.get("tags", [])]
    if len(cells) != 1:
        raise UsageError(f"a notebook needs exactly one code cell tagged {PARAMETERS_TAG!r} (found {len(cells)}): "
                         'start it with `# %% tags=["parameters"]`')
    tree = ast.parse(cells[0].source)
    return [t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
            if isinstance(t, ast.Name)]


def with_parameters(nb, params: Mapping[str, Any]):
    """The notebook with a cell after its parameters cell that sets `params` (each must be a parameter)."""
    import nbformat

    known = parameter_names(nb)
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise UsageError(f"unknown notebook parameter(s) {unknown}: this notebook takes {', '.join(known)}")
    if not params:
        return nb
    index = next(i for i, c in enumerate(nb.cells) if PARAMETERS_TAG in c.metadata.get("tags", []))
    # pformat wraps a long value (a SETTINGS dict) so the executed notebook stays within the line length ruff checks
    source = "# Parameters set for this run\n" + "\n".join(f"{k} = {pprint.pformat(v, width=110 - len(k))}"
                                                           for k, v in params.items())
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(source, metadata={"tags": [INJECTED_TAG]}))
    return nb


def parse_setting(text: str) -> tuple[str, Any]:
    """NAME=VALUE with VALUE a Python literal (a bare word is a string): --set PATIENTS=40 --set ROOT=/tmp/x."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip().isidentifier():
        raise UsageError(f"--set expects NAME=VALUE with NAME a notebook parameter (e.g. --set PATIENTS=40), "
                         f"got {text!r}")
    try:
        return name.strip(), ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name.strip(), value


# -- running -------------------------------------------------------------------------------------------
def run_in_process(path: Path, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Run the script's cells in this process (its SparkSession is joined); returns the namespace.

    A NotebookStop ends the run cleanly: its message is printed and `namespace["stopped"]` holds it."""
    nb = with_parameters(read(path), params or {})
    namespace: dict[str, Any] = {"__name__": "__main__", "__file__": str(path)}
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        try:
            exec(compile(cell.source, f"{path.name}[cell {index}]", "exec"), namespace)  # noqa: S102
        except NotebookStop as stop:
            print(str(stop))
            namespace["stopped"] = str(stop)
            break
    return namespace


def _kernel_manager(sockets: Path):
    """A kernel on this very interpreter (the project's .venv), whatever kernelspecs the machine has; its
    connection file and IPC sockets live in `sockets` (a private temporary folder), not unencrypted TCP."""
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec = KernelSpec(argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                      display_name=KERNEL["display_name"], language="python", resource_dir=str(FOLDER))

    class ThisInterpreter(KernelSpecManager):
        def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
            return spec

    return KernelManager(kernel_name=KERNEL["name"], kernel_spec_manager=ThisInterpreter(), transport="ipc",
                         connection_file=str(sockets / "kernel.json"))


def execute(path: Path, out: Path, params: Mapping[str, Any] | None = None, *, timeout: int = 1800) -> str | None:
    """Run the script on a Jupyter kernel and write the .ipynb with its outputs; returns the NotebookStop message
    when the notebook ended early on purpose, None when every cell ran. Any other error raises NotebookFailed."""
    import nbformat
    from nbclient import NotebookClient

    nb = with_parameters(read(path), params or {})
    nb.metadata["kernelspec"] = dict(KERNEL)
    nb.metadata.pop("jupytext", None)
    with tempfile.TemporaryDirectory(prefix="carelake-kernel-") as sockets:
        client = NotebookClient(nb, km=_kernel_manager(Path(sockets)), timeout=timeout, record_timing=False,
                                resources={"metadata": {"path": str(FOLDER.parent)}})
        stopped = _run_cells(client, nb, path)
    out.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(tidy(nb), out)
    return stopped


def tidy(nb):
    """Drop the JVM's own log lines (Spark WARN/INFO with a clock time, the JDK's incubator notice) from the
    kernel's stderr outputs: carelake's job summaries and warnings say what happened, and the notebook stays
    readable. ERROR lines and everything on stdout are kept."""
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        kept = []
        for output in cell.outputs:
            if output.get("output_type") == "stream" and output.get("name") == "stderr":
                lines = [ln for ln in output["text"].splitlines(keepends=True) if not _JVM_NOISE.match(ln)]
                if not "".join(lines).strip():
                    continue
                output["text"] = "".join(lines)
            kept.append(output)
        cell.outputs = kept
    return nb


def _run_cells(client, nb, path: Path) -> str | None:
    """Execute the code cells in order; stop at a NotebookStop (its message becomes the cell's output)."""
    import nbformat
    from nbclient.exceptions import CellExecutionError

    with client.setup_kernel():
        for index, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            try:
                client.execute_cell(cell, index)
            except CellExecutionError as exc:
                if exc.ename != NotebookStop.__name__:
                    raise NotebookFailed(f"{path.name}, cell {index}: {exc.ename}: {exc.evalue}\n"
                                         f"{cell.source[:300]}") from None
                cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=f"{exc.evalue}\n")]
                return exc.evalue
    return None


# -- what the notebooks share: the CLI's functions, called from Python ------------------------------------
def simulate_and_land(cfg: Config, spark: SparkSession, out: Path, *, patients: int, hours: int,
                      seed: int) -> Path:
    """`carelake simulate` (HL7, FHIR, monitors) then `carelake ingest` of each feed; returns the output folder."""
    from pipelines.landing import ingest
    from pipelines.simulator.params import resolve_params
    from pipelines.simulator.run import simulate

    params = resolve_params(cfg.simulator, out, patients=patients, hours=hours, seed=seed,
                            feeds=",".join(SIMULATED_FEEDS))
    print(simulate(spark, params).text())
    for feed, pattern in SIMULATED_FEEDS.items():
        files = sorted((params.out / feed).glob(pattern))
        if files:
            landed = ingest(cfg, files, feed)
            print(f"landed {len(landed)} {feed} file(s), {sum(f.bytes for f in landed):,} bytes")
    return params.out


def run_jobs(cfg: Config, spark: SparkSession, store: TableStore,
             names: Sequence[str] | None = None) -> list[JobSummary]:
    """`carelake run all --available-now` (or the named jobs): each job's summary line as it finishes."""
    from pipelines.jobs import load_registry
    from pipelines.runner import Runner, Trigger

    registry = load_registry(cfg)
    jobs = [j.name for j in registry.order(list(names) if names else None)]
    runner = Runner(cfg, spark, store, registry)
    return runner.run(jobs, Trigger(available_now=True), on_summary=lambda s: print(s.line(), flush=True))


def require_folder(folder: str | Path, what: str, hint: str) -> Path:
    """The folder, or a NotebookStop saying it is absent and how to get it."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise NotebookStop(f"{what} not found at {path.resolve()}: {hint}. The notebook stops here.")
    return path


# -- one small simulated lakehouse the notebooks share ---------------------------------------------------------
SIMULATION = "_simulation"  # a lakehouse a notebook built keeps the simulator's output (feeds, truth/) here ...
_SIMULATION_FOLDERS = (SIMULATION, "_demo_feeds")  # ... and one `carelake demo` built keeps it in _demo_feeds
LATE_FEEDS = ("dicom", "claims")  # not hourly files: they arrive with the second part of the window


def build_lakehouse(cfg: Config, spark: SparkSession, store: TableStore, *, patients: int, hours: int,
                    seed: int, arrivals: int = 2) -> Path:
    """A simulated hospital (every feed) through every job, as `carelake demo` sends it but with file drops: in two
    arrivals, the first two thirds of the window, then the rest with the imaging studies and the claims (so the
    tables have versions an audit can tell apart), or all at once (`arrivals=1`, one run of the jobs: the test
    suite's). Returns the simulation folder (its truth/ holds the labels)."""
    from pipelines.demo import split_by_hour
    from pipelines.landing import ingest
    from pipelines.simulator.params import resolve_params
    from pipelines.simulator.run import simulate

    params = resolve_params(cfg.simulator, cfg.root / SIMULATION, patients=patients, hours=hours, seed=seed,
                            feeds=",".join((*SIMULATED_FEEDS, *LATE_FEEDS)))
    print(simulate(spark, params).text())
    if arrivals not in (1, 2):
        raise UsageError(f"a notebook lakehouse is built in 1 or 2 arrivals, not {arrivals}")
    first, rest = split_by_hour(params.out, max(1, hours * 2 // 3) if arrivals == 2 else hours)
    rest.update({feed: [params.out / feed] for feed in LATE_FEEDS if (params.out / feed).is_dir()})
    for arrival, part in enumerate((first, rest) if arrivals == 2 else ({**first, **rest},), 1):
        for feed, paths in part.items():
            landed = ingest(cfg, paths, feed)
            print(f"arrival {arrival}: landed {len(landed)} {feed} file(s), {sum(f.bytes for f in landed):,} bytes")
        run_jobs(cfg, spark, store)
    return params.out


def simulation_folder(root: Path) -> Path | None:
    """The simulator's output a lakehouse was built from (a notebook's or the demo's), None when it has none."""
    return next((root / name for name in _SIMULATION_FOLDERS if (root / name / "truth").is_dir()), None)


def truth_file(simulation: Path | None, name: str, root: Path) -> Path:
    """truth/<name> of the lakehouse's simulation, or a NotebookStop saying where it was looked for."""
    path = simulation / "truth" / name if simulation else None
    if path is None or not path.is_file():
        raise NotebookStop(f"no ground truth truth/{name} under {root} ({' or '.join(_SIMULATION_FOLDERS)}): point "
                           "ROOT at a lakehouse `./dev demo` or a notebook built, or set ROOT = None to build one. "
                           "The notebook stops here.")
    return path


def require_table(store: TableStore, name: str, hint: str) -> None:
    """A NotebookStop when the lakehouse lacks the table the notebook is about, saying how to get it."""
    if not store.exists(name):
        raise NotebookStop(f"{name} does not exist under {store.cfg.root}: {hint}. The notebook stops here.")


def lakehouse(root: str | Path | None, env: str, settings: Mapping[str, Any], *, patients: int, hours: int,
              seed: int, arrivals: int = 2) -> tuple[Config, SparkSession, TableStore, Path | None]:
    """(cfg, spark, store, simulation folder) of ROOT, built there first (`build_lakehouse`) when it holds no
    tables yet; ROOT None = a new folder under a temp dir."""
    from pipelines.config import load_config
    from pipelines.spark import create_spark
    from pipelines.store import open_store

    folder = Path(root).expanduser() if root else Path(tempfile.mkdtemp(prefix="carelake-notebook-")) / "lake"
    cfg = load_config(env=env, root=folder, overrides=settings)
    spark = create_spark(cfg.spark)
    store = open_store(cfg, spark)
    built = not store.list_tables()
    simulation = (build_lakehouse(cfg, spark, store, patients=patients, hours=hours, seed=seed, arrivals=arrivals)
                  if built else simulation_folder(cfg.root))
    print(f"lakehouse at {cfg.root} (engine {store.engine}, {'built here' if built else 'as found'}); "
          f"simulation ground truth: {simulation / 'truth' if simulation else 'none'}")
    return cfg, spark, store, simulation


def setup_display(*, width: int = 180, colwidth: int = 100) -> None:
    """What the executed notebooks show: wide short tables, plots at 72 dpi (committed outputs stay small), no
    MLflow progress bars."""
    import os

    import matplotlib.pyplot as plt
    import pandas as pd

    for option, value in (("display.width", width), ("display.max_columns", 12), ("display.max_colwidth", colwidth),
                          ("display.max_rows", 30)):
        pd.set_option(option, value)
    plt.rcParams.update({"figure.dpi": 72})
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"


def short(key: Any) -> Any:
    """A pseudonymous key (or any long id), shortened for display."""
    return f"{key[:10]}..." if isinstance(key, str) and len(key) > 13 else key


# -- `./dev notebooks` ---------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="./dev notebooks", description="Execute notebooks/NN_*.py and write "
                                 "notebooks/NN_*.ipynb with their outputs (on a kernel of this interpreter).")
    ap.add_argument("names", nargs="*", help="notebooks to run (e.g. 01 or 02_deterioration_model); default all")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="override a parameter of the notebook(s) run, e.g. --set PATIENTS=40")
    ap.add_argument("--out", help="folder for the .ipynb files (default: beside the scripts)")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds one cell may take (default 1800)")
    a = ap.parse_args(argv)
    try:
        params = dict(parse_setting(s) for s in a.set)
        failures = 0
        for path in notebook_paths(a.names):
            out = (Path(a.out) if a.out else path.parent) / f"{path.stem}.ipynb"
            began = time.monotonic()
            print(f"{path.name}: running ...", flush=True)
            stopped = execute(path, out, params, timeout=a.timeout)
            size = out.stat().st_size
            how = f"stopped early: {stopped}" if stopped else "every cell ran"
            print(f"{path.name} -> {out} ({size / 1024:.0f} KiB) in {time.monotonic() - began:.0f} s; {how}")
            if size > MAX_BYTES:
                failures += 1
                print(f"{out.name} is {size / 1e6:.1f} MB, over {MAX_BYTES / 1e6:.1f} MB: keep committed outputs "
                      "small (fewer plot points, head() of tables)", file=sys.stderr)
        return 1 if failures else 0
    except CarelakeError as exc:
        print(f"carelake notebooks: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
