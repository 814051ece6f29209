"""What a statement may do: be one query that reads only the views the server resolved for it.

The statement is parsed by Spark's own parser (no execution) and its plan walked: every relation it names must be
one of the views the catalog registered for this statement's table references (or a CTE it defines); commands
(SET, CREATE, INSERT, ADD JAR, ...), file reads (parquet.`/path`), table-valued functions that read storage,
functions that call into the JVM, and names or SQL known only at analysis (IDENTIFIER(...), EXECUTE IMMEDIATE) are
refused. A name the rewrite did not see (`global_temp.x` typed directly, a
quoted `silver`.`patients`) is therefore refused, not resolved.
"""

from __future__ import annotations

from collections.abc import Iterable

from pipelines.errors import CarelakeError

# Functions that reach outside SQL: they call Java methods by name, or parse XML (whose entities can name files).
_DENIED_FUNCTIONS = frozenset({"reflect", "java_method", "try_reflect", "from_xml", "schema_of_xml", "xpath",
                               *(f"xpath_{t}" for t in ("boolean", "double", "float", "int", "long", "number",
                                                        "short", "string"))})
# Table-valued functions that only generate rows (no storage, no other tables).
_ALLOWED_TVFS = frozenset({"range", "explode", "explode_outer", "inline", "inline_outer", "posexplode",
                           "posexplode_outer", "stack", "json_tuple"})
_CATALYST = "org.apache.spark.sql.catalyst"
_LATE_NAMES = "{kind} is not available through the SQL server: write table and function names as they are"


class StatementRefused(CarelakeError):
    """The statement does something the SQL server does not allow; the message says what and why."""


def _seq(jseq) -> list:
    """A Scala Seq (through py4j) as a Python list."""
    it, out = jseq.iterator(), []
    while it.hasNext():
        out.append(it.next())
    return out


def _name(jnode) -> str:
    return jnode.getClass().getName()


def check_statement(spark, text: str, allowed: Iterable[str], schema: str = "global_temp") -> None:
    """Raise StatementRefused unless `text` is one query reading only `schema`.<one of allowed> (and its own CTEs)."""
    jvm = spark._jvm  # noqa: SLF001 - the parser is reachable only through the JVM
    try:
        plan = spark._jsparkSession.sessionState().sqlParser().parsePlan(text)  # noqa: SLF001
    except Exception as exc:  # py4j wraps Spark's ParseException
        first = str(exc).split("\n", 2)
        detail = next((line for line in first if "PARSE" in line or "Syntax" in line), first[0])
        raise StatementRefused(f"SQL syntax error: {detail.strip()[:300]}") from None
    command = jvm.java.lang.Class.forName(f"{_CATALYST}.plans.logical.Command")
    subquery = jvm.java.lang.Class.forName(f"{_CATALYST}.expressions.SubqueryExpression")
    allowed = {(schema, v.lower()) for v in allowed}
    ctes: set[str] = set()
    relations: list[tuple[str, ...]] = []
    plans, exprs = [plan], []
    while plans or exprs:
        if exprs:
            e = exprs.pop()
            cls = _name(e)
            if "UnresolvedIdentifier" in cls:  # IDENTIFIER('name')(...): a function named at analysis
                raise StatementRefused(_LATE_NAMES.format(kind="IDENTIFIER(...)"))
            if cls.endswith(".UnresolvedFunction"):
                parts = tuple(str(p).lower() for p in _seq(e.nameParts()))
                if parts[-1] in _DENIED_FUNCTIONS or len(parts) > 1:
                    raise StatementRefused(f"the function {'.'.join(parts)} is not available through the SQL server")
            if subquery.isInstance(e):
                plans.append(e.plan())
            exprs += _seq(e.children())
            continue
        p = plans.pop()
        cls = _name(p)
        if (command.isInstance(p) or cls.endswith("Statement") or cls.endswith(".InsertIntoDir")
                or cls.endswith(".Call") or "Procedure" in cls):
            kind = cls.rsplit(".", 1)[-1]
            raise StatementRefused(f"only queries run through the SQL server (SELECT, WITH ...); this statement is "
                                   f"{kind}")
        if "UnresolvedIdentifier" in cls or "ExecuteImmediate" in cls:  # names or SQL text known only at analysis
            kind = "EXECUTE IMMEDIATE" if "ExecuteImmediate" in cls else "IDENTIFIER(...)"
            raise StatementRefused(_LATE_NAMES.format(kind=kind))
        if cls.endswith(".UnresolvedRelation"):
            relations.append(tuple(str(x).lower() for x in _seq(p.multipartIdentifier())))
        elif cls.endswith(".UnresolvedTableValuedFunction"):
            fn = ".".join(str(x) for x in _seq(p.name())).lower()
            if fn not in _ALLOWED_TVFS:
                raise StatementRefused(f"the table function {fn} is not available through the SQL server")
        elif cls.endswith(".UnresolvedWith"):
            for pair in _seq(p.cteRelations()):
                ctes.add(str(pair._1()).lower())
                plans.append(pair._2())
        plans += _seq(p.children())
        exprs += _seq(p.expressions())
    for rel in relations:
        if rel in allowed or (len(rel) == 1 and rel[0] in ctes):
            continue
        raise StatementRefused(f"{'.'.join(rel)} is not a table the SQL server serves: name lakehouse tables as "
                               "<layer>.<table> (e.g. gold.early_warning_scores) or a view from the server's list")
