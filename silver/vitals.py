"""Clinical normalization for silver.observations: LOINC codes, UCUM units, ACVPU levels, plausible ranges.

Every measured value from HL7 OBX, FHIR Observation and bedside-device JSON goes through the same tables:

- VITALS: one row per canonical LOINC code: concept, display, canonical UCUM unit, plausible range.
- CODE_ALIASES: what senders send (other LOINC codes, local codes, IEEE 11073 MDC codes) -> canonical LOINC.
- UNIT_ALIASES, CONVERSIONS, CODE_CONVERSIONS: unit spellings -> UCUM, and UCUM -> canonical unit arithmetic.
- CONSCIOUSNESS: letters, words and SNOMED CT codes -> the ACVPU letter.

The tables are exposed two ways that give the same answer: `normalize` (pure Python, for the per-message
HL7/FHIR parsers) and Spark expressions built from the same derived indexes, without Python UDFs:
`normalized(...)`, a DataFrame -> DataFrame transform for device readings at scale, and `normalize_columns`,
the same fields as one Column expression each (for composing into a select on small frames).

Rules, in order, for a known numeric vital: no number -> `missing_value`; a unit that is neither the canonical
unit nor convertible to it -> `unit_not_convertible` (value and unit left null: no guessing); the converted
value outside the plausible range -> `implausible_value` (value kept so the quarantine row shows it). A missing
unit means the canonical unit, except that a bare number <= 1 for a percentage (SpO2, inhaled O2) is a fraction
and is multiplied by 100. Codes not in the tables pass through unchanged.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from pipelines import sqltext as sql

LOINC = "http://loinc.org"


@dataclass(frozen=True)
class Vital:
    """One canonical observation code: what it means, its canonical unit and the values a body can have."""

    code: str           # LOINC
    concept: str        # scoring key: several codes may share one (59408-5 and 2708-6 are both spo2)
    display: str        # LOINC long common name
    unit: str | None    # canonical UCUM unit; None for coded (non-numeric) observations
    low: float | None   # plausible range, inclusive, in `unit`
    high: float | None


# Plausible = a living patient can have it and a working sensor can report it. Outside -> quarantine, not score.
# Heart rate starts at 1, not 0: a monitor's 0 /min is far more often a lead-off or probe-off than asystole,
# and a real arrest is handled by the monitor's own alarm and the resuscitation team, not by an early-warning
# score computed later; quarantining a 0 keeps it out of NEWS2 (where it would score 3) without losing the row.
VITALS: tuple[Vital, ...] = (
    Vital("8867-4", "hr", "Heart rate", "/min", 1, 300),
    Vital("9279-1", "rr", "Respiratory rate", "/min", 0, 100),
    Vital("59408-5", "spo2", "Oxygen saturation in Arterial blood by Pulse oximetry", "%", 0, 100),
    Vital("2708-6", "spo2", "Oxygen saturation in Arterial blood", "%", 0, 100),
    Vital("8480-6", "sbp", "Systolic blood pressure", "mm[Hg]", 20, 300),
    Vital("8462-4", "dbp", "Diastolic blood pressure", "mm[Hg]", 10, 250),
    Vital("8478-0", "map", "Mean blood pressure", "mm[Hg]", 15, 250),
    # Arterial-line pressures keep their own codes (a method difference a reader must see) and share the concept:
    # NEWS2 scores a systolic pressure however it was measured.
    Vital("76215-0", "sbp", "Invasive Systolic blood pressure", "mm[Hg]", 20, 300),
    Vital("76213-5", "dbp", "Invasive Diastolic blood pressure", "mm[Hg]", 10, 250),
    Vital("76214-3", "map", "Invasive Mean blood pressure", "mm[Hg]", 15, 250),
    Vital("8310-5", "temp", "Body temperature", "Cel", 25, 45),
    Vital("3150-0", "fio2", "Inhaled oxygen concentration", "%", 21, 100),
    Vital("3151-8", "o2flow", "Inhaled oxygen flow rate", "L/min", 0, 80),
    Vital("67775-7", "acvpu", "Level of responsiveness", None, None, None),
    Vital("29463-7", "weight", "Body weight", "kg", 0.2, 700),
    Vital("2524-7", "lactate", "Lactate [Moles/volume] in Serum or Plasma", "mmol/L", 0, 40),
    Vital("6690-2", "wbc", "Leukocytes [#/volume] in Blood by Automated count", "10*3/uL", 0, 1000),
    Vital("2160-0", "creatinine", "Creatinine [Mass/volume] in Serum or Plasma", "mg/dL", 0.05, 40),
    # ICU labs, charting and blood gases (the PhysioNet 2012 records carry them; the mortality model reads them).
    # Ranges: the widest a living patient's sample has been reported with, so only a sentinel or a unit slip is
    # quarantined (BUN 1-300, pH 6.5-8, glucose 10-2000 mg/dL, ...).
    Vital("9269-2", "gcs", "Glasgow coma score total", "{score}", 3, 15),
    Vital("3094-0", "bun", "Urea nitrogen [Mass/volume] in Serum or Plasma", "mg/dL", 1, 300),
    Vital("9187-6", "urine", "Urine output", "mL", 0, 10000),  # the volume charted since the previous charting
    Vital("2744-1", "ph", "pH of Arterial blood", "[pH]", 6.5, 8.0),
    Vital("2703-7", "pao2", "Oxygen [Partial pressure] in Arterial blood", "mm[Hg]", 10, 800),
    Vital("2019-8", "paco2", "Carbon dioxide [Partial pressure] in Arterial blood", "mm[Hg]", 5, 200),
    Vital("1960-4", "hco3", "Bicarbonate [Moles/volume] in Arterial blood", "mmol/L", 1, 60),
    Vital("777-3", "platelets", "Platelets [#/volume] in Blood by Automated count", "10*3/uL", 1, 2000),
    Vital("1975-2", "bilirubin", "Bilirubin.total [Mass/volume] in Serum or Plasma", "mg/dL", 0, 60),
    Vital("2345-7", "glucose", "Glucose [Mass/volume] in Serum or Plasma", "mg/dL", 10, 2000),
    Vital("2823-3", "potassium", "Potassium [Moles/volume] in Serum or Plasma", "mmol/L", 1, 12),
    Vital("2951-2", "sodium", "Sodium [Moles/volume] in Serum or Plasma", "mmol/L", 90, 200),
    Vital("4544-3", "hct", "Hematocrit [Volume Fraction] of Blood by Automated count", "%", 5, 75),
    Vital("1751-7", "albumin", "Albumin [Mass/volume] in Serum or Plasma", "g/dL", 0.5, 7),
    Vital("1742-6", "alt", "Alanine aminotransferase [Enzymatic activity/volume] in Serum or Plasma", "U/L", 0, 20000),
    Vital("1920-8", "ast", "Aspartate aminotransferase [Enzymatic activity/volume] in Serum or Plasma", "U/L", 0,
          40000),
    Vital("6768-6", "alp", "Alkaline phosphatase [Enzymatic activity/volume] in Serum or Plasma", "U/L", 0, 10000),
)

# Sender code -> canonical LOINC. Matched on the code alone, trimmed and upper-cased: LOINC codes carry a
# check digit after a dash, MDC codes are six-digit numbers or MDC_ names, local codes are words, so the
# three never collide (a test asserts it). Canonical codes map to themselves implicitly.
# IEEE 11073-10101 MDC codes are partition 2 (SCADA) * 65536 + term code, e.g. 2 * 65536 + 16770 = 147842.
# Sources: HL7 PoCD IG example Observation (147842 MDC_ECG_HEART_RATE given with LOINC 8867-4),
# https://hl7.org/fhir/uv/pocd/2018Sep/Observation-f2252dbe-48e5-463b-b781-00c4fa71da88.html;
# HL7 PHD IG (149530 MDC_PULS_OXIM_PULS_RATE with LOINC 8867-4), https://hl7.org/fhir/uv/phd/2019May/spotnumeric-1.0.0.3.html;
# US Core SatO2 example (150456 MDC_PULS_OXIM_SAT_O2 with 2708-6 and 59408-5),
# https://www.hl7.org/fhir/us/core/2022Jan/Observation-satO2-fiO2.html; FHIR compound BP example (150021
# MDC_PRESS_BLD_NONINV_SYS with 8480-6, 150022 MDC_PRESS_BLD_NONINV_DIA with 8462-4),
# https://build.fhir.org/branches/dbarwin-FHIR-56305/observation-example-compound-numeric-blood-pressure.json;
# HL7 Denmark DK Core IEEEBasicObservation value set (151562 MDC_RESP_RATE, 151578 MDC_TTHOR_RESP_RATE,
# 151594 MDC_CO2_RESP_RATE, 149546 MDC_PULS_RATE_NON_INV),
# https://build.fhir.org/ig/hl7dk/dk-core/ValueSet-dk-core-IEEEBasicObservation.html; 150344 MDC_TEMP with
# 268192 MDC_DIM_DEGC and 150023 MDC_PRESS_BLD_NONINV_MEAN as sent in OBX segments by GE and Mindray monitors
# (public HL7 samples; term codes 19272 and 18951). 150364 MDC_TEMP_BODY is term code 19292.
CODE_ALIASES: Mapping[str, tuple[str, ...]] = {
    "8867-4": ("8889-8", "HR", "PULSE", "147842", "MDC_ECG_HEART_RATE", "149530", "MDC_PULS_OXIM_PULS_RATE",
               "149546", "MDC_PULS_RATE_NON_INV"),
    "9279-1": ("RR", "RESP", "151562", "MDC_RESP_RATE", "151578", "MDC_TTHOR_RESP_RATE", "151594",
               "MDC_CO2_RESP_RATE"),
    "59408-5": ("SPO2", "150456", "MDC_PULS_OXIM_SAT_O2"),
    "8480-6": ("SBP", "150021", "MDC_PRESS_BLD_NONINV_SYS"),
    "8462-4": ("DBP", "150022", "MDC_PRESS_BLD_NONINV_DIA"),
    "8478-0": ("MAP", "150023", "MDC_PRESS_BLD_NONINV_MEAN"),
    # 8331-1 oral, 8332-9 rectal, 8328-7 axillary: site-specific body temperature; original_code keeps the site.
    "8310-5": ("8331-1", "8332-9", "8328-7", "TEMP", "150344", "MDC_TEMP", "150364", "MDC_TEMP_BODY"),
    "3150-0": ("FIO2",),
    "3151-8": ("O2FLOW",),
    "67775-7": ("ACVPU", "AVPU", "LOC"),
}

# Unit spellings (matched trimmed, lower-cased) -> UCUM. Covers UCUM codes, the text senders put in HL7 OBX-6.2
# or FHIR Quantity.unit, and MDC dimension codes (264864 MDC_DIM_BEAT_PER_MIN, 264928 MDC_DIM_RESP_PER_MIN,
# 262688 MDC_DIM_PERCENT, 266016 MDC_DIM_MMHG, 268192 MDC_DIM_DEGC: the OBX-6 codes in the samples cited above).
UNIT_ALIASES: Mapping[str, tuple[str, ...]] = {
    "/min": ("/min", "1/min", "{beats}/min", "{beat}/min", "beats/min", "beat/min", "bpm", "{breaths}/min",
             "{breath}/min", "breaths/min", "breath/min", "264864", "mdc_dim_beat_per_min", "264928",
             "mdc_dim_resp_per_min"),
    "%": ("%", "percent", "262688", "mdc_dim_percent"),
    "1": ("1", "{fraction}", "fraction"),
    "mm[Hg]": ("mm[hg]", "mmhg", "mm hg", "266016", "mdc_dim_mmhg"),
    "kPa": ("kpa",),
    "Cel": ("cel", "c", "°c", "℃", "degc", "deg c", "celsius", "268192", "mdc_dim_degc"),
    "[degF]": ("[degf]", "degf", "°f", "℉", "f", "deg f", "fahrenheit"),
    "K": ("k", "kelvin"),
    "L/min": ("l/min", "lpm", "liters/min", "litres/min"),
    "mL/min": ("ml/min",),
    "kg": ("kg", "kilogram", "kilograms"),
    "g": ("g", "gram", "grams"),
    "[lb_av]": ("[lb_av]", "lb", "lbs", "pound", "pounds"),
    "mmol/L": ("mmol/l",),
    "mg/dL": ("mg/dl",),
    "umol/L": ("umol/l", "µmol/l", "μmol/l"),  # ASCII u, micro sign U+00B5, Greek mu U+03BC
    "10*3/uL": ("10*3/ul", "10^3/ul", "x10e3/ul", "k/ul", "thou/ul"),
    "10*9/L": ("10*9/l", "10^9/l", "x10e9/l", "/nl"),
    "{score}": ("{score}", "score", "points"),
    "mL": ("ml", "milliliter", "millilitre"),
    "[pH]": ("[ph]", "ph"),
    "g/dL": ("g/dl",),
    "U/L": ("u/l", "iu/l", "[iu]/l"),  # an enzyme's IU is its U (1 umol/min)
}


@dataclass(frozen=True)
class Conversion:
    """canonical = (value + shift) * scale."""

    scale: float
    shift: float = 0.0


# UCUM unit -> canonical UCUM unit, whatever the code. "1" -> "%" is exact UCUM arithmetic (a 97 labelled as a
# fraction becomes 9700 % and is quarantined as implausible, not guessed back to 97 %).
CONVERSIONS: Mapping[tuple[str, str], Conversion] = {
    ("[degF]", "Cel"): Conversion(5 / 9, -32.0),
    ("K", "Cel"): Conversion(1.0, -273.15),
    ("kPa", "mm[Hg]"): Conversion(7.50062),
    ("[lb_av]", "kg"): Conversion(0.45359237),
    ("g", "kg"): Conversion(0.001),
    ("mL/min", "L/min"): Conversion(0.001),
    ("1", "%"): Conversion(100.0),
    ("10*9/L", "10*3/uL"): Conversion(1.0),  # 10^9 per L = 10^9 per 10^6 uL = 10^3 per uL
}

# Conversions that depend on the substance: (canonical LOINC, UCUM unit) -> conversion to the canonical unit.
CODE_CONVERSIONS: Mapping[tuple[str, str], Conversion] = {
    ("2160-0", "umol/L"): Conversion(1 / 88.4),  # creatinine 113.12 g/mol: 1 mg/dL = 88.4 umol/L
}

# ACVPU level from what senders put in the value: the letter, the word, or a SNOMED CT finding. SNOMED codes
# per the HL7 UK CareConnect-ACVPU value set (https://simplifier.net/guide/hl7fhircareconnectprofilesstu3/Home/
# ProfilesandExtensions/AllAssets/AllValueSets/ValueSetCareConnectACVPU.guide.md): 248234008 |Mentally alert|,
# 130987000 |Acute confusion|, 300202002 |Responds to voice|, 450847001 |Responds to pain|,
# 422768004 |Unresponsive|. (Some public code maps 450847001 or 422768004 to "voice"; the value set does not.)
CONSCIOUSNESS: Mapping[str, tuple[str, ...]] = {
    "A": ("A", "ALERT", "248234008"),
    "C": ("C", "CONFUSED", "CONFUSION", "NEW CONFUSION", "ACUTE CONFUSION", "130987000"),
    "V": ("V", "VOICE", "RESPONDS TO VOICE", "300202002"),
    "P": ("P", "PAIN", "RESPONDS TO PAIN", "450847001"),
    "U": ("U", "UNRESPONSIVE", "422768004"),
}

MISSING_VALUE = "missing_value"
UNIT_NOT_CONVERTIBLE = "unit_not_convertible"
IMPLAUSIBLE_VALUE = "implausible_value"
UNRECOGNIZED_VALUE = "unrecognized_value"

# problem_detail per reason, written once and rendered by both paths ({display} is the canonical display).
DETAILS: Mapping[str, str] = {
    MISSING_VALUE: "{display} has no value",
    UNIT_NOT_CONVERTIBLE: "unit '{unit}' cannot be converted to {canonical_unit} for {display}",
    IMPLAUSIBLE_VALUE: "{display} outside plausible range {range}",
    UNRECOGNIZED_VALUE: "'{value_text}' is not an ACVPU level (A, C, V, P, U)",
}

# A value_text that is a plain decimal number; ASCII only and space-padded only, so Python and Spark agree.
NUMBER_PATTERN = r"^ *[-+]?([0-9]+(\.[0-9]*)?|\.[0-9]+) *$"
_NUMBER = re.compile(NUMBER_PATTERN, re.ASCII)


def _invert(table: Mapping[str, tuple[str, ...]]) -> dict[str, str]:
    """{target: (alias, ...)} -> {alias: target}, refusing an alias claimed twice."""
    out: dict[str, str] = {}
    for target, aliases in table.items():
        for alias in aliases:
            if out.setdefault(alias, target) != target:
                raise ValueError(f"alias {alias!r} maps to both {out[alias]!r} and {target!r}")
    return out


def _number_text(x: float) -> str:
    """A range bound as people write it: 300, 0.2."""
    return f"{x:g}"


def _conversion_index() -> dict[str, Conversion]:
    """'<canonical code>|<UCUM unit>' -> conversion, for every unit a numeric vital accepts (its own included)."""
    out: dict[str, Conversion] = {}
    for v in VITALS:
        if v.unit is None:
            continue
        out[f"{v.code}|{v.unit}"] = Conversion(1.0)
        out.update({f"{v.code}|{src}": c for (src, dst), c in CONVERSIONS.items() if dst == v.unit})
        out.update({f"{v.code}|{src}": c for (code, src), c in CODE_CONVERSIONS.items() if code == v.code})
    return out


# Derived indexes: the only things both paths read.
BY_CODE: dict[str, Vital] = {v.code: v for v in VITALS}
CODE_INDEX: dict[str, str] = {**{code.upper(): code for code in BY_CODE}, **_invert(CODE_ALIASES)}
UNIT_INDEX: dict[str, str] = _invert(UNIT_ALIASES)
CONVERSION_INDEX: dict[str, Conversion] = _conversion_index()
CONSCIOUSNESS_INDEX: dict[str, str] = _invert(CONSCIOUSNESS)
CODED: frozenset[str] = frozenset(v.code for v in VITALS if v.unit is None)
RANGE_TEXT: dict[str, str] = {
    v.code: f"[{_number_text(v.low)}, {_number_text(v.high)}] {v.unit}" for v in VITALS if v.low is not None
}


@dataclass(frozen=True)
class Normalized:
    """One observation value after normalization; `problem` is a quarantine reason code or None."""

    code: str | None
    system: str | None
    display: str | None
    concept: str | None
    value: float | None
    value_text: str | None
    unit: str | None
    original_code: str | None
    original_unit: str | None
    original_value: float | None
    problem: str | None
    problem_detail: str | None


def _blank(s: str | None) -> bool:
    """True for None or only spaces (Spark's trim strips spaces only; so does this)."""
    return s is None or s.strip(" ") == ""


def _number(value_num: float | None, value_text: str | None) -> float | None:
    """The numeric value: value_num unless missing or NaN, else value_text when it is a plain number."""
    if value_num is not None and not math.isnan(value_num):
        return float(value_num)
    if value_text is not None and _NUMBER.match(value_text):
        return float(value_text.strip(" "))
    return None


def _render(template: str, **fields: str) -> str:
    """A DETAILS template filled in Python."""
    return template.format(**fields)


def _conversion(v: Vital, unit: str | None, number: float) -> Conversion | None:
    """How to bring `number` in `unit` to the canonical unit of `v`, or None when it cannot be."""
    if _blank(unit):
        return Conversion(100.0) if v.unit == "%" and number <= 1 else Conversion(1.0)
    ucum = UNIT_INDEX.get(unit.strip(" ").lower())
    return None if ucum is None else CONVERSION_INDEX.get(f"{v.code}|{ucum}")


def _coded(v: Vital, base: dict, value_text: str | None) -> Normalized:
    """A consciousness observation: the ACVPU letter in value_text."""
    letter = None if value_text is None else CONSCIOUSNESS_INDEX.get(value_text.strip(" ").upper())
    if letter is not None:
        return Normalized(**base, value=None, value_text=letter, unit=None, problem=None, problem_detail=None)
    problem = MISSING_VALUE if _blank(value_text) else UNRECOGNIZED_VALUE
    detail = _render(DETAILS[problem], display=v.display, value_text=value_text)
    return Normalized(**base, value=None, value_text=value_text, unit=None, problem=problem, problem_detail=detail)


def _numeric(v: Vital, base: dict, number: float | None, value_text: str | None, unit: str | None) -> Normalized:
    """A numeric vital or lab: converted to the canonical unit and checked against the plausible range."""
    if number is None:
        return Normalized(**base, value=None, value_text=value_text, unit=None, problem=MISSING_VALUE,
                          problem_detail=_render(DETAILS[MISSING_VALUE], display=v.display))
    conversion = _conversion(v, unit, number)
    if conversion is None:
        return Normalized(**base, value=None, value_text=value_text, unit=None, problem=UNIT_NOT_CONVERTIBLE,
                          problem_detail=_render(DETAILS[UNIT_NOT_CONVERTIBLE], unit=unit, canonical_unit=v.unit,
                                                 display=v.display))
    value = (number + conversion.shift) * conversion.scale
    implausible = not (v.low <= value <= v.high)
    return Normalized(**base, value=value, value_text=value_text, unit=v.unit,
                      problem=IMPLAUSIBLE_VALUE if implausible else None,
                      problem_detail=_render(DETAILS[IMPLAUSIBLE_VALUE], display=v.display,
                                             range=RANGE_TEXT[v.code]) if implausible else None)


def normalize(code: str | None, code_system: str | None, display: str | None, value_num: float | None,
              value_text: str | None, unit: str | None, unit_system: str | None = None) -> Normalized:
    """Normalize one observation value: canonical LOINC code and display, UCUM unit, ACVPU letter, problem.

    `unit` is the unit code when the sender gave one, else its text; the unit tables cover UCUM codes, MDC
    dimension codes and text spellings, so `unit_system` does not change the result.
    """
    canonical = None if code is None else CODE_INDEX.get(code.strip(" ").upper())
    if canonical is None:
        number = None if value_num is None or math.isnan(value_num) else float(value_num)
        return Normalized(code=code, system=code_system, display=display, concept=None, value=number,
                          value_text=value_text, unit=unit, original_code=code, original_unit=unit,
                          original_value=number, problem=None, problem_detail=None)
    v = BY_CODE[canonical]
    coded = v.code in CODED
    number = _number(value_num, None if coded else value_text)  # a coded value's text is never a number
    base = dict(code=v.code, system=LOINC, display=v.display, concept=v.concept, original_code=code,
                original_unit=unit, original_value=number)
    return _coded(v, base, value_text) if coded else _numeric(v, base, number, value_text, unit)


# ---------------------------------------------------------------------------------------------------------------
# Spark: the same indexes as literal maps; every rule above as a Column expression.


def _lookup(mapping: Mapping[str, object], key: Column) -> Column:
    """mapping[key] as a Spark expression over a literal map; null when the key is null or absent.

    try_element_at, not map_column[key]: in Spark 4.0.1 the key of an extraction (UnresolvedExtractValue) is
    resolved late and can bind to a same-named output column of the select (`code`, `unit`), not the input.
    """
    if not mapping:
        return F.lit(None)
    return F.try_element_at(_map_literal(mapping), key)


def _map_literal(mapping: Mapping[str, object]) -> Column:
    """A literal map as one SQL expression: one JVM call, not two per entry (a batch built hundreds)."""
    return F.expr("map(" + ", ".join(f"{sql.literal(k)}, {sql.literal(v)}" for k, v in mapping.items()) + ")")


def _by_code(attribute: str, canonical: Column) -> Column:
    """A Vital attribute of the canonical LOINC code (null for None attributes; numbers as doubles)."""
    values = {v.code: getattr(v, attribute) for v in VITALS if getattr(v, attribute) is not None}
    return _lookup({k: float(x) if isinstance(x, int | float) else x for k, x in values.items()}, canonical)


def _as_column(c: Column | str | None) -> Column:
    """A Column from a Column, a column name, or None (a null literal)."""
    if c is None:
        return F.lit(None).cast("string")
    return F.col(c) if isinstance(c, str) else c


def _is_blank(c: Column) -> Column:
    """Null or only spaces (never null itself)."""
    return F.coalesce(F.trim(c), F.lit("")) == ""


def _render_column(template: str, **fields: Column) -> Column:
    """A DETAILS template filled with Column values (concat of literal pieces and columns)."""
    pieces = re.split(r"\{(\w+)\}", template)  # literal, name, literal, name, ..., literal
    return F.concat(*(fields[p] if i % 2 else F.lit(p) for i, p in enumerate(pieces)))


# The Column path is a chain of stages, each reading the inputs and earlier stages' columns by name. Composed
# inline they give `normalize_columns`; run as successive projections (`normalized`) each lookup is computed
# once per row and the generated methods stay small enough for the JIT (one fused expression did not).
Stage = Callable[[Mapping[str, Column]], dict[str, Column]]


def _keys(c: Mapping[str, Column]) -> dict[str, Column]:
    """Table lookups on the raw inputs."""
    return {
        "canonical": _lookup(CODE_INDEX, F.upper(F.trim(c["code"]))),
        "letter": _lookup(CONSCIOUSNESS_INDEX, F.upper(F.trim(c["value_text"]))),
        "ucum": _lookup(UNIT_INDEX, F.lower(F.trim(c["unit"]))),
        "unit_blank": _is_blank(c["unit"]),
        "passthrough": F.when(~F.isnan(c["value_num"]), c["value_num"]),
        "text_number": F.when(c["value_text"].rlike(NUMBER_PATTERN), F.trim(c["value_text"]).try_cast("double")),
    }


def _facts(c: Mapping[str, Column]) -> dict[str, Column]:
    """What the code is, and the number read from the value (a coded value's text is never a number)."""
    coded = c["canonical"].isin(*CODED)
    return {
        "known": c["canonical"].isNotNull(),
        "coded": coded,
        "number": F.coalesce(c["passthrough"], F.when(~coded, c["text_number"])),
        "canonical_unit": _by_code("unit", c["canonical"]),
    }


def _scale_shift(c: Mapping[str, Column]) -> dict[str, Column]:
    """(scale, shift) to the canonical unit; both null when the unit cannot be converted."""
    key = F.concat(c["canonical"], F.lit("|"), c["ucum"])
    fraction = (c["canonical_unit"] == F.lit("%")) & (c["number"] <= 1)
    scale = F.when(c["unit_blank"], F.when(fraction, F.lit(100.0)).otherwise(F.lit(1.0)))
    shift = F.when(c["unit_blank"], F.lit(0.0))
    return {
        "scale": scale.otherwise(_lookup({k: v.scale for k, v in CONVERSION_INDEX.items()}, key)),
        "shift": shift.otherwise(_lookup({k: v.shift for k, v in CONVERSION_INDEX.items()}, key)),
    }


def _converted(c: Mapping[str, Column]) -> dict[str, Column]:
    """The value in the canonical unit, and whether a numeric vital got one."""
    return {
        "converted": (c["number"] + c["shift"]) * c["scale"],
        "numeric_ok": c["known"] & ~c["coded"] & c["number"].isNotNull() & c["scale"].isNotNull(),
    }


def _problem(c: Mapping[str, Column]) -> tuple[Column, Column]:
    """(problem, problem_detail) for a known code; both null when the value is good."""
    canonical, coded, no_letter = c["canonical"], c["coded"], c["letter"].isNull()
    fields = dict(display=_by_code("display", canonical), canonical_unit=c["canonical_unit"],
                  range=_lookup(RANGE_TEXT, canonical), unit=c["unit"], value_text=c["value_text"])
    outside = (c["converted"] < _by_code("low", canonical)) | (c["converted"] > _by_code("high", canonical))
    cases = (
        (coded & no_letter & _is_blank(c["value_text"]), MISSING_VALUE),
        (coded & no_letter, UNRECOGNIZED_VALUE),
        (coded, None),
        (c["number"].isNull(), MISSING_VALUE),
        (c["scale"].isNull(), UNIT_NOT_CONVERTIBLE),
        (outside, IMPLAUSIBLE_VALUE),
    )
    problem = detail = F.when(~c["known"], F.lit(None))
    for condition, reason in cases:
        problem = problem.when(condition, F.lit(reason))
        detail = detail.when(condition, _render_column(DETAILS[reason], **fields) if reason else F.lit(None))
    return problem.cast("string"), detail.cast("string")


def _outputs(c: Mapping[str, Column]) -> dict[str, Column]:
    """The Normalized fields."""
    known, canonical = c["known"], c["canonical"]
    problem, detail = _problem(c)
    return {
        "code": F.coalesce(canonical, c["code"]),
        "system": F.when(known, F.lit(LOINC)).otherwise(c["code_system"]),
        "display": F.when(known, _by_code("display", canonical)).otherwise(c["display"]),
        "concept": _by_code("concept", canonical),
        "value": F.when(~known, c["passthrough"]).when(c["numeric_ok"], c["converted"]).cast("double"),
        "value_text": F.when(c["coded"], F.coalesce(c["letter"], c["value_text"])).otherwise(c["value_text"]),
        "unit": F.when(~known, c["unit"]).when(c["numeric_ok"], c["canonical_unit"]).cast("string"),
        "original_code": c["code"],
        "original_unit": c["unit"],
        "original_value": F.when(known, c["number"]).otherwise(c["passthrough"]),
        "problem": problem,
        "problem_detail": detail,
    }


STAGES: tuple[Stage, ...] = (_keys, _facts, _scale_shift, _converted)


def _inputs(code, code_system, value_num, value_text, unit, display) -> dict[str, Column]:
    """The input columns by role (value_num as a double)."""
    columns = dict(code=code, code_system=code_system, value_num=value_num, value_text=value_text, unit=unit,
                   display=display)
    out = {role: _as_column(c) for role, c in columns.items()}
    out["value_num"] = out["value_num"].cast("double")
    return out


def normalize_columns(code: Column | str, code_system: Column | str, value_num: Column | str,
                      value_text: Column | str, unit: Column | str, display: Column | str | None = None,
                      unit_system: Column | str | None = None) -> dict[str, Column]:
    """The `normalize` fields as Column expressions (same names, same results), from the same tables.

    `display` passes through for unknown codes (null when not given); `unit_system` does not change the result.
    Each field is one fused expression that repeats the lookups it needs (about 27,000 rows/s on 2 cores);
    `normalized` computes each lookup once (well over 1,000,000 rows/s): use it for device readings.
    """
    env = _inputs(code, code_system, value_num, value_text, unit, display)
    for stage in STAGES:
        env |= stage(env)
    return _outputs(env)


def normalized(*, code: str = "code", code_system: str = "code_system", value_num: str = "value_num",
               value_text: str = "value_text", unit: str = "unit",
               display: str | None = None) -> Callable[[DataFrame], DataFrame]:
    """A DataFrame -> DataFrame transform adding (or replacing) the Normalized columns, for `df.transform`."""

    def transform(df: DataFrame) -> DataFrame:
        def temp(role: str) -> str:
            return f"__vitals_{role}"

        inputs = _inputs(code, code_system, value_num, value_text, unit, display)
        df = df.withColumns({temp(role): c for role, c in inputs.items()})
        env = {role: F.col(temp(role)) for role in inputs}
        for stage in STAGES:
            added = stage(env)
            df = df.withColumns({temp(role): c for role, c in added.items()})
            env |= {role: F.col(temp(role)) for role in added}
        return df.withColumns(_outputs(env)).drop(*map(temp, env))

    return transform
