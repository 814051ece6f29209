"""pipelines.quality: suite loading and checking, per-batch validation, quarantine split, dq_results and HTML."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pytest
from pyspark.sql.pandas.types import to_arrow_schema

from pipelines.quality import (
    DQ_RESULTS_ARROW_SCHEMA,
    DQ_RESULTS_SCHEMA,
    DataQualityFailed,
    SuiteError,
    lineage_quarantine_row,
    load_suite,
    parse_suite,
    render_html,
    split_quarantined,
    validate,
)
from silver.observations import SCHEMA as OBSERVATIONS
from silver.quarantine import QUARANTINE_SCHEMA

REPO = Path(__file__).resolve().parents[1]
SUITES = REPO / "expectations"
NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
KEY = "a" * 32
TABLES = ("silver.observations", "silver.patients", "silver.encounters")


def obs(i: int, **changes) -> dict:
    """One valid silver.observations row (a device heart rate), with changes."""
    row = {"observation_id": f"{i:032x}", "patient_key": KEY, "code": "8867-4", "code_system": "http://loinc.org",
           "display": "Heart rate", "concept": "hr", "value": 80.0, "unit": "/min",
           "effective_at": NOW - timedelta(minutes=3), "status": "final", "source_feed": "devices",
           "source_system": "monitor-7", "source_id": "monitor-7", "source_version": "0",
           "source_record": {"table": "bronze.device_readings", "landing_file": "landing/devices/a.jsonl",
                             "landing_position": 100 * i, "sha256": f"{i:064x}"},
           "received_at": NOW, "ingested_at": NOW}
    row.update(changes)
    return row


def table(rows: list[dict], schema=OBSERVATIONS) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=to_arrow_schema(schema))


def by_reason(validation) -> dict[str, dict]:
    """dq_results rows keyed by reason code (the first one of each reason)."""
    out: dict[str, dict] = {}
    for r in validation.results.to_pylist():
        out.setdefault(json.loads(r["details"])["reason"], r)
    return out


@pytest.fixture(scope="module")
def suite():
    return load_suite("silver.observations", SUITES)


PLANTED = [
    obs(0),                                                               # clean
    obs(1, effective_at=NOW + timedelta(hours=2)),                         # future -> quarantine
    obs(2, patient_key=None),                                             # no patient -> quarantine
    obs(3, unit="mm[Hg]"),                                                 # wrong unit -> quarantine
    obs(4, value=240.0),                                                   # unusual hr -> warn only
    obs(5, concept="acvpu", code="67775-7", unit=None, value=None, value_text="X"),  # bad ACVPU -> quarantine
    obs(6, status="deleted", patient_key=None, effective_at=None, concept=None, unit=None, value=None),  # exempt
    obs(7, effective_at=NOW + timedelta(hours=1), unit="kg"),              # two reasons
]


@pytest.fixture(scope="module")
def planted(suite):
    return validate(table(PLANTED), suite, batch="7", job="silver.observations", at=NOW)


# -- suites ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TABLES)
def test_suites_load(name):
    s = load_suite(name, SUITES)
    assert s.table == name and s.version and s.rules
    assert {r.severity for r in s.rules} <= {"warn", "quarantine", "fail"}
    assert len({r.reason for r in s.rules if r.severity == "quarantine"}) == len(
        [r for r in s.rules if r.severity == "quarantine"]), "each quarantine rule has its own reason code"


def test_suite_columns_exist_in_the_silver_schemas():
    from silver.encounters import SCHEMA as ENCOUNTERS
    from silver.patients import SCHEMA as PATIENTS

    for name, schema in zip(TABLES, (OBSERVATIONS, PATIENTS, ENCOUNTERS), strict=True):
        s = load_suite(name, SUITES)
        known = {f.name for f in schema.fields} | {d.name for d in s.derived}
        for rule in s.rules:
            assert set((rule.column or "").split(",")) - {""} <= known, (name, rule.index, rule.column)


def _doc(**expectation) -> dict:
    good = {"type": "ExpectColumnValuesToNotBeNull", "kwargs": {"column": "patient_key"}, "severity": "warn",
            "reason": "dq_x", "description": "x"}
    return {"version": "1", "table": "silver.t", "expectations": [good, {**good, **expectation}]}


@pytest.mark.parametrize(("change", "message"), [
    ({"type": "ExpectColumnToBeFabulous"}, "is not a Great Expectations expectation"),
    ({"severity": "error"}, "severity 'error' is not one of ['warn', 'quarantine', 'fail']"),
    ({"kwargs": {}}, "bad kwargs (column: field required)"),
    ({"kwargs": {"column": "x", "row_condition": "y > 1"}}, "use row_filter"),
    ({"reason": "Future"}, "must be a stable code"),
    ({"type": "ExpectTableRowCountToBeBetween", "kwargs": {"min_value": 1}, "severity": "quarantine"},
     "needs a row-level expectation"),
    ({"kwargs": {"column": "x", "mostly": 0.9}, "severity": "quarantine"}, "'mostly' means nothing"),
    ({"kwargs": {"column": "x", "max_value": {"$PARAMETER": "nope"}}, "type": "ExpectColumnValuesToBeBetween"},
     "parameter 'nope', which the suite does not declare"),
])
def test_bad_suite_fails_naming_file_expectation_and_fix(tmp_path, change, message):
    path = tmp_path / "silver.t.json"
    path.write_text(json.dumps(_doc(**change)))
    with pytest.raises(SuiteError) as err:
        load_suite(path)
    text = str(err.value)
    assert text.startswith(f"{path}: expectations[1]"), text
    assert message in text


def test_bad_suite_structure(tmp_path):
    path = tmp_path / "s.json"
    path.write_text('{"version": "1", "table": "silver.t", "expectations": [}')
    with pytest.raises(SuiteError, match="not valid JSON"):
        load_suite(path)
    with pytest.raises(SuiteError, match="'version' must be a non-empty string"):
        parse_suite({"table": "t", "expectations": []})
    with pytest.raises(SuiteError, match=r"derived\[0\]: plus 'soon' is not a duration"):
        parse_suite({"version": "1", "table": "t", "derived": [{"name": "d", "column": "c", "plus": "soon"}],
                     "expectations": _doc()["expectations"]})
    with pytest.raises(SuiteError, match="no such expectation suite"):
        load_suite("silver.nothing", tmp_path)


# -- validation --------------------------------------------------------------------------------------
def test_planted_problems_give_results_rows(planted):
    r = by_reason(planted)
    assert r["dq_effective_in_future"]["success"] is False
    assert r["dq_effective_in_future"]["unexpected_rows"] == 2
    assert r["dq_missing_patient_key"]["unexpected_rows"] == 1
    assert r["dq_missing_patient_key"]["evaluated_rows"] == 7, "row_filter leaves the deletion marker out"
    assert r["dq_noncanonical_unit"]["unexpected_rows"] == 2
    assert r["dq_bad_acvpu"]["evaluated_rows"] == 1 and r["dq_bad_acvpu"]["unexpected_rows"] == 1
    assert r["dq_value_above_expected"]["severity"] == "warn"
    assert r["dq_value_above_expected"]["unexpected_rows"] == 1
    assert r["dq_unknown_source_feed"]["success"] is True
    assert r["dq_missing_observation_id"]["success"] is True
    assert r["dq_effective_in_future"]["observed"].startswith("2 of 8 rows unexpected (28.57%)")
    assert planted.results.num_rows == len(load_suite("silver.observations", SUITES).rules)


def test_quarantine_rows_carry_positions_and_reasons(planted):
    got = {q.index: q.reasons for q in planted.quarantine_rows}
    assert got == {1: ("dq_effective_in_future",), 2: ("dq_missing_patient_key",), 3: ("dq_noncanonical_unit",),
                   5: ("dq_bad_acvpu",), 7: ("dq_effective_in_future", "dq_noncanonical_unit")}
    detail = next(q.detail for q in planted.quarantine_rows if q.index == 3)
    assert "dq_noncanonical_unit" in detail and '["mm[Hg]", "/min"]' in detail
    assert not planted.failed
    assert [w.reason for w in planted.warnings] == ["dq_value_above_expected"]
    assert "5 row(s) quarantined" in planted.summary()


def test_unexpected_rows_map_to_input_positions(suite):
    rows = [obs(i) for i in range(120)]
    for i in (0, 57, 119):
        rows[i] = obs(i, effective_at=NOW + timedelta(days=1))
    rows[58] = obs(58, status="deleted", patient_key=None, effective_at=None)  # filtered out, not an offset
    v = validate(table(rows), suite, batch="1", job="j", at=NOW)
    assert v.quarantine_indices == [0, 57, 119]


def test_fail_severity_is_reported_and_raises(suite):
    v = validate(table([obs(0), obs(1, source_feed="pager")]), suite, batch="3", job="silver.observations", at=NOW)
    assert [f.reason for f in v.failed] == ["dq_unknown_source_feed"]
    assert not v.quarantine_rows
    with pytest.raises(DataQualityFailed, match=r"silver.observations batch 3 failed 1 fail-severity.*pager"):
        v.raise_for_failures()


def test_a_missing_column_is_an_error_not_a_pass(suite):
    v = validate(table([obs(0)]).drop_columns(["source_feed"]), suite, batch="1", job="j", at=NOW)
    failed = {f.reason: f for f in v.failed}
    assert "dq_unknown_source_feed" in failed
    assert "could not evaluate" in failed["dq_unknown_source_feed"].observed


def test_parameters_override_the_suite(suite):
    rows = table([obs(0, effective_at=NOW + timedelta(hours=2))])
    assert validate(rows, suite, batch="1", job="j", at=NOW).quarantine_indices == [0]
    tolerant = validate(rows, suite, batch="1", job="j", at=NOW, parameters={"future_tolerance": "3h"})
    assert tolerant.quarantine_rows == ()


def test_row_filter_limits_where_an_expectation_applies():
    doc = {"version": "2", "table": "silver.observations", "expectations": [
        {"type": "ExpectColumnValuesToBeBetween", "kwargs": {"column": "value", "min_value": 30, "max_value": 200},
         "row_filter": "concept == 'hr'", "severity": "quarantine", "reason": "dq_hr", "description": "hr range"}]}
    rows = [obs(0, value=20.0), obs(1, concept="rr", value=20.0), obs(2, value=250.0)]
    v = validate(table(rows), parse_suite(doc), batch="1", job="j", at=NOW)
    assert v.quarantine_indices == [0, 2]
    assert v.results.to_pylist()[0]["evaluated_rows"] == 2


def test_warn_expectations_sample_while_quarantine_sees_every_row(suite):
    rows = [obs(i, value=240.0 if i % 10 == 0 else 80.0) for i in range(400)]
    rows[399] = obs(399, patient_key=None)
    v = validate(table(rows), suite, batch="9", job="j", at=NOW, sample_rows=100)
    r = by_reason(v)
    assert r["dq_value_above_expected"]["evaluated_rows"] == 100
    assert json.loads(r["dq_value_above_expected"]["details"])["sampled_from_rows"] == 400
    assert r["dq_missing_patient_key"]["evaluated_rows"] == 400
    assert v.quarantine_indices == [399]


def test_patients_and_encounters_suites():
    from silver.encounters import SCHEMA as ENCOUNTERS
    from silver.patients import SCHEMA as PATIENTS

    def patient(i, **kw):
        return {"patient_key": f"{i:032x}", "identity_kind": "patient", "mrn": f"MRN{i}", "sex": "female",
                "birth_date": date(1950, 1, 1), "ingested_at": NOW, **kw}

    pats = [patient(0), patient(1, birth_date=date(2031, 1, 1)), patient(2, mrn=None),
            patient(3, identity_kind="fhir-patient", mrn=None), patient(4, birth_date=date(1800, 1, 1))]
    v = validate(table(pats, PATIENTS), load_suite("silver.patients", SUITES), batch="1", job="j", at=NOW)
    assert {q.index: q.reasons for q in v.quarantine_rows} == {1: ("dq_birth_date_in_future",),
                                                               2: ("dq_missing_mrn",)}
    assert [w.reason for w in v.warnings] == ["dq_birth_date_too_old"]

    def encounter(i, **kw):
        return {"encounter_key": f"{i:032x}", "identity_kind": "encounter", "visit_number": f"V{i}",
                "patient_key": KEY, "status": "finished", "admitted_at": NOW - timedelta(days=2),
                "discharged_at": NOW, "ingested_at": NOW, **kw}

    encs = [encounter(0), encounter(1, discharged_at=NOW - timedelta(days=3)), encounter(2, discharged_at=None),
            encounter(3, status="cancelled")]
    v = validate(table(encs, ENCOUNTERS), load_suite("silver.encounters", SUITES), batch="1", job="j", at=NOW)
    assert v.quarantine_indices == [1]
    assert v.quarantine_rows[0].reasons == ("dq_discharge_before_admit",)
    assert [w.reason for w in v.warnings] == ["dq_cancel_without_time"]


# -- results table, quarantine split, report -------------------------------------------------------------
def test_results_match_the_declared_schema(planted):
    assert planted.results.schema == DQ_RESULTS_ARROW_SCHEMA
    spark_as_arrow = to_arrow_schema(DQ_RESULTS_SCHEMA)
    assert [(f.name, f.type, f.nullable) for f in spark_as_arrow] == \
        [(f.name, f.type, f.nullable) for f in DQ_RESULTS_ARROW_SCHEMA]
    row = planted.results.to_pylist()[0]
    assert row["table"] == "silver.observations" and row["batch"] == "7" and row["suite_version"] == "1.1.0"
    assert row["validated_at"] == NOW
    assert len({r["run_id"] for r in planted.results.to_pylist()}) == 1


def test_split_quarantined_moves_rows_out_with_lineage(planted):
    at = NOW
    kept, quarantined = split_quarantined(table(PLANTED), planted, quarantine_schema=to_arrow_schema(QUARANTINE_SCHEMA),
                                          to_quarantine_row=lineage_quarantine_row("silver.observations", at))
    assert kept.column("observation_id").to_pylist() == [f"{i:032x}" for i in (0, 4, 6)]
    q = quarantined.to_pylist()
    assert [r["landing_position"] for r in q] == [100, 200, 300, 500, 700]
    assert [r["reason"] for r in q] == ["dq_effective_in_future", "dq_missing_patient_key", "dq_noncanonical_unit",
                                        "dq_bad_acvpu", "dq_effective_in_future"]
    assert "dq_noncanonical_unit" in q[-1]["detail"]
    assert {r["feed"] for r in q} == {"devices"} and {r["source_table"] for r in q} == {"bronze.device_readings"}
    assert len({r["quarantine_id"] for r in q}) == 5


def test_html_report(planted, suite, tmp_path):
    other = validate(table([obs(0)]), suite, batch="8", job="silver.observations", at=NOW)
    out = render_html(pa.concat_tables([planted.results, other.results]), tmp_path / "dq.html", title="Nightly run")
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and "Nightly run" in page
    assert "silver.observations — batch 7" in page and "silver.observations — batch 8" in page
    assert "dq_effective_in_future" in page and "expect_column_pair_values_a_to_be_greater_than_b" in page
    assert "2 of 8 rows unexpected" in page and "FAIL" in page
    assert "<script" not in page and "http" not in page.replace("http://loinc.org", "")  # self-contained
