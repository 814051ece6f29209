"""Data quality: Great Expectations suites with a severity per expectation, run on each batch's Arrow tables.

A suite (`expectations/<table>.json`, format documented in expectations/README.md) lists expectations by their
Great Expectations class name with kwargs, a severity and a stable reason code:

- `warn`: reported (results table, HTML report, log), the batch is written as it is;
- `quarantine`: the rows that fail leave the batch for silver.quarantine with the reason code;
- `fail`: the batch is not written; the caller raises `DataQualityFailed` (`Validation.raise_for_failures`).

`validate` converts the Arrow table to pandas once, adds the suite's derived columns, and runs two Great
Expectations validations on an ephemeral context: the row-level `quarantine` and the `fail` expectations on every
row (`quarantine` with the COMPLETE result format, whose `unexpected_index_list` holds the failing rows' positions
in the input table), then the `warn` expectations with the SUMMARY format, on a seeded random sample when
`sample_rows` is set and the batch is larger. Each expectation becomes one row of `silver.dq_results`
(DQ_RESULTS_SCHEMA); `render_html` turns results into a self-contained report.
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import json
import logging
import re
import threading
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from pyspark.sql.types import (
    BooleanType,
    DoubleType,
    LongType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

from pipelines.errors import CarelakeError, ConfigError

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger("carelake.quality")

DQ_RESULTS = "silver.dq_results"
SUITE_FORMAT = 1
SEVERITIES = ("warn", "quarantine", "fail")
WARN, QUARANTINE, FAIL = SEVERITIES
# Parameters every suite may use without declaring them: the validation time (naive UTC).
BUILTIN_PARAMETERS = ("validated_at",)
# kwargs the engine sets itself; a suite says them another way (row_filter, severity) or not at all.
RESERVED_KWARGS = frozenset({"row_condition", "condition_parser", "result_format", "meta", "severity", "id",
                             "catch_exceptions", "notes", "rendered_content", "batch_id", "windows"})
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
REASON_PATTERN = re.compile(r"^dq_[a-z0-9_]+$")
EXAMPLES = 5  # example unexpected values kept per expectation in `details`
OBSERVED_CHARS = 200
DETAIL_CHARS = 2000

DQ_RESULTS_SCHEMA = StructType([
    StructField("run_id", StringType(), False),  # one validation of one batch of one table (stable on replay)
    StructField("table", StringType(), False),
    StructField("job", StringType(), False),
    StructField("batch", StringType(), False),
    StructField("validated_at", TimestampType(), False),
    StructField("expectation", StringType(), False),  # Great Expectations type, e.g. expect_column_values_to_be_in_set
    StructField("column", StringType(), True),  # the column(s) it looks at, comma-separated; null for table-level
    StructField("severity", StringType(), False),  # warn | quarantine | fail
    StructField("success", BooleanType(), False),
    StructField("evaluated_rows", LongType(), True),  # rows it looked at (after row_filter and sampling)
    StructField("unexpected_rows", LongType(), True),
    StructField("unexpected_percent", DoubleType(), True),
    StructField("observed", StringType(), True),  # a short readable summary
    StructField("details", StringType(), True),  # JSON: index, reason, description, row_filter, kwargs, examples...
    StructField("suite_version", StringType(), False),
])
DQ_RESULTS_ARROW_SCHEMA = pa.schema([
    ("run_id", pa.string(), False), ("table", pa.string(), False), ("job", pa.string(), False),
    ("batch", pa.string(), False), ("validated_at", pa.timestamp("us", tz="UTC"), False),
    ("expectation", pa.string(), False), ("column", pa.string()), ("severity", pa.string(), False),
    ("success", pa.bool_(), False), ("evaluated_rows", pa.int64()), ("unexpected_rows", pa.int64()),
    ("unexpected_percent", pa.float64()), ("observed", pa.string()), ("details", pa.string()),
    ("suite_version", pa.string(), False),
])


class SuiteError(ConfigError):
    """An expectation suite file is malformed; the message names the file, the expectation and the fix."""


class DataQualityFailed(CarelakeError):
    """A batch failed a fail-severity expectation and must not be written."""


# -- suites -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """One expectation of a suite: a Great Expectations class with kwargs, plus carelake's severity and reason."""

    index: int
    type: str
    kwargs: Mapping[str, Any]
    severity: str
    reason: str
    description: str
    row_filter: str | None = None

    @property
    def column(self) -> str | None:
        """The column(s) the expectation looks at, comma-separated; None for a table-level expectation."""
        k = self.kwargs
        if "column" in k:
            return str(k["column"])
        if "column_A" in k:
            return f"{k['column_A']},{k['column_B']}"
        if "column_list" in k:
            return ",".join(map(str, k["column_list"]))
        return None

    @property
    def snake_type(self) -> str:
        """The Great Expectations type name: ExpectColumnValuesToBeInSet -> expect_column_values_to_be_in_set."""
        return re.sub(r"(?<!^)(?=[A-Z])", "_", self.type).lower()


