"""Latency, continuous mode: a reading received at the gateway -> its score row committed, and -> the alert committed.

A 1,000-bed hospital's monitors: `--rate` readings/s (default 1,000) POSTed to a real `carelake gateway` (its own
process, fsync on) by `--beds` monitors (default 100 beds x 6 vitals: HR, RR, SpO2, SBP, temperature, FiO2; no
ACVPU, so scores are partial on consciousness), `--posts` POSTs a second, while `carelake run all --continuous
--interval I` (its own process, same root) carries landing -> bronze -> silver -> gold. `--events` beds
deteriorate at known times during the measured window (RR 26-28, SpO2 89-90 %, SBP 85-88, HR 135-140, 38.5 C:
NEWS2 high and qSOFA 2) for `--episode` seconds, then recover, so alerts open and resolve.

Measured from the tables after the run, per reading of the measured window (event time >= its start):
received_at (gateway receipt, bronze) -> landing segment sealed (the rename that makes it visible to the bronze
query: the segment file's ctime) -> bronze commit -> silver.observations commit -> first gold.early_warning_scores
commit holding the score row (patient_key, scored_at = the reading's time; rows are re-MERGEd later, the first
insert counts) and, for each alert opened in the window, its first commit. A commit's time is the mtime of its
`_delta_log/<version>.json` (the moment it became visible). Score latency is per score row (one monitor frame),
from the newest receipt among its readings; alert latency from the newest receipt among the alert's
`observation_ids`. Batch durations per job come from the runner's log (kept under the root, see --keep).

`--upto bronze` (or `silver`) runs only the jobs up to that layer, on the same traffic: the floor of the earlier
hops when fewer queries share the cores, to tell what the architecture costs from what the score job costs.

Goal: p95 received -> score committed <= 2 s. Run:
  .venv/bin/python benchmarks/gold_latency.py [--seconds 60] [--rate 1000] [--interval 250ms] [--beds 100] [--keep]
                                              [--upto bronze|silver|gold]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from _common import REPO, emit, median, percentile, temp_config

from tests.conftest import carelake_cmd, carelake_env

GOAL_P95_S = 2.0
# (code, unit, normal range, deteriorated range): normal values score 0 in NEWS2 and qSOFA; deteriorated ones
# score RR 3, SpO2 3 (scale 1), SBP 3, HR 3, temperature 1 -> NEWS2 13 (high), qSOFA 2 (RR >= 22, SBP <= 100).
VITALS = (("8867-4", "/min", (70, 85), (135, 140)), ("9279-1", "/min", (14, 18), (26, 28)),
          ("59408-5", "%", (96, 99), (89, 90)), ("8480-6", "mm[Hg]", (115, 130), (85, 88)),
          ("8310-5", "Cel", (36.6, 37.4), (38.5, 38.5)), ("3150-0", "%", (21, 21), (21, 21)))
LEVELS_PER_EVENT = 3  # news2_medium, news2_high, qsofa
# --upto: the jobs the runner runs, and the table whose first commit ends the priming. The shorter pipelines
# measure the floor of the hops before gold: what the same traffic costs with fewer queries sharing the cores.
STAGES = {"bronze": ("bronze.device_readings",), "silver": ("bronze.device_readings", "silver.observations"),
          "gold": ("all",)}
PRIMED_BY = {"bronze": "bronze.device_readings", "silver": "silver.observations",
             "gold": "gold.deterioration_alerts"}
RUNNER_LINE = re.compile(r"carelake\.runner: (\S+) batch (\d+): ([\d,]+) \S+ in -> ([\d,]+) rows .* in ([\d.]+) s, "
                         r"lag ([\d.]+) s")


# -- processes -----------------------------------------------------------------------------------------------
class Proc:
    """A carelake subprocess in its own process group; stopped with SIGTERM, killed if it does not stop."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path, *, stdout_pipe: bool = False):
        self.args, self.env, self.log, self.stdout_pipe = args, env, log, stdout_pipe
        self.starts = 0
        self.start()

    def start(self) -> None:
        self.err = open(self.log, "a")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(carelake_cmd(*self.args), env=self.env, cwd=REPO, start_new_session=True,
                                     text=True, stdout=subprocess.PIPE if self.stdout_pipe else self.err,
                                     stderr=self.err)
        self.starts += 1

    def stop(self, timeout: float) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the main process only: the runner finishes its batch
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None or _group_alive(self.proc.pid):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # whatever is left: the JVM, Python workers
            except ProcessLookupError:
                pass
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.err.close()
        return self.proc.returncode


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def start_gateway(base: list[str], env: dict[str, str], logs: Path) -> tuple[Proc, str]:
    gw = Proc([*base, "gateway", "--mllp-port", "0", "--http-port", "0"], env, logs / "gateway.log",
              stdout_pipe=True)
    line = gw.proc.stdout.readline()
    if not line.startswith("carelake gateway:"):
        gw.stop(5)
        raise SystemExit(f"gateway did not start: {line!r}; see {gw.log}: {gw.log.read_text()[-2000:]}")
    return gw, line.split("http=", 1)[1].split()[0]


