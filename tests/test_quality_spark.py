"""Validation in Spark (pipelines.quality_spark) against Great Expectations on the same batches.

Where every quarantine and fail expectation passes, the Spark path must give the results Great Expectations
gives (success, rows evaluated, unexpected rows, percentage) for every expectation, warnings included; where one
of them finds a row, it must hand the batch to Great Expectations (None).
"""

from __future__ import annotations

import json
from datetime import date, timedelta

import pandas as pd
import pytest

from pipelines.quality import load_suite, validate
from pipelines.quality_spark import NotCompiled, row_filter_sql, validate_frame
from tests.test_quality import KEY, NOW, SUITES, obs, table


def _results(validation) -> dict[int, tuple]:
    out = {}
    for r in validation.results.to_pylist():
        index = json.loads(r["details"])["index"]
        pct = None if r["unexpected_percent"] is None else round(r["unexpected_percent"], 6)
        out[index] = (r["expectation"], r["success"], r["evaluated_rows"], r["unexpected_rows"], pct)
    return out


def both(spark, arrow, suite):
    """(Great Expectations, Spark) validations of one batch; every row sees the warn rules too."""
    ge = validate(arrow, suite, batch="b1", job="j", at=NOW)
    sp = validate_frame(spark.createDataFrame(arrow), suite, batch="b1", job="j", at=NOW)
    return ge, sp


def test_a_clean_observation_batch_with_warnings_is_judged_as_great_expectations_judges_it(spark):
    suite = load_suite("silver.observations", SUITES)
    rows = [obs(i) for i in range(40)]
    rows[3] = obs(3, value=240.0)                       # unusual heart rate: warn
    rows[4] = obs(4, value=20.0)                        # below the expected low: warn
    rows[5] = obs(5, code_system="http://snomed.info")  # not LOINC: warn
    rows[6] = obs(6, observation_id=f"{5:032x}")        # a duplicate id: warn (two rows unexpected)
    rows[7] = obs(7, status="deleted", patient_key=None, effective_at=None, concept=None, unit=None, value=None)
    rows[8] = obs(8, concept="acvpu", code="67775-7", unit=None, value=None, value_text="V")
    rows[9] = obs(9, effective_at=NOW.replace(year=1999))  # before 2000: warn
    ge, sp = both(spark, table(rows), suite)
    assert ge.quarantine_rows == () and ge.failed == ()
    assert sp is not None
    assert _results(sp) == _results(ge)
    assert sorted(w.reason for w in sp.warnings) == sorted(w.reason for w in ge.warnings)
    assert len(sp.warnings) >= 5
    dup = next(r for r in sp.results.to_pylist() if r["expectation"] == "expect_column_values_to_be_unique")
    assert dup["unexpected_rows"] == 2 and json.loads(dup["details"])["examples"] == [f"{5:032x}"] * 2


@pytest.mark.parametrize("change", [
    {"patient_key": None},                                   # quarantine: no patient
    {"unit": "mm[Hg]"},                                      # quarantine: not the canonical unit
    {"effective_at": NOW + timedelta(hours=2)},              # quarantine: in the future
    {"source_feed": "fax"},                                  # fail
])
def test_a_batch_with_rows_to_quarantine_or_a_failure_goes_to_great_expectations(spark, change):
    suite = load_suite("silver.observations", SUITES)
    rows = [obs(0), obs(1, **change), obs(2)]
    ge, sp = both(spark, table(rows), suite)
    assert ge.quarantine_rows or ge.failed
    assert sp is None


def test_patients_and_encounters_suites_agree_on_clean_batches(spark):
    from silver.encounters import SCHEMA as ENCOUNTERS
    from silver.patients import SCHEMA as PATIENTS

    def patient(i, **kw):
        return {"patient_key": f"{i:032x}", "identity_kind": "patient", "mrn": f"MRN{i}", "sex": "female",
                "birth_date": date(1950, 1, 1), "ingested_at": NOW, **kw}

    pats = [patient(0), patient(1, identity_kind="fhir-patient", mrn=None), patient(2, birth_date=date(1800, 1, 1)),
            patient(3, sex=None)]
    ge, sp = both(spark, table(pats, PATIENTS), load_suite("silver.patients", SUITES))
    assert ge.quarantine_rows == () and sp is not None and _results(sp) == _results(ge)

    def encounter(i, **kw):
        return {"encounter_key": f"{i:032x}", "identity_kind": "encounter", "visit_number": f"V{i}",
                "patient_key": KEY, "status": "finished", "admitted_at": NOW - timedelta(days=2),
                "discharged_at": NOW, "ingested_at": NOW, **kw}

    encs = [encounter(0), encounter(1, discharged_at=None, status="in-progress"), encounter(2, status="cancelled")]
    ge, sp = both(spark, table(encs, ENCOUNTERS), load_suite("silver.encounters", SUITES))
    assert ge.quarantine_rows == () and sp is not None and _results(sp) == _results(ge)
    assert [w.reason for w in sp.warnings] == [w.reason for w in ge.warnings] == ["dq_cancel_without_time"]


@pytest.mark.parametrize("query", [
    "status != 'deleted'",
    "concept.notna() and concept != 'acvpu' and status != 'deleted'",
    "concept == 'acvpu' and status != 'deleted'",
    "not (value > 100 or concept.isna())",
    "value <= 80.5",
    "not (status == 'final')",
    "status != 'final' or value > 70",
])
def test_row_filters_select_the_rows_pandas_selects_missing_values_included(spark, query):
    import pyarrow as pa

    arrow = pa.table({"id": pa.array(range(6), pa.int64()),
                      "status": ["final", "deleted", None, "final", "deleted", None],
                      "concept": ["hr", "acvpu", "acvpu", None, "hr", "rr"],
                      "value": pa.array([80.0, None, 120.0, 60.0, 80.5, None])})
    # the frame as Great Expectations sees it (quality._frame): Arrow-backed strings, NumPy floats (null -> NaN)
    data = arrow.to_pandas(types_mapper={pa.string(): pd.StringDtype("pyarrow")}.get)
    want = sorted(data.query(query, parser="pandas")["id"])
    got = sorted(r["id"] for r in spark.createDataFrame(arrow).where(
        row_filter_sql(query)).collect())
    assert got == want


def test_a_key_ending_in_a_line_break_is_judged_alike(spark):
    """`$` before a final line break: Great Expectations' path and Spark's regex agree on it."""
    suite = load_suite("silver.observations", SUITES)
    rows = [obs(0), obs(1, observation_id=f"{1:032x}\n")]
    ge, sp = both(spark, table(rows), suite)
    assert sp is not None and _results(sp) == _results(ge)


def test_a_row_filter_outside_the_subset_is_not_compiled():
    with pytest.raises(NotCompiled):
        row_filter_sql("value.between(1, 2)")
    with pytest.raises(NotCompiled):
        row_filter_sql("concept in ['hr', 'rr']")
