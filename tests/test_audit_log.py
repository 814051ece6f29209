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