@dataclass(frozen=True)
class Derived:
    """A column added before validation: `column` plus a duration (`plus`), or `column` looked up in `map`."""

    name: str
    column: str
    plus: str | None = None
    map: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Suite:
    """A loaded, checked expectation suite for one table."""

    table: str
    version: str
    rules: tuple[Rule, ...]
    parameters: Mapping[str, Any] = field(default_factory=dict)
    derived: tuple[Derived, ...] = ()
    description: str = ""
    path: str = ""

    def columns(self) -> set[str]:
        """Every name the suite may read: expectation columns, derived inputs and identifiers in row filters."""
        names = {d.column for d in self.derived}
        for rule in self.rules:
            names.update((rule.column or "").split(","))
            names.update(_IDENTIFIER.findall(rule.row_filter or ""))
        return names - {""}

    def by_severity(self, *severities: str) -> list[Rule]:
        """The rules of the given severities, in suite order."""
        return [r for r in self.rules if r.severity in severities]


def suite_path(path_or_table_name: str | Path, folder: Path = Path("expectations")) -> Path:
    """The file of a suite named by path or by table (silver.observations -> <folder>/silver.observations.json)."""
    given = Path(path_or_table_name)
    if given.suffix == ".json" or given.exists():
        return given
    return Path(folder) / f"{path_or_table_name}.json"


def load_suite(path_or_table_name: str | Path, folder: Path = Path("expectations")) -> Suite:
    """Read and check an expectation suite; SuiteError says what is wrong, where, and how to fix it."""
    path = suite_path(path_or_table_name, folder)
    if not path.is_file():
        raise SuiteError(f"{path}: no such expectation suite; create it (format: expectations/README.md) or fix "
                         "Job.expectation_suite")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SuiteError(f"{path}: not valid JSON ({exc}); fix the syntax at line {exc.lineno}") from None
    return parse_suite(doc, source=str(path))


def parse_suite(doc: Any, *, source: str = "<suite>") -> Suite:
    """Check a suite document (the parsed JSON) and build the Suite."""
    if not isinstance(doc, dict):
        raise SuiteError(f"{source}: a suite is a JSON object with version, table and expectations")
    unknown = sorted(set(doc) - {"format", "version", "table", "description", "parameters", "derived",
                                 "expectations"})
    if unknown:
        raise SuiteError(f"{source}: unknown top-level key(s) {unknown}; allowed: format, version, table, "
                         "description, parameters, derived, expectations")
    if doc.get("format", SUITE_FORMAT) != SUITE_FORMAT:
        raise SuiteError(f"{source}: format {doc.get('format')!r} is not supported; this carelake reads format "
                         f"{SUITE_FORMAT}")
    for key in ("version", "table"):
        if not isinstance(doc.get(key), str) or not doc[key].strip():
            raise SuiteError(f"{source}: '{key}' must be a non-empty string (e.g. \"version\": \"1.0.0\", "
                             "\"table\": \"silver.observations\")")
    parameters = _parameters(doc.get("parameters", {}), source)
    derived = _derived(doc.get("derived", []), parameters, source)
    items = doc.get("expectations")
    if not isinstance(items, list) or not items:
        raise SuiteError(f"{source}: 'expectations' must be a non-empty list")
    known = {*parameters, *BUILTIN_PARAMETERS}
    rules = tuple(_rule(i, item, known, source) for i, item in enumerate(items))
    return Suite(table=doc["table"], version=doc["version"], rules=rules, parameters=parameters, derived=derived,
                 description=str(doc.get("description", "")), path=source)


def _parameters(raw: Any, source: str) -> dict[str, Any]:
    """Suite parameters: numbers, or strings (durations such as "15min" where a derived column adds them)."""
    if not isinstance(raw, dict):
        raise SuiteError(f"{source}: 'parameters' must be an object {{name: number or string}}")
    for name, value in raw.items():
        if name in BUILTIN_PARAMETERS:
            raise SuiteError(f"{source}: parameter {name!r} is built in; rename yours")
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise SuiteError(f"{source}: parameter {name!r} must be a number or a string, got {value!r}")
    return dict(raw)


def _derived(raw: Any, parameters: Mapping[str, Any], source: str) -> tuple[Derived, ...]:
    """Derived columns: [{name, column, plus | map}]; plus is a duration or "$parameter", map a lookup object."""
    if not isinstance(raw, list):
        raise SuiteError(f"{source}: 'derived' must be a list of {{name, column, plus or map}}")
    out = []
    for i, item in enumerate(raw):
        where = f"{source}: derived[{i}]"
        shape_ok = (isinstance(item, dict) and not set(item) - {"name", "column", "plus", "map", "description"}
                    and all(isinstance(item.get(k), str) for k in ("name", "column"))
                    and ("plus" in item) != ("map" in item))
        if not shape_ok:
            raise SuiteError(f"{where}: needs string keys name and column, and exactly one of plus (a duration, e.g. "
                             "\"$future_tolerance\" or \"15min\") or map (an object {value: derived value}); "
                             "description is optional")
        if "map" in item:
            if not isinstance(item["map"], dict) or not all(isinstance(v, str | int | float) and not isinstance(v, bool)
                                                            for v in item["map"].values()):
                raise SuiteError(f"{where}: map must be an object whose values are all numbers or all strings")
            out.append(Derived(item["name"], item["column"], map=dict(item["map"])))
            continue
        try:
            _duration(item["plus"], parameters)
        except (KeyError, ValueError, TypeError) as exc:
            raise SuiteError(f"{where}: plus {item['plus']!r} is not a duration ({exc}); use e.g. \"15min\", "
                             "\"2h\" or \"$name\" of a declared duration parameter") from None
        out.append(Derived(item["name"], item["column"], plus=item["plus"]))
    return tuple(out)