# -- the sender ----------------------------------------------------------------------------------------------
class Sender:
    """Frames of one bed's vitals, round-robin over the beds, `posts` POSTs a second at `rate` readings/s."""

    def __init__(self, url: str, rate: float, beds: int, posts: float, seed: int = 7):
        self.url, self.rate, self.beds, self.posts = url, rate, beds, posts
        self.rng = random.Random(seed)
        self.next_bed = 0
        self.sent = 0  # readings handed to a POST
        self.acked = 0  # readings answered 202
        self.frames_acked_measured = 0
        self.failed = 0
        self.post_ms: list[float] = []
        self.measure_from: datetime | None = None  # frames with a time at or after this are measured
        self.events: list[tuple[int, float, float]] = []  # (bed, from, to) in wall-clock seconds
        frames_per_post = rate / len(VITALS) / posts
        if frames_per_post > beds:
            raise SystemExit(f"{beds} beds cannot send {rate:g} readings/s in {posts:g} POSTs/s: a bed would "
                             f"send two frames in one POST (same time); raise --beds or --posts")

    def frame(self, bed: int, at: datetime) -> str:
        now = at.timestamp()
        bad = any(b == bed and start <= now < end for b, start, end in self.events)
        stamp = at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z"
        out = []
        for code, unit, normal, deteriorated in VITALS:
            lo, hi = deteriorated if bad else normal
            value = round(self.rng.uniform(lo, hi), 1)
            out.append(f'{{"device_id":"icu-bed-{bed:03d}","patient_mrn":"MRN{100000 + bed}","time":"{stamp}",'
                       f'"code":"{code}","value":{value},"unit":"{unit}"}}\n')
        return "".join(out)

    async def run(self, until: Callable[[], bool]) -> float:
        """Send on schedule until until() is true; returns the seconds spent."""
        t0 = time.monotonic()
        start_sent = self.sent
        tasks: set[asyncio.Task] = set()
        tick = 0
        while not until():
            tick += 1
            due = start_sent + int(self.rate * (time.monotonic() - t0))
            at = datetime.now(UTC)
            lines, frames = [], 0
            while self.sent < due:
                lines.append(self.frame(self.next_bed, at))
                self.next_bed = (self.next_bed + 1) % self.beds
                self.sent += len(VITALS)
                frames += 1
            if lines:
                measured = self.measure_from is not None and at >= self.measure_from
                task = asyncio.create_task(self.post("".join(lines).encode(), frames, measured))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.sleep(max(0.0, t0 + tick / self.posts - time.monotonic()))
        if tasks:
            await asyncio.gather(*tasks)
        return time.monotonic() - t0

    async def post(self, body: bytes, frames: int, measured: bool) -> None:
        t0 = time.perf_counter()
        try:
            async with self.session.post(self.url, data=body, headers={"Content-Type": "application/x-ndjson"}) as r:
                await r.read()
                ok = r.status == 202
        except Exception:  # noqa: BLE001 - counted, reported
            ok = False
        self.post_ms.append((time.perf_counter() - t0) * 1000)
        if ok:
            self.acked += frames * len(VITALS)
            if measured:
                self.frames_acked_measured += frames
        else:
            self.failed += frames * len(VITALS)


