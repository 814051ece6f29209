"""The imaging worklist: a study received -> on gold.imaging_worklist (continuous mode), and the batch refresh cost.

1. **Refresh** (available-now): a lakehouse holding `--history` read studies (orders, final reports) and `--open`
   unread ones with their orders, NEWS2 scores and open alerts for their patients; each run appends one final report
   and runs the worklist job once (one batch that recomputes the whole open set). Figure: the batch's seconds
   (ops.metrics duration), median over `--runs`.
2. **Latency** (continuous): `bronze.dicom_instances`, `silver.imaging_studies` and `gold.imaging_worklist` as
   continuous queries (`--interval`, default 1 s) in this process; every `--every` seconds a CT instance of a new
   study (its order already in silver.imaging_orders) is dropped into landing/dicom (`carelake ingest`'s code,
   fsynced); a thread polls the worklist table (delta-rs, every 50 ms) until the study is on it. Figure: received
   (landed) -> on the worklist, p50/p95/max over `--studies` studies after the first (the queries' start).

Beside them: where each study's time went (`hop_*`, from ops.metrics: landed -> the fused bronze/silver batch
committed, the worklist's trigger wait, its batch, committed -> seen), and each worklist step's median seconds per
path (`*_keyed_*`: by key on the driver; `*_whole_*`: whole tables), from the batches' `steps (s):` log lines.
`--spark-plan` makes every worklist batch run the whole-table Spark plan (as before session wlinc);
`--silver-spark-plan` every silver.imaging_studies batch its Spark plan (as before session 17).
Goal: p95 received -> on the worklist <= 5 s. Run:
  .venv/bin/python benchmarks/imaging_worklist.py [--history 2000] [--open 60] [--runs 5] [--studies 12]
                                                  [--every 6] [--interval 1s] [--spark-plan]
                                                  [--silver-spark-plan]
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from _common import emit, median, percentile, temp_config

GOAL_P95_S = 5.0
WORKLIST = "gold.imaging_worklist"
STUDIES_TABLE = "silver.imaging_studies"


def registry(cfg, spark_plan: bool = False, silver_spark_plan: bool = False):
    """The job registry; `spark_plan`: the worklist always runs its whole-table Spark plan (no driver path), as on
    main before session wlinc, with its steps logged; `silver_spark_plan`: silver.imaging_studies always runs its
    Spark plan (no driver path), as before session 17."""
    from pipelines.jobs import Registry, load_registry
    from tests import imaging_tables as t

    jobs = list(load_registry(cfg))
    if importlib.util.find_spec("silver.imaging_match") is None:
        jobs = [replace(j, options={**j.options, "match": t.accession_match}) if j.name == WORKLIST else j
                for j in jobs]
    if spark_plan:
        jobs = [replace(j, options={**j.options, "read_rows": None}) if j.name == WORKLIST else j for j in jobs]
    if silver_spark_plan:  # the job, and its copy inside the carrier's batches (streaming.fuse)
        def plan(j):
            return replace(j, options={**j.options, "read_rows": None}) if j.name == STUDIES_TABLE else j

        jobs = [replace(plan(j), fused=tuple(plan(d) for d in j.fused)) for j in jobs]
    return Registry(jobs)


def seed(spark, store, history: int, open_: int, now: datetime) -> None:
    """Read studies (history) and unread ones, with orders, reports, scores and alerts."""
    from gold import deterioration_alerts, early_warning_scores
    from silver.imaging_studies import SCHEMA as STUDIES
    from tests import imaging_tables as t

    studies, orders, reports, scores, alerts = [], [], [], [], []
    for k in range(history + open_):
        at = now - timedelta(hours=48) + timedelta(seconds=k * 48 * 3600 / (history + open_))
        patient, accession = f"p{k % 500}", f"H{k}"
        studies.append(t.study(f"1.9.{k}", patient, accession, at, "CT" if k % 3 else "CR",
                               "HEAD" if k % 2 else "CHEST"))
        orders.append(t.order(f"h{k}", patient, accession, at - timedelta(minutes=30),
                              ("STAT", "ASAP", "ROUTINE")[k % 3], ("ED", "ICU", "WARD", "OUTPATIENT")[k % 4],
                              text="stroke" if k % 7 == 0 else "follow up"))
        if k < history:
            reports.append(t.report(f"r{k}", accession, at + timedelta(minutes=50)))
        scores.append(t.score(patient, now - timedelta(minutes=k % 600), ("low", "medium", "high")[k % 3], k % 10))
    alerts += [t.alert(f"p{k}", now - timedelta(hours=1), "news2_high") for k in range(0, 500, 25)]
    t.write(spark, store, "silver.imaging_studies", studies, STUDIES)
    t.write(spark, store, "silver.imaging_orders", orders, t.ORDERS_SCHEMA)
    t.write(spark, store, "silver.imaging_reports", reports, t.REPORTS_SCHEMA)
    t.write(spark, store, "gold.early_warning_scores", scores, early_warning_scores.SCHEMA)
    t.write(spark, store, "gold.deterioration_alerts", alerts, deterioration_alerts.SCHEMA)


def _batches(store, job: str = WORKLIST) -> list[dict]:
    rows = [r for r in store.read_arrow("ops.metrics").to_pylist() if r["job"] == job]
    return sorted(rows, key=lambda r: r["started_at"])


class StepLog(logging.Handler):
    """The worklist batches' "steps (s): ..." log lines (gold.imaging_worklist / gold.imaging_keyed), parsed."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.batches: list[tuple[str, dict[str, float]]] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if "steps (s): " in text:
            mode = "keyed" if "(by key)" in text else "whole"
            part = text.split("steps (s): ", 1)[1].split(" (", 1)[0]
            self.batches.append((mode, {k: float(v) for k, v in (x.rsplit(" ", 1) for x in part.split(", "))}))

    @contextmanager
    def attached(self):
        logger = logging.getLogger("carelake.imaging")
        level = logger.level
        logger.addHandler(self)
        logger.setLevel(logging.INFO)
        try:
            yield self
        finally:
            logger.removeHandler(self)
            logger.setLevel(level)

    def figures(self, prefix: str) -> dict[str, float]:
        """Per path (keyed, whole) and step: the median seconds over the batches that took that path."""
        out = {}
        for mode in ("keyed", "whole"):
            runs = [steps for m, steps in self.batches if m == mode]
            for step in dict.fromkeys(k for r in runs for k in r):
                out[f"{prefix}_{mode}_{step}_s"] = round(median([r.get(step, 0.0) for r in runs]), 3)
            if runs:
                out[f"{prefix}_{mode}_batches"] = len(runs)
        return out


