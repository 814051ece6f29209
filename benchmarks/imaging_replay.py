"""Imaging worklist vs FIFO vs order priority: simulated days through the reading room at several loads.

Simulates one 24 h day per seed with `carelake simulate --feeds hl7` (truth/ is always written; a day already under
`--dir` is reused), then replays the days (pipelines.imaging_replay.run_replay, the code of `carelake imaging
replay`) without a model and with a critical-finding model fitted on the other days' labels (`--model cross-day`).
Figures: per load and policy, the median across days (with the range) of the critical studies' median and p90 report
turnaround, their median wait, the other studies' median and p90, and each priority's share within its SLA. Run:
  .venv/bin/python benchmarks/imaging_replay.py [--seeds 11,12,13] [--dir /tmp/carelake-imaging-days]
                                                [--utilisation 0.8,0.9,1.0] [--radiologists 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from _common import REPO, emit, temp_config


def day(seed: int, folder: Path) -> Path:
    """truth/imaging.csv of the seed's simulated day, simulating it when absent."""
    truth = folder / f"seed{seed}" / "truth" / "imaging.csv"
    if not (truth.is_file() and (truth.parent / "ward_vitals.csv").is_file()):
        subprocess.run([str(REPO / ".venv" / "bin" / "carelake"), "simulate", "--out", str(truth.parents[1]),
                        "--seed", str(seed), "--feeds", "hl7", "--force"], check=True, stdout=subprocess.DEVNULL)
    return truth


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="11,12,13")
    ap.add_argument("--dir", default="/tmp/carelake-imaging-days")
    ap.add_argument("--utilisation", default=None, help="loads (default imaging.replay_utilisation)")
    ap.add_argument("--radiologists", type=int, default=None)
    a = ap.parse_args()
    from pipelines.imaging_replay import replay_acuity, run_replay

    cfg = temp_config()
    truths = [day(int(s), Path(a.dir)) for s in a.seeds.split(",")]
    loads = [float(u) for u in a.utilisation.split(",")] if a.utilisation else None
    began = time.perf_counter()
    figures = {model: run_replay(truths, cfg.imaging, radiologists=a.radiologists, utilisation=loads,
                                 model=None if model == "none" else model, acuity=replay_acuity(cfg),
                                 seed=cfg.models.seed)
               for model in ("none", "cross-day")}
    emit({"seeds": a.seeds, "load_average": os.getloadavg(), "replay_seconds": round(time.perf_counter() - began, 1),
          **figures})


if __name__ == "__main__":
    sys.exit(main())
