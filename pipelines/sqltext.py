"""Literals and names for Spark SQL text.

Streaming transforms build wide projections as SQL strings (selectExpr): each Column object is a JVM round trip,
and a micro-batch that builds hundreds of them spends seconds before Spark starts working. The text goes through
Spark's SQL parser: literals here assume the default `spark.sql.parser.escapedStringLiterals=false`, and carry
only the project's own constants and data-independent names (no `${...}`, which variable substitution would read).
"""

from __future__ import annotations

import math
from collections.abc import Iterable


def string(s: str) -> str:
    """A SQL string literal of s (backslashes and quotes escaped)."""
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def strings(values: Iterable[str]) -> str:
    """Comma-separated string literals, for IN (...) and array(...)."""
    return ", ".join(string(v) for v in values)


def double(x: float) -> str:
    """A double literal: Spark SQL reads 0.5 as a decimal, 0.5D as the double Python computes with."""
    x = float(x)
    if math.isnan(x):
        return "CAST('NaN' AS DOUBLE)"
    if math.isinf(x):
        return f"CAST('{'-' if x < 0 else ''}Infinity' AS DOUBLE)"
    return f"{x!r}D"


def literal(value: str | float | bool | None) -> str:
    """A SQL literal of a string, a number (as a double), a boolean or None (NULL)."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return string(value)
    return double(value)


def name(column: str) -> str:
    """A column name quoted for SQL (backticks doubled)."""
    return "`" + column.replace("`", "``") + "`"


def type_text(data_type) -> str:
    """A Spark type as SQL text that reads back as the same type whatever the session's settings: struct field
    names quoted (`table` is reserved under enforceReservedKeywords), timestamps as timestamp_ltz (plain
    `timestamp` means timestamp_ntz under spark.sql.timestampType=TIMESTAMP_NTZ)."""
    from pyspark.sql.types import ArrayType, MapType, StructType, TimestampType

    if isinstance(data_type, StructType):
        return "struct<" + ",".join(f"{name(f.name)}:{type_text(f.dataType)}" for f in data_type.fields) + ">"
    if isinstance(data_type, ArrayType):
        return f"array<{type_text(data_type.elementType)}>"
    if isinstance(data_type, MapType):
        return f"map<{type_text(data_type.keyType)},{type_text(data_type.valueType)}>"
    if isinstance(data_type, TimestampType):
        return "timestamp_ltz"
    return data_type.simpleString()


def casts(fields: Iterable) -> list[str]:
    """SELECT items casting each StructField's column to its declared type, under its own name."""
    return [f"CAST({name(f.name)} AS {type_text(f.dataType)}) AS {name(f.name)}" for f in fields]