def _duration(text: str, parameters: Mapping[str, Any]) -> Any:
    """A pandas Timedelta from a literal ("15min") or a "$parameter" reference."""
    import pandas as pd

    value = parameters[text[1:]] if text.startswith("$") else text
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is a number; give a unit, e.g. \"15min\"")
    return pd.Timedelta(value)


def _rule(index: int, item: Any, parameters: set[str], source: str) -> Rule:
    """Check one expectation entry and build its Rule."""
    where = f"{source}: expectations[{index}]"
    if not isinstance(item, dict):
        raise SuiteError(f"{where}: must be an object with type, kwargs, severity, reason and description")
    extra = sorted(set(item) - {"type", "kwargs", "severity", "reason", "description", "row_filter"})
    if extra:
        raise SuiteError(f"{where}: unknown key(s) {extra}; allowed: type, kwargs, severity, reason, description, "
                         "row_filter")
    kind = item.get("type")
    where = f"{where} ({kind})"
    cls = _expectation_class(kind, where)
    severity = item.get("severity")
    if severity not in SEVERITIES:
        raise SuiteError(f"{where}: severity {severity!r} is not one of {list(SEVERITIES)}")
    reason = item.get("reason")
    if not isinstance(reason, str) or not REASON_PATTERN.match(reason):
        raise SuiteError(f"{where}: reason {reason!r} must be a stable code like \"dq_effective_in_future\" "
                         "(dq_ then lower-case letters, digits, underscores)")
    if not isinstance(item.get("description"), str) or not item["description"].strip():
        raise SuiteError(f"{where}: 'description' must say in words what is checked and why")
    row_filter = item.get("row_filter")
    if row_filter is not None and (not isinstance(row_filter, str) or not row_filter.strip()):
        raise SuiteError(f"{where}: row_filter must be a pandas query string such as \"concept == 'hr'\"")
    kwargs = _kwargs(item.get("kwargs"), where, parameters)
    if severity == QUARANTINE and "mostly" in kwargs:
        raise SuiteError(f"{where}: a quarantine expectation quarantines every failing row, so 'mostly' means "
                         "nothing there; remove it, or make the expectation 'warn' or 'fail'")
    if severity == QUARANTINE and not _is_row_level(cls):
        raise SuiteError(f"{where}: severity 'quarantine' needs a row-level expectation (column values, column "
                         "pair or multicolumn); make it 'warn' or 'fail'")
    _build(cls, kwargs, row_filter, index, where)
    return Rule(index, kind, kwargs, severity, reason, item["description"].strip(), row_filter)


def _expectation_class(kind: Any, where: str) -> type:
    """The Great Expectations class a suite entry names."""
    gx = _gx_module()
    from great_expectations.expectations.expectation import Expectation

    cls = getattr(gx.expectations, kind, None) if isinstance(kind, str) else None
    if not (isinstance(cls, type) and issubclass(cls, Expectation)) or kind == "Expectation":
        raise SuiteError(f"{where}: type {kind!r} is not a Great Expectations expectation; use a class name from "
                         "great_expectations.expectations, e.g. ExpectColumnValuesToNotBeNull")
    return cls


def _kwargs(raw: Any, where: str, parameters: set[str]) -> dict[str, Any]:
    """Check an entry's kwargs: an object without engine-reserved keys, naming only declared parameters."""
    if not isinstance(raw, dict):
        raise SuiteError(f"{where}: 'kwargs' must be an object of the expectation's arguments, e.g. "
                         "{\"column\": \"patient_key\"}")
    reserved = sorted(RESERVED_KWARGS & set(raw))
    if reserved:
        raise SuiteError(f"{where}: kwargs {reserved} are set by carelake; use row_filter for row conditions and "
                         "the entry's severity")
    for key, value in raw.items():
        if isinstance(value, dict) and "$PARAMETER" in value and value["$PARAMETER"] not in parameters:
            raise SuiteError(f"{where}: kwargs.{key} uses parameter {value['$PARAMETER']!r}, which the suite "
                             f"does not declare; add it to 'parameters' (built in: {list(BUILTIN_PARAMETERS)})")
    return raw


def _is_row_level(cls: type) -> bool:
    """Whether an expectation judges rows one by one (so failing rows can be named)."""
    from great_expectations.expectations.expectation import (
        ColumnMapExpectation,
        ColumnPairMapExpectation,
        MulticolumnMapExpectation,
    )

    return issubclass(cls, ColumnMapExpectation | ColumnPairMapExpectation | MulticolumnMapExpectation)


def _build(cls: type, kwargs: Mapping[str, Any], row_filter: str | None, index: int, where: str) -> Any:
    """A Great Expectations expectation object; a bad argument becomes a SuiteError naming it."""
    condition = {"row_condition": row_filter, "condition_parser": "pandas"} if row_filter else {}
    try:
        return cls(**kwargs, **condition, meta={"carelake_index": index})
    except Exception as exc:  # pydantic's ValidationError lists every missing or mistyped argument
        problems = "; ".join(
            f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in getattr(exc, "errors", list)()
        ) or str(exc)
        raise SuiteError(f"{where}: bad kwargs ({problems}); see the expectation's arguments in the Great "
                         "Expectations gallery") from None


