"""Validation in the batch's own plan: a suite's expectations compiled to Spark column predicates.

The suites stay Great Expectations definitions (expectations/*.json) and their results keep Great Expectations'
form in silver.dq_results. What changes is where a clean batch is judged: instead of collecting every row to the
driver and running Great Expectations on pandas, each expectation becomes a pair of Spark columns (is the row
judged — inside the row filter and not missing —, and does it fail) and one aggregation over the batch counts
them all. Uniqueness needs one more grouped count.

When every quarantine and fail expectation passes (the common case), the batch is judged without leaving the
executors, and its rows are written by them. When one of them finds a row (rows to move to silver.quarantine,
or a batch to stop), or an expectation cannot be compiled, `validate_frame` returns None and the caller takes
the exact path: the batch collected and validated by Great Expectations, which names the rows. So the two paths
can never disagree on which rows are quarantined; the counts of the compiled path are tested against Great
Expectations' (tests/test_quality_spark.py).

Supported: ExpectColumnValuesToNotBeNull, ...ToBeInSet, ...ToMatchRegex, ...ToBeBetween, ...ToBeUnique,
ExpectColumnPairValuesToBeEqual and ExpectColumnPairValuesAToBeGreaterThanB (ignore_row_if
either_value_is_missing), with `mostly`; row filters in the pandas-query subset the suites use (comparisons,
and/or/not, parentheses, .notna()/.isna(), quoted text and numbers), with pandas' treatment of missing values.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from pipelines import quality as q

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame

_TOKEN = re.compile(r"""\s*(?:(?P<str>'[^'\\]*'|"[^"\\]*")|(?P<num>-?\d+(?:\.\d+)?)|(?P<op>==|!=|<=|>=|<|>|\(|\))
                       |(?P<method>\.(?:notna|isna|notnull|isnull)\(\))|(?P<word>[A-Za-z_][A-Za-z0-9_]*))""",
                    re.VERBOSE)
_WORDS = {"and": "AND", "or": "OR", "not": "NOT"}


class NotCompiled(Exception):
    """This expectation (or its row filter) has no Spark form here; the exact path judges the batch."""


def row_filter_sql(text: str) -> str:
    """A pandas query (the subset suites use) as Spark SQL with the missing-value semantics `DataFrame.query` has on
    the frame Great Expectations sees (quality._frame; Arrow-backed strings and NumPy numbers alike, tested): a
    comparison with a missing value is false, except `!=`, which is true."""
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            if text[pos:].strip() == "":
                break
            raise NotCompiled(f"row_filter {text!r}: cannot read it from {text[pos:]!r}")
        kind = m.lastgroup
        tokens.append((kind, m.group(kind)))
        pos = m.end()
    out: list[str] = []
    i = 0

    def operand(tok: tuple[str, str]) -> str:
        kind, value = tok
        if kind == "word" and value not in _WORDS:
            return f"`{value}`"
        if kind == "str":
            return "'" + value[1:-1] + "'"
        if kind == "num":
            return value
        raise NotCompiled(f"row_filter {text!r}: {value!r} is not a column or a value")

    while i < len(tokens):
        kind, value = tokens[i]
        nxt = tokens[i + 1] if i + 1 < len(tokens) else None
        if kind == "word" and value in _WORDS:
            out.append(_WORDS[value])
            i += 1
        elif kind == "op" and value in "()":
            out.append(value)
            i += 1
        elif nxt is not None and nxt[0] == "method":
            test = "IS NOT NULL" if nxt[1] in (".notna()", ".notnull()") else "IS NULL"
            out.append(f"({operand(tokens[i])} {test})")
            i += 2
        elif nxt is not None and nxt[0] == "op" and nxt[1] not in "()" and i + 2 < len(tokens):
            a, op, b = operand(tokens[i]), nxt[1], operand(tokens[i + 2])
            sql_op = {"==": "="}.get(op, op)
            if op == "!=":
                out.append(f"(NOT coalesce({a} = {b}, false))")
            else:
                out.append(f"coalesce({a} {sql_op} {b}, false)")
            i += 3
        else:
            raise NotCompiled(f"row_filter {text!r}: cannot read it at {value!r}")
    return f"coalesce({' '.join(out)}, false)"


def _literal(value: Any, params: Mapping[str, Any]) -> Column:
    from pyspark.sql import functions as F

    if isinstance(value, dict) and "$PARAMETER" in value:
        value = params[value["$PARAMETER"]]
    if isinstance(value, datetime):  # parameters hold naive UTC times
        at = value if value.tzinfo is None else value.astimezone(UTC).replace(tzinfo=None)
        return F.lit(at.isoformat()).cast("timestamp")
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise NotCompiled(f"bound {value!r} has no Spark literal here")
    return F.lit(value)


@dataclass(frozen=True)
class Compiled:
    """A rule as columns: `rows` counts it (inside the row filter), `judged` is what its percentage is of (rows
    not missing), `failed` the unexpected rows; `unique` names the column of a uniqueness rule (counted apart);
    `shown` the value(s) reported as examples."""

    rows: Column
    judged: Column
    failed: Column
    shown: Column
    unique: str | None = None


def compile_rule(rule: q.Rule, params: Mapping[str, Any], types: Mapping[str, Any]) -> Compiled:
    from pyspark.sql import functions as F
    from pyspark.sql.types import DoubleType, FloatType, TimestampNTZType, TimestampType

    k = dict(rule.kwargs)
    allowed = {"ExpectColumnValuesToNotBeNull": {"column", "mostly"},
               "ExpectColumnValuesToBeInSet": {"column", "value_set", "mostly"},
               "ExpectColumnValuesToMatchRegex": {"column", "regex", "mostly"},
               "ExpectColumnValuesToBeBetween": {"column", "min_value", "max_value", "strict_min", "strict_max",
                                                 "mostly"},
               "ExpectColumnValuesToBeUnique": {"column", "mostly"},
               "ExpectColumnPairValuesToBeEqual": {"column_A", "column_B", "ignore_row_if", "mostly"},
               "ExpectColumnPairValuesAToBeGreaterThanB": {"column_A", "column_B", "or_equal", "ignore_row_if",
                                                           "mostly"}}.get(rule.type)
    if allowed is None or set(k) - allowed:
        raise NotCompiled(f"{rule.type} with {sorted(k)}")
    if any(isinstance(v, dict) for key, v in k.items() if key not in ("min_value", "max_value")):
        raise NotCompiled(f"{rule.type}: a $PARAMETER outside a Between bound")
    if k.get("ignore_row_if", "either_value_is_missing") != "either_value_is_missing":
        raise NotCompiled(f"ignore_row_if {k['ignore_row_if']!r}")
    for name in (k.get("column"), k.get("column_A"), k.get("column_B")):
        if name is not None and name not in types:
            raise NotCompiled(f"column {name!r} is not in the batch")
    rows = F.expr(row_filter_sql(rule.row_filter)) if rule.row_filter else F.lit(True)
    if rule.type.startswith("ExpectColumnPair"):
        a, b = F.col(f"`{k['column_A']}`"), F.col(f"`{k['column_B']}`")
        judged = rows & a.isNotNull() & b.isNotNull()
        if rule.type.endswith("ToBeEqual"):
            ok = a == b
        else:
            ok = a >= b if k.get("or_equal") else a > b
        return Compiled(rows, judged, judged & ~F.coalesce(ok, F.lit(False)), F.struct(a.alias("a"), b.alias("b")))
    c = F.col(f"`{k['column']}`")
    # pandas counts a NaN as missing; Spark does not
    missing = c.isNull() | F.isnan(c) if isinstance(types[k["column"]], DoubleType | FloatType) else c.isNull()
    present = rows & ~missing
    if rule.type == "ExpectColumnValuesToNotBeNull":
        return Compiled(rows, rows, rows & missing, c)
    if rule.type == "ExpectColumnValuesToBeUnique":
        return Compiled(rows, present, F.lit(False), c, unique=k["column"])
    if rule.type == "ExpectColumnValuesToBeInSet":
        ok = c.isin(list(k["value_set"]))
    elif rule.type == "ExpectColumnValuesToMatchRegex":
        if not q._PLAIN_REGEX.match(k["regex"]):  # Python's, RE2's and Java's regex read plain patterns alike
            raise NotCompiled(f"regex {k['regex']!r}")
        ok = c.cast("string").rlike(k["regex"])
    else:  # Between
        low, high = k.get("min_value"), k.get("max_value")
        is_time = isinstance(types[k["column"]], TimestampType | TimestampNTZType)
        ok = F.lit(True)
        for bound, strict, above in ((low, k.get("strict_min"), True), (high, k.get("strict_max"), False)):
            if bound is None:
                continue
            lit = _literal(bound, params)
            lit = lit.cast("timestamp") if is_time else lit
            ok = ok & ((c > lit if strict else c >= lit) if above else (c < lit if strict else c <= lit))
    return Compiled(rows, present, present & ~F.coalesce(ok, F.lit(False)), c)


def _with_derived(df: DataFrame, suite: q.Suite, params: Mapping[str, Any]) -> DataFrame:
    from itertools import chain

    from pyspark.sql import functions as F

    for d in suite.derived:
        if d.column not in df.columns:
            raise q.SuiteError(f"{suite.path}: derived column {d.name!r} adds to {d.column!r}, which the "
                               f"{suite.table} batch lacks")
        src = F.col(f"`{d.column}`")
        if d.map is not None:
            mapping = F.create_map(*chain.from_iterable((F.lit(key), F.lit(v)) for key, v in d.map.items()))
            value = F.try_element_at(mapping, src.cast("string"))
        else:
            micros = int(q._duration(d.plus or "", params).value // 1000)
            value = F.timestamp_micros(F.unix_micros(src) + F.lit(micros))
        df = df.withColumn(d.name, value)
    return df


def validate_frame(df: DataFrame, suite: q.Suite, *, batch: str, job: str, at: datetime,
                   parameters: Mapping[str, Any] | None = None) -> q.Validation | None:
    """Judge a batch in Spark. A Validation (warnings only: nothing to quarantine, nothing failed) when every
    quarantine and fail expectation passed; None when the exact path must judge it (see the module doc)."""
    from pyspark.sql import functions as F

    at = at if at.tzinfo else at.replace(tzinfo=UTC)
    params = q._resolved_parameters(suite, parameters, at)
    frame = _with_derived(df, suite, params)
    types = {f.name: f.dataType for f in frame.schema.fields}
    try:
        compiled = {r.index: compile_rule(r, params, types) for r in suite.rules}
    except NotCompiled:
        return None
    aggs = []
    for i, c in compiled.items():
        aggs += [F.count(F.when(c.rows, 1)).alias(f"r{i}"), F.count(F.when(c.judged, 1)).alias(f"j{i}"),
                 F.count(F.when(c.failed, 1)).alias(f"f{i}")]
    counts = frame.agg(*aggs).first()
    found: dict[int, tuple[int, int, int]] = {i: (counts[f"r{i}"], counts[f"j{i}"], counts[f"f{i}"])
                                              for i in compiled}
    for i, c in compiled.items():
        if c.unique is not None:
            col = F.col(f"`{c.unique}`")
            dup = (frame.where(c.judged).groupBy(col).count().where("count > 1")
                   .agg(F.coalesce(F.sum("count"), F.lit(0)).alias("n")).first()["n"])
            found[i] = (found[i][0], found[i][1], int(dup))
    outcomes: dict[int, q._Outcome] = {}
    for rule in suite.rules:
        rows, judged, failed = found[rule.index]
        mostly = rule.kwargs.get("mostly")
        success = failed == 0 if mostly is None else (judged == 0 or (judged - failed) / judged >= mostly)
        if rule.severity == q.QUARANTINE and failed or rule.severity == q.FAIL and not success:
            return None  # rows to name (quarantine) or a batch to stop: Great Expectations decides, exactly
        outcomes[rule.index] = q._Outcome(success, evaluated=rows, unexpected=failed,
                                          percent=(100.0 * failed / judged) if judged else None)
    run_id = q._run_id(job, suite.table, batch)
    results, warned = [], []
    for rule in suite.rules:
        out = outcomes[rule.index]
        if out.unexpected:
            c = compiled[rule.index]
            shown = frame.where(c.failed) if c.unique is None else frame.where(c.judged).join(
                frame.where(c.judged).groupBy(c.unique).count().where("count > 1").select(c.unique), c.unique)
            out.examples = [q._plain(r[0]) for r in shown.select(c.shown).limit(q.EXAMPLES).collect()]
        results.append(q._result_row(rule, out, suite, run_id=run_id, job=job, batch=batch, at=at,
                                     sampled_from=None))
        if not out.success:
            warned.append(q.Finding(rule.snake_type, rule.column, rule.severity, rule.reason, rule.description,
                                    out.unexpected, q._observed(out)))
    table = pa.Table.from_pylist(results, schema=q.DQ_RESULTS_ARROW_SCHEMA)
    return q.Validation(suite.table, batch, table, (), (), tuple(warned))
