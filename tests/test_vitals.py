"""silver.vitals: codes, units, consciousness and plausibility, in Python and in Spark, with the same answers."""

from __future__ import annotations

import math
from dataclasses import asdict, fields

import pytest
from pyspark.sql.types import DoubleType, IntegerType, StringType, StructField, StructType

from silver.vitals import (
    BY_CODE,
    CODE_ALIASES,
    CODE_INDEX,
    CONSCIOUSNESS,
    CONVERSION_INDEX,
    UNIT_ALIASES,
    UNIT_INDEX,
    VITALS,
    Normalized,
    normalize,
    normalize_columns,
    normalized,
)

LOINC = "http://loinc.org"


def norm(code, value=None, unit=None, text=None, system=None, display=None) -> Normalized:
    return normalize(code, system, display, value, text, unit)


# --- codes -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("sent", "code", "concept"), [
    ("8867-4", "8867-4", "hr"), ("8889-8", "8867-4", "hr"), ("HR", "8867-4", "hr"), ("PULSE", "8867-4", "hr"),
    ("147842", "8867-4", "hr"), ("MDC_ECG_HEART_RATE", "8867-4", "hr"), ("149530", "8867-4", "hr"),
    ("MDC_PULS_OXIM_PULS_RATE", "8867-4", "hr"), ("149546", "8867-4", "hr"),
    ("9279-1", "9279-1", "rr"), ("RR", "9279-1", "rr"), ("RESP", "9279-1", "rr"), ("151562", "9279-1", "rr"),
    ("MDC_RESP_RATE", "9279-1", "rr"), ("151578", "9279-1", "rr"), ("151594", "9279-1", "rr"),
    ("59408-5", "59408-5", "spo2"), ("2708-6", "2708-6", "spo2"), ("SPO2", "59408-5", "spo2"),
    ("150456", "59408-5", "spo2"), ("MDC_PULS_OXIM_SAT_O2", "59408-5", "spo2"),
    ("8480-6", "8480-6", "sbp"), ("SBP", "8480-6", "sbp"), ("150021", "8480-6", "sbp"),
    ("MDC_PRESS_BLD_NONINV_SYS", "8480-6", "sbp"),
    ("8462-4", "8462-4", "dbp"), ("DBP", "8462-4", "dbp"), ("150022", "8462-4", "dbp"),
    ("MDC_PRESS_BLD_NONINV_DIA", "8462-4", "dbp"),
    ("8478-0", "8478-0", "map"), ("150023", "8478-0", "map"),
    ("8310-5", "8310-5", "temp"), ("8331-1", "8310-5", "temp"), ("8332-9", "8310-5", "temp"),
    ("8328-7", "8310-5", "temp"), ("TEMP", "8310-5", "temp"), ("150344", "8310-5", "temp"),
    ("MDC_TEMP", "8310-5", "temp"), ("150364", "8310-5", "temp"),
    ("3150-0", "3150-0", "fio2"), ("FIO2", "3150-0", "fio2"),
    ("3151-8", "3151-8", "o2flow"), ("O2FLOW", "3151-8", "o2flow"),
    ("67775-7", "67775-7", "acvpu"), ("ACVPU", "67775-7", "acvpu"), ("AVPU", "67775-7", "acvpu"),
    ("LOC", "67775-7", "acvpu"),
    ("hr", "8867-4", "hr"), (" SpO2 ", "59408-5", "spo2"),  # trimmed, case-insensitive
])
def test_code_maps_to_loinc_and_concept(sent, code, concept):
    value, text = (None, "A") if concept == "acvpu" else ({"spo2": 97, "fio2": 40, "temp": 37}.get(concept, 60), None)
    n = norm(sent, value, text=text)
    assert (n.code, n.system, n.concept, n.original_code) == (code, LOINC, concept, sent)
    assert n.display == BY_CODE[code].display
    assert n.problem is None


def test_displays_are_the_loinc_names():
    assert {c: BY_CODE[c].display for c in ("8867-4", "59408-5", "2708-6", "8310-5", "67775-7")} == {
        "8867-4": "Heart rate",
        "59408-5": "Oxygen saturation in Arterial blood by Pulse oximetry",
        "2708-6": "Oxygen saturation in Arterial blood",
        "8310-5": "Body temperature",
        "67775-7": "Level of responsiveness",
    }


