"""`carelake imaging replay`: simulated days of studies through a reading room, three ways, at several loads.

A discrete-event simulation in plain Python (no Spark). Studies arrive at their study time (the simulator's
truth/imaging.csv); `imaging.replay_radiologists` radiologists share one worklist and a read takes the study's
modality's minutes (`imaging.replay_read_minutes`) times a pace. The pace is set per day so that the reading work of
the day's studies fills `utilisation` of the radiologists' time between the first and the last arrival (0.8: 80 %
busy on average; arrivals still bunch by day, so queues build in the afternoon and drain at night). Whenever a
radiologist is free they open the study the policy picks from those waiting:

- `fifo`: the longest waiting;
- `priority`: order priority alone (STAT, ASAP, ROUTINE, then no order), the longest waiting first within one;
- `worklist`: rank 1 of carelake's worklist at that moment (gold.imaging_rank.ranked, the function the gold job
  ranks with), with the critical-finding model's probabilities when one is given.

What the worklist sees of a study is what gold would: the order (priority, procedure, indication, location) and the
patient's NEWS2 band and open NEWS2 alerts when the study arrived, scored by gold.news2 from the simulator's charted
ward observations and ICU monitors' hourly sets (truth/ward_vitals.csv beside imaging.csv; without that file those
factors give no points and the figures say so).

Time-to-read is the report turnaround: from the study's time to the end of its read, when the report is signed and a
critical finding is phoned through (what departments measure and what the patient waits for); `wait` is the part a
ranking controls, from the study to the moment a radiologist opens it. Figures per policy: median and 90th
percentile turnaround of the studies with a critical finding (the truth's label) and of the others, the median wait
of the critical ones, and the share of each priority's studies reported within its SLA (what reordering costs).
The replay runs until every study is read.
"""

from __future__ import annotations

import csv
import heapq
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from gold import imaging_rank
from pipelines.errors import UsageError
from pipelines.timeutil import parse_timestamp

POLICIES = ("fifo", "priority", "worklist")
TRUTH_COLUMNS = ("accession_number", "patient_mrn", "procedure_code", "priority", "study_time", "study_instance_uid",
                 "indication_code", "indication_text", "location_class", "critical_finding")
VITALS_FILE = "ward_vitals.csv"


def _procedures() -> dict[str, tuple[str, str]]:
    """CPT code -> (modality, body part), from the simulator's procedure table."""
    from pipelines.simulator.clinical import IMAGING

    return {p.cpt: (p.modality, p.body_part) for p in IMAGING.values()}


def _rows(path: Path, required: Sequence[str], what: str) -> list[dict[str, str]]:
    if not path.is_file():
        raise UsageError(f"{path} not found: pass the simulator's DIR/truth/imaging.csv (carelake simulate --out DIR)")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or ())]
        if missing:
            raise UsageError(f"{path} lacks column(s) {missing}: it must come from a simulator that records {what}")
        return list(reader)


def read_truth(path: str | Path) -> list[dict[str, Any]]:
    """The studies of truth/imaging.csv (orders without a study are left out) as worklist items + `critical`."""
    path = Path(path)
    rows = [r for r in _rows(path, TRUTH_COLUMNS, "indications and ground-truth findings")
            if r["study_time"] and r["study_instance_uid"]]
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
                      "patient_key": r["patient_mrn"], "visit_number": r.get("visit_number") or None,
                      "available_at": at, "priority": r["priority"].upper() or None, "modality": modality,
                      "body_part": body_part,
                      "indication_codes": [r["indication_code"]] if r["indication_code"] else [],
                      "indication_text": r["indication_text"], "location_class": r["location_class"] or None,
                      "critical": r["critical_finding"] == "1"})
    if not items:
        raise UsageError(f"{path} holds no study (no row with a study_time and study_instance_uid)")
    return items


@dataclass(frozen=True)
class Acuity:
    """How the replay scores a patient's acuity as gold does: the NEWS2 chart, how long a score stays current, and
    how long a patient must stay out of an alert level before its alert resolves."""

    charts: Any
    current_for: timedelta
    resolve_after: timedelta
    levels: tuple[str, ...] = ("news2_medium", "news2_high")  # the NEWS2 alert levels gold raises (gold.alert_levels)


