"""gold.imaging_worklist and gold.imaging_sla_breaches through the runner, on tiny hand-made silver and gold tables."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pipelines.errors import UsageError
from tests import imaging_tables as t
from tests.conftest import make_config

WORKLIST, BREACHES = "gold.imaging_worklist", "gold.imaging_sla_breaches"


@pytest.fixture
def lake(spark, tmp_path):
    from gold import deterioration_alerts, early_warning_scores
    from pipelines.jobs import Registry, load_registry
    from pipelines.runner import Runner, Trigger
    from pipelines.store import open_store
    from silver.imaging_studies import SCHEMA as STUDIES

    cfg = make_config(tmp_path / "lake")
    store = open_store(cfg, spark)
    job = load_registry(cfg).get(WORKLIST)
    job = replace(job, options={**job.options, "match": t.accession_match})
    runner = Runner(cfg, spark, store, Registry([job]))
    schemas = {"silver.imaging_studies": STUDIES, "silver.imaging_orders": t.ORDERS_SCHEMA,
               "silver.imaging_reports": t.REPORTS_SCHEMA, "gold.early_warning_scores": early_warning_scores.SCHEMA,
               "gold.deterioration_alerts": deterioration_alerts.SCHEMA}

    class Lake:
        def write(self, table, rows):
            t.write(spark, store, table, rows, schemas[table])

        def run(self):
            return runner.run([WORKLIST], Trigger(available_now=True))

        def train(self, labels):
            from pipelines.training import train_critical_finding

            return train_critical_finding(cfg, spark, store, labels, match=t.accession_match)

        def rows(self, table):
            return store.read_arrow(table).to_pylist() if store.exists(table) else []

    return Lake()


def test_unread_studies_rank_with_their_factors_and_leave_when_read(lake):
    now = datetime.now(UTC)
    lake.write("silver.imaging_studies", [
        t.study("s1", "p1", "A1", now - timedelta(minutes=70), "CT", "HEAD"),
        t.study("s2", "p2", "A2", now - timedelta(hours=3), "CR", "CHEST"),
        t.study("s3", "p3", None, now - timedelta(minutes=10), "MR", "HEAD")])
    lake.write("silver.imaging_orders", [
        t.order("o1", "p1", "A1", now - timedelta(minutes=90), "STAT", "ED", text="code stroke"),
        t.order("o2", "p2", "A2", now - timedelta(hours=4), "ROUTINE", "WARD", "CR", "CHEST"),
        t.order("o3", "p4", "A3", now - timedelta(hours=5), "STAT", "ICU"),
        t.order("o4", "p4", "A4", now - timedelta(minutes=30), "STAT", "ICU")])  # not overdue yet
    lake.write("silver.imaging_reports", [t.report("r0", "A9", now),  # another study's report
                                          t.report("r2", "A2", now, "preliminary")])  # not read until final
    lake.write("gold.early_warning_scores", [t.score("p2", now - timedelta(hours=1), "high", 8),
                                             t.score("p3", now - timedelta(days=3), "high", 9)])  # not current
    lake.write("gold.deterioration_alerts", [t.alert("p2", now - timedelta(hours=1), "news2_high"),
                                             t.alert("p3", now - timedelta(days=3), "qsofa", "resolved")])
    [summary] = lake.run()
    assert summary.status == "done", summary.line()
    rows = sorted(lake.rows(WORKLIST), key=lambda r: (r["rank"] or 99, r["worklist_key"]))
    assert [(r["worklist_key"], r["status"], r["rank"], r["order_key"], r["order_match"]) for r in rows] == [
        ("s1", "unread", 1, "o1", "accession"), ("s2", "unread", 2, "o2", "accession"),
        ("s3", "unread", 3, None, "no order"), ("order:o3", "images_overdue", None, "o3", "no study")]
    points = {r["worklist_key"]: {f["factor"]: (f["value"], f["points"]) for f in r["factors"]} for r in rows[:3]}
    assert points["s1"]["indication"] == ("stroke", 30.0) and points["s1"]["location"] == ("ED", 15.0)
    assert points["s2"]["news2_band"] == ("high", 20.0) and points["s2"]["open_alert"] == ("news2_high", 15.0)
    assert points["s3"]["news2_band"] == ("no score", 0.0) and points["s3"]["open_alert"] == ("none", 0.0)
    assert points["s3"]["priority"] == ("no order", 10.0)
    assert rows[0]["sla_breached"] and not rows[1]["sla_breached"]
    assert rows[0]["score"] == pytest.approx(sum(p for _, p in points["s1"].values()))
    [breach] = lake.rows(BREACHES)
    assert (breach["study_instance_uid"], breach["status"], breach["closed_at"]) == ("s1", "open", None)
    assert breach["opened_at"] == rows[0]["available_at"] + timedelta(hours=1)

    read_at = now - timedelta(minutes=2)
    lake.write("silver.imaging_reports", [t.report("r1", "A1", read_at)])
    lake.run()
    after = {r["worklist_key"]: r["rank"] for r in lake.rows(WORKLIST)}
    assert after == {"s2": 1, "s3": 2, "order:o3": None}
    [closed] = lake.rows(BREACHES)
    assert (closed["breach_id"], closed["status"], closed["closed_at"], closed["report_key"]) == (
        breach["breach_id"], "closed", read_at, "r1")
    assert closed["minutes_past_sla"] == pytest.approx((read_at - breach["opened_at"]).total_seconds() / 60)

    lake.write("gold.early_warning_scores", [t.score("p9", now, "low", 0)])  # a vitals batch: the worklist refreshes
    lake.run()
    assert lake.rows(BREACHES) == [closed]  # a breach's content never depends on when a batch ran


def test_without_orders_or_clinical_tables_studies_rank_as_no_order(lake, tmp_path):
    now = datetime.now(UTC)
    lake.write("silver.imaging_studies", [t.study("s1", "p1", "A1", now - timedelta(hours=5), "CT", "HEAD"),
                                          t.study("s2", "p2", "A2", now - timedelta(minutes=5), "CT", "HEAD")])
    lake.write("silver.imaging_orders", [])
    lake.write("silver.imaging_reports", [])
    lake.write("gold.early_warning_scores", [])
    lake.run()
    rows = sorted(lake.rows(WORKLIST), key=lambda r: r["rank"])
    assert [(r["worklist_key"], r["priority"], r["sla_breached"]) for r in rows] == [("s1", None, True),
                                                                                   ("s2", None, False)]
    assert {f["factor"]: f["value"] for f in rows[0]["factors"]}["critical_model"] == "no model registered"
    assert [b["study_instance_uid"] for b in lake.rows(BREACHES)] == ["s1"]  # no-order SLA: 4 h

    labels = tmp_path / "imaging.csv"  # the critical-finding model's training reads the same studies
    labels.write_text("accession_number,critical_finding\nA1,1\nA2,0\n")
    with pytest.raises(UsageError, match="the patient split left a set without both outcomes \\(1 critical of 2"):
        lake.train(labels)
    labels.write_text("accession_number,critical_finding\nZ9,1\n")
    with pytest.raises(UsageError, match="no study in silver.imaging_studies has an accession number in"):
        lake.train(labels)


def test_a_lakehouse_without_imaging_gets_empty_tables_at_once(spark):
    from gold import imaging_rank
    from gold import imaging_worklist as w

    cfg = make_config(Path("/nonexistent"))
    scores = spark.createDataFrame([("p1",)], "patient_key string")

    def read_table(name, since=None):
        raise AssertionError(f"read {name}: nothing but the existence of the imaging tables should be looked at")

    out = w.imaging_worklist(scores, read_table=read_table, table_version=lambda n: 3 if n == w.SCORES else None,
                             processed_at=datetime.now(UTC), ingest_batch_id="b", ranking=imaging_rank.Ranking.of(
                                 cfg.imaging), images_expected_s={}, match=t.accession_match,
                             match_window=timedelta(hours=1), news2_current_s=60, clock="wall",
                             critical_model=lambda: None)
    assert {k: (v.count(), v.schema) for k, v in out.items()} == {WORKLIST: (0, w.SCHEMA),
                                                                   BREACHES: (0, w.BREACH_SCHEMA)}