@pytest.mark.parametrize(("code", "value", "unit"), [
    ("2524-7", 2.4, "mmol/L"), ("6690-2", 7.5, "10*3/uL"), ("2160-0", 0.9, "mg/dL"),
])
def test_labs_keep_code_and_canonical_unit(code, value, unit):
    n = norm(code, value, unit, system=LOINC, display="as sent")
    assert (n.code, n.value, n.unit, n.problem) == (code, value, unit, None)
    assert n.display == BY_CODE[code].display


def test_unknown_code_passes_through_unchanged():
    n = norm("1234-5", 4.2, "mg/dL", text="4.2 H", system=LOINC, display="Something else")
    assert n == Normalized(code="1234-5", system=LOINC, display="Something else", concept=None, value=4.2,
                           value_text="4.2 H", unit="mg/dL", original_code="1234-5", original_unit="mg/dL",
                           original_value=4.2, problem=None, problem_detail=None)


def test_unknown_code_keeps_unusual_unit_and_text_only_value():
    n = norm("X-LOCAL", None, "mmhg", text="positive", system="urn:local")
    assert (n.code, n.system, n.value, n.value_text, n.unit, n.problem) == (
        "X-LOCAL", "urn:local", None, "positive", "mmhg", None)


def test_missing_code_passes_through():
    assert norm(None, 5.0, "x").code is None and norm(None, 5.0, "x").problem is None


# --- units -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("code", "value", "unit", "expected", "canonical"), [
    ("8310-5", 98.6, "[degF]", 37.0, "Cel"),
    ("8310-5", 100.4, "degF", 38.0, "Cel"),
    ("8310-5", 310.15, "K", 37.0, "Cel"),
    ("8310-5", 37.2, "Cel", 37.2, "Cel"),
    ("8310-5", 37.2, "C", 37.2, "Cel"),
    ("8310-5", 37.2, "°C", 37.2, "Cel"),
    ("8310-5", 37.2, "degC", 37.2, "Cel"),
    ("8480-6", 16.0, "kPa", 120.00992, "mm[Hg]"),
    ("8480-6", 120, "mmHg", 120.0, "mm[Hg]"),
    ("8462-4", 80, "mm[Hg]", 80.0, "mm[Hg]"),
    ("29463-7", 154.0, "[lb_av]", 69.85322498, "kg"),
    ("29463-7", 70000, "g", 70.0, "kg"),
    ("59408-5", 0.97, "1", 97.0, "%"),
    ("59408-5", 0.97, "{fraction}", 97.0, "%"),
    ("59408-5", 0.97, None, 97.0, "%"),
    ("59408-5", 97, None, 97.0, "%"),
    ("59408-5", 97, "%", 97.0, "%"),
    ("59408-5", 97, "percent", 97.0, "%"),
    ("3150-0", 0.4, "1", 40.0, "%"),
    ("3150-0", 0.21, None, 21.0, "%"),
    ("3150-0", 28, "%", 28.0, "%"),
    ("8867-4", 72, "/min", 72.0, "/min"),
    ("8867-4", 72, "{beats}/min", 72.0, "/min"),
    ("8867-4", 72, "bpm", 72.0, "/min"),
    ("8867-4", 72, "264864", 72.0, "/min"),
    ("9279-1", 18, "{breaths}/min", 18.0, "/min"),
    ("9279-1", 18, None, 18.0, "/min"),
    ("3151-8", 2, "L/min", 2.0, "L/min"),
    ("3151-8", 2, "l/min", 2.0, "L/min"),
    ("3151-8", 500, "mL/min", 0.5, "L/min"),
    ("2160-0", 88.4, "umol/L", 1.0, "mg/dL"),
    ("2160-0", 176.8, "µmol/L", 2.0, "mg/dL"),
    ("6690-2", 7.5, "10*9/L", 7.5, "10*3/uL"),
    ("2524-7", 1.8, "mmol/L", 1.8, "mmol/L"),
])
def test_unit_conversion(code, value, unit, expected, canonical):
    n = norm(code, value, unit)
    assert n.problem is None, n.problem_detail
    assert n.value == pytest.approx(expected, abs=1e-9)
    assert (n.unit, n.original_unit, n.original_value) == (canonical, unit, value)


