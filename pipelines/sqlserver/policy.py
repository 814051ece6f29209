"""Roles of the SQL server and what each may read.

| role     | may read                                                                          | time travel |
|----------|-----------------------------------------------------------------------------------|-------------|
| analyst  | gold tables and the repository's views (pseudonymous keys, masked dates)           | no          |
| engineer | every layer (bronze, silver, gold, ops) except ops.audit_log                       | no          |
| auditor  | everything, ops.audit_log included                                                 | yes         |

A view is read with the rights of the server (its definition is reviewed in the repository), so an analyst reads
gold.patients_masked without reading silver.patients.
"""

from __future__ import annotations

from collections.abc import Iterable

from pipelines.audit_log import AUDIT_LOG
from pipelines.sqlrefs import TableReference

ROLES = ("analyst", "engineer", "auditor")


def refusal(role: str, refs: Iterable[TableReference], views: Iterable[str]) -> str | None:
    """Why `role` may not run a statement reading `refs` (None: it may). `views`: the server's view names."""
    views = set(views)
    for ref in refs:
        travels = ref.version is not None or ref.timestamp is not None
        if travels and role != "auditor":
            return (f"role {role} may not read history ({ref.table} VERSION/TIMESTAMP AS OF): time travel is for "
                    "the auditor role")
        if travels and ref.table in views:
            return f"{ref.table} is a view, read at its tables' latest versions: time travel applies to tables only"
        if role == "analyst" and not (ref.table.startswith("gold.") or ref.table in views):
            return (f"role analyst may read gold tables and the masked views only; {ref.table} holds direct "
                    "identifiers or raw records (names, MRNs, birth dates, free text): use a gold table or view "
                    "(SELECT * FROM gold.patients_masked), or ask for the engineer role")
        if role == "engineer" and ref.table == AUDIT_LOG:
            return f"role engineer may not read {AUDIT_LOG}: the audit log is for the auditor role"
        if role not in ROLES:
            return f"unknown role {role!r}: the credentials file may name {', '.join(ROLES)}"
    return None
