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
    refs: dict[str, TableReference] = {}
    out, pos = [], 0

    def replace(text: str) -> str:
        def one(m: re.Match) -> str:
            at = m["at"]
            ref = TableReference(
                f"{m['layer'].lower()}.{m['entity'].lower()}",
                version=int(at) if m["kind"] and m["kind"].upper() == "VERSION" else None,
                timestamp=at.strip("'") if m["kind"] and m["kind"].upper() == "TIMESTAMP" else None,
            )
            refs[ref.view] = ref
            return f"`{ref.view}`"

        return _REF.sub(one, text)

    for m in _SKIP.finditer(sql):
        out.append(replace(sql[pos:m.start()]))
        out.append(m.group(0))
        pos = m.end()
    out.append(replace(sql[pos:]))
    return "".join(out), list(refs.values())
