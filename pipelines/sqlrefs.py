"""Find lakehouse table references (bronze.x, silver.x VERSION AS OF 3, ...) in SQL text.

Spark has no catalog for delta-rs tables, so `carelake sql` registers each referenced table as a
temporary view and rewrites the reference to that view. Strings, quoted identifiers and comments are
left alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipelines.config import LAYERS

_REF = re.compile(
    r"(?<![\w.`])(?P<layer>" + "|".join(LAYERS) + r")\s*\.\s*(?P<entity>[A-Za-z_][A-Za-z0-9_]*)(?![\w`])"
    r"(?:\s+(?P<kind>VERSION|TIMESTAMP)\s+AS\s+OF\s+(?P<at>\d+|'[^']*'))?",
    re.IGNORECASE,
)
_SKIP = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|`[^`]*`|--[^\n]*|/\*.*?\*/", re.DOTALL)


@dataclass(frozen=True)
class TableReference:
    table: str
    version: int | None = None
    timestamp: str | None = None

    @property
    def view(self) -> str:
        """A temporary-view name unique to the table and the point in time it is read at."""
        at = f"__v{self.version}" if self.version is not None else ""
        if self.timestamp is not None:
            at = "__t" + re.sub(r"\W", "_", self.timestamp)
        return f"{self.table.replace('.', '__')}{at}"


def rewrite(sql: str) -> tuple[str, list[TableReference]]:
    """SQL with each table reference replaced by its view name, and the references found."""
    skipped = [(m.start(), m.end()) for m in _SKIP.finditer(sql)]
    refs: dict[str, TableReference] = {}
    out, pos = [], 0
    for m in _REF.finditer(sql):
        if any(a <= m.start() < b for a, b in skipped):
            continue
        kind, at = (m["kind"] or "").upper(), m["at"]
        ref = TableReference(
            f"{m['layer'].lower()}.{m['entity'].lower()}",
            version=int(at) if kind == "VERSION" else None,
            timestamp=at.strip("'") if kind == "TIMESTAMP" else None,
        )
        refs[ref.view] = ref
        out += [sql[pos:m.start()], f"`{ref.view}`"]
        pos = m.end()
    out.append(sql[pos:])
    return "".join(out), list(refs.values())


def pin(sql: str, *, version: int | None = None, timestamp: str | None = None) -> str:
    """SQL with `VERSION AS OF version` (or `TIMESTAMP AS OF 'timestamp'`) added to each table reference that has
    no point in time of its own: `carelake sql --as-of-version` sent to the SQL server as SQL."""
    if version is None and timestamp is None:
        return sql
    at = f" VERSION AS OF {int(version)}" if version is not None else " TIMESTAMP AS OF '" + timestamp.replace(
        "'", "") + "'"
    skipped = [(m.start(), m.end()) for m in _SKIP.finditer(sql)]
    out, pos = [], 0
    for m in _REF.finditer(sql):
        if m["kind"] or any(a <= m.start() < b for a, b in skipped):
            continue
        out += [sql[pos:m.end()], at]
        pos = m.end()
    out.append(sql[pos:])
    return "".join(out)
