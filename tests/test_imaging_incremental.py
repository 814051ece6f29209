"""gold.imaging_worklist batch by batch (the driver path, reading silver by key) equals one recompute of the same
silver rows by the whole-table Spark plan (the executor path); a replayed batch changes nothing.

The clock is `data` (now = the newest event time), so both rank at the same "now"."""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime, timedelta

from pipelines.jobs import Registry, load_registry
from tests import imaging_tables as t
from tests.conftest import make_config

WORKLIST, BREACHES = "gold.imaging_worklist", "gold.imaging_sla_breaches"
T0 = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)
M = timedelta(minutes=1)
PROVENANCE = {"studies_version", "orders_version", "reports_version", "scores_version", "alerts_version",
              "code_version", "computed_by", "computed_at"}

# Each batch's new silver and gold rows, in the order they arrive.
BATCHES = [
    {"silver.imaging_studies": [t.study("s1", "p1", "A1", T0 + 10 * M, "CT", "HEAD"),
                                t.study("s2", "p2", None, T0 + 20 * M, "CR", "CHEST"),
                                t.study("s3", "p3", "A3", T0, "CT", "HEAD")],
     "silver.imaging_orders": [t.order("o1", "p1", "A1", T0, "STAT", "ED", text="code stroke"),
                               t.order("o3", "p3", "A3", T0 - 30 * M, "ROUTINE", "WARD"),
                               t.order("o5", "p5", "A5", T0 - 5 * 60 * M, "STAT", "ICU"),  # overdue at once
                               t.order("o6", "p6", "A6", T0 + 20 * M, "STAT", "ED")],  # overdue after T0 + 140 min
     "silver.imaging_reports": [],
     "gold.early_warning_scores": [t.score("p3", T0 + 5 * M, "low", 1)],
     "gold.deterioration_alerts": []},
    # An order arriving after its study (no accession number: matched by patient, exam and time), and a later study
    # that moves the clock past s1's 1 h SLA: its breach opens.
    {"silver.imaging_orders": [t.order("o2", "p2", None, T0 + 5 * M, "ASAP", "WARD", "DX", "CHEST")],
     "silver.imaging_studies": [t.study("s4", "p4", "A4", T0 + 75 * M, "MR", "HEAD")]},
    # s1's final report: it leaves the worklist, its breach closes; a study that moves the clock past o6's expected
    # time: o6 turns overdue by time alone, no change names it.
    {"silver.imaging_reports": [t.report("r1", "A1", T0 + 80 * M)],
     "silver.imaging_studies": [t.study("s7", "p7", "A7", T0 + 3 * 60 * M, "CT", "CHEST")]},
    # p3's NEWS2 band changes and an alert opens (a batch of scores only): s3 moves up; nothing else changed.
    {"gold.early_warning_scores": [t.score("p3", T0 + 178 * M, "high", 8)],
     "gold.deterioration_alerts": [t.alert("p3", T0 + 178 * M, "news2_high")]},
]


def lake(spark, root, **overrides):
    from gold import deterioration_alerts, early_warning_scores
    from pipelines.runner import Runner, Trigger
    from pipelines.store import open_store
    from silver.imaging_studies import SCHEMA as STUDIES

    cfg = make_config(root, **{"imaging.clock": "data", **overrides})
    store = open_store(cfg, spark)
    runner = Runner(cfg, spark, store, Registry([load_registry(cfg).get(WORKLIST)]))
    schemas = {"silver.imaging_studies": STUDIES, "silver.imaging_orders": t.ORDERS_SCHEMA,
               "silver.imaging_reports": t.REPORTS_SCHEMA, "gold.early_warning_scores": early_warning_scores.SCHEMA,
               "gold.deterioration_alerts": deterioration_alerts.SCHEMA}

    def write(batches):
        for table in schemas:
            rows = [r for b in batches for r in b.get(table, [])]
            if rows or not store.exists(table):
                t.write(spark, store, table, rows, schemas[table])

    def run():
        [summary] = runner.run([WORKLIST], Trigger(available_now=True))
        assert summary.status == "done", summary.line()

    def content(table):
        rows = [{k: v for k, v in r.items() if k not in PROVENANCE} for r in store.read_arrow(table).to_pylist()]
        return sorted(rows, key=lambda r: str(r.get("worklist_key") or r.get("breach_id")))

    return cfg, store, write, run, content


