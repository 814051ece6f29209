"""What one score batch costs per person as their history grows: 1 h vs 12 h of a 1 Hz monitor behind it.

The score job keeps each person's state (gold.scoring: the last `gold.state_horizon` of readings row by row,
older ones as carries and feature-window snapshots) and a batch steps each touched person's state with the
batch's readings. This benchmark builds one ICU person's state from `--hours` of a 1 Hz monitor (6 vitals a
second, fed a minute per step as the stream would), then times `--steps` batches of 1 s of new readings each (the
continuous job's case): the step itself, and the state's round trip through the bytes the state store keeps.
Same run, same process, each history length in turn; medians. The goal (issue 23): the 12 h batch costs the
same as the 1 h one, within 10 %.

Run:  .venv/bin/python benchmarks/gold_history.py [--hours 1 12] [--steps 300]
"""

from __future__ import annotations

import argparse
import random
import time

import _common  # noqa: F401  (puts the repository on sys.path)
import numpy as np
import pandas as pd
from _common import emit, median, percentile

from gold import scoring
from pipelines.config import load_config

VITALS = (("hr", 80.0, 6.0), ("rr", 16.0, 1.5), ("spo2", 96.0, 1.0), ("sbp", 120.0, 8.0), ("temp", 37.0, 0.2),
          ("fio2", 21.0, 0.0))


def readings(start_us: int, seconds: int, rng: random.Random, serial: list[int]) -> pd.DataFrame:
    rows = []
    for s in range(seconds):
        t = start_us + s * 1_000_000
        for concept, mean, sd in VITALS:
            serial[0] += 1
            rows.append((f"{serial[0]:032x}", concept, None, round(rng.gauss(mean, sd), 1), None, "final", t,
                         "enc-1", False))
    return pd.DataFrame(rows, columns=scoring.ROW_COLUMNS)


def run(hours: float, steps: int, settings: scoring.Settings) -> dict:
    rng, serial = random.Random(7), [0]
    t0 = 1_767_225_600_000_000
    state = None
    minutes = int(hours * 60)
    for m in range(minutes):  # the history, a minute per step
        now = t0 + (m + 1) * 60_000_000
        state = scoring.step(state, readings(t0 + m * 60_000_000, 60, rng, serial), settings, person="P1",
                             now_us=now).state
    blob = state.dumps()
    step_s, trip_s = [], []
    at = t0 + minutes * 60_000_000
    for k in range(steps):
        batch = readings(at + k * 1_000_000, 1, rng, serial)
        started = time.perf_counter()
        loaded = scoring.PersonState.loads(blob)
        middle = time.perf_counter()
        out = scoring.step(loaded, batch, settings, person="P1", now_us=at + (k + 1) * 1_000_000)
        ended = time.perf_counter()
        blob = out.state.dumps()
        done = time.perf_counter()
        step_s.append(ended - middle)
        trip_s.append((middle - started) + (done - ended))
    return {"step_ms_p50": round(median(step_s) * 1e3, 3), "step_ms_p95": round(percentile(step_s, 0.95) * 1e3, 3),
            "state_roundtrip_ms_p50": round(median(trip_s) * 1e3, 3), "state_bytes": len(blob),
            "tail_rows": len(out.state.tail), "history_rows": serial[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hours", type=float, nargs="+", default=[1.0, 12.0])
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args()
    g = load_config(env="local", root="/tmp/carelake-bench-unused", environ={}).gold
    settings = scoring.Settings.of(g)
    figures: dict = {"benchmark": "gold_history", "steps": args.steps, "state_horizon": g.state_horizon}
    per = {}
    for hours in args.hours:
        per[hours] = run(hours, args.steps, settings)
        figures[f"h{hours:g}"] = per[hours]
    if len(args.hours) >= 2:
        first, last = per[args.hours[0]], per[args.hours[-1]]
        figures["step_ratio_longest_to_shortest"] = round(
            (last["step_ms_p50"] + last["state_roundtrip_ms_p50"])
            / (first["step_ms_p50"] + first["state_roundtrip_ms_p50"]), 3)
    figures["numpy"] = np.__version__
    emit(figures)


if __name__ == "__main__":
    main()