def hops(store, landed: dict[str, datetime], seen: dict[str, datetime]) -> dict[str, float]:
    """Where each study's time went, medians over the studies (ops.metrics): landed -> the fused bronze/silver batch
    committed; -> the next worklist batch started (trigger wait and planning); its seconds; committed -> seen by the
    poll."""
    bronze = [r for r in _batches(store, "bronze.dicom_instances") if r["rows_in"]]
    gold = _batches(store)
    parts: dict[str, list[float]] = {"silver": [], "wait": [], "batch": [], "poll": []}
    for uid, at in landed.items():
        b = next((r for r in bronze if r["finished_at"] > at), None)
        g = next((r for r in gold if b is not None and r["started_at"] >= b["finished_at"]), None)
        if b is None or g is None or uid not in seen:
            continue
        parts["silver"].append((b["finished_at"] - at).total_seconds())
        parts["wait"].append((g["started_at"] - b["finished_at"]).total_seconds())
        parts["batch"].append((g["finished_at"] - g["started_at"]).total_seconds())
        parts["poll"].append((seen[uid] - g["finished_at"]).total_seconds())
    names = {"silver": "hop_landed_to_silver_s", "wait": "hop_worklist_trigger_wait_s",
             "batch": "hop_worklist_batch_s", "poll": "hop_committed_to_seen_s"}
    return {names[k]: round(median(v), 2) for k, v in parts.items() if v}


def batch_seconds(store, jobs: tuple[str, ...]) -> dict[str, float]:
    """Per job: the median seconds of its batches that read something (ops.metrics), where each hop's time goes."""
    out = {}
    for job in jobs:
        seconds = [r["duration_ms"] / 1000 for r in _batches(store, job) if r["rows_in"]]
        if seconds:
            out[f"batch_s_median_{job}"] = round(median(seconds), 2)
            out[f"batches_{job}"] = len(seconds)
    return out