def test_unit_text_is_accepted_when_no_code():
    """HL7 OBX-6.2 / FHIR Quantity.unit text: what a parser passes when the unit has no code."""
    assert norm("8480-6", 120, " mm Hg ").unit == "mm[Hg]"
    assert norm("8310-5", 37.0, "Celsius").value == 37.0
    assert norm("8867-4", 60, "beats/min").unit == "/min"


@pytest.mark.parametrize(("code", "value", "unit"), [
    ("8867-4", 72, "mg"),          # unknown unit
    ("8867-4", 72, "%"),           # known unit, wrong dimension
    ("8310-5", 37, "mm[Hg]"),
    ("8480-6", 120, "cm[H2O]"),
    ("2160-0", 1.0, "mmol/L"),     # substance conversion not in the table
    ("3151-8", 2, "%"),
])
def test_unit_not_convertible_is_a_problem_not_a_guess(code, value, unit):
    n = norm(code, value, unit)
    assert (n.problem, n.value, n.unit, n.original_value, n.original_unit) == (
        "unit_not_convertible", None, None, value, unit)
    assert n.problem_detail == f"unit '{unit}' cannot be converted to {BY_CODE[code].unit} for {BY_CODE[code].display}"


def test_fraction_unit_on_a_percentage_is_exact_arithmetic():
    """97 labelled as a fraction is 9700 %: quarantined, not silently read as 97 %."""
    n = norm("59408-5", 97, "1")
    assert (n.value, n.problem) == (9700.0, "implausible_value")


# --- values ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("code", "value", "unit"), [
    ("8867-4", 900, "/min"), ("8867-4", 0, "/min"), ("8867-4", -5, "bpm"),
    ("8310-5", 3.5, "Cel"), ("8310-5", 98.6, None),  # Fahrenheit number without a unit is read as Cel
    ("8310-5", 50, "Cel"), ("9279-1", 120, "/min"), ("59408-5", 101, "%"),
    ("8480-6", 15, "mm[Hg]"), ("8480-6", 350, "mm[Hg]"), ("8462-4", 5, "mm[Hg]"), ("8462-4", 260, "mm[Hg]"),
    ("3150-0", 15, "%"), ("3151-8", 90, "L/min"), ("3151-8", -1, "L/min"),
    ("8867-4", math.inf, "/min"),
])
def test_implausible_values_are_quarantined(code, value, unit):
    n = norm(code, value, unit)
    assert n.problem == "implausible_value"
    assert n.problem_detail.startswith(f"{BY_CODE[code].display} outside plausible range [")


def test_implausible_detail_and_value_after_conversion():
    n = norm("8310-5", 38.3, "[degF]")  # 3.5 Cel
    assert n.value == pytest.approx(3.5)
    assert (n.unit, n.problem, n.problem_detail) == (
        "Cel", "implausible_value", "Body temperature outside plausible range [25, 45] Cel")
    assert norm("8867-4", 900).problem_detail == "Heart rate outside plausible range [1, 300] /min"


@pytest.mark.parametrize(("code", "value", "unit"), [
    ("8867-4", 1, "/min"), ("8867-4", 300, "/min"), ("9279-1", 0, "/min"), ("9279-1", 100, "/min"),
    ("59408-5", 0, "%"), ("59408-5", 100, "%"), ("8480-6", 20, "mm[Hg]"), ("8480-6", 300, "mm[Hg]"),
    ("8462-4", 10, "mm[Hg]"), ("8462-4", 250, "mm[Hg]"), ("8310-5", 25, "Cel"), ("8310-5", 45, "Cel"),
    ("3150-0", 21, "%"), ("3150-0", 100, "%"), ("3151-8", 0, "L/min"), ("3151-8", 80, "L/min"),
])
def test_range_bounds_are_inclusive(code, value, unit):
    assert norm(code, value, unit).problem is None