# -- Great Expectations, quietly ------------------------------------------------------------------------
# Great Expectations keeps its active context in a process-wide singleton and is not documented as thread-safe:
# one context per process, and one validation at a time (jobs run together share it).
_lock = threading.RLock()
_definition: list[Any] = []


def _gx_module() -> Any:
    """great_expectations, imported on first use (it takes seconds) with its logger turned down to errors."""
    with _quiet():
        import great_expectations as gx

    gx_log = logging.getLogger("great_expectations")
    if gx_log.level == logging.NOTSET:
        gx_log.setLevel(logging.ERROR)
    chatty = logging.getLogger("great_expectations.data_context.types.base")  # GE forces it to INFO on import
    if chatty.level == logging.INFO:
        chatty.setLevel(logging.NOTSET)
    return gx


def _batch_definition() -> Any:
    """The process's pandas batch definition on an ephemeral context with progress bars off (call under _lock)."""
    if not _definition:
        gx = _gx_module()
        from great_expectations.data_context.types.base import ProgressBarsConfig

        with _quiet():
            context = gx.get_context(mode="ephemeral")
            context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
            asset = context.data_sources.add_pandas("carelake").add_dataframe_asset("batch")
            _definition.append(asset.add_batch_definition_whole_dataframe("whole"))
    return _definition[0]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hide Great Expectations' deprecation and future warnings (its own and its dependencies'); errors still raise."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module="great_expectations")
        yield


# -- validation ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Finding:
    """A failed warn or fail expectation (or one that could not be evaluated)."""

    expectation: str
    column: str | None
    severity: str
    reason: str
    description: str
    unexpected_rows: int | None
    observed: str

    def line(self) -> str:
        """One readable line for logs and error messages."""
        where = f" on {self.column}" if self.column else ""
        return f"{self.reason} ({self.expectation}{where}): {self.observed}"


@dataclass(frozen=True)
class QuarantinedRow:
    """An input row that failed quarantine-severity expectations: its position, reason codes and why."""

    index: int
    reasons: tuple[str, ...]
    detail: str


@dataclass(frozen=True)
class Validation:
    """The outcome of validating one batch: the results rows, rows to quarantine, failures and warnings."""

    table: str
    batch: str
    results: pa.Table
    quarantine_rows: tuple[QuarantinedRow, ...]
    failed: tuple[Finding, ...]
    warnings: tuple[Finding, ...]

    @property
    def quarantine_indices(self) -> list[int]:
        """Positions (in the validated table) of the rows to quarantine, ascending."""
        return [q.index for q in self.quarantine_rows]

    def summary(self) -> str:
        """One line for the batch log."""
        reasons: dict[str, int] = {}
        for q in self.quarantine_rows:
            for r in q.reasons:
                reasons[r] = reasons.get(r, 0) + 1
        quarantined = ", ".join(f"{k} {v:,}" for k, v in sorted(reasons.items())) or "none"
        return (f"{self.table} batch {self.batch}: {self.results.num_rows} expectation(s), {len(self.failed)} "
                f"failed (fail), {len(self.warnings)} warning(s), {len(self.quarantine_rows):,} row(s) "
                f"quarantined ({quarantined})")

    def raise_for_failures(self) -> None:
        """Raise DataQualityFailed naming every failed fail-severity expectation, if any."""
        if self.failed:
            lines = "; ".join(f.line() for f in self.failed)
            raise DataQualityFailed(f"{self.table} batch {self.batch} failed {len(self.failed)} fail-severity "
                                    f"expectation(s): {lines}. The batch was not written; fix the data or the "
                                    "suite, then rerun (it replays)")


def validate(table: pa.Table, suite: Suite, *, batch: str, job: str, at: datetime,
             parameters: Mapping[str, Any] | None = None, sample_rows: int | None = None) -> Validation:
    """Run a suite on one batch (an Arrow table) and return results, rows to quarantine, failures and warnings.

    `parameters` override the suite's (e.g. {"future_tolerance": "10min"}). With `sample_rows`, warn-severity
    expectations of a larger batch see a seeded random sample of that many rows; quarantine- and fail-severity
    expectations always see every row.
    """
    at = at if at.tzinfo else at.replace(tzinfo=UTC)
    params = _resolved_parameters(suite, parameters, at)
    frame = _frame(table, suite, params)
    full = [r for r in suite.rules if r.severity != WARN]
    warn = suite.by_severity(WARN)
    filtered: dict[str, pd.DataFrame] = {}
    outcomes = {r.index: o for r in full if (o := _clean_pass(frame, r, filtered)) is not None}
    outcomes.update(_run(frame, [r for r in full if r.index not in outcomes], params, complete=True))
    sample = _sample(frame, sample_rows, batch)
    sampled = {r.index: o for r in warn if (o := _clean_pass(sample, r)) is not None}
    outcomes.update(sampled)
    outcomes.update(_run(sample, [r for r in warn if r.index not in sampled], params, complete=False))
    run_id = _run_id(job, suite.table, batch)
    rows, failed, warned, quarantined = [], [], [], {}
    for rule in suite.rules:
        out = outcomes[rule.index]
        sampled_from = len(frame) if rule.severity == WARN and len(sample) < len(frame) else None
        rows.append(_result_row(rule, out, suite, run_id=run_id, job=job, batch=batch, at=at,
                                sampled_from=sampled_from))
        if out.success:
            continue
        finding = Finding(rule.snake_type, rule.column, rule.severity, rule.reason, rule.description,
                          out.unexpected, _observed(out))
        if rule.severity == FAIL or (rule.severity == QUARANTINE and out.error):
            failed.append(finding)
        elif rule.severity == WARN:
            warned.append(finding)
        else:
            _collect_quarantine(quarantined, rule, out)
    results = pa.Table.from_pylist(rows, schema=DQ_RESULTS_ARROW_SCHEMA)
    return Validation(suite.table, batch, results, _quarantine_rows(quarantined), tuple(failed), tuple(warned))