# -- reading the tables --------------------------------------------------------------------------------------
def table_path(cfg, name: str) -> Path:
    from pipelines.store.deltars import DeltaRsStore

    return DeltaRsStore(cfg).ref(name).path


def commit_times(path: Path) -> dict[int, float]:
    """Version -> when its commit file appeared (mtime of _delta_log/<version>.json), epoch seconds."""
    out = {}
    for f in (path / "_delta_log").glob("*.json"):
        if f.stem.isdigit():
            out[int(f.stem)] = f.stat().st_mtime
    return out


def first_inserts(path: Path, keys: list[str], columns: list[str]):
    """Change-feed rows inserted, one per key: the first commit holding it, with its commit time (pandas)."""
    import pyarrow as pa
    from deltalake import DeltaTable

    dt = DeltaTable(str(path))
    cdf = pa.table(dt.load_cdf(starting_version=0, columns=[*columns, "_change_type", "_commit_version"]))
    df = cdf.to_pandas()
    df = df[df["_change_type"] == "insert"].sort_values("_commit_version").drop_duplicates(keys, keep="first")
    times = commit_times(path)
    df["committed"] = df["_commit_version"].map(times)
    return df


def table_rows(path: Path, columns: list[str]):
    from deltalake import DeltaTable

    if not (path / "_delta_log").is_dir():
        return None
    return DeltaTable(str(path)).to_pyarrow_table(columns=columns).to_pandas()


def epoch(series):
    import pandas as pd

    s = pd.to_datetime(series, utc=True)
    return (s - pd.Timestamp(0, tz="UTC")).dt.total_seconds()


def stats(values, prefix: str) -> dict:
    values = [float(v) for v in values if v == v]  # drop NaN
    if not values:
        return {f"{prefix}_n": 0}
    return {f"{prefix}_p50_s": round(percentile(values, 0.5), 3), f"{prefix}_p95_s": round(percentile(values, 0.95), 3),
            f"{prefix}_max_s": round(max(values), 3), f"{prefix}_n": len(values)}


def landing_seal_time(landing_file: str) -> float:
    path = landing_file.removeprefix("file://").removeprefix("file:")
    try:
        return os.stat(path).st_ctime  # the seal is a rename, which sets ctime; nothing changes the file after
    except OSError:
        return float("nan")


