"""Query results for people (aligned table) and programs (JSON lines, CSV)."""

from __future__ import annotations

import base64
import csv
import itertools
import json
import sys
from collections.abc import Iterable, Sequence
from datetime import date, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

TABLE_DEFAULT_LIMIT = 200


def jsonable(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def cell(value: Any) -> str:
    """One value as people read it in a terminal."""
    if value is None:
        return "NULL"
    if isinstance(value, datetime):
        return value.isoformat(timespec="milliseconds")
    if isinstance(value, bytes | bytearray):
        return value[:40].decode("utf-8", "replace") + ("..." if len(value) > 40 else "")
    return str(value)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], out: TextIO | None = None) -> None:
    """Rows aligned under their headers."""
    out = out or sys.stdout
    cells = [[cell(v) for v in r] for r in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    out.write("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip() + "\n")
    out.write("  ".join("-" * w for w in widths) + "\n")
    for r in cells:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n")


def write_rows(df: DataFrame, fmt: str, limit: int | None, out: TextIO) -> int:
    """Write df in `fmt`; return the number of rows written."""
    columns = df.columns
    if fmt == "table":
        shown = limit if limit is not None else TABLE_DEFAULT_LIMIT
        rows = df.limit(shown + 1).collect()
    else:
        rows = (df.limit(limit) if limit is not None else df).toLocalIterator()
    return write_records(columns, ([r.asDict(recursive=True)[c] for c in columns] for r in rows), fmt, limit, out)


def write_records(columns: Sequence[str], rows: Iterable[Sequence[Any]], fmt: str, limit: int | None,
                  out: TextIO) -> int:
    """Write rows (value sequences in `columns` order) in `fmt`; return the number of rows written."""
    if limit is not None:
        rows = itertools.islice(rows, limit + 1 if fmt == "table" else limit)
    if fmt == "table":
        shown = limit if limit is not None else TABLE_DEFAULT_LIMIT
        rows = list(itertools.islice(rows, shown + 1))
        print_table(columns, rows[:shown], out)
        more = " (more rows not shown: use --limit, or --format csv/json for all)" if len(rows) > shown else ""
        print(f"({min(len(rows), shown)} row{'s' if min(len(rows), shown) != 1 else ''}){more}", file=out)
        return min(len(rows), shown)
    count = 0
    if fmt == "json":
        for row in rows:
            out.write(json.dumps(jsonable(dict(zip(columns, row, strict=True))), ensure_ascii=False) + "\n")
            count += 1
        return count
    writer = csv.writer(out)
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if v is None else jsonable(v) for v in row])
        count += 1
    return count