def refresh(spark, args) -> dict:
    from pipelines.runner import Runner, Trigger
    from pipelines.store import open_store
    from tests import imaging_tables as t

    cfg = temp_config()
    store = open_store(cfg, spark)
    now = datetime.now(UTC)
    seed(spark, store, args.history, args.open, now)
    runner = Runner(cfg, spark, store, registry(cfg, args.spark_plan, args.silver_spark_plan))
    with StepLog().attached() as steps:
        runner.run([WORKLIST], Trigger(available_now=True))  # the first batches read every version so far
        first = len(_batches(store))
        for k in range(args.runs):
            t.write(spark, store, "silver.imaging_reports", [t.report(f"x{k}", f"H{args.history + k}", now)],
                    t.REPORTS_SCHEMA)
            runner.run([WORKLIST], Trigger(available_now=True))
    seconds = [r["duration_ms"] / 1000 for r in _batches(store)[first:]]
    rows = store.read_arrow(WORKLIST).num_rows
    return {"refresh_batch_s_median": round(median(seconds), 2), "refresh_batches": len(seconds),
            "refresh_first_batch_s": round(sum(r["duration_ms"] for r in _batches(store)[:first]) / 1000, 2),
            "refresh_history_studies": args.history, "refresh_open_rows_after": rows, **steps.figures("refresh")}


def latency(spark, args) -> dict:
    """One continuous run in a fresh lakehouse: the seconds each study took from landed to on the worklist, and
    the median batch seconds of each imaging job."""
    from deltalake import DeltaTable

    from pipelines.landing import ingest
    from pipelines.runner import Runner, Trigger
    from pipelines.store import open_store
    from tests import imaging_tables as t
    from tests.test_gateway_dicom import ct_slice

    cfg = temp_config(**{"streaming.interval": args.interval, **dict(args.set)})
    store = open_store(cfg, spark)
    now = datetime.now(UTC)
    seed(spark, store, 200, 10, now)
    folder = Path(cfg.root) / "_bench"
    folder.mkdir()
    uids, results = [], {}
    for k in range(args.studies):
        ds = ct_slice(16, 16)
        ds.AccessionNumber, ds.PatientID, ds.BodyPartExamined = f"L{k}", f"MRN-L{k}", "HEAD"
        ds.StudyDate, ds.StudyTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
        ds.save_as(folder / f"{k}.dcm", enforce_file_format=True)
        uids.append(ds.StudyInstanceUID)
    orders = [t.order(f"l{k}", None, f"L{k}", now - timedelta(minutes=5), "STAT", "ED") for k in range(args.studies)]
    t.write(spark, store, "silver.imaging_orders", orders, t.ORDERS_SCHEMA)
    worklist_path = str(store.ref(WORKLIST).path)

    def on_worklist(uid: str) -> bool:
        if not DeltaTable.is_deltatable(worklist_path):
            return False
        keys = DeltaTable(worklist_path).to_pyarrow_table(columns=["worklist_key"]).column(0).to_pylist()
        return uid in keys

    landed_at, seen_at = {}, {}

    def drive() -> None:
        time.sleep(args.warmup)
        for k, uid in enumerate(uids):
            ingest(cfg, [str(folder / f"{k}.dcm")], "dicom")
            landed, landed_at[uid] = time.monotonic(), datetime.now(UTC)
            while not on_worklist(uid) and time.monotonic() - landed < 120:
                time.sleep(0.05)
            results[uid], seen_at[uid] = time.monotonic() - landed, datetime.now(UTC)
            time.sleep(max(0.0, args.every - results[uid]))
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=drive, daemon=True).start()
    jobs = ("bronze.dicom_instances", "silver.imaging_studies", WORKLIST)
    with StepLog().attached() as steps:
        Runner(cfg, spark, store, registry(cfg, args.spark_plan, args.silver_spark_plan)).run(
            list(jobs), Trigger(available_now=False, interval_ms=cfg.streaming.interval_ms))
    measured = uids[1:]
    return {"seconds": [results[u] for u in measured if u in results], **batch_seconds(store, jobs),
            **hops(store, {u: landed_at[u] for u in measured if u in landed_at}, seen_at),
            **steps.figures("latency")}


