"""ops.audit_log: one shared table for audited actions (restores, vacuums, audits, SQL queries)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from pipelines.audit_log import AUDIT_LOG, SCHEMA, record
from pipelines.errors import UsageError
from tests.conftest import make_config


def test_record_appends_one_row_per_event_with_the_shared_schema(tmp_path):
    from pipelines.store import open_store

    store = open_store(make_config(tmp_path))
    at = datetime(2026, 12, 1, 9, 30, tzinfo=UTC)
    record(store, actor="alice", action="restore", outcome="allowed", statement="carelake restore gold.x",
           tables={"gold.early_warning_scores": 7}, rows=12, detail="bad model", at=at)
    record(store, action="query", outcome="refused", statement="select mrn from silver.patients",
           tables=[("silver.patients", None)], detail="analyst may not read silver")
    rows = store.read_arrow(AUDIT_LOG)
    assert rows.schema.names == SCHEMA.names
    got = sorted(rows.to_pylist(), key=lambda r: r["at_utc"])
    assert got[0] == {"at_utc": at, "actor": "alice", "action": "restore", "statement": "carelake restore gold.x",
                      "tables": [{"name": "gold.early_warning_scores", "version": 7}], "rows": 12,
                      "outcome": "allowed", "detail": "bad model"}
    assert got[1]["actor"]  # the OS user by default
    assert got[1]["tables"] == [{"name": "silver.patients", "version": None}]
    assert len(store.history(AUDIT_LOG)) == 2  # one commit per event


@pytest.mark.parametrize("kw, message", [
    ({"outcome": "maybe"}, "outcome must be one of allowed, refused, failed"),
    ({"action": ""}, "needs an actor and an action"),
])
def test_a_malformed_event_is_refused(tmp_path, kw, message):
    from pipelines.store import open_store

    store = open_store(make_config(tmp_path))
    with pytest.raises(UsageError, match=message):
        record(store, **{"action": "restore", "outcome": "allowed", **kw})
    assert not store.exists(AUDIT_LOG)


@pytest.mark.parametrize("overrides, message", [
    ({"storage.retention_days.audit": "0"}, "storage.retention_days.audit must be at least 1 day, got 0"),
    ({"storage.retention_days.landing": "-3"}, "storage.retention_days.landing must be at least 1 day"),
    ({"storage.retention_days.archive": "9"}, "unknown configuration key 'storage.retention_days.archive'"),
])
def test_retention_settings_are_checked(tmp_path, overrides, message):
    from pipelines.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        make_config(tmp_path, **overrides)


def test_the_audit_retention_is_a_floor_for_what_audits_walk_and_the_audit_log(tmp_path):
    from pipelines.retention import landing_retention_days, table_retention_days

    cfg = make_config(tmp_path, **{f"storage.retention_days.{k}": "30" for k in ("silver", "gold", "landing")},
                      **{"storage.retention_days.audit": "400", "storage.retention_days.ops": "90"})
    assert [table_retention_days(cfg, t) for t in ("silver.observations", "gold.deterioration_alerts",
                                                   "gold.claims_fraud_scores", "ops.metrics", "ops.audit_log")] == [
        400, 400, 30, 90, 400]
    assert (landing_retention_days(cfg, "devices"), landing_retention_days(cfg, "x12")) == (400, 30)
