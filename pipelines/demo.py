"""The end-to-end demo on the embedded engine: a simulated hospital, from the gateway to alerts and a model.

`carelake demo` (or `./dev demo`): simulate a hospital's feeds, start the gateway, send the first part of the
window over MLLP (HL7 v2) and HTTP (FHIR, bedside monitors), run every job (landing -> bronze -> silver ->
gold scores and alerts), train the deterioration model on the simulator's labels and register it, send the
rest of the window and score it with the model, then print a summary and write an HTML report with plots.
It drives the same `carelake` commands a person would type, in one process, on a fresh demo lakehouse.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from pipelines.cli import main as carelake

MARKER = ".carelake-demo"
_HOUR = re.compile(r"^(\d{8}T\d{2})")


@contextlib.contextmanager
def gateway(base: list[str]) -> Iterator[tuple[str, str]]:
    """`carelake gateway` on free ports in its own process; yields (mllp URL, http URL), stops it cleanly."""
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", *base, "gateway", "--mllp-port", "0",
                             "--http-port", "0"], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        print(line.rstrip(), flush=True)
        if not line.startswith("carelake gateway:"):
            raise SystemExit("carelake demo: the gateway did not start (see its message above)")
        mllp = "mllp://" + line.split("mllp=", 1)[1].split()[0]
        yield mllp, line.split("http=", 1)[1].split()[0]
    finally:
        proc.send_signal(signal.SIGTERM)
        print(proc.communicate(timeout=120)[0].rstrip(), flush=True)


def split_by_hour(feeds: Path, first_hours: int) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
    """The simulator's hourly feed files, split into the first `first_hours` hours and the rest."""
    hours = sorted({m.group(1) for p in feeds.glob("*/*") if (m := _HOUR.match(p.name))})
    cut = set(hours[:first_hours])
    early: dict[str, list[Path]] = {}
    late: dict[str, list[Path]] = {}
    for feed, pattern in (("hl7", "*.hl7"), ("fhir", "*.json"), ("devices", "*.jsonl")):
        for path in sorted((feeds / feed).glob(pattern)):
            m = _HOUR.match(path.name)
            (early if m and m.group(1) in cut else late).setdefault(feed, []).append(path)
    return early, late


class Clock:
    def __init__(self) -> None:
        self.start = time.monotonic()
        self.steps: list[tuple[str, float]] = []

    def step(self, title: str) -> None:
        self.steps.append((title, time.monotonic()))
        print(f"\n=== [{time.monotonic() - self.start:6.0f} s] {title} ===", flush=True)


