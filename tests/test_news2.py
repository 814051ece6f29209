"""gold.news2: every chart edge, the rounding rule, bands, missing inputs, qSOFA, SIRS, [degF] through silver, and
the NumPy arrays the scoring kernel uses equal to the Python reference."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from gold.news2 import (
    BANDS,
    COMPONENTS,
    INF,
    PULSE_CHART,
    RESPIRATORY_RATE_CHART,
    SPO2_SCALE2_OXYGEN_CHART,
    SYSTOLIC_BP_CHART,
    TEMPERATURE_CHART,
    Chart,
    News2,
    band,
    news2,
    news2_arrays,
    on_oxygen,
    on_oxygen_array,
    qsofa,
    qsofa_arrays,
    sirs,
    sirs_arrays,
)
from silver.vitals import LOINC, normalize

# A reading that scores 0 everywhere: each case changes only what it tests.
BASE = dict(rr=16.0, spo2=98.0, fio2=21.0, o2flow=0.0, sbp=120.0, pulse=70.0, acvpu="A", temp=37.0, wbc=8.0,
            scale2=False)
AIR = dict(fio2=21.0, o2flow=0.0)
OXYGEN = dict(fio2=None, o2flow=2.0)
NOTHING = dict.fromkeys(BASE)


def reading(**overrides) -> dict:
    return BASE | overrides


def fahrenheit_to_cel(f: float) -> float:
    """A [degF] temperature as silver normalizes it."""
    n = normalize("8310-5", LOINC, None, f, None, "[degF]")
    assert (n.unit, n.problem) == ("Cel", None)
    return n.value


def score(r: dict) -> News2:
    on_o2 = on_oxygen(r["fio2"], r["o2flow"])
    return news2(r["rr"], r["spo2"], on_o2, r["sbp"], r["pulse"], r["acvpu"], r["temp"], scale2=r["scale2"])


def python_result(r: dict) -> dict:
    """Every output of the Python reference for one reading, named as the Spark columns."""
    n = score(r)
    q, q_partial = qsofa(r["rr"], r["sbp"], r["acvpu"])
    return {"on_o2": on_oxygen(r["fio2"], r["o2flow"]), **n.components, "news2_score": n.score,
            "news2_band": n.band, "news2_partial": n.partial, "news2_missing": list(n.missing), "qsofa_score": q,
            "qsofa_partial": q_partial, "sirs_count": sirs(r["temp"], r["pulse"], r["rr"], r["wbc"])}


def _case(component: str, expected: int, **overrides) -> pytest.param:
    label = ",".join(f"{k}={v}" for k, v in overrides.items())
    return pytest.param(component, reading(**overrides), expected, id=f"{component[6:]}:{label}->{expected}")


RR, SPO2, O2, SBP, PULSE, ACVPU, TEMP = COMPONENTS

EDGES = [
    # respiration rate: <=8 3, 9-11 1, 12-20 0, 21-24 2, >=25 3; rounding half-up to whole numbers
    *(_case(RR, p, rr=v) for v, p in [(8, 3), (9, 1), (11, 1), (12, 0), (20, 0), (21, 2), (24, 2), (25, 3)]),
    *(_case(RR, p, rr=v) for v, p in [(20.5, 2), (20.49, 0), (8.49, 3), (8.5, 1), (24.5, 3), (11.5, 0)]),
    # a binary float one ulp under the half still rounds up; 1e-8 under does not
    _case(RR, 2, rr=math.nextafter(20.5, 0)),
    _case(RR, 0, rr=20.5 - 1e-8),
    # SpO2 scale 1: <=91 3, 92-93 2, 94-95 1, >=96 0
    *(_case(SPO2, p, spo2=v) for v, p in [(91, 3), (92, 2), (93, 2), (94, 1), (95, 1), (96, 0), (95.5, 0)]),
    # scale 1 does not depend on oxygen
    _case(SPO2, 0, spo2=96, **OXYGEN),
    # SpO2 scale 2: <=83 3, 84-85 2, 86-87 1, 88-92 0, >=93 on air 0; on oxygen 93-94 1, 95-96 2, >=97 3
    *(_case(SPO2, p, spo2=v, scale2=True, **AIR)
      for v, p in [(83, 3), (84, 2), (85, 2), (86, 1), (87, 1), (88, 0), (92, 0), (93, 0), (97, 0), (100, 0)]),
    *(_case(SPO2, p, spo2=v, scale2=True, **OXYGEN)
      for v, p in [(83, 3), (84, 2), (85, 2), (86, 1), (87, 1), (88, 0), (92, 0), (93, 1), (94, 1), (95, 2),
                   (96, 2), (97, 3), (100, 3), (92.5, 1), (92.49, 0)]),
    # air or oxygen
    _case(O2, 0, **AIR),
    _case(O2, 2, fio2=28.0, o2flow=None),
    _case(O2, 2, fio2=None, o2flow=0.5),
    _case(O2, 2, fio2=21.0, o2flow=2.0),
    # systolic BP: <=90 3, 91-100 2, 101-110 1, 111-219 0, >=220 3
    *(_case(SBP, p, sbp=v) for v, p in [(90, 3), (91, 2), (100, 2), (101, 1), (110, 1), (111, 0), (219, 0),
                                        (220, 3), (90.5, 2), (219.49, 0), (219.5, 3)]),
    # pulse: <=40 3, 41-50 1, 51-90 0, 91-110 1, 111-130 2, >=131 3
    *(_case(PULSE, p, pulse=v) for v, p in [(40, 3), (41, 1), (50, 1), (51, 0), (90, 0), (91, 1), (110, 1),
                                            (111, 2), (130, 2), (131, 3), (90.5, 1), (130.49, 2)]),
    # consciousness
    *(_case(ACVPU, p, acvpu=v) for v, p in [("A", 0), ("C", 3), ("V", 3), ("P", 3), ("U", 3)]),
    # temperature: <=35.0 3, 35.1-36.0 1, 36.1-38.0 0, 38.1-39.0 1, >=39.1 2; rounding half-up to one decimal
    *(_case(TEMP, p, temp=v) for v, p in [(35.0, 3), (35.1, 1), (36.0, 1), (36.1, 0), (38.0, 0), (38.1, 1),
                                          (39.0, 1), (39.1, 2)]),
    *(_case(TEMP, p, temp=v) for v, p in [(35.05, 1), (35.04, 3), (38.04, 0), (38.05, 1), (36.05, 0),
                                          (39.05, 2), (39.04, 1)]),
    _case(TEMP, 1, temp=math.nextafter(35.05, 0)),  # 35.04999999999999: 35.05 within one ulp
    _case(TEMP, 3, temp=35.05 - 1e-8),
    # [degF] through silver.vitals.normalize: 95.0 = 35.0, 96.8 = 36.0, 100.4 = 38.0(0000000000001), 102.2 = 39.0
    *(_case(TEMP, p, temp=fahrenheit_to_cel(f)) for f, p in [(95.0, 3), (95.2, 1), (96.8, 1), (96.9, 0),
                                                             (100.4, 0), (100.5, 1), (102.2, 1), (102.3, 2)]),
]


@pytest.mark.parametrize(("component", "r", "expected"), EDGES)
def test_component_edges(component, r, expected):
    n = score(r)
    assert getattr(n, component) == expected
    others = {name: v for name, v in n.components.items() if name not in (component, O2)}
    assert set(others.values()) == {0}
    assert n.score == sum(n.components.values())
    assert (n.partial, n.missing) == (False, ())


@pytest.mark.parametrize(("fahrenheit", "celsius", "points"), [(95.0, 35.0, 3), (100.4, 38.0, 0), (102.2, 39.0, 1)])
def test_fahrenheit_through_silver(fahrenheit, celsius, points):
    cel = fahrenheit_to_cel(fahrenheit)
    assert cel == pytest.approx(celsius, abs=1e-9)
    assert score(reading(temp=cel)).news2_temperature == points


BAND_CASES = [
    pytest.param(reading(), 0, "low", id="0-low"),
    pytest.param(reading(rr=25), 3, "low-medium", id="single-3-total-3"),
    pytest.param(reading(rr=25, pulse=91), 4, "low-medium", id="single-3-total-4"),
    pytest.param(reading(rr=21, pulse=91, temp=38.1), 4, "low", id="4-low"),
    pytest.param(reading(rr=21, pulse=91, temp=38.1, sbp=105), 5, "medium", id="5-medium"),
    pytest.param(reading(rr=25, pulse=91, temp=38.1), 5, "medium", id="single-3-total-5-medium"),
    pytest.param(reading(rr=21, pulse=91, temp=38.1, **OXYGEN), 6, "medium", id="6-medium"),
    pytest.param(reading(rr=21, pulse=91, temp=38.1, sbp=105, **OXYGEN), 7, "high", id="7-high"),
    pytest.param(reading(rr=30, spo2=85, sbp=80, pulse=140, acvpu="U", temp=34.0, **OXYGEN), 20, "high",
                 id="20-high"),
]


@pytest.mark.parametrize(("r", "total", "expected_band"), BAND_CASES)
def test_total_bands(r, total, expected_band):
    n = score(r)
    assert (n.score, n.band, n.partial) == (total, expected_band, False)


@pytest.mark.parametrize(("total", "any_three", "expected"), [
    (0, False, "low"), (4, False, "low"), (3, True, "low-medium"), (4, True, "low-medium"), (5, False, "medium"),
    (5, True, "medium"), (6, True, "medium"), (7, False, "high"), (7, True, "high"), (20, True, "high"),
])
def test_band(total, any_three, expected):
    assert band(total, any_three) == expected
    assert expected in BANDS


MISSING_CASES = [
    pytest.param(reading(rr=None, temp=None, pulse=91), (RR, TEMP), 1, "low", id="rr-temp"),
    pytest.param(reading(fio2=None, o2flow=None), (O2,), 0, "low", id="oxygen-unknown"),
    pytest.param(reading(fio2=math.nan, o2flow=None), (O2,), 0, "low", id="oxygen-nan"),
    pytest.param(reading(acvpu=None), (ACVPU,), 0, "low", id="acvpu-none"),
    pytest.param(reading(acvpu="X"), (ACVPU,), 0, "low", id="acvpu-not-a-letter"),
    pytest.param(reading(spo2=math.nan), (SPO2,), 0, "low", id="spo2-nan"),
    pytest.param(reading(sbp=math.inf), (SBP,), 0, "low", id="sbp-inf"),
    pytest.param(reading(spo2=None, sbp=85, rr=None), (RR, SPO2), 3, "low-medium", id="partial-low-medium"),
    pytest.param(reading(rr=None, sbp=85, pulse=135, acvpu="V"), (RR,), 9, "high", id="partial-high"),
    pytest.param(NOTHING, COMPONENTS, 0, "low", id="all-missing"),
    # scale 2 without an oxygen status: scored where air and oxygen agree (<= 92), missing where they differ
    pytest.param(reading(scale2=True, spo2=95, fio2=None, o2flow=None), (SPO2, O2), 0, "low", id="scale2-95-o2-?"),
    pytest.param(reading(scale2=True, spo2=93, fio2=None, o2flow=None), (SPO2, O2), 0, "low", id="scale2-93-o2-?"),
    pytest.param(reading(scale2=True, spo2=92, fio2=None, o2flow=None), (O2,), 0, "low", id="scale2-92-o2-?"),
    pytest.param(reading(scale2=True, spo2=85, fio2=None, o2flow=None), (O2,), 2, "low", id="scale2-85-o2-?"),
]


@pytest.mark.parametrize(("r", "missing", "total", "expected_band"), MISSING_CASES)
def test_missing_inputs(r, missing, total, expected_band):
    n = score(r)
    assert (n.missing, n.partial, n.score, n.band) == (missing, True, total, expected_band)
    assert all((getattr(n, c) is None) == (c in missing) for c in COMPONENTS)


@pytest.mark.parametrize(("fio2", "o2flow", "expected"), [
    (None, None, None), (math.nan, None, None), (21.0, None, False), (21.5, None, True), (None, 0.0, False),
    (None, 0.5, True), (21.0, 0.0, False), (21.0, 2.0, True), (40.0, 0.0, True), (40.0, None, True),
    (None, 3.0, True), (20.0, math.nan, False),
])
def test_on_oxygen(fio2, o2flow, expected):
    assert on_oxygen(fio2, o2flow) is expected


@pytest.mark.parametrize(("rr", "sbp", "acvpu", "expected"), [
    (21, 101, "A", (0, False)), (22, 101, "A", (1, False)), (21.49, 101, "A", (0, False)),
    (21.5, 101, "A", (1, False)), (21, 100, "A", (1, False)), (21, 100.5, "A", (0, False)),
    *((21, 101, letter, (1, False)) for letter in "CVPU"),
    (22, 100, "C", (3, False)), (None, 100, "U", (2, True)), (22, None, "A", (1, True)),
    (22, 90, None, (2, True)), (22, 90, "X", (2, True)), (None, None, None, (0, True)),
])
def test_qsofa(rr, sbp, acvpu, expected):
    assert qsofa(rr, sbp, acvpu) == expected


@pytest.mark.parametrize(("temp", "pulse", "rr", "wbc", "expected"), [
    (None, None, None, None, None), (math.nan, None, None, None, None),
    (38.0, None, None, None, 0), (38.1, None, None, None, 1), (38.04, None, None, None, 0),
    (38.05, None, None, None, 1), (36.0, None, None, None, 0), (35.9, None, None, None, 1),
    (None, 90, None, None, 0), (None, 91, None, None, 1), (None, None, 20, None, 0), (None, None, 21, None, 1),
    (None, None, None, 12.0, 0), (None, None, None, 12.1, 1), (None, None, None, 4.0, 0), (None, None, None, 3.9, 1),
    (38.5, None, 22, None, 2), (35.0, 120, None, 2.0, 3), (39.0, 95, 24, 15.0, 4), (37.0, 70, 16, 8.0, 0),
])
def test_sirs(temp, pulse, rr, wbc, expected):
    assert sirs(temp, pulse, rr, wbc) == expected


def test_charts_are_validated():
    assert [b for b, _ in TEMPERATURE_CHART.unit_bands()] == [350, 360, 380, 390, INF]
    with pytest.raises(ValueError, match="strictly ascending"):
        Chart(0, ((20, 0), (8, 3), (INF, 3)))
    with pytest.raises(ValueError, match="end with INF"):
        Chart(0, ((8, 3), (20, 0)))


# ---------------------------------------------------------------------------------------------------------------
# NumPy against the Python reference: every case above plus random readings, as arrays at once.


def _near(rng: random.Random, chart: Chart) -> float:
    """A value at, just around, or between a chart's bounds (in its precision and just off it)."""
    bounds = [b for b, _ in chart.bands if b != INF]
    step = 10.0 ** -chart.decimals
    if rng.random() < 0.15:  # one ulp under a half: the rounding rule's epsilon decides
        return math.nextafter(rng.choice(bounds) + 0.5 * step, -INF)
    offset = rng.choice([-1, -0.5, -0.51, -0.49, -0.05, 0, 0.04, 0.05, 0.49, 0.5, 0.51, 1, 2]) * step
    return round(rng.choice(bounds) + offset + rng.choice([0, 0, 0, rng.uniform(-10, 10)]), 3)