def _resolved_parameters(suite: Suite, overrides: Mapping[str, Any] | None, at: datetime) -> dict[str, Any]:
    """Suite parameters with the caller's overrides and the built-in validated_at (naive UTC)."""
    unknown = sorted(set(overrides or {}) - set(suite.parameters))
    if unknown:
        raise ConfigError(f"quality parameters {unknown} are not declared by {suite.path or suite.table}; "
                          f"it declares {sorted(suite.parameters)}")
    return {**suite.parameters, **(overrides or {}), "validated_at": at.astimezone(UTC).replace(tzinfo=None)}


def _frame(table: pa.Table, suite: Suite, params: Mapping[str, Any]) -> pd.DataFrame:
    """The batch as pandas, once: flat columns only, timestamps as naive UTC nanoseconds, derived columns added."""
    used = suite.columns()
    flat = [f.name for f in table.schema if not pa.types.is_nested(f.type) and f.name in used]
    frame = table.select(flat).to_pandas(date_as_object=False, types_mapper=_string_types().get)
    for name in flat:
        frame[name] = _comparable_times(frame[name])
    for d in suite.derived:
        if d.column not in frame.columns:
            raise SuiteError(f"{suite.path}: derived column {d.name!r} adds to {d.column!r}, which the "
                             f"{suite.table} batch lacks (columns: {flat})")
        frame[d.name] = _derive(frame[d.column], d, params)
    return frame.copy()  # one consolidated block per dtype: Great Expectations copies the frame per metric


def _string_types() -> dict[pa.DataType, Any]:
    """Strings as Arrow-backed pandas strings: no Python object per value, vectorized isin, regex and null checks."""
    import pandas as pd

    return {pa.string(): pd.StringDtype("pyarrow"), pa.large_string(): pd.StringDtype("pyarrow")}


def _derive(series: pd.Series, d: Derived, params: Mapping[str, Any]) -> pd.Series:
    """One derived column: the source plus a duration, or the source looked up in a map (unmapped -> null)."""
    if d.map is not None:
        return series.map(d.map)
    return series + _duration(d.plus or "", params)


def _comparable_times(series: pd.Series) -> pd.Series:
    """Datetimes as naive UTC datetime64[ns] (Great Expectations' vectorized path); others unchanged."""
    import pandas as pd

    if isinstance(series.dtype, pd.DatetimeTZDtype):
        series = series.dt.tz_convert("UTC").dt.tz_localize(None)
    if pd.api.types.is_datetime64_dtype(series.dtype) and series.dtype != "datetime64[ns]":
        with contextlib.suppress(pd.errors.OutOfBoundsDatetime, OverflowError):
            series = series.astype("datetime64[ns]")  # dates outside 1677..2262 keep their unit
    return series


def _sample(frame: pd.DataFrame, sample_rows: int | None, batch: str) -> pd.DataFrame:
    """The rows warn-severity expectations see: all of them, or a random sample seeded by the batch id."""
    if sample_rows is None or len(frame) <= sample_rows:
        return frame
    if sample_rows < 1:
        raise ConfigError(f"quality sample_rows must be a positive number of rows or unset, got {sample_rows}")
    return frame.sample(n=sample_rows, random_state=zlib.crc32(batch.encode()))


@dataclass
class _Outcome:
    """What one expectation found, reduced to what carelake keeps."""

    success: bool
    evaluated: int | None = None
    unexpected: int | None = None
    percent: float | None = None
    observed_value: Any = None
    examples: list[Any] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    values: list[Any] = field(default_factory=list)
    error: str | None = None


def _run(frame: pd.DataFrame, rules: Sequence[Rule], params: Mapping[str, Any], *, complete: bool,
         ) -> dict[int, _Outcome]:
    """Validate rules on a frame in one Great Expectations run; outcomes by rule index."""
    if not rules:
        return {}
    gx = _gx_module()
    expectations = [_build(_expectation_class(r.type, r.type), r.kwargs, r.row_filter, r.index, r.type) for r in rules]
    result_format = {"result_format": "COMPLETE" if complete else "SUMMARY", "partial_unexpected_count": EXAMPLES}
    with _lock, _quiet():
        definition = _batch_definition()
        suite = gx.ExpectationSuite(name="carelake", expectations=expectations)
        batch = definition.get_batch(batch_parameters={"dataframe": frame})
        report = batch.validate(suite, result_format=result_format, expectation_parameters=dict(params))
    return {int(r.expectation_config.meta["carelake_index"]): _outcome(r) for r in report.results}


