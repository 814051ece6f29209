"""ops.audit_log: who did what to which table versions, and how it ended (HIPAA: who saw or changed which PHI).

One table for every audited action: SQL queries (the SQL server), restores, vacuums, `carelake audit` lookups.
Each event is one row appended in its own commit, so an event is never lost with another's failure.

| column    | meaning                                                                  |
|-----------|--------------------------------------------------------------------------|
| at_utc    | when it happened (UTC)                                                   |
| actor     | the OS user running carelake, or the authenticated user of the SQL server |
| action    | query, restore, vacuum, explain, as_of, diff, ...                        |
| statement | the command line or SQL text as given                                    |
| tables    | the tables touched and the version of each that was read or written     |
| rows      | rows returned or changed (null when not meaningful)                     |
| outcome   | allowed, refused or failed                                               |
| detail    | the reason given, the refusal or the error message                       |
"""

from __future__ import annotations

import getpass
import os
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import pyarrow as pa

from pipelines.errors import UsageError

if TYPE_CHECKING:
    from pipelines.store import TableStore, WriteResult

AUDIT_LOG = "ops.audit_log"
OUTCOMES = ("allowed", "refused", "failed")

TABLE_READ = pa.struct([pa.field("name", pa.string()), pa.field("version", pa.int64())])
SCHEMA = pa.schema([
    pa.field("at_utc", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("actor", pa.string(), nullable=False),
    pa.field("action", pa.string(), nullable=False),
    pa.field("statement", pa.string()),
    pa.field("tables", pa.list_(TABLE_READ)),
    pa.field("rows", pa.int64()),
    pa.field("outcome", pa.string(), nullable=False),
    pa.field("detail", pa.string()),
])


def os_actor() -> str:
    """The OS user running this process (what a CLI action is recorded under)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (a container's arbitrary uid)
        return f"uid:{os.getuid()}"


def event(*, actor: str, action: str, outcome: str, statement: str | None = None,
          tables: Mapping[str, int | None] | Sequence[tuple[str, int | None]] = (), rows: int | None = None,
          detail: str | None = None, at: datetime | None = None) -> pa.Table:
    """One audit row, checked: an outcome outside OUTCOMES or an empty actor/action is a programming error."""
    if outcome not in OUTCOMES:
        raise UsageError(f"audit outcome must be one of {', '.join(OUTCOMES)}, got {outcome!r}")
    if not actor or not action:
        raise UsageError(f"an audit event needs an actor and an action, got actor={actor!r} action={action!r}")
    pairs = tables.items() if isinstance(tables, Mapping) else tables
    row = {
        "at_utc": (at or datetime.now(UTC)).astimezone(UTC), "actor": actor, "action": action,
        "statement": statement, "tables": [{"name": n, "version": v} for n, v in pairs], "rows": rows,
        "outcome": outcome, "detail": detail,
    }
    return pa.Table.from_pylist([row], schema=SCHEMA)


def record(store: TableStore, *, actor: str | None = None, action: str, outcome: str, statement: str | None = None,
           tables: Mapping[str, int | None] | Sequence[tuple[str, int | None]] = (), rows: int | None = None,
           detail: str | None = None, at: datetime | None = None) -> WriteResult:
    """Append one event to ops.audit_log (its own commit). `actor` defaults to the OS user."""
    row = event(actor=actor or os_actor(), action=action, outcome=outcome, statement=statement, tables=tables,
                rows=rows, detail=detail, at=at)
    return store.append(AUDIT_LOG, row, metadata={"carelake.op": f"audit.{action}"})