def measure(cfg, measure_from: datetime, upto: str = "gold") -> dict:
    """Per reading, per score row and per alert: the commit times of each hop, from the tables (up to `upto`)."""
    cut = measure_from.timestamp()
    bronze = first_inserts(table_path(cfg, "bronze.device_readings"), ["landing_file", "landing_position"],
                           ["landing_file", "landing_position", "received_at"])
    if upto == "bronze":  # no silver: each bronze row (one reading) of the measured window
        rows = bronze.assign(received=epoch(bronze["received_at"]))
        rows = rows[rows["received"] >= cut].copy()
        rows["sealed"] = rows["landing_file"].map({f: landing_seal_time(f) for f in rows["landing_file"].unique()})
        return {"readings_measured": len(rows), **stats(rows["sealed"] - rows["received"], "hop_landing"),
                **stats(rows["committed"] - rows["sealed"], "hop_bronze"),
                **stats(rows["committed"] - rows["received"], "hop_landing_plus_bronze")}
    silver = first_inserts(table_path(cfg, "silver.observations"), ["observation_id"],
                           ["observation_id", "patient_key", "effective_at", "source_record", "received_at",
                            "source_feed"])
    silver = silver[silver["source_feed"] == "devices"].copy()
    silver["event"] = epoch(silver["effective_at"])
    silver = silver[silver["event"] >= cut].copy()
    silver["landing_file"] = silver["source_record"].map(lambda r: r["landing_file"])
    silver["landing_position"] = silver["source_record"].map(lambda r: r["landing_position"])
    silver["received"] = epoch(silver["received_at"])
    readings = silver.merge(bronze[["landing_file", "landing_position", "committed"]].rename(
        columns={"committed": "bronze_committed"}), on=["landing_file", "landing_position"], how="left")
    readings = readings.rename(columns={"committed": "silver_committed"})
    seals = {f: landing_seal_time(f) for f in readings["landing_file"].unique()}
    readings["sealed"] = readings["landing_file"].map(seals)
    if upto == "silver":
        return {"readings_measured": len(readings),
                "readings_without_bronze_commit": int(readings["bronze_committed"].isna().sum()),
                **stats(readings["sealed"] - readings["received"], "hop_landing"),
                **stats(readings["bronze_committed"] - readings["sealed"], "hop_bronze"),
                **stats(readings["silver_committed"] - readings["bronze_committed"], "hop_silver"),
                **stats(readings["silver_committed"] - readings["sealed"], "hop_sealed_to_silver"),
                **stats(readings["silver_committed"] - readings["received"], "received_to_silver")}

    scores = first_inserts(table_path(cfg, "gold.early_warning_scores"), ["patient_key", "scored_at"],
                           ["patient_key", "scored_at"])
    scores["scored"] = epoch(scores["scored_at"])
    points = readings.groupby(["patient_key", "event"]).agg(received=("received", "max"),
                                                           silver_committed=("silver_committed", "max"),
                                                           readings=("observation_id", "count")).reset_index()
    points = points.merge(scores[["patient_key", "scored", "committed"]].rename(
        columns={"scored": "event", "committed": "score_committed"}), on=["patient_key", "event"], how="left")

    alerts_path = table_path(cfg, "gold.deterioration_alerts")
    alerts = first_inserts(alerts_path, ["alert_id"], ["alert_id", "patient_key", "level", "opened_at",
                                                       "observation_ids"]) if (alerts_path / "_delta_log").is_dir() \
        else None
    alert_lat, alert_hop = [], []
    if alerts is not None and len(alerts):
        alerts["opened"] = epoch(alerts["opened_at"])
        alerts = alerts[alerts["opened"] >= cut]
        received = dict(zip(readings["observation_id"], readings["received"], strict=True))
        score_at = {(p, e): c for p, e, c in zip(points["patient_key"], points["event"], points["score_committed"],
                                                 strict=True)}
        for row in alerts.itertuples():
            ids = [] if row.observation_ids is None else list(row.observation_ids)
            # ids from before the window are older than the opening frame's own readings: they never set the newest
            newest = max((received[o] for o in ids if o in received), default=float("nan"))
            alert_lat.append(row.committed - newest)
            alert_hop.append(row.committed - score_at.get((row.patient_key, row.opened), float("nan")))
    n_alerts = 0 if alerts is None else len(alerts)

    score_lat = points["score_committed"] - points["received"]
    return {
        "readings_measured": len(readings), "score_rows_measured": len(points),
        "score_rows_missing": int(points["score_committed"].isna().sum()),
        "readings_without_bronze_commit": int(readings["bronze_committed"].isna().sum()),
        **stats(score_lat, "score_latency"),
        **stats(alert_lat, "alert_latency"), "alerts_opened": n_alerts,
        **stats(readings["sealed"] - readings["received"], "hop_landing"),
        **stats(readings["bronze_committed"] - readings["sealed"], "hop_bronze"),
        **stats(readings["bronze_committed"] - readings["received"], "hop_landing_plus_bronze"),
        **stats(readings["silver_committed"] - readings["bronze_committed"], "hop_silver"),
        # With streaming.fuse, silver commits inside the bronze batch (before bronze): this is that one hop.
        **stats(readings["silver_committed"] - readings["sealed"], "hop_sealed_to_silver"),
        **stats(points["score_committed"] - points["silver_committed"], "hop_gold"),
        **stats(alert_hop, "hop_alert"),
    }