# Simple row-level expectations and the kwargs they may have for `_clean_pass` to judge them.
_SIMPLE = {
    "ExpectColumnValuesToNotBeNull": {"column", "mostly"},
    "ExpectColumnValuesToBeInSet": {"column", "value_set", "mostly"},
    "ExpectColumnValuesToMatchRegex": {"column", "regex", "mostly"},
    "ExpectColumnPairValuesToBeEqual": {"column_A", "column_B", "ignore_row_if", "mostly"},
    "ExpectColumnPairValuesAToBeGreaterThanB": {"column_A", "column_B", "or_equal", "ignore_row_if", "mostly"},
}


# Regexes Python's re and Arrow's RE2 read alike (no escapes, ASCII): RE2 then checks them without Python objects.
_PLAIN_REGEX = re.compile(r"^[\x20-\x5b\x5d-\x7e]*$")


def _matches(values: pd.Series, regex: str) -> pd.Series:
    """Great Expectations' regex test (`astype(str).str.contains`), vectorized in Arrow where that is the same."""
    if _PLAIN_REGEX.match(regex) and str(values.dtype) == "string":
        return values.str.contains(regex).astype(bool)  # RE2's $ is stricter than re's: never a false pass
    return values.astype(str).str.contains(regex)


def _clean_pass(frame: pd.DataFrame, rule: Rule, filtered: dict[str, pd.DataFrame] | None = None,
                ) -> _Outcome | None:
    """A simple column rule that no row fails, judged with vectorized pandas (the same calls Great Expectations
    makes); None when some row fails or the rule is not simple, and Great Expectations then decides (and names
    the rows). Every row of a large batch goes through the quarantine and fail rules: this keeps that cheap."""
    k = rule.kwargs
    if set(k) - _SIMPLE.get(rule.type, set()) or any(isinstance(v, dict) for v in k.values()):
        return None
    if k.get("ignore_row_if", "either_value_is_missing") != "either_value_is_missing":
        return None
    try:
        rows = frame
        if rule.row_filter:
            filtered = {} if filtered is None else filtered
            if rule.row_filter not in filtered:
                filtered[rule.row_filter] = frame.query(rule.row_filter, parser="pandas")
            rows = filtered[rule.row_filter]
        if rule.type.startswith("ExpectColumnPair"):
            a, b = rows[k["column_A"]], rows[k["column_B"]]
            both = a.notna() & b.notna()
            a, b = a[both], b[both]
            if rule.type.endswith("ToBeEqual"):
                ok = a == b
            else:
                ok = a >= b if k.get("or_equal") else a > b
            judged = int(both.sum())
        else:
            column = rows[k["column"]]
            values = column[column.notna()]
            if rule.type == "ExpectColumnValuesToNotBeNull":
                ok, judged = column.notna(), len(column)
            elif rule.type == "ExpectColumnValuesToBeInSet":
                ok, judged = values.isin(k["value_set"]), len(values)
            else:
                ok, judged = _matches(values, k["regex"]), len(values)
        if judged and not bool(ok.all()):
            return None
    except Exception:  # anything unusual: Great Expectations decides, and reports what went wrong
        return None
    return _Outcome(True, evaluated=len(rows), unexpected=0, percent=0.0 if judged else None)


def _outcome(result: Any) -> _Outcome:
    """Reduce a Great Expectations ExpectationValidationResult."""
    info = result.exception_info or {}
    errors = [v for v in info.values() if isinstance(v, dict) and v.get("raised_exception")]
    if info.get("raised_exception"):
        errors.append(info)
    if errors:
        return _Outcome(False, error=str(errors[0].get("exception_message") or "error")[:DETAIL_CHARS])
    r = result.result or {}
    count = r.get("unexpected_count")
    return _Outcome(
        success=bool(result.success),
        evaluated=_int(r.get("element_count")),
        unexpected=_int(count),
        percent=None if r.get("unexpected_percent") is None else float(r["unexpected_percent"]),
        observed_value=r.get("observed_value"),
        examples=[_plain(v) for v in (r.get("partial_unexpected_list") or [])[:EXAMPLES]],
        indices=[int(i) for i in r.get("unexpected_index_list") or []],
        values=list(r.get("unexpected_list") or []),
    )


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def _plain(value: Any) -> Any:
    """A JSON-friendly form of a value Great Expectations reports (numpy scalars, timestamps, tuples)."""
    import numpy as np
    import pandas as pd

    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, np.datetime64 | pd.Timestamp | datetime):
        return None if pd.isna(value) else pd.Timestamp(value).isoformat()
    if hasattr(value, "item") and not isinstance(value, str):
        with contextlib.suppress(ValueError, TypeError):
            value = value.item()
    if isinstance(value, float) and value != value:
        return None
    return value if isinstance(value, str | int | float | bool | type(None)) else str(value)


def _observed(out: _Outcome) -> str:
    """A short readable summary of an outcome."""
    if out.error:
        text = f"could not evaluate: {out.error}"
    elif out.unexpected is not None:
        text = f"{out.unexpected:,} of {out.evaluated or 0:,} rows unexpected ({out.percent or 0.0:.2f}%)"
        if out.examples:
            text += "; e.g. " + ", ".join(json.dumps(v, default=str) for v in out.examples[:3])
    else:
        text = f"observed {json.dumps(_plain(out.observed_value), default=str)}"
    return text[:OBSERVED_CHARS]