def latencies(spark, args) -> dict:
    """--latency-runs continuous runs: p50/p95/max of each, and their medians."""
    runs = [latency(spark, args) for _ in range(args.latency_runs)]
    p50s = [percentile(r["seconds"], 0.5) for r in runs]
    p95s = [percentile(r["seconds"], 0.95) for r in runs]
    out = {"latency_p50_s": round(median(p50s), 2), "latency_p95_s": round(median(p95s), 2),
           "latency_p50_s_runs": [round(x, 2) for x in p50s], "latency_p95_s_runs": [round(x, 2) for x in p95s],
           "latency_max_s": round(max(max(r["seconds"]) for r in runs), 2),
           "latency_studies_per_run": len(runs[0]["seconds"]), "latency_runs": len(runs), "interval": args.interval,
           "latency_goal_p95_s": GOAL_P95_S, "latency_goal_met": median(p95s) <= GOAL_P95_S}
    for key in sorted({k for r in runs for k in r if k.startswith(("batch", "hop_", "latency_"))}):
        values = [r[key] for r in runs if key in r]
        out[key] = round(median(values), 2)
    return out


def headers(spark, args) -> dict:
    """DICOM headers -> silver.imaging_studies, available-now: `--instances` small CT instances (10 a study) dropped
    into landing/dicom, then bronze.dicom_instances and silver.imaging_studies run (fused or not, as configured)."""
    from pipelines.landing import ingest
    from pipelines.runner import Runner, Trigger
    from pipelines.store import open_store
    from tests.test_gateway_dicom import ct_slice

    cfg = temp_config(**dict(args.set))
    store = open_store(cfg, spark)
    folder = Path(cfg.root) / "_bench"
    folder.mkdir()
    study = None
    for k in range(args.instances):
        ds = ct_slice(16, 16)
        study = ds.StudyInstanceUID if k % 10 == 0 else study
        ds.StudyInstanceUID = study
        ds.AccessionNumber, ds.PatientID = f"T{k // 10}", f"MRN-T{k // 10}"
        ds.save_as(folder / f"{k}.dcm", enforce_file_format=True)
    ingest(cfg, sorted(str(f) for f in folder.iterdir()), "dicom")
    t0 = time.perf_counter()
    runner = Runner(cfg, spark, store, registry(cfg, silver_spark_plan=args.silver_spark_plan))
    runner.run(["bronze.dicom_instances", STUDIES_TABLE], Trigger(available_now=True))
    seconds = time.perf_counter() - t0
    studies = store.read_arrow("silver.imaging_studies").num_rows
    return {"headers_instances": args.instances, "headers_studies": studies, "headers_s": round(seconds, 1),
            "headers_instances_per_s": round(args.instances / seconds, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--history", type=int, default=2000)
    p.add_argument("--open", type=int, default=60)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--studies", type=int, default=12)
    p.add_argument("--every", type=float, default=6.0)
    p.add_argument("--warmup", type=float, default=20.0)
    p.add_argument("--interval", default="1s")
    p.add_argument("--latency-runs", type=int, default=3)
    p.add_argument("--instances", type=int, default=1000, help="instances for the headers -> silver figure")
    p.add_argument("--only", nargs="+", choices=["refresh", "latency", "headers"],
                   default=["refresh", "latency", "headers"])
    p.add_argument("--spark-plan", action="store_true",
                   help="the worklist's whole-table Spark plan for every batch (no driver path): the old way")
    p.add_argument("--silver-spark-plan", action="store_true",
                   help="silver.imaging_studies' Spark plan for every batch (no driver path): before session 17")
    p.add_argument("--set", action="append", default=[], type=lambda kv: tuple(kv.split("=", 1)),
                   help="a configuration override for the latency and headers lakehouses, e.g. streaming.fuse=[]")
    args = p.parse_args()
    from pipelines.spark import create_spark

    spark = create_spark(temp_config().spark)
    figures = {"load_average_1m_start": round(os.getloadavg()[0], 1)}
    if "refresh" in args.only:
        figures.update(refresh(spark, args))
    if "latency" in args.only:
        figures.update(latencies(spark, args))
    if "headers" in args.only:
        figures.update(headers(spark, args))
    figures["load_average_1m_end"] = round(os.getloadavg()[0], 1)
    emit(figures)


if __name__ == "__main__":
    main()