def batch_summary(log: Path, offset: int) -> dict:
    """Per job, from the runner log written after `offset`: batches, median/p95 duration, median rows in, and
    the median duration of the first and last third of its batches (does a job slow down as tables grow?)."""
    with open(log, errors="replace") as f:
        f.seek(offset)
        text = f.read()
    by_job: dict[str, list[tuple[float, int]]] = {}
    for m in RUNNER_LINE.finditer(text):
        by_job.setdefault(m.group(1), []).append((float(m.group(5)), int(m.group(3).replace(",", ""))))
    out = {}
    for job, batches in sorted(by_job.items()):
        d = [b[0] for b in batches]
        third = max(1, len(d) // 3)
        out[job] = {"batches": len(d), "median_s": round(median(d), 2), "p95_s": round(percentile(d, 0.95), 2),
                    "median_rows_in": int(median([b[1] for b in batches])),
                    "first_third_median_s": round(median(d[:third]), 2),
                    "last_third_median_s": round(median(d[-third:]), 2)}
    return out


def bottleneck(f: dict, batches: dict, interval_ms: int) -> str:
    hops = {"landing (receipt -> segment sealed)": f.get("hop_landing_p50_s"),
            "bronze+silver (sealed -> silver commit)": f.get("hop_sealed_to_silver_p50_s"),
            "gold (silver -> score commit)": f.get("hop_gold_p50_s")}
    hops = {k: v for k, v in hops.items() if v is not None}
    if not hops:
        return "no figures"
    total = sum(max(0.0, v) for v in hops.values()) or 1.0
    name, worst = max(hops.items(), key=lambda kv: kv[1])
    job = {"bronze+silver": "bronze.device_readings", "gold": "gold.early_warning_scores",
           "landing": None}[name.split()[0]]
    text = f"{name}: p50 {worst:.2f} s of {total:.2f} s summed hop p50s ({worst / total:.0%})"
    if job and job in batches:
        b = batches[job]
        text += (f"; {job} batches take median {b['median_s']:.2f} s (p95 {b['p95_s']:.2f} s) for a median "
                 f"{b['median_rows_in']:,} rows in, against a {interval_ms} ms trigger (first third of its batches "
                 f"{b['first_third_median_s']:.2f} s, last third {b['last_third_median_s']:.2f} s)")
    return text


# -- the run -------------------------------------------------------------------------------------------------
def check_alive(runner: Proc, gw: Proc) -> None:
    """Stop the benchmark as soon as either process has died, with the runner's last error lines."""
    for p in (runner, gw):
        if p.proc.poll() is not None:
            p.err.flush()
            lines = [x for x in p.log.read_text(errors="replace").splitlines() if "error" in x.lower()]
            raise SystemExit(f"{p.log.stem} exited ({p.proc.returncode}) during the run: {lines[-3:]}; see {p.log}")


async def drive(a, http: str, cfg, runner: Proc, gw: Proc) -> dict:
    import aiohttp

    sender = Sender(f"{http}/devices", a.rate, a.beds, a.posts)
    primed_log = table_path(cfg, PRIMED_BY[a.upto]) / "_delta_log"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=16)) as session:
        sender.session = session
        # Priming: one frame per bed, then wait until every job has run once (its last table exists), so the
        # queries start on small batches. A runner that dies while its queries start is restarted (--restarts):
        # under load a Python streaming-source worker may miss Spark's 10 s connect-back deadline.
        t0 = time.monotonic()
        await sender.post("".join(sender.frame(b, datetime.now(UTC)) for b in range(a.beds)).encode(), a.beds, False)
        while not primed_log.is_dir():
            if gw.proc.poll() is not None or time.monotonic() - t0 > a.warmup_timeout:
                check_alive(runner, gw)
                raise SystemExit(f"the pipeline did not reach {a.upto} within {a.warmup_timeout} s; see {runner.log}")
            if runner.proc.poll() is not None:
                if runner.starts > a.restarts:
                    check_alive(runner, gw)
                runner.stop(5)
                runner.start()
            await asyncio.sleep(1.0)
        prime_s = time.monotonic() - t0
        # Warm-up: the measured traffic for --warmup seconds, then the measured window, without a pause.
        t1 = time.monotonic()
        await sender.run(lambda: check_alive(runner, gw) or time.monotonic() - t1 >= a.warmup)
        log_offset = runner.log.stat().st_size
        measure_from = datetime.now(UTC)
        sender.measure_from = measure_from
        start = measure_from.timestamp()
        span = a.seconds / (a.events + 1)
        sender.events = [(i * (a.beds // max(1, a.events)) % a.beds, start + span * (i + 1),
                          start + span * (i + 1) + min(a.episode, span * 0.8)) for i in range(a.events)]
        acked0, t2 = sender.acked, time.monotonic()
        sent_s = await sender.run(lambda: check_alive(runner, gw) or time.monotonic() - t2 >= a.seconds)
        acked = sender.acked - acked0
    return {"sender": sender, "measure_from": measure_from, "sent_s": sent_s, "acked": acked, "prime_s": prime_s,
            "log_offset": log_offset}


def wait_for_gold(cfg, measure_from: datetime, frames: int, alerts: int, timeout: float, alive) -> float:
    """Until gold holds a score row for every measured frame and the alerts opened, or the timeout."""
    import pandas as pd

    cut = pd.Timestamp(measure_from)
    t0 = time.monotonic()
    scores_path = table_path(cfg, "gold.early_warning_scores")
    alerts_path = table_path(cfg, "gold.deterioration_alerts")
    while time.monotonic() - t0 < timeout:
        alive()
        s = table_rows(scores_path, ["scored_at"])
        al = table_rows(alerts_path, ["opened_at"])
        have = 0 if s is None else int((pd.to_datetime(s["scored_at"], utc=True) >= cut).sum())
        opened = 0 if al is None else int((pd.to_datetime(al["opened_at"], utc=True) >= cut).sum())
        if have >= frames and opened >= alerts:
            return time.monotonic() - t0
        time.sleep(1.0)
    return float("nan")


# --upto bronze|silver: the table the run ends at, and the column that puts its rows in the measured window (a
# bronze row is one reading, received at or after the start; a silver one, a reading stamped at or after it).
LAST_TABLE = {"bronze": ("bronze.device_readings", "received_at"), "silver": ("silver.observations", "effective_at")}


def wait_for_rows(cfg, upto: str, measure_from: datetime, readings: int, timeout: float, alive) -> float:
    """Until the last table holds every measured reading (`readings`), or the timeout."""
    import pandas as pd

    table, column = LAST_TABLE[upto]
    cut = pd.Timestamp(measure_from)
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        alive()
        rows = table_rows(table_path(cfg, table), [column])
        if rows is not None and int((pd.to_datetime(rows[column], utc=True) >= cut).sum()) >= readings:
            return time.monotonic() - t0
        time.sleep(1.0)
    return float("nan")


def main() -> None:
    from pipelines.config import parse_duration_ms

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60, help="measured sending time (default 60)")
    ap.add_argument("--rate", type=float, default=1000, help="readings/s sent (default 1000)")
    ap.add_argument("--interval", default="250ms", help="the runner's --interval (default 250ms)")
    ap.add_argument("--beds", type=int, default=100, help="monitors; each sends a 6-vital frame (default 100)")
    ap.add_argument("--posts", type=float, default=10, help="POSTs a second (default 10)")
    ap.add_argument("--events", type=int, default=6, help="deteriorations during the measured window (default 6)")
    ap.add_argument("--episode", type=float, default=6, help="seconds each deterioration lasts (default 6)")
    ap.add_argument("--segment-age", default="200ms", help="gateway.segment_age (default 200ms)")
    ap.add_argument("--warmup", type=float, default=20, help="seconds at the rate before measuring (default 20)")
    ap.add_argument("--warmup-timeout", type=float, default=600, help="seconds for every job to run once")
    ap.add_argument("--restarts", type=int, default=3, help="runner restarts allowed before the rate phase")
    ap.add_argument("--drain-timeout", type=float, default=180, help="wait this long for gold to catch up")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more settings for both")
    ap.add_argument("--keep", action="store_true", help="keep the lakehouse root (and the logs in <root>/_bench)")
    ap.add_argument("--upto", choices=tuple(STAGES), default="gold",
                    help="run the jobs up to this layer only: the floor of the earlier hops (default gold)")
    ap.add_argument("--reanalyze", metavar="ROOT", help="only recompute the figures of a run kept with --keep")
    a = ap.parse_args()
    if a.reanalyze:
        root = Path(a.reanalyze)
        emit(analyze(root, json.loads((root / "_bench" / "run.json").read_text())))
        return
    interval_ms = parse_duration_ms(a.interval, "--interval")
    root = Path(tempfile.mkdtemp(prefix="carelake-bench-gold-latency-"))
    logs = root / "_bench"
    logs.mkdir()
    sets = [f"gateway.segment_age={a.segment_age}", *a.set]
    base = [x for s in sets for x in ("--set", s)]
    cfg = temp_config(root, **dict(s.split("=", 1) for s in sets))
    env = carelake_env(root, short_lived=False)
    gw = runner = None
    try:
        gw, http = start_gateway(base, env, logs)
        runner = Proc([*base, "run", *STAGES[a.upto], "--continuous", "--interval", a.interval], env,
                      logs / "runner.log")
        d = asyncio.run(drive(a, http, cfg, runner, gw))
        sender: Sender = d["sender"]
        expected_alerts = LEVELS_PER_EVENT * a.events
        if a.upto == "gold":
            drain_s = wait_for_gold(cfg, d["measure_from"], sender.frames_acked_measured, expected_alerts,
                                    a.drain_timeout, lambda: check_alive(runner, gw))
        else:
            drain_s = wait_for_rows(cfg, a.upto, d["measure_from"], sender.frames_acked_measured * len(VITALS),
                                    a.drain_timeout, lambda: check_alive(runner, gw))
        runner_rc = runner.stop(90)
        gw.stop(30)
        run = {
            "benchmark": "gold_latency", "upto": a.upto, "cores": os.cpu_count(), "interval_ms": interval_ms,
            "segment_age": a.segment_age, "settings": a.set, "rate_target": a.rate, "beds": a.beds,
            "posts_per_s": a.posts, "seconds": a.seconds, "warmup_s": a.warmup, "prime_s": round(d["prime_s"], 1),
            "runner_starts": runner.starts, "readings_sent": d["acked"], "readings_failed": sender.failed,
            "rate_achieved": round(d["acked"] / d["sent_s"], 1),
            "post_p50_ms": round(percentile(sender.post_ms, 0.5), 1),
            "post_p99_ms": round(percentile(sender.post_ms, 0.99), 1),
            "frames_measured": sender.frames_acked_measured, "deterioration_events": a.events,
            "alerts_expected": expected_alerts, "drain_s": round(drain_s, 1) if drain_s == drain_s else None,
            "runner_exit": runner_rc, "measure_from": d["measure_from"].isoformat(), "log_offset": d["log_offset"],
            "goal_score_p95_s": GOAL_P95_S, "root": str(root) if a.keep else None,
        }
        (logs / "run.json").write_text(json.dumps(run))
        figures = analyze(root, run)
    finally:
        for p in (runner, gw):
            if p is not None:
                p.stop(10)
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)
    emit(figures)


def analyze(root: Path, run: dict) -> dict:
    """The run's facts plus the figures measured from its tables and the runner's log."""
    cfg = temp_config(root, **{"gateway.segment_age": run["segment_age"]})
    figures = measure(cfg, datetime.fromisoformat(run["measure_from"]), run.get("upto", "gold"))
    batches = batch_summary(root / "_bench" / "runner.log", run["log_offset"])
    return {**{k: v for k, v in run.items() if k not in ("measure_from", "log_offset")},
            "load_1min": round(os.getloadavg()[0], 2), **figures, "batches": batches,
            "bottleneck": bottleneck(figures, batches, run["interval_ms"])}


if __name__ == "__main__":
    main()