def test_missing_value():
    n = norm("8867-4", None, "/min")
    assert (n.value, n.unit, n.problem, n.problem_detail) == (None, None, "missing_value", "Heart rate has no value")
    assert norm("8867-4", math.nan, "/min").problem == "missing_value"
    assert norm("8867-4", None, "/min", text="pending").problem == "missing_value"


def test_numeric_text_is_read_for_known_vitals():
    n = norm("8867-4", None, "/min", text=" 72.5 ")
    assert (n.value, n.original_value, n.value_text, n.problem) == (72.5, 72.5, " 72.5 ", None)
    assert norm("8867-4", math.nan, None, text="80").value == 80.0
    assert norm("8867-4", None, None, text="1e2").problem == "missing_value"  # plain decimals only


# --- consciousness ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("sent", "letter"), [
    ("A", "A"), ("C", "C"), ("V", "V"), ("P", "P"), ("U", "U"), ("a", "A"), (" u ", "U"),
    ("Alert", "A"), ("alert", "A"), ("Confused", "C"), ("New confusion", "C"), ("new confusion", "C"),
    ("Voice", "V"), ("Responds to voice", "V"), ("Pain", "P"), ("responds to pain", "P"),
    ("Unresponsive", "U"), ("UNRESPONSIVE", "U"),
    ("248234008", "A"), ("130987000", "C"), ("300202002", "V"), ("450847001", "P"), ("422768004", "U"),
])
def test_consciousness_in_every_form(sent, letter):
    n = norm("67775-7", text=sent)
    assert (n.value_text, n.value, n.unit, n.concept, n.problem) == (letter, None, None, "acvpu", None)
    assert n.original_value is None


def test_consciousness_local_code_and_unit_ignored():
    n = norm("AVPU", text="V", unit="{score}")
    assert (n.code, n.value_text, n.unit, n.original_unit) == ("67775-7", "V", None, "{score}")


def test_consciousness_unrecognized_and_missing():
    n = norm("67775-7", text="drowsy")
    assert (n.problem, n.value_text, n.problem_detail) == (
        "unrecognized_value", "drowsy", "'drowsy' is not an ACVPU level (A, C, V, P, U)")
    assert norm("67775-7", text=" ").problem == "missing_value"
    assert norm("67775-7", 0).problem == "missing_value"  # a number is not an ACVPU level


# --- tables ----------------------------------------------------------------------------------------------------

def test_tables_are_consistent():
    assert len(BY_CODE) == len(VITALS)
    assert set(CODE_ALIASES) <= set(BY_CODE)
    assert all(alias == alias.upper() for aliases in CODE_ALIASES.values() for alias in aliases)
    assert not set(CODE_INDEX) & {c for c in BY_CODE if CODE_INDEX[c] != c}  # no alias re-points a canonical code
    assert all(alias == alias.lower() for aliases in UNIT_ALIASES.values() for alias in aliases)
    assert set(CONSCIOUSNESS) == set("ACVPU")
    for v in VITALS:
        if v.unit is None:
            assert v.low is None and v.high is None
        else:
            assert v.low < v.high and CONVERSION_INDEX[f"{v.code}|{v.unit}"].scale == 1.0
            assert v.unit in UNIT_INDEX.values()


def test_spo2_codes_share_one_concept():
    a, b = norm("59408-5", 95, "%"), norm("2708-6", 95, "%")
    assert (a.code, b.code, a.concept, b.concept) == ("59408-5", "2708-6", "spo2", "spo2")


# --- Python and Spark agree ------------------------------------------------------------------------------------