def replay_acuity(cfg: Any) -> Acuity:
    """The acuity settings of a configuration: gold's NEWS2 chart and alert resolution, imaging.news2_current_for."""
    return Acuity(cfg.gold.charts, timedelta(seconds=cfg.imaging.seconds("news2_current_for")),
                  timedelta(milliseconds=cfg.gold.alert_resolve_after_ms),
                  tuple(lv for lv in cfg.gold.alert_levels if lv in ALERT_BANDS))


def read_vitals(path: Path, acuity: Acuity) -> dict[str, list[tuple[datetime, str]]]:
    """visit_number -> [(charted at, NEWS2 band)] in time order, from truth/ward_vitals.csv."""
    from pipelines.simulator.acuity import VITALS_COLUMNS, news2_band

    by_visit: dict[str, list[tuple[datetime, str]]] = {}
    for n, r in enumerate(_rows(path, VITALS_COLUMNS, "charted ward and ICU monitor observations"), start=2):
        try:
            at = parse_timestamp(r["time"])
            values = {k: (r[k] or None) if k == "acvpu" else (float(r[k]) if r[k] else None)
                      for k in VITALS_COLUMNS[3:]}
        except (UsageError, ValueError) as exc:
            raise UsageError(f"{path} line {n}: {exc}") from None
        by_visit.setdefault(r["visit_number"], []).append((at, news2_band(values, acuity.charts)))
    return {v: sorted(sets) for v, sets in by_visit.items()}


ALERT_BANDS = {"news2_medium": ("medium", "high"), "news2_high": ("high",)}  # gold.deterioration_alerts' NEWS2 levels


def _open_alerts(scores: Sequence[tuple[datetime, str]], acuity: Acuity) -> list[str]:
    """The NEWS2 alert levels open after these scores (time order): a level opens at a score in it and resolves once
    a later score shows the patient out of it for `resolve_after` (gold.deterioration_alerts' episode rule; qSOFA
    and model alerts are not replayed)."""
    found = []
    for level in acuity.levels:
        bands = ALERT_BANDS[level]
        inside = [n for n, (_, b) in enumerate(scores) if b in bands]
        if not inside:
            continue
        after = scores[inside[-1] + 1:]
        if not after or after[-1][0] - after[0][0] < acuity.resolve_after:
            found.append(level)
    return found


def add_acuity(items: Sequence[dict[str, Any]], vitals: Mapping[str, list[tuple[datetime, str]]],
               acuity: Acuity) -> None:
    """Set each item's news2_band (the newest score at its arrival, if current) and open_alert_levels, in place."""
    for item in items:
        scores = [s for s in vitals.get(item.get("visit_number") or "", ()) if s[0] <= item["available_at"]]
        current = scores and item["available_at"] - scores[-1][0] <= acuity.current_for
        item["news2_band"] = scores[-1][1] if current else None
        item["open_alert_levels"] = _open_alerts(scores, acuity) if scores else []


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


