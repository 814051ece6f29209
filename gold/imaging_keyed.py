"""gold.imaging_worklist's driver path: a small batch refreshed in Python on the driver, reading silver by key.

A batch the runner sends through the driver (at most `storage.driver_write_max_rows` change rows) does not run the
Spark plan of gold.imaging_worklist, whose ~9 Spark jobs cost 1-3 s each on a loaded machine whatever the batch holds.
It recomputes only what its changes can move, with the same rules, and gives the same rows as the whole-table plan
(tests/test_imaging_incremental.py holds them equal):

1. **Seeds**: the study UIDs, accession numbers, order keys and numbers and patients the batch's imaging change rows
   name (pre-images too: a corrected accession number frees the old one); the worklist as committed (its unread
   studies and overdue orders: the open set); orders whose images fall due between the last batch's "now" (the
   rows' `as_of`) and this one's; studies with an open SLA breach.
2. **Closure**: silver.imaging_match pairs only within one accession number, then within one patient, so the match
   of some orders and studies is exact when they include every order and study of each accession number and patient
   they name. Orders and studies are read by those keys (delta-rs, at the versions the batch pinned), their own
   accession numbers and patients added, until a read names nothing new; then the reports that can mark them read.
3. **The same steps as the whole-table plan** on those rows: the match (`match_rows`, the rule in Python), first
   final reads, the open set, the patients' current NEWS2 and open alerts (read by patient), the ranking of the
   whole open set (gold.imaging_rank: ranks and waited points move with "now" every batch), the SLA breaches.

The first batch of a query (a new or reset checkpoint), an empty worklist and a batch the runner sends through the
executors take the whole-table plan instead: removing `_checkpoints/gold.imaging_worklist` and running the job
rebuilds the worklist from scratch.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from gold import imaging_rank
from gold import imaging_worklist as w
from pipelines.timeutil import Steps

log = logging.getLogger("carelake.imaging")
# The change-feed columns that name what a batch touched (absent ones are skipped).
KEY_COLUMNS = ("study_instance_uid", "accession_number", "order_key", "order_number", "report_key", "patient_key")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ReadRows = Callable[..., pa.Table]  # (table, version, where | None, columns, since=(column, time) | None)


class Reader:
    """Rows of the batch's pinned table versions, as dicts (an absent table has none)."""

    def __init__(self, read_rows: ReadRows, versions: Mapping[str, int | None]):
        self.read_rows, self.versions, self.rows_read = read_rows, versions, 0

    def rows(self, table: str, columns: Iterable[str], where: pc.Expression | None = None,
             since: tuple[str, datetime] | None = None) -> list[dict[str, Any]]:
        if self.versions.get(table) is None:
            return []
        got = self.read_rows(table, self.versions[table], where, list(columns), since=since).to_pylist()
        self.rows_read += len(got)
        return got


def any_of(**keys: Iterable[Any]) -> pc.Expression | None:
    """column IN values, OR-ed over the columns given a non-empty set (None: nothing to look for)."""
    terms = [pc.field(c).isin(sorted(v)) for c, v in keys.items() if v]
    if not terms:
        return None
    out = terms[0]
    for more in terms[1:]:
        out = out | more
    return out


def seeds(changes: list[dict[str, Any]]) -> dict[str, set[str]]:
    """Per key column, the values the batch's imaging change rows name (a score row names only a patient: it moves
    the patient's NEWS2, never a match)."""
    imaging = [r for r in changes if any(r.get(k) is not None for k in ("study_instance_uid", "order_key",
                                                                        "report_key"))]
    return {k: {r[k] for r in imaging if r.get(k) is not None} for k in KEY_COLUMNS}


def closure(read: Reader, named: Mapping[str, set[str]]) -> tuple[dict[str, dict], dict[str, dict], int]:
    """Orders and studies (by key) of every accession number and patient the seeds lead to; and the reads taken."""
    orders: dict[str, dict] = {}
    studies: dict[str, dict] = {}
    accessions, patients = set(named["accession_number"]), set(named["patient_key"])
    o_where = any_of(order_key=named["order_key"], order_number=named["order_number"], accession_number=accessions,
                     patient_key=patients)
    s_where = any_of(study_instance_uid=named["study_instance_uid"], accession_number=accessions,
                     patient_key=patients)
    rounds = 0
    while o_where is not None or s_where is not None:
        rounds += 1
        for r in read.rows(w.ORDERS, w.ORDER_COLUMNS, o_where) if o_where is not None else ():
            orders.setdefault(r["order_key"], r)
        for r in read.rows(w.STUDIES, w.STUDY_COLUMNS, s_where) if s_where is not None else ():
            studies.setdefault(r["study_instance_uid"], r)
        rows = [*orders.values(), *studies.values()]
        new_a = {r["accession_number"] for r in rows if r["accession_number"] is not None} - accessions
        new_p = {r["patient_key"] for r in rows if r["patient_key"] is not None} - patients
        accessions |= new_a
        patients |= new_p
        o_where = s_where = any_of(accession_number=new_a, patient_key=new_p)
    return orders, studies, rounds