def _run_id(job: str, table: str, batch: str) -> str:
    """A stable id for one validation of one batch of one table (a replayed batch gets the same id)."""
    return hashlib.sha256(f"{job}|{table}|{batch}".encode()).hexdigest()[:32]


def _result_row(rule: Rule, out: _Outcome, suite: Suite, *, run_id: str, job: str, batch: str, at: datetime,
                sampled_from: int | None) -> dict[str, Any]:
    """One silver.dq_results row."""
    details = {"index": rule.index, "type": rule.type, "reason": rule.reason, "description": rule.description,
               "row_filter": rule.row_filter, "kwargs": rule.kwargs, "examples": out.examples,
               "sampled_from_rows": sampled_from, "error": out.error}
    if out.observed_value is not None:
        details["observed_value"] = _plain(out.observed_value)
    return {"run_id": run_id, "table": suite.table, "job": job, "batch": batch, "validated_at": at,
            "expectation": rule.snake_type, "column": rule.column, "severity": rule.severity,
            "success": out.success, "evaluated_rows": out.evaluated, "unexpected_rows": out.unexpected,
            "unexpected_percent": out.percent, "observed": _observed(out),
            "details": json.dumps(details, default=str, sort_keys=True), "suite_version": suite.version}


def _collect_quarantine(acc: dict[int, list[tuple[str, str]]], rule: Rule, out: _Outcome) -> None:
    """Add a quarantine rule's failing rows (position -> [(reason, detail)])."""
    values = out.values if len(out.values) == len(out.indices) else [None] * len(out.indices)
    for index, value in zip(out.indices, values, strict=True):
        shown = "" if value is None else f" (value: {json.dumps(_plain(value), default=str)})"
        acc.setdefault(index, []).append((rule.reason, f"{rule.reason}: {rule.description}{shown}"))


def _quarantine_rows(acc: Mapping[int, list[tuple[str, str]]]) -> tuple[QuarantinedRow, ...]:
    """Quarantined rows by position, each with its distinct reasons in suite order and a joined detail."""
    rows = []
    for index in sorted(acc):
        reasons = tuple(dict.fromkeys(r for r, _ in acc[index]))
        detail = "; ".join(dict.fromkeys(d for _, d in acc[index]))[:DETAIL_CHARS]
        rows.append(QuarantinedRow(index, reasons, detail))
    return tuple(rows)


# -- moving quarantined rows out --------------------------------------------------------------------------
QuarantineRowFn = Callable[[dict[str, Any], QuarantinedRow], dict[str, Any]]


def split_quarantined(table: pa.Table, validation: Validation, *, to_quarantine_row: QuarantineRowFn,
                      quarantine_schema: pa.Schema) -> tuple[pa.Table, pa.Table]:
    """Split a validated batch into (rows to write, silver.quarantine rows for the rest).

    `to_quarantine_row(row, quarantined)` turns one input row (a dict) and its QuarantinedRow into a row of
    `quarantine_schema`; `lineage_quarantine_row` does it for tables with bronze lineage columns.
    """
    import pyarrow.compute as pc

    if not validation.quarantine_rows:
        return table, quarantine_schema.empty_table()
    positions = pa.array(validation.quarantine_indices, pa.int64())
    mask = pc.invert(pc.is_in(pa.array(range(table.num_rows), pa.int64()), value_set=positions))
    picked = table.take(positions).to_pylist()
    rows = [to_quarantine_row(row, q) for row, q in zip(picked, validation.quarantine_rows, strict=True)]
    return table.filter(mask), pa.Table.from_pylist(rows, schema=quarantine_schema)


def lineage_quarantine_row(job: str, at: datetime, *, item_column: str | tuple[str, ...] = "source_id"
                           ) -> QuarantineRowFn:
    """A to_quarantine_row for silver tables carrying `source_feed` and a `source_record` struct (bronze lineage).

    One silver.quarantine row per quarantined input row: reason = its first reason code, detail = every reason
    with its description and value; the quarantine_id hashes job, lineage, item and reason (replays add nothing).
    """
    from silver.quarantine import quarantine_id

    def convert(row: dict[str, Any], q: QuarantinedRow) -> dict[str, Any]:
        src = row.get("source_record") or {}
        columns = (item_column,) if isinstance(item_column, str) else item_column
        item = "dq:" + "/".join(str(row.get(c) if row.get(c) is not None else "") for c in columns)
        table, file, position = src.get("table") or "", src.get("landing_file") or "", src.get("landing_position")
        return {"quarantine_id": quarantine_id(job, table, file, position if position is not None else -1, item,
                                               q.reasons[0]),
                "feed": row.get("source_feed") or "", "source_table": table, "landing_file": file,
                "landing_position": position if position is not None else -1, "sha256": src.get("sha256") or "",
                "item": item, "reason": q.reasons[0], "detail": q.detail, "job": job, "quarantined_at": at}

    return convert