def test_batches_by_key_equal_one_whole_table_recompute_in_spark(spark, tmp_path, caplog):
    cfg, store, write, run, content = lake(spark, tmp_path / "batches")
    with caplog.at_level(logging.INFO, logger="carelake.imaging"):
        for batch in BATCHES:
            write([batch])
            run()
    logged = [re.search(r"driver path \((.+?)\).*; (\d+) open, (\d+) left, (\d+) breach", r.getMessage()).groups()
              for r in caplog.records if "driver path" in r.getMessage()]
    assert logged == [("whole tables", "4", "0", "0"),  # s1-s3 unread, o5 overdue
                      ("by key", "5", "0", "1"),  # + s4; s1's breach opens
                      ("by key", "6", "1", "1"),  # s1 read and its breach closed; + s7 and o6 (overdue)
                      ("by key", "6", "0", "0")]  # new NEWS2 and alert only: no breach changes, nothing written
    worklist, breaches = content(WORKLIST), content(BREACHES)
    assert [(r["worklist_key"], r["status"], r["rank"], r["order_match"]) for r in worklist] == [
        ("order:o5", "images_overdue", None, "no study"), ("order:o6", "images_overdue", None, "no study"),
        ("s2", "unread", 2, "patient_procedure_time"), ("s3", "unread", 1, "accession"),
        ("s4", "unread", 3, "no order"), ("s7", "unread", 4, "no order")]
    s3 = next(r for r in worklist if r["worklist_key"] == "s3")  # ROUTINE, but now high NEWS2 with an open alert
    assert (s3["news2_band"], s3["open_alert_levels"]) == ("high", ["news2_high"])
    assert [(b["study_instance_uid"], b["status"], b["opened_at"], b["closed_at"]) for b in breaches] == [
        ("s1", "closed", T0 + 70 * M, T0 + 80 * M)]

    # The whole-table Spark plan over the same silver rows, as a first batch (every study named) would run it.
    job = load_registry(cfg).get(WORKLIST)
    studies = store.read_arrow("silver.imaging_studies", columns=["study_instance_uid"]).to_pylist()
    recomputed = job.apply(spark.createDataFrame(studies, "study_instance_uid string"), {
        "batch_id": 0, "ingest_batch_id": "recompute", "processed_at": datetime.now(UTC), "read_table": store.read,
        "table_version": lambda name: store.version(name) if store.exists(name) else None, "via_driver": False})
    for table, ours in ((WORKLIST, worklist), (BREACHES, breaches)):
        rows = [{k: v for k, v in r.items() if k not in PROVENANCE} for r in recomputed[table].toArrow().to_pylist()]
        theirs = sorted(rows, key=lambda r: str(r.get("worklist_key") or r.get("breach_id")))
        assert [(r.keys(), [k for k in r if r[k] != o.get(k)]) for r, o in zip(theirs, ours, strict=True)] == [
            (r.keys(), []) for r in theirs], table

    versions = (store.version(WORKLIST), store.version(BREACHES))
    commits = cfg.path("_checkpoints", WORKLIST, "commits")
    last = max(int(p.name) for p in commits.iterdir() if p.name.isdigit())
    for done in (commits / str(last), commits / f".{last}.crc"):  # the last batch replays: its commits are
        done.unlink(missing_ok=True)  # found in the tables' transactions, nothing is written again
    run()
    assert (store.version(WORKLIST), store.version(BREACHES)) == versions
    assert (content(WORKLIST), content(BREACHES)) == (worklist, breaches)