AGREEMENT_ROWS = [
    # code, code_system, display, value_num, value_text, unit
    ("8867-4", LOINC, "Heart rate", 72.0, None, "/min"),
    ("HR", "local", None, 88.0, None, "bpm"),
    ("147842", "urn:iso:std:iso:11073:10101", "MDC_ECG_HEART_RATE", 64.0, None, "264864"),
    ("8889-8", LOINC, None, 0.0, None, "/min"),
    ("8867-4", LOINC, None, 900.0, None, "/min"),
    ("8867-4", LOINC, None, None, " 71 ", None),
    ("8867-4", LOINC, None, float("nan"), None, "/min"),
    ("8867-4", LOINC, None, None, None, "/min"),
    ("8867-4", LOINC, None, 72.0, None, "mg"),
    ("8867-4", LOINC, None, float("inf"), None, "/min"),
    ("RESP", None, None, 18.0, None, "{breaths}/min"),
    ("9279-1", LOINC, None, 0.0, None, None),
    ("150456", None, None, 0.95, None, None),
    ("59408-5", LOINC, None, 0.93, None, "{fraction}"),
    ("2708-6", LOINC, None, 96.0, None, "percent"),
    ("59408-5", LOINC, None, 97.0, None, "1"),
    ("SBP", None, None, 16.0, None, "kPa"),
    ("8480-6", LOINC, None, 350.0, None, "mmHg"),
    ("150022", None, None, 80.0, None, "mm[Hg]"),
    ("8478-0", LOINC, None, 93.0, None, "mm[Hg]"),
    ("8310-5", LOINC, None, 98.6, None, "[degF]"),
    ("8331-1", LOINC, None, 310.15, None, "K"),
    ("TEMP", None, None, 3.5, None, "°C"),
    ("150344", None, None, 37.4, None, "268192"),
    ("8310-5", LOINC, None, 37.0, None, "mm[Hg]"),
    ("FIO2", None, None, 0.21, None, None),
    ("3150-0", LOINC, None, 15.0, None, "%"),
    ("O2FLOW", None, None, 2.0, None, "l/min"),
    ("67775-7", LOINC, None, None, "A", None),
    ("ACVPU", None, None, None, "new confusion", "{score}"),
    ("67775-7", LOINC, None, None, "248234008", None),
    ("67775-7", LOINC, None, None, "422768004", None),
    ("LOC", None, None, None, "drowsy", None),
    ("67775-7", LOINC, None, 2.0, None, None),
    ("2524-7", LOINC, "Lactate", 2.4, None, "mmol/L"),
    ("6690-2", LOINC, "WBC", 11.0, None, "10*9/L"),
    ("2160-0", LOINC, "Creatinine", 97.0, None, "umol/L"),
    ("2160-0", LOINC, "Creatinine", 1.1, None, "mmol/L"),
    ("29463-7", LOINC, None, 176.0, None, "[lb_av]"),
    ("1234-5", LOINC, "Unknown lab", 4.2, "4.2 H", "mg/dL"),
    ("X-LOCAL", "urn:local", None, None, "positive", None),
    (None, None, None, 1.0, None, None),
]

AGREEMENT_SCHEMA = StructType([
    StructField("id", IntegerType(), False),
    StructField("code", StringType()),
    StructField("code_system", StringType()),
    StructField("display", StringType()),
    StructField("value_num", DoubleType()),
    StructField("value_text", StringType()),
    StructField("unit", StringType()),
])


def _assert_rows_match_python(rows, names):
    assert len(rows) == len(AGREEMENT_ROWS)
    for row, inputs in zip(rows, AGREEMENT_ROWS, strict=True):
        expected = asdict(normalize(*inputs))
        actual = {name: row[name] for name in names}
        for name in ("value", "original_value"):
            assert actual.pop(name) == pytest.approx(expected.pop(name), rel=1e-12), (inputs, name)
        assert actual == expected, inputs


def test_python_and_spark_agree_row_by_row(spark):
    df = spark.createDataFrame([(i, *row) for i, row in enumerate(AGREEMENT_ROWS)], AGREEMENT_SCHEMA)
    names = [f.name for f in fields(Normalized)]
    staged = df.transform(normalized(display="display"))
    assert staged.columns == [c.name for c in AGREEMENT_SCHEMA] + [n for n in names if n not in df.columns]
    _assert_rows_match_python(staged.select("id", *names).orderBy("id").collect(), names)
    fused = normalize_columns("code", "code_system", "value_num", "value_text", "unit", display="display")
    rows = df.select("id", *(column.alias(name) for name, column in fused.items())).orderBy("id").collect()
    _assert_rows_match_python(rows, names)
    assert {r.problem for r in rows} == {None, "missing_value", "unit_not_convertible", "implausible_value",
                                         "unrecognized_value"}