def run(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="carelake demo", description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="./demo-lakehouse", help="demo lakehouse folder (recreated each run)")
    ap.add_argument("--patients", type=int, default=120, help="patients in the simulated hospital (default 120)")
    ap.add_argument("--hours", type=int, default=30, help="length of the simulated window (default 30)")
    ap.add_argument("--train-hours", type=int, default=0,
                    help="hours sent before training the model (default: two thirds of the window)")
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args(argv)
    if a.patients < 20 or a.hours < 6:
        print("carelake demo: use at least --patients 20 and --hours 6 (the model needs deteriorations to learn "
              "from)", file=sys.stderr)
        return 2
    train_hours = a.train_hours or max(4, a.hours * 2 // 3)
    if not 1 <= train_hours < a.hours:
        print(f"carelake demo: --train-hours must be between 1 and {a.hours - 1}", file=sys.stderr)
        return 2
    root = Path(a.root).resolve()
    if root.exists():
        if not (root / MARKER).exists():
            print(f"carelake demo: {root} exists and is not a demo lakehouse; choose another --root", file=sys.stderr)
            return 2
        shutil.rmtree(root)
    root.mkdir(parents=True)
    (root / MARKER).write_text("created by the carelake demo; safe to delete\n")
    # ICU monitors every 30-60 s keep the demo inside ten minutes on two cores; a real feed sends every second.
    # imaging.clock=data: the worklist's waits and SLAs run on the simulated day's clock, not today's.
    base = ["--root", str(root), "--env", "local", "--set", "simulator.icu_cadence_min_s=30",
            "--set", "simulator.icu_cadence_max_s=60", "--set", "imaging.clock=data"]
    feeds = root / "_demo_feeds"
    clock = Clock()

    def cli(*args: str) -> None:
        rc = carelake([*base, *args])
        if rc != 0:
            raise SystemExit(rc)

    clock.step(f"1. Simulate a hospital: {a.patients} patients over {a.hours} h (seeded; ground truth kept apart)")
    cli("simulate", "--patients", str(a.patients), "--hours", str(a.hours), "--seed", str(a.seed),
        "--out", str(feeds), "--feeds", "hl7,fhir,devices,dicom,claims")
    early, late = split_by_hour(feeds, train_hours)

    def send(parts: dict[str, list[Path]], label: str) -> None:
        with gateway(base) as (mllp_url, http_url):
            if parts.get("hl7"):
                print(f"sending {len(parts['hl7'])} HL7 file(s) of the {label} over MLLP ...", flush=True)
                cli("send", "--to", mllp_url, "--connections", "4", *map(str, parts["hl7"]))
            rest = [str(p) for feed in ("fhir", "devices") for p in parts.get(feed, [])]
            if rest:
                print(f"sending {len(rest)} FHIR / monitor file(s) of the {label} over HTTP ...", flush=True)
                cli("send", "--to", http_url, "--connections", "4", "--batch", "1000", *rest)

    clock.step(f"2. Gateway up; the first {train_hours} h arrive over MLLP and HTTP (each acked after fsync)")
    send(early, f"first {train_hours} h")
    clock.step("3. Every job, available-now: landing -> bronze -> silver -> gold scores, alerts, imaging worklist")
    imaging_drop(base, feeds)
    cli("run", "all", "--available-now")
    clock.step("4. Train the deterioration model on the simulator's labels; register it (champion if it beats "
               "NEWS2)")
    from pipelines.config import load_config
    from pipelines.store.deltars import DeltaRsStore

    cfg = load_config(env="local", root=root)
    alerts_before = DeltaRsStore(cfg).version("gold.deterioration_alerts")
    from pipelines.training import print_training, train_deterioration

    result, uri = train_deterioration(cfg, DeltaRsStore(cfg), feeds / "truth" / "deteriorations.csv")
    print_training(result, cfg.models.alert_rate_per_100_patient_days, uri)
    imaging_train(cli, feeds / "truth" / "imaging.csv")
    clock.step(f"5. The last {a.hours - train_hours} h arrive, and the billing office's claims for the window; "
               "scores now carry the model's risk and version")
    send(late, f"last {a.hours - train_hours} h")
    claims_drop(base, feeds)
    cli("run", "all", "--available-now")
    fraud = claims_train(cfg, feeds / "truth" / "fraud_labels.csv")
    clock.step("6. What the clinical data team sees")
    from pipelines.report import claims_sections, demo_report, imaging_sections

    imaging = imaging_sections(cfg, feeds / "truth" / "imaging.csv")
    claims = claims_sections(cfg, feeds / "truth" / "fraud_labels.csv", *fraud)
    report = demo_report(cfg, result, out=root / "_reports" / "demo.html",
                         extra=(imaging[0] + claims[0], imaging[1] + claims[1]))
    print(report.text, flush=True)
    clock.step("7. SQL over gold, and time travel for the auditors")
    cli("sql", "select news2_band, count(*) as score_rows, count(distinct patient_key) as patients, "
               "round(avg(news2_score), 1) as mean_news2, sum(case when news2_partial then 1 else 0 end) as partial "
               "from gold.early_warning_scores group by news2_band order by mean_news2")
    cli("sql", "select level, status, count(*) as alerts from gold.deterioration_alerts "
               "group by level, status order by level, status")
    print("What did we know before the last hours arrived? The alerts table as of that version:")
    cli("sql", "select level, count(*) as alerts from gold.deterioration_alerts group by level order by level",
        "--as-of-version", str(alerts_before))
    if DeltaRsStore(cfg).exists("gold.imaging_worklist"):
        print("The imaging worklist, read first at the top (carelake sql):")
        cli("sql", "select rank, score, priority, modality, body_part, location_class, news2_band, waited_minutes "
                   "from gold.imaging_worklist where status = 'unread' order by rank limit 5")
    print(f"\nHTML report (plots): {report.path}")
    print(f"data-quality report: {root / '_reports' / 'dq' / 'silver.observations.html'}")
    print(f"Demo lakehouse at {root} ({time.monotonic() - clock.start:.0f} s). Try:\n"
          f"  carelake --root {root} sql \"select * from gold.deterioration_alerts where status = 'open'\"")
    return 0


def imaging_drop(base: list[str], feeds: Path) -> None:
    """The simulated modalities' DICOM files, as a PACS export dropped into landing/dicom (one summary line)."""
    if (feeds / "dicom").is_dir() and any((feeds / "dicom").iterdir()):
        rc = carelake(["-q", *base, "ingest", str(feeds / "dicom"), "--feed", "dicom"])
        if rc != 0:
            raise SystemExit(rc)


def claims_drop(base: list[str], feeds: Path) -> None:
    """The simulated claims (CSV lines and FHIR Claim/EOB Bundles), dropped into landing/claims (one summary line)."""
    if (feeds / "claims").is_dir() and any((feeds / "claims").iterdir()):
        rc = carelake(["-q", *base, "ingest", str(feeds / "claims"), "--feed", "claims"])
        if rc != 0:
            raise SystemExit(rc)


def claims_train(cfg, labels: Path) -> tuple:
    """(training result, None) for the claims fraud model, or (None, why not) when the claims cannot train it."""
    from pipelines.errors import UsageError
    from pipelines.store.deltars import DeltaRsStore
    from pipelines.training import print_fraud_training, train_fraud

    try:
        result, uri = train_fraud(cfg, DeltaRsStore(cfg), labels)
    except UsageError as exc:
        print(f"claims fraud model: not trained ({exc})", flush=True)
        return None, str(exc)
    print_fraud_training(result, uri)
    return result, ""


def imaging_train(cli, truth: Path) -> None:
    """The critical-finding model, when the simulation recorded ground-truth findings."""
    import csv

    with truth.open(newline="", encoding="utf-8") as f:
        columns = next(csv.reader(f), [])
    if "critical_finding" not in columns:
        print(f"critical-finding model: not trained ({truth.name} records no ground-truth findings)", flush=True)
        return
    cli("imaging", "train", "--labels", str(truth))


if __name__ == "__main__":
    sys.exit(run())