def _maybe(rng: random.Random, value):
    """None one time in ten, NaN one time in forty, else the value."""
    roll = rng.random()
    return None if roll < 0.1 else math.nan if roll < 0.125 else value


def random_readings(n: int, seed: int = 20170101) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        out.append({
            "rr": _maybe(rng, _near(rng, RESPIRATORY_RATE_CHART)),
            "spo2": _maybe(rng, _near(rng, SPO2_SCALE2_OXYGEN_CHART)),
            "fio2": _maybe(rng, rng.choice([21.0, 21.0, 21.4, 24.0, 28.0, 60.0, rng.uniform(15, 100)])),
            "o2flow": _maybe(rng, rng.choice([0.0, 0.0, 0.5, 2.0, 15.0, rng.uniform(0, 60)])),
            "sbp": _maybe(rng, _near(rng, SYSTOLIC_BP_CHART)),
            "pulse": _maybe(rng, _near(rng, PULSE_CHART)),
            "acvpu": rng.choice(["A", "A", "A", "C", "V", "P", "U", None, "X", "a"]),
            "temp": _maybe(rng, _near(rng, TEMPERATURE_CHART)),
            "wbc": _maybe(rng, round(rng.choice([4.0, 12.0, rng.uniform(0, 30)]) + rng.choice([-0.1, 0, 0.1]), 2)),
            "scale2": rng.choice([False, True, None]),
        })
    return out