# -- the HTML report --------------------------------------------------------------------------------------
_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d232a;max-width:1200px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 6px} .meta{color:#5b6570;margin-bottom:16px}
table{border-collapse:collapse;width:100%;margin:6px 0 14px} th,td{padding:5px 8px;border-bottom:1px solid #e3e7eb;
text-align:left;vertical-align:top} th{background:#f4f6f8;font-weight:600} td.n{text-align:right;
font-variant-numeric:tabular-nums} .pass{color:#1a7f37;font-weight:600} .bad{color:#b42318;font-weight:600}
.sev{display:inline-block;padding:1px 7px;border-radius:9px;font-size:12px;font-weight:600}
.sev-warn{background:#fff4ce;color:#7a5b00} .sev-quarantine{background:#ffe2cc;color:#8a3b00}
.sev-fail{background:#ffd6d6;color:#9b1c1c} .ex{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;
color:#39424c} .desc{color:#5b6570;font-size:12px} tr.failed td{background:#fffafa}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin:10px 0 6px} .card{border:1px solid #e3e7eb;border-radius:8px;
padding:10px 14px;min-width:130px} .card b{display:block;font-size:20px}
"""


def render_html(results: pa.Table, out: Path, *, title: str = "carelake data quality") -> Path:
    """Write a self-contained HTML report of dq_results rows: a summary, then each table and batch."""
    rows = results.to_pylist()
    body = [f"<h1>{_e(title)}</h1>", _summary_html(rows)]
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["table"], r["batch"], r["job"]), []).append(r)
    for (table, batch, job), group in sorted(groups.items(), key=lambda kv: (kv[0][0], _batch_order(kv[0][1]))):
        body.append(_group_html(table, batch, job, group))
    if not rows:
        body.append("<p>No validation results.</p>")
    page = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_e(title)}</title>"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _batch_order(batch: str) -> tuple[int, str]:
    """Numeric batches in number order, others after, by name."""
    tail = batch.rsplit("/", 1)[-1]
    return (int(tail), batch) if tail.isdigit() else (1 << 62, batch)


def _summary_html(rows: list[dict[str, Any]]) -> str:
    """The cards at the top: tables, batches, expectations run, failures by severity."""
    failed = [r for r in rows if not r["success"]]
    cards = [("tables", len({r["table"] for r in rows})), ("batches", len({(r["table"], r["batch"]) for r in rows})),
             ("expectations run", len(rows)), ("passed", len(rows) - len(failed))]
    cards += [(f"failed ({s})", sum(r["severity"] == s for r in failed)) for s in SEVERITIES]
    cards.append(("rows quarantined (max per batch, per rule)",
                  sum(r["unexpected_rows"] or 0 for r in failed if r["severity"] == QUARANTINE)))
    times = [r["validated_at"] for r in rows if r["validated_at"] is not None]
    span = f"{min(times):%Y-%m-%d %H:%M:%S} – {max(times):%Y-%m-%d %H:%M:%S} UTC" if times else ""
    html_cards = "".join(f"<div class=\"card\"><b>{v:,}</b>{_e(k)}</div>" for k, v in cards)
    return f"<div class=\"meta\">{_e(span)}</div><div class=\"cards\">{html_cards}</div>"


def _group_html(table: str, batch: str, job: str, rows: list[dict[str, Any]]) -> str:
    """One table+batch section: failures first, then passes, each with severity, counts and examples."""
    bad = sum(not r["success"] for r in rows)
    head = (f"<h2>{_e(table)} — batch {_e(batch)}</h2><div class=\"meta\">job {_e(job)}, suite "
            f"{_e(rows[0]['suite_version'])}, validated {rows[0]['validated_at']:%Y-%m-%d %H:%M:%S} UTC — "
            f"{len(rows) - bad} passed, {bad} failed</div>")
    header = ("<tr><th>result</th><th>severity</th><th>expectation</th><th>column</th><th>rows</th>"
              "<th>unexpected</th><th>%</th><th>observed / examples</th></tr>")
    ordered = sorted(rows, key=lambda r: (r["success"], SEVERITIES.index(r["severity"]) * -1))
    return head + "<table>" + header + "".join(_row_html(r) for r in ordered) + "</table>"


def _row_html(r: dict[str, Any]) -> str:
    """One expectation result as a table row."""
    details = json.loads(r["details"] or "{}")
    mark = "<span class=\"pass\">pass</span>" if r["success"] else "<span class=\"bad\">FAIL</span>"
    sev = f"<span class=\"sev sev-{_e(r['severity'])}\">{_e(r['severity'])}</span>"
    what = (f"{_e(r['expectation'])}<div class=\"desc\">{_e(details.get('reason'))}: "
            f"{_e(details.get('description'))}</div>")
    if details.get("row_filter"):
        what += f"<div class=\"desc\">where {_e(details['row_filter'])}</div>"
    if details.get("sampled_from_rows"):
        what += f"<div class=\"desc\">sample of {details['sampled_from_rows']:,} rows</div>"
    pct = "" if r["unexpected_percent"] is None else f"{r['unexpected_percent']:.2f}"
    cells = [mark, sev, what, _e(r["column"]), _num(r["evaluated_rows"]), _num(r["unexpected_rows"]), pct,
             f"<span class=\"ex\">{_e(r['observed'])}</span>"]
    numeric = {4, 5, 6}
    tds = "".join(f"<td class=\"n\">{c}</td>" if i in numeric else f"<td>{c}</td>" for i, c in enumerate(cells))
    return f"<tr class=\"{'' if r['success'] else 'failed'}\">{tds}</tr>"


def _num(value: int | None) -> str:
    return "" if value is None else f"{value:,}"
