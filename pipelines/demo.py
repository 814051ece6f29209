"""The end-to-end demo on the embedded engine: land device readings, run every job, query, time-travel.

Run with `./dev demo` (or `python -m pipelines.demo --root DIR`). It drives the same `carelake`
commands a person would type, in one process, on a fresh demo lakehouse.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pipelines.cli import main as carelake

MARKER = ".carelake-demo"


def monitor_readings(patients: int, minutes: int, seed: int) -> list[str]:
    """Bedside-monitor JSON lines: heart rate, respiratory rate and SpO2 once a minute per bed."""
    rng = random.Random(seed)
    lines = []
    for p in range(patients):
        base_hr, base_rr, base_spo2 = rng.gauss(78, 8), rng.gauss(15, 2), rng.gauss(97, 1)
        for m in range(minutes):
            drift = math.sin(m / 30) * 3
            at = f"2026-11-21T03:{m // 60:02d}:{m % 60:02d}Z".replace("03:", f"{3 + m // 60:02d}:", 1)
            for code, value, unit in (("8867-4", base_hr + drift + rng.gauss(0, 2), "/min"),
                                      ("9279-1", base_rr + rng.gauss(0, 1), "/min"),
                                      ("59408-5", min(100.0, base_spo2 + rng.gauss(0, 0.5)), "%")):
                lines.append(json.dumps({"device_id": f"icu-bed-{p + 1:02d}", "patient_mrn": f"MRN{1000 + p}",
                                         "time": at, "code": code, "value": round(value, 1), "unit": unit}))
    return lines


def write_feed(folder: Path, seed: int) -> list[Path]:
    readings = monitor_readings(patients=12, minutes=30, seed=seed)
    half = len(readings) // 2
    first = folder / "monitors-0300.jsonl"
    first.write_text("\n".join(readings[:half]) + "\n")
    second = folder / "monitors-0315.jsonl"
    # A second gateway that ends lines with CRLF and sends two lines no parser can key.
    second.write_bytes(("\r\n".join(readings[half:]) + "\r\n{not json\r\n{\"time\":\"no device\"}\r\n").encode())
    return [first, second]


@contextlib.contextmanager
def gateway(base: list[str]) -> Iterator[str]:
    """`carelake gateway` on free ports in its own process; yields its HTTP URL, stops it cleanly."""
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", *base, "gateway", "--mllp-port", "0",
                             "--http-port", "0"], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        print(line.rstrip(), flush=True)
        if not line.startswith("carelake gateway:"):
            raise SystemExit("carelake demo: the gateway did not start (see its message above)")
        yield line.split("http=", 1)[1].split()[0]
    finally:
        proc.send_signal(signal.SIGTERM)
        print(proc.communicate(timeout=60)[0].rstrip(), flush=True)


def step(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def run(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="carelake-demo", description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="./demo-lakehouse", help="demo lakehouse folder (recreated each run)")
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args(argv)
    root = Path(a.root).resolve()
    if root.exists():
        if not (root / MARKER).exists():
            print(f"carelake demo: {root} exists and is not a demo lakehouse; choose another --root", file=sys.stderr)
            return 2
        shutil.rmtree(root)
    root.mkdir(parents=True)
    (root / MARKER).write_text("created by the carelake demo; safe to delete\n")
    base = ["--root", str(root), "--env", "local"]

    def cli(*args: str) -> None:
        rc = carelake([*base, *args])
        if rc != 0:
            raise SystemExit(rc)

    with tempfile.TemporaryDirectory() as tmp:
        files = write_feed(Path(tmp), a.seed)
        step("1. Start the gateway and send the first monitor file over HTTP (each batch fsynced, then 202)")
        with gateway(base) as http_url:
            cli("send", "--to", http_url, "--batch", "100", str(files[0]))
        step("2. Run every job once (available-now): landing -> bronze -> silver")
        cli("run", "all", "--available-now")
        step("3. A second file is dropped into landing (CRLF line ends, two broken lines); run again")
        cli("ingest", str(files[1]), "--feed", "devices")
        cli("run", "all", "--available-now")
    step("4. The tables")
    cli("tables")
    step("5. SQL: what bronze holds, by parse outcome (nothing rejected, nothing lost)")
    cli("sql", "select parse_status, count(*) as readings, count(distinct device_id) as devices "
               "from bronze.device_readings group by parse_status order by parse_status")
    step("6. Time travel: the same question as of version 0 (before the second file)")
    cli("sql", "select count(*) as readings from bronze.device_readings", "--as-of-version", "0")
    step("7. Lineage: every bronze row points at its landing file and byte offset, with its sha256")
    cli("sql", "select device_id, landing_position, substr(sha256, 1, 16) as sha256_prefix, "
               "decode(payload, 'UTF-8') as payload from bronze.device_readings "
               "where parse_status <> 'ok' order by landing_position")
    step("8. Silver: every reading normalized (LOINC code, UCUM unit), pseudonymous patient key, nothing lost")
    cli("sql", "select code, display, unit, count(*) as readings, round(avg(value), 1) as mean "
               "from silver.observations group by code, display, unit order by code")
    cli("sql", "select feed, reason, item, detail from silver.quarantine order by reason")
    print(f"data-quality report of the last batch: {root / '_reports' / 'dq' / 'silver.observations.html'}")
    step("9. Commit history and per-batch metrics")
    cli("history", "bronze.device_readings")
    cli("sql", "select job, batch_id, rows_in, rows_out, duration_ms, lag_ms from ops.metrics order by batch_id")
    print(f"\nDemo lakehouse at {root}. Try: carelake --root {root} sql \"select * from bronze.device_readings\"")
    return 0


if __name__ == "__main__":
    sys.exit(run())