def everything(read: Reader) -> tuple[dict[str, dict], dict[str, dict]]:
    """Every order and study (the whole-table case)."""
    return ({r["order_key"]: r for r in read.rows(w.ORDERS, w.ORDER_COLUMNS)},
            {r["study_instance_uid"]: r for r in read.rows(w.STUDIES, w.STUDY_COLUMNS)})


def matched(orders: Mapping[str, dict], studies: Mapping[str, dict], window: timedelta) -> list[dict]:
    """w.matched_orders on rows: each order with its study (or None) and match method."""
    from silver.imaging_match import match_rows

    pairs = {o: (s, m) for o, s, m in match_rows(list(orders.values()), list(studies.values()), window=window)
             if o is not None}
    return [{**o, "study_instance_uid": pairs[k][0], "match_method": pairs[k][1]} for k, o in orders.items()]


def final_reads(reports: list[dict], studies: Mapping[str, dict], orders: list[dict]) -> dict[str, tuple]:
    """w.final_reads on rows: study UID -> (read_at, report_key) of its first final report, linked by study UID,
    accession number, or the number of the order matched to the study."""
    by_accession: dict[str, list[str]] = {}
    for uid, s in studies.items():
        if s["accession_number"] is not None:
            by_accession.setdefault(s["accession_number"], []).append(uid)
    by_number: dict[str, list[str]] = {}
    for o in orders:
        if o["study_instance_uid"] is not None and o["order_number"] is not None:
            by_number.setdefault(o["order_number"], []).append(o["study_instance_uid"])
    first: dict[str, tuple] = {}
    for r in reports:
        if (r["status"] or "").lower() not in w.READ_STATUSES or r["read_at"] is None:
            continue
        uids = [r["study_instance_uid"]] if r["study_instance_uid"] is not None else []
        uids += by_accession.get(r["accession_number"], []) + by_number.get(r["order_number"], [])
        for uid in uids:
            first[uid] = min(first.get(uid, (r["read_at"], r["report_key"])), (r["read_at"], r["report_key"]))
    return first


def study_items(studies: Mapping[str, dict], orders: list[dict], reads: Mapping[str, tuple]) -> list[dict]:
    """w.study_items on rows: every study with its matched order's columns, and read_at/report_key if read."""
    by_study = {o["study_instance_uid"]: o for o in orders if o["study_instance_uid"] is not None}
    items = []
    for uid, s in studies.items():
        o = by_study.get(uid, {})
        read_at, report_key = reads.get(uid, (None, None))
        items.append({**s, **{c: o.get(c) for c in ("order_key", "order_number", "procedure_display", "priority",
                                                      "indication_text", "indication_codes", "ordered_at",
                                                      "location_class")},
                      "order_accession": o.get("accession_number"), "order_match": o.get("match_method") or w.NO_ORDER,
                      "read_at": read_at, "report_key": report_key,
                      "available_at": s["study_time_utc"] or s["first_received_at"]})
    return items


def _micros(t: datetime) -> int:
    return (t - EPOCH) // timedelta(microseconds=1)


def _plus_seconds(start: datetime | None, priority: str | None, seconds: Mapping[str, int], default: int
                  ) -> tuple[datetime | None, int]:
    """w._plus_seconds on a row: start + the seconds of its priority, and those seconds."""
    wait = seconds.get(priority or "", default)
    return (None if start is None else start + timedelta(seconds=wait)), wait


def overdue_orders(orders: list[dict], expected_s: Mapping[str, int], now: datetime) -> list[dict]:
    """w.overdue_orders on rows."""
    out = []
    for o in orders:
        if o["study_instance_uid"] is None and (o["status"] or "").lower() == "active":
            due, _ = _plus_seconds(o["ordered_at"], o["priority"], expected_s, max(expected_s.values()))
            if due is not None and due < now:
                out.append({**o, "sla_due_at": due})
    return out


