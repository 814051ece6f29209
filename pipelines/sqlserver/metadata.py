"""Catalog browsing for BI tools (JDBC DatabaseMetaData: getSchemas, getTables, getColumns) over the lakehouse names.

Each answer is the rows a JDBC driver expects, computed here from the lakehouse (the tables' Delta schemas, the
views' analyzed schemas) and filtered by the user's role, then run on Spark as one inline `VALUES` query, so the
client fetches them like any result. Schemas are the layers; tables keep their names (`gold.early_warning_scores`
is schema gold, table early_warning_scores).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from pipelines.sqlrefs import TableReference
from pipelines.sqlserver.policy import refusal
from pipelines.sqltext import literal, name

# java.sql.Types of Spark's type names, as Spark's own Thrift server reports them.
_JDBC_TYPES = {"boolean": 16, "tinyint": -6, "smallint": 5, "int": 4, "bigint": -5, "float": 6, "double": 8,
               "string": 12, "binary": -2, "date": 91, "timestamp": 93, "timestamp_ntz": 93, "decimal": 3,
               "array": 2003, "map": 2000, "struct": 2002, "void": 0}
SCHEMA_COLUMNS = ("TABLE_SCHEM", "TABLE_CATALOG")
TABLE_COLUMNS = ("TABLE_CAT", "TABLE_SCHEM", "TABLE_NAME", "TABLE_TYPE", "REMARKS")
COLUMN_COLUMNS = ("TABLE_CAT", "TABLE_SCHEM", "TABLE_NAME", "COLUMN_NAME", "DATA_TYPE", "TYPE_NAME", "COLUMN_SIZE",
                  "DECIMAL_DIGITS", "NUM_PREC_RADIX", "NULLABLE", "REMARKS", "ORDINAL_POSITION", "IS_NULLABLE")


def like(pattern: str | None) -> re.Pattern:
    """A JDBC search pattern (% any run, _ one character; None or '*' all) as a case-insensitive regex."""
    if pattern in (None, "", "*"):
        return re.compile(".*", re.DOTALL)
    out = "".join(".*" if c == "%" else "." if c == "_" else re.escape(c) for c in pattern)
    return re.compile(out, re.IGNORECASE | re.DOTALL)


def readable(role: str, names: Iterable[str], views: Iterable[str]) -> list[str]:
    """The tables and views `role` may read, sorted."""
    views = set(views)
    return sorted(n for n in names if refusal(role, [TableReference(n)], views) is None)


def rows_query(columns: Sequence[str], types: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A query returning `rows` under `columns` (typed `types`), empty when there are none."""
    if not rows:
        items = ", ".join(f"CAST(NULL AS {t}) AS {name(c)}" for c, t in zip(columns, types, strict=True))
        return f"SELECT {items} WHERE false"
    values = ", ".join("(" + ", ".join(_typed(v, t) for v, t in zip(r, types, strict=True)) + ")" for r in rows)
    return f"SELECT * FROM VALUES {values} AS t({', '.join(name(c) for c in columns)})"


def _typed(value, sql_type: str) -> str:
    if value is None:
        return f"CAST(NULL AS {sql_type})"
    return f"CAST({literal(value) if isinstance(value, str) else int(value)} AS {sql_type})"


def schemas_query(tables: Sequence[str], schema_pattern: str | None) -> str:
    match = like(schema_pattern)
    layers = sorted({t.split(".")[0] for t in tables if match.fullmatch(t.split(".")[0])})
    return rows_query(SCHEMA_COLUMNS, ("STRING", "STRING"), [(layer, "spark") for layer in layers])


def tables_query(tables: Sequence[str], views: Iterable[str], schema_pattern: str | None, table_pattern: str | None,
                 types: Sequence[str] | None) -> str:
    views = set(views)
    schema, table = like(schema_pattern), like(table_pattern)
    wanted = {t.upper() for t in types} if types else None
    rows = []
    for t in tables:
        layer, entity = t.split(".", 1)
        kind = "VIEW" if t in views else "TABLE"
        if schema.fullmatch(layer) and table.fullmatch(entity) and (wanted is None or kind in wanted):
            rows.append(("spark", layer, entity, kind, ""))
    return rows_query(TABLE_COLUMNS, ("STRING",) * 5, rows)


def columns_query(schemas: dict[str, object], column_pattern: str | None) -> str:
    """`schemas`: {table name: Spark StructType} of the tables asked for."""
    match = like(column_pattern)
    rows = []
    for table, struct in schemas.items():
        layer, entity = table.split(".", 1)
        for position, f in enumerate(struct.fields, 1):
            if not match.fullmatch(f.name):
                continue
            kind = f.dataType.typeName()
            precision = getattr(f.dataType, "precision", None)
            scale = getattr(f.dataType, "scale", None)
            rows.append(("spark", layer, entity, f.name, _JDBC_TYPES.get(kind, 1111), f.dataType.simpleString().upper(),
                         precision, scale, 10 if precision is not None else None, 1 if f.nullable else 0, "",
                         position, "YES" if f.nullable else "NO"))
    types = ("STRING", "STRING", "STRING", "STRING", "INT", "STRING", "INT", "INT", "INT", "INT", "STRING", "INT",
             "STRING")
    return rows_query(COLUMN_COLUMNS, types, rows)