def _edge_readings() -> list[dict]:
    params = [*EDGES, *BAND_CASES, *MISSING_CASES]
    extra = [reading(rr=rr, sbp=sbp, acvpu=a) for rr, sbp, a in [(21, 101, "A"), (22, 100, "C"), (21.5, 100.5, "V")]]
    extra += [reading(fio2=f, o2flow=o) for f, o in [(None, None), (21.5, None), (None, 0.5), (20.0, math.nan)]]
    extra += [reading(temp=t, pulse=p, rr=r, wbc=w) for t, p, r, w in
              [(None, None, None, None), (38.5, None, 22, None), (None, None, None, 3.9), (35.0, 120, None, 2.0)]]
    readings = [next(v for v in p.values if isinstance(v, dict)) for p in params] + extra
    return [NOTHING | r for r in readings]


EDGE_READINGS = _edge_readings()
RANDOM_READINGS = random_readings(400)


def numpy_results(readings: list[dict], scale2: bool | None = None) -> list[dict]:
    """Every output of the NumPy implementation, one dict per reading, in python_result's shape."""
    def col(name):
        return np.array([math.nan if r[name] is None else float(r[name]) for r in readings], dtype="float64")

    letters = np.array([r["acvpu"] for r in readings], dtype=object)
    on = on_oxygen_array(col("fio2"), col("o2flow"))
    marked = np.array([bool(r["scale2"]) if scale2 is None else scale2 for r in readings], dtype=bool)
    n = news2_arrays(col("rr"), col("spo2"), on, col("sbp"), col("pulse"), letters, col("temp"), marked)
    q, q_partial = qsofa_arrays(col("rr"), col("sbp"), letters)
    sirs_count = sirs_arrays(col("temp"), col("pulse"), col("rr"), col("wbc"))

    def plain(x):
        return None if isinstance(x, float) and math.isnan(x) else int(x)

    return [{"on_o2": None if math.isnan(on[i]) else bool(on[i]),
             **{c: plain(float(n[c][i])) for c in COMPONENTS}, "news2_score": int(n["news2_score"][i]),
             "news2_band": n["news2_band"][i], "news2_partial": bool(n["news2_partial"][i]),
             "news2_missing": list(n["news2_missing"][i]), "qsofa_score": int(q[i]),
             "qsofa_partial": bool(q_partial[i]), "sirs_count": plain(float(sirs_count[i]))}
            for i in range(len(readings))]


def test_numpy_equals_python_on_every_edge_case():
    for r, got in zip(EDGE_READINGS, numpy_results(EDGE_READINGS), strict=True):
        assert got == python_result(r), r


def test_numpy_equals_python_on_random_readings():
    results = [python_result(r) for r in RANDOM_READINGS]
    assert numpy_results(RANDOM_READINGS) == results
    # the random readings reach every band, both partial and complete, and every qSOFA score
    assert {x["news2_band"] for x in results} == set(BANDS)
    assert {x["news2_partial"] for x in results} == {True, False}
    assert {x["qsofa_score"] for x in results} == {0, 1, 2, 3}
    assert {x["sirs_count"] for x in results} >= {0, 1, 2, 3}


def test_numpy_without_scale2_is_scale1():
    readings = EDGE_READINGS + RANDOM_READINGS
    assert [r["news2_spo2"] for r in numpy_results(readings, scale2=False)] == [
        score(r | {"scale2": False}).news2_spo2 for r in readings]