def breaches(items: list[dict], ranking: imaging_rank.Ranking, now: datetime, keep: set[str],
             provenance: Mapping[str, Any]) -> list[dict]:
    """w.breaches on rows: the SLA breaches of the items that are unread past due, or read late and in `keep`."""
    sla_s = {p: ms // 1000 for p, ms in ranking.sla_ms.items()}
    out = []
    for i in items:
        opened, wait = _plus_seconds(i["available_at"], i["priority"], sla_s, ranking.no_order_sla_ms // 1000)
        read_at = i["read_at"]
        if opened is None or not opened < (read_at or now) or (read_at is not None and
                                                                i["study_instance_uid"] not in keep):
            continue
        closed = read_at is not None
        out.append({
            "breach_id": hashlib.sha256(f"sla|{i['study_instance_uid']}".encode()).hexdigest(),
            "study_instance_uid": i["study_instance_uid"], "accession_number": i["accession_number"],
            "patient_key": i["patient_key"], "order_key": i["order_key"], "priority": i["priority"],
            "sla_minutes": wait * 1_000_000 / 60e6, "available_at": i["available_at"], "opened_at": opened,
            "closed_at": read_at, "status": "closed" if closed else "open",
            "report_key": i["report_key"] if closed else None,
            "minutes_past_sla": (_micros(read_at) - _micros(opened)) / 60e6 if closed else None, **provenance})
    return out


def unchanged(breach: Mapping[str, Any], stored: Mapping[str, Any] | None) -> bool:
    """Whether a breach row is one the table holds already: the MERGE would leave it as it is (its update_when),
    so it is not written at all, and a batch whose open breaches stay open commits nothing to the table."""
    return stored is not None and all(breach[k] == stored[k] for k in w.BREACH_CONTENT)


def touched(changes: list[dict], items: list[dict]) -> set[str]:
    """w.touched_studies on rows: the items the change rows name by study UID, accession or order number."""
    named = {k: {r[k] for r in changes if r.get(k) is not None}
             for k in ("study_instance_uid", "accession_number", "order_number")}
    return {i["study_instance_uid"] for i in items if any(i.get(k) in v for k, v in named.items())}


def patient_context(read: Reader, patients: set[str], now: datetime, news2_current_s: int
                    ) -> dict[str, dict[str, Any]]:
    """w.patient_context read by patient with delta-rs: current NEWS2 and open alert levels."""
    out: dict[str, dict[str, Any]] = {k: {} for k in patients}
    if not patients:
        return out
    since = now - timedelta(seconds=news2_current_s)
    keys = pc.field("patient_key").isin(sorted(patients))
    scores = read.rows(w.SCORES, ("patient_key", "scored_at", "news2_band", "news2_score"),
                       keys & (pc.field("scored_at") >= pc.scalar(since)) & (pc.field("scored_at") <= pc.scalar(now)),
                       since=("scored_at", since))
    newest: dict[str, dict] = {}
    for s in scores:
        if s["patient_key"] not in newest or s["scored_at"] > newest[s["patient_key"]]["scored_at"]:
            newest[s["patient_key"]] = s
    for k, s in newest.items():
        got = {"news2_band": s["news2_band"], "news2_score": s["news2_score"], "news2_scored_at": s["scored_at"]}
        out[k].update({n: v for n, v in got.items() if v is not None})
    levels: dict[str, set[str]] = {}
    for a in read.rows(w.ALERTS, ("patient_key", "level", "status"), keys & (pc.field("status") == "open")):
        levels.setdefault(a["patient_key"], set()).add(a["level"])
    for k, found in levels.items():
        out[k]["open_alert_levels"] = sorted(v for v in found if v is not None)
    return out


def data_clock(read: Reader) -> datetime | None:
    """w.data_clock: the newest event time among the studies, orders and reports."""
    found = [s["study_time_utc"] or s["first_received_at"]
             for s in read.rows(w.STUDIES, ("study_time_utc", "first_received_at"))]
    found += [o["ordered_at"] for o in read.rows(w.ORDERS, ("ordered_at",))]
    found += [r["read_at"] for r in read.rows(w.REPORTS, ("read_at",))]
    return max((t for t in found if t is not None), default=None)


def refresh(changes: list[dict[str, Any]], *, read: Reader, whole: bool, processed_at: datetime,
            ingest_batch_id: str, ranking: imaging_rank.Ranking, images_expected_s: Mapping[str, int],
            match_window: timedelta, news2_current_s: int, clock: str, critical_model: Callable[[], Any],
            schemas: tuple[pa.Schema, pa.Schema]) -> dict[str, pa.Table]:
    """A batch's change rows -> the worklist (rows that left it marked `left`) and the SLA breaches that opened or
    closed, as Arrow tables of `schemas` (worklist, breaches). `whole`: read every order and study (no seeds)."""
    steps = Steps()
    now = processed_at.astimezone(UTC) if clock == "wall" else (data_clock(read) or processed_at.astimezone(UTC))
    before = read.rows(w.WORKLIST, ("worklist_key", "status", "study_instance_uid", "order_key", "as_of"))
    stored = {b["breach_id"]: b for b in read.rows(w.BREACHES, ("breach_id", "study_instance_uid", *w.BREACH_CONTENT),
                                                    pc.field("status") == "open")}
    open_breaches = {b["study_instance_uid"] for b in stored.values()}
    steps.done("state")
    whole = whole or not before  # no as_of to bound the orders falling due by: read everything
    if whole:
        orders, studies = everything(read)
        reports, rounds = read.rows(w.REPORTS, w.REPORT_COLUMNS), 1
    else:
        named = seeds(changes)
        named["study_instance_uid"] |= {r["study_instance_uid"] for r in before if r["status"] == w.UNREAD}
        named["study_instance_uid"] |= open_breaches
        named["order_key"] |= {r["order_key"] for r in before if r["status"] == w.IMAGES_OVERDUE}
        named["order_key"] |= falling_due(read, before, images_expected_s, now)
        orders, studies, rounds = closure(read, named)
        numbers = {o["order_number"] for o in orders.values() if o["order_number"] is not None}
        accessions = {s["accession_number"] for s in studies.values() if s["accession_number"] is not None}
        where = any_of(study_instance_uid=set(studies), accession_number=accessions, order_number=numbers)
        reports = read.rows(w.REPORTS, w.REPORT_COLUMNS, where) if where is not None else []
    steps.done("reads")
    pairs = matched(orders, studies, match_window)
    items = study_items(studies, pairs, final_reads(reports, studies, pairs))
    unread = [{**i, "_kind": w.UNREAD} for i in items if i["read_at"] is None]
    overdue = overdue_orders(pairs, images_expected_s, now)
    steps.done("match")
    context = patient_context(read, {r["patient_key"] for r in [*unread, *overdue] if r["patient_key"]}, now,
                              news2_current_s)
    for r in [*unread, *overdue]:
        r.update(context.get(r["patient_key"], {}))
    steps.done("context")
    rows = w.rank_unread(unread, ranking, now, critical_model())
    rows += [w.overdue_row(o, now) for o in overdue]
    steps.done("rank")
    provenance = w.batch_provenance(read.versions, ingest_batch_id, processed_at)
    kept = {r["worklist_key"] for r in rows}
    rows += [{"worklist_key": r["worklist_key"], "status": w.LEFT, "as_of": now} for r in before
             if r["worklist_key"] not in kept]
    for r in rows:
        r.update(provenance)
        if r.get("factors") is not None:
            r["factors"] = [dict(zip(("factor", "value", "points"), f, strict=True)) for f in r["factors"]]
    sla = [b for b in breaches(items, ranking, now, touched(changes, items) | open_breaches, provenance)
           if not unchanged(b, stored.get(b["breach_id"]))]
    out = {w.WORKLIST: pa.Table.from_pylist(rows, schema=schemas[0]),
           w.BREACHES: pa.Table.from_pylist(sla, schema=schemas[1])}
    steps.done("build")
    log.info("%s driver path (%s): %d change row(s) -> %d orders, %d studies, %d reports in %d read round(s), "
             "%d rows read; %d open, %d left, %d breach row(s); steps (s): %s", w.WORKLIST,
             "whole tables" if whole else "by key", len(changes), len(orders), len(studies), len(reports), rounds,
             read.rows_read, len(kept), len(rows) - len(kept), len(sla), steps.line())
    return out


def falling_due(read: Reader, before: list[dict], expected_s: Mapping[str, int], now: datetime) -> set[str]:
    """Order keys whose images fall due after the last batch's "now" (the worklist's as_of) and by this one's: an
    order turns images_overdue with time alone, no change names it."""
    last = max((r["as_of"] for r in before if r["as_of"] is not None), default=None)
    if last is None or now <= last:
        return set()
    low = last - timedelta(seconds=max(expected_s.values()))
    high = now - timedelta(seconds=min(expected_s.values()))
    where = (pc.field("ordered_at") >= pc.scalar(low)) & (pc.field("ordered_at") <= pc.scalar(high))
    return {o["order_key"] for o in read.rows(w.ORDERS, ("order_key", "ordered_at"), where, since=("ordered_at", low))}
