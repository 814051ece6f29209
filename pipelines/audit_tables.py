"""`carelake audit as-of` and `audit diff`: what a table said at a moment, and what changed between two versions.

A diff reads only the data files that differ between the two versions (files in one version's snapshot and not
the other's): a row in a file both versions share is the same row in both. So its cost is the size of what the
versions between them rewrote or added, not the size of the table: a streaming append of 1,000 rows reads 1,000
rows; a MERGE that rewrote three files reads those three files twice (before and after); an OPTIMIZE between the
versions rewrites everything it compacted and is read whole (its rows come out unchanged).

Rows are matched by the table's key (the merge keys its job declares in the registry, or `--key`); a table
written by appends only (bronze) has no key, and its rows are compared whole (added or removed, never changed).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from pipelines.errors import UsageError
from pipelines.output import jsonable
from pipelines.timeutil import parse_timestamp

if TYPE_CHECKING:
    from deltalake import DeltaTable

    from pipelines.config import Config
    from pipelines.store import TableStore
    from pipelines.store.base import CommitInfo


def table_keys(cfg: Config, name: str) -> tuple[str, ...]:
    """The key a table's rows are merged on (its job's or side output's MergeSpec), or () for append-only tables."""
    from pipelines.jobs import load_registry

    for job in load_registry(cfg):
        if job.name == name and job.merge is not None:
            return tuple(job.merge.keys)
        for out in getattr(job, "side_outputs", ()):
            if out.table == name and out.merge is not None:
                return tuple(out.merge.keys)
    return ()


def parse_moment(text: str) -> tuple[int | None, datetime | None]:
    """A version (a whole number) or a time (ISO-8601, UTC unless a zone is given)."""
    text = text.strip()
    if text.isdigit():
        return int(text), None
    return None, parse_timestamp(text)


@dataclass(frozen=True)
class AsOf:
    """A table at one version: which commit that is, how many rows, and the first rows."""

    table: str
    version: int
    commit: CommitInfo
    rows: int
    head: pa.Table


def as_of(store: TableStore, name: str, moment: str, limit: int) -> AsOf:
    """The table as of a version or a time; reads `limit` rows, and the row count from the log's statistics."""
    if limit < 0:
        raise UsageError(f"--limit must be 0 or more, got {limit}")
    version, when = parse_moment(moment)
    dt = store._open(name, version, when)  # resolves a time by the commit times history shows
    v = dt.version()
    commit = next(c for c in store.history(name) if c.version == v)
    dataset = dt.to_pyarrow_dataset()
    head = dataset.head(limit) if limit else dataset.schema.empty_table()
    return AsOf(name, v, commit, _row_count(dt, dataset), head)


def _row_count(dt: DeltaTable, dataset) -> int:
    actions = pa.table(dt.get_add_actions(flatten=True))
    if "num_records" in actions.column_names and actions["num_records"].null_count == 0:
        return int(pa.compute.sum(actions["num_records"]).as_py() or 0)
    return dataset.count_rows()


@dataclass
class Diff:
    """Rows added, changed and removed between two versions, by key."""

    table: str
    from_version: int
    to_version: int
    key: tuple[str, ...]
    files_read: int
    rows_read: int
    added: list[dict] = field(default_factory=list)
    changed: list[dict] = field(default_factory=list)
    removed: list[dict] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"table": self.table, "from_version": self.from_version, "to_version": self.to_version,
                "key": list(self.key) or None, "added": len(self.added), "changed": len(self.changed),
                "removed": len(self.removed), "files_read": self.files_read, "rows_read": self.rows_read}

    def changes(self) -> Iterator[dict[str, Any]]:
        for kind, rows in (("added", self.added), ("changed", self.changed), ("removed", self.removed)):
            for row in rows:
                yield {"change": kind, **row}


def diff(store: TableStore, name: str, v1: int, v2: int, key: Sequence[str]) -> Diff:
    """What changed from version v1 to v2, reading only the files that differ between them."""
    from pipelines.store.deltars import table_arrow_schema

    before_dt, after_dt = store._open(name, v1), store._open(name, v2)
    schema = table_arrow_schema(after_dt)
    missing = [k for k in key if k not in schema.names]
    if missing:
        raise UsageError(f"{name} has no column(s) {missing} to key the diff on; its columns: "
                         f"{', '.join(schema.names)}")
    f1, f2 = set(before_dt.file_uris()), set(after_dt.file_uris())
    before = _read(sorted(f1 - f2), table_arrow_schema(before_dt), schema)
    after = _read(sorted(f2 - f1), schema, schema)
    out = Diff(name, v1, v2, tuple(key), len(f1 ^ f2), before.num_rows + after.num_rows)
    if key:
        _by_key(out, before.to_pylist(), after.to_pylist())
    else:
        _whole_rows(out, before.to_pylist(), after.to_pylist())
    return out


def _read(files: list[str], file_schema: pa.Schema, schema: pa.Schema) -> pa.Table:
    """Rows of these files in `schema` (columns a file's version lacked come back null)."""
    from pipelines.audit import _read_file

    parts = []
    for uri in files:
        t = _read_file(uri, file_schema)
        parts.append(pa.table([t[f.name].cast(f.type) if f.name in t.column_names else pa.nulls(t.num_rows, f.type)
                               for f in schema], schema=schema))
    return pa.concat_tables(parts) if parts else schema.empty_table()


def _index(rows: list[dict], key: tuple[str, ...], side: str) -> dict[tuple, dict]:
    out: dict[tuple, dict] = {}
    for r in rows:
        k = tuple(r[c] for c in key)
        if k in out:
            raise UsageError(f"key {dict(zip(key, k, strict=True))} appears twice in the {side} version: "
                             f"{', '.join(key)} does not identify a row here; pass --key COLUMNS that do")
        out[k] = r
    return out


def _same(a: Any, b: Any) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def _by_key(out: Diff, before: list[dict], after: list[dict]) -> None:
    old, new = _index(before, out.key, "older"), _index(after, out.key, "newer")
    for k, row in new.items():
        key = dict(zip(out.key, k, strict=True))
        if k not in old:
            out.added.append({"key": key, "after": row})
            continue
        columns = [c for c in row if not _same(row[c], old[k].get(c))]
        if columns:
            out.changed.append({"key": key, "columns": columns, "before": {c: old[k].get(c) for c in columns},
                                "after": {c: row[c] for c in columns}})
    out.removed += [{"key": dict(zip(out.key, k, strict=True)), "before": row} for k, row in old.items()
                    if k not in new]


def _whole_rows(out: Diff, before: list[dict], after: list[dict]) -> None:
    def canon(r: dict) -> str:
        return json.dumps(jsonable(r), sort_keys=True)

    old, new = Counter(canon(r) for r in before), Counter(canon(r) for r in after)
    seen_old, seen_new = Counter(), Counter()
    for r in after:
        c = canon(r)
        seen_new[c] += 1
        if seen_new[c] > old[c]:
            out.added.append({"key": None, "after": r})
    for r in before:
        c = canon(r)
        seen_old[c] += 1
        if seen_old[c] > new[c]:
            out.removed.append({"key": None, "before": r})
