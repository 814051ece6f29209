"""`carelake imaging replay`: a simulated day of studies through a reading room of fixed capacity, three ways.

A discrete-event simulation in plain Python (no Spark): studies arrive at their study time (the simulator's
truth/imaging.csv); `imaging.replay_radiologists` radiologists each read `imaging.replay_reads_per_hour` studies an
hour (a fixed reading time); whenever one is free they take the next study the policy picks from those waiting:

- `fifo`: the longest waiting;
- `priority`: order priority alone (STAT, ASAP, ROUTINE, then no order), the longest waiting first within one;
- `worklist`: rank 1 of carelake's worklist at that moment (gold.imaging_rank.ranked, the function the gold job
  ranks with, with the critical-finding champion's probabilities when one is registered).

Time-to-read is from the study's time to the end of its read. The figures are the median and 90th percentile, in
minutes, for the studies with a critical finding (the truth's label) and for all studies; the replay runs until every
study is read. The replay knows what the truth file holds of each study (priority, procedure, indication, location);
a patient's NEWS2 band and alerts are not in it, so those factors give no points here.
"""

from __future__ import annotations

import csv
import heapq
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from gold import imaging_rank
from pipelines.errors import UsageError
from pipelines.timeutil import parse_timestamp

POLICIES = ("fifo", "priority", "worklist")
TRUTH_COLUMNS = ("accession_number", "patient_mrn", "procedure_code", "priority", "study_time", "study_instance_uid",
                 "indication_code", "indication_text", "location_class", "critical_finding")


def _procedures() -> dict[str, tuple[str, str]]:
    """CPT code -> (modality, body part), from the simulator's procedure table."""
    from pipelines.simulator.clinical import IMAGING

    return {p.cpt: (p.modality, p.body_part) for p in IMAGING.values()}


def read_truth(path: str | Path) -> list[dict[str, Any]]:
    """The studies of truth/imaging.csv (orders without a study are left out) as worklist items + `critical`."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path} not found: pass the simulator's DIR/truth/imaging.csv (carelake simulate --out DIR)")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in TRUTH_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise UsageError(f"{path} lacks column(s) {missing}: it must come from a simulator that records "
                             "indications and ground-truth findings")
        rows = [r for r in reader if r["study_time"] and r["study_instance_uid"]]
    procedures = _procedures()
    items = []
    for n, r in enumerate(rows, start=2):
        try:
            at = parse_timestamp(r["study_time"])
        except UsageError as exc:
            raise UsageError(f"{path} line {n}: study_time: {exc}") from None
        if r["critical_finding"] not in ("0", "1"):
            raise UsageError(f"{path} line {n}: critical_finding must be 1 or 0, got {r['critical_finding']!r}")
        modality, body_part = procedures.get(r["procedure_code"], (None, None))
        items.append({"study_instance_uid": r["study_instance_uid"], "accession_number": r["accession_number"],
                      "patient_key": r["patient_mrn"], "available_at": at,
                      "priority": r["priority"].upper() or None, "modality": modality, "body_part": body_part,
                      "indication_codes": [r["indication_code"]] if r["indication_code"] else [],
                      "indication_text": r["indication_text"], "location_class": r["location_class"] or None,
                      "critical": r["critical_finding"] == "1"})
    if not items:
        raise UsageError(f"{path} holds no study (no row with a study_time and study_instance_uid)")
    return items


Chooser = Callable[[list[dict[str, Any]], datetime], dict[str, Any]]


def chooser(policy: str, ranking: imaging_rank.Ranking) -> Chooser:
    """The policy's pick among the waiting studies at a time."""
    if policy == "fifo":
        return lambda queue, now: min(queue, key=lambda i: (i["available_at"], i["study_instance_uid"]))
    if policy == "priority":
        return lambda queue, now: min(queue, key=lambda i: (imaging_rank.priority_rank(i["priority"]),
                                                            i["available_at"], i["study_instance_uid"]))
    if policy == "worklist":
        return lambda queue, now: imaging_rank.ranked(queue, ranking, now)[0][1]
    raise UsageError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")


def simulate(items: Sequence[dict[str, Any]], choose: Chooser, radiologists: int, read_time: timedelta
             ) -> dict[str, float]:
    """study_instance_uid -> minutes from its study time to the end of its read."""
    arrivals = sorted(items, key=lambda i: (i["available_at"], i["study_instance_uid"]))
    start = arrivals[0]["available_at"]
    free = [(start, n) for n in range(radiologists)]  # (free from, radiologist): a heap
    waiting: list[dict[str, Any]] = []
    minutes: dict[str, float] = {}
    nxt = 0
    while nxt < len(arrivals) or waiting:
        at, who = heapq.heappop(free)
        if not waiting and arrivals[nxt]["available_at"] > at:
            at = arrivals[nxt]["available_at"]
        while nxt < len(arrivals) and arrivals[nxt]["available_at"] <= at:
            waiting.append(arrivals[nxt])
            nxt += 1
        pick = choose(waiting, at)
        waiting.remove(pick)
        done = at + read_time
        minutes[pick["study_instance_uid"]] = (done - pick["available_at"]).total_seconds() / 60
        heapq.heappush(free, (done, who))
    return minutes


def _figures(values: Sequence[float]) -> dict[str, float | None]:
    import numpy as np

    if not values:
        return {"median_min": None, "p90_min": None}
    return {"median_min": round(float(np.median(values)), 1), "p90_min": round(float(np.percentile(values, 90)), 1)}


@dataclass(frozen=True)
class Room:
    radiologists: int
    reads_per_hour: float

    @property
    def read_time(self) -> timedelta:
        return timedelta(hours=1 / self.reads_per_hour)


def replay(items: list[dict[str, Any]], ranking: imaging_rank.Ranking, room: Room, model: Any = None
           ) -> dict[str, Any]:
    """Each policy's time-to-read figures (critical studies and all), as one JSON-ready mapping."""
    imaging_rank.prepare(items, ranking, model)
    critical = {i["study_instance_uid"] for i in items if i["critical"]}
    out: dict[str, Any] = {"studies": len(items), "critical_studies": len(critical),
                           "radiologists": room.radiologists, "reads_per_hour": room.reads_per_hour,
                           "critical_model_version": getattr(model, "version", None)}
    span_h = (max(i["available_at"] for i in items) - min(i["available_at"] for i in items)).total_seconds() / 3600
    out["arrivals_per_hour"] = round(len(items) / span_h, 2) if span_h > 0 else None
    for policy in POLICIES:
        minutes = simulate(items, chooser(policy, ranking), room.radiologists, room.read_time)
        out[policy] = {"critical": _figures([m for k, m in minutes.items() if k in critical]),
                       "all": _figures(list(minutes.values()))}
    worklist = out["worklist"]["critical"]["median_min"]
    out["worklist_cuts_critical_median"] = worklist is not None and all(
        worklist < out[p]["critical"]["median_min"] for p in ("fifo", "priority"))
    return out


def run_replay(truth: str | Path, imaging: Any, *, radiologists: int | None, reads_per_hour: float | None,
               model: Any = None) -> Mapping[str, Any]:
    """The CLI's replay: the truth file, the configured room (flags override), the ranking of `imaging`."""
    room = Room(radiologists or imaging.replay_radiologists, reads_per_hour or imaging.replay_reads_per_hour)
    if room.radiologists < 1 or room.reads_per_hour <= 0:
        raise UsageError("--radiologists must be at least 1 and --reads-per-hour above 0")
    return replay(read_truth(truth), imaging_rank.Ranking.of(imaging), room, model)