@dataclass(frozen=True)
class Room:
    """Radiologists sharing one worklist: `radiologists` on duty by day, `night_radiologists` of them from
    `night_hours[0]` to `night_hours[1]` o'clock (UTC; None: the same all day); a read takes its modality's minutes
    (else `other`) times `pace`. A read begun before a shift ends is finished."""

    radiologists: int
    read_minutes: Mapping[str, float]
    pace: float = 1.0
    night_radiologists: int | None = None
    night_hours: tuple[int, int] = (20, 8)

    def read_time(self, item: Mapping[str, Any]) -> timedelta:
        minutes = self.read_minutes.get(item.get("modality") or "", self.read_minutes["other"])
        return timedelta(minutes=minutes * self.pace)

    def on_duty(self, at: datetime) -> int:
        """How many radiologists are on duty at this moment."""
        start, end = self.night_hours
        night = start <= at.hour or at.hour < end if start > end else start <= at.hour < end
        return self.radiologists if self.night_radiologists is None or not night else self.night_radiologists

    def next_duty(self, who: int, at: datetime) -> datetime:
        """When radiologist `who` (0-based) is next on duty from `at` (whole hours: shifts change on the hour)."""
        t = at
        while who >= self.on_duty(t):
            t = t.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
        return t

    def at_utilisation(self, items: Sequence[Mapping[str, Any]], utilisation: float) -> Room:
        """This room with the pace at which the items' reads fill `utilisation` of the radiologists' time on duty
        from the first arrival to the last."""
        times = [i["available_at"] for i in items]
        first, last = min(times), max(times)
        minutes = int((last - first).total_seconds() // 60)
        on_duty = sum(self.on_duty(first + timedelta(minutes=m)) for m in range(minutes))
        work = sum(replace(self, pace=1.0).read_time(i).total_seconds() / 60 for i in items)
        if on_duty <= 0 or work <= 0:
            raise UsageError("a replay at a utilisation needs studies spread over time (all arrive at once here)")
        return replace(self, pace=utilisation * on_duty / work)


def simulate(items: Sequence[dict[str, Any]], choose: Chooser, room: Room) -> dict[str, tuple[float, float]]:
    """study_instance_uid -> (minutes waited until opened, minutes from the study time to the end of its read)."""
    arrivals = sorted(items, key=lambda i: (i["available_at"], i["study_instance_uid"]))
    start = arrivals[0]["available_at"]
    free = [(room.next_duty(n, start), n) for n in range(room.radiologists)]  # (free from, radiologist): a heap
    heapq.heapify(free)
    waiting: list[dict[str, Any]] = []
    out: dict[str, tuple[float, float]] = {}
    nxt = 0
    while nxt < len(arrivals) or waiting:
        at, who = heapq.heappop(free)
        if not waiting and arrivals[nxt]["available_at"] > at:
            at = arrivals[nxt]["available_at"]
        if who >= room.on_duty(at):
            heapq.heappush(free, (room.next_duty(who, at), who))
            continue
        while nxt < len(arrivals) and arrivals[nxt]["available_at"] <= at:
            waiting.append(arrivals[nxt])
            nxt += 1
        pick = choose(waiting, at)
        waiting.remove(pick)
        done = at + room.read_time(pick)
        out[pick["study_instance_uid"]] = ((at - pick["available_at"]).total_seconds() / 60,
                                           (done - pick["available_at"]).total_seconds() / 60)
        heapq.heappush(free, (done, who))
    return out


def _median_p90(values: Sequence[float]) -> tuple[float | None, float | None]:
    import numpy as np

    if not values:
        return None, None
    return round(float(np.median(values)), 1), round(float(np.percentile(values, 90)), 1)


def _policy_figures(items: Sequence[Mapping[str, Any]], minutes: Mapping[str, tuple[float, float]],
                    ranking: imaging_rank.Ranking) -> dict[str, Any]:
    critical = [minutes[i["study_instance_uid"]] for i in items if i["critical"]]
    other = [minutes[i["study_instance_uid"]][1] for i in items if not i["critical"]]
    out = dict(zip(("critical_median_min", "critical_p90_min"), _median_p90([t for _, t in critical]), strict=True))
    out["critical_wait_median_min"] = _median_p90([w for w, _ in critical])[0]
    out.update(zip(("noncritical_median_min", "noncritical_p90_min"), _median_p90(other), strict=True))
    for priority in (*imaging_rank.PRIORITY_ORDER, None):
        mine = [i for i in items if i["priority"] == priority]
        if mine:
            sla = ranking.sla(priority).total_seconds() / 60
            met = sum(minutes[i["study_instance_uid"]][1] <= sla for i in mine)
            out[f"{(priority or 'no_order').lower()}_within_sla"] = round(met / len(mine), 3)
    return out


def replay(items: list[dict[str, Any]], ranking: imaging_rank.Ranking, room: Room, model: Any = None
           ) -> dict[str, Any]:
    """One day through one room: each policy's figures, as one JSON-ready mapping."""
    imaging_rank.prepare(items, ranking, model)
    out: dict[str, Any] = {"studies": len(items), "critical_studies": sum(i["critical"] for i in items),
                           "pace": round(room.pace, 3)}
    for policy in POLICIES:
        out[policy] = _policy_figures(items, simulate(items, chooser(policy, ranking), room), ranking)
    return out


def _spread(values: Sequence[float | None]) -> dict[str, Any]:
    """Median across days, with the range."""
    import numpy as np

    known = [v for v in values if v is not None]
    if not known:
        return {"median": None, "range": None}
    return {"median": round(float(np.median(known)), 3), "range": [min(known), max(known)]}


def summarise(days: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Each policy's figures as the median across days with their range; whether the worklist's median critical
    turnaround is below both others' on every day."""
    out: dict[str, Any] = {"pace": _spread([d["pace"] for d in days])}
    for policy in POLICIES:
        keys = days[0][policy].keys()
        out[policy] = {k: _spread([d[policy].get(k) for d in days]) for k in keys}

    def cuts(day: Mapping[str, Any]) -> bool:
        w = day["worklist"]["critical_median_min"]
        return w is not None and all(w < day[p]["critical_median_min"] for p in ("fifo", "priority"))

    out["worklist_cuts_critical_median_days"] = f"{sum(cuts(d) for d in days)}/{len(days)}"
    return out


@dataclass(frozen=True)
class Day:
    """One simulated day: its studies (with acuity when the truth has charted vitals) and where they came from."""

    truth: Path
    items: list[dict[str, Any]]
    acuity: bool


def load_day(truth: str | Path, acuity: Acuity) -> Day:
    """A truth/imaging.csv and, when present beside it, its ward_vitals.csv."""
    truth = Path(truth)
    items = read_truth(truth)
    vitals = truth.parent / VITALS_FILE
    if vitals.is_file():
        add_acuity(items, read_vitals(vitals, acuity), acuity)
    return Day(truth, items, vitals.is_file())


def _models(days: Sequence[Day], model: Any, ranking: imaging_rank.Ranking, seed: int) -> list[Any]:
    """The model each day is ranked with: the given one, or with model="cross-day" one fitted on the other days'
    studies and labels (a day never ranks with a model that saw its own findings)."""
    if model != "cross-day":
        return [model] * len(days)
    if len(days) < 2:
        raise UsageError("--model cross-day fits each day's model on the other days: pass at least two --truth files")
    from models.critical_finding import fit

    for d in days:
        imaging_rank.prepare(d.items, ranking, None)
    out = []
    for n in range(len(days)):
        train = [i for k, d in enumerate(days) if k != n for i in d.items]
        out.append(fit(train, [int(i["critical"]) for i in train], seed=seed))
    return out


def run_replay(truths: Sequence[str | Path], imaging: Any, *, radiologists: int | None = None,
               utilisation: Sequence[float] | None = None, model: Any = None, acuity: Acuity, seed: int = 42
               ) -> dict[str, Any]:
    """The CLI's replay: each truth file (a simulated day) through the configured room (flags override) at each
    utilisation, ranked by `imaging`'s worklist; figures per load as the median across days with their range."""
    loads = list(utilisation or imaging.replay_utilisation)
    if any(not 0 < u <= 2 for u in loads):
        raise UsageError(f"--utilisation must be shares of the radiologists' time above 0 and at most 2, got {loads}")
    day_staff = radiologists or imaging.replay_radiologists
    if day_staff < 1:
        raise UsageError(f"--radiologists must be at least 1, got {day_staff}")
    base = Room(day_staff, dict(imaging.replay_read_minutes),
                night_radiologists=min(imaging.replay_night_radiologists, day_staff),
                night_hours=tuple(imaging.replay_night_hours))
    ranking = imaging_rank.Ranking.of(imaging)
    days = [load_day(t, acuity) for t in truths]
    models = _models(days, model, ranking, seed)
    out: dict[str, Any] = {
        "days": [str(d.truth) for d in days], "studies": [len(d.items) for d in days],
        "critical_studies": [sum(i["critical"] for i in d.items) for d in days],
        "acuity_from_ward_vitals": [d.acuity for d in days], "radiologists": base.radiologists,
        "night_radiologists": base.night_radiologists, "night_hours_utc": list(base.night_hours),
        "read_minutes": dict(base.read_minutes),
        "critical_model_version": sorted({str(getattr(m, "version", None)) for m in models}),
        "time_to_read": "study time to the end of the read (report turnaround); wait: to the read's start",
        "loads": []}
    for load in loads:
        per_day = [replay(d.items, ranking, base.at_utilisation(d.items, load), m)
                   for d, m in zip(days, models, strict=True)]
        out["loads"].append({"utilisation": load, **summarise(per_day)})
    return out
