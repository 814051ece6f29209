"""The mortality model (models/mortality.py): the 48 h stay frame, the Challenge 2012 metrics, the cross-validated
comparison with the baselines and the champion rule. Pure pandas/scikit-learn (no Spark); one MLflow store."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest

from models import mortality as m
from pipelines.errors import UsageError

T0 = datetime(2021, 3, 1, 8, 0, tzinfo=UTC)


def _at(hours: float) -> datetime:
    return T0 + timedelta(hours=hours)


def test_stay_frame_summarises_the_first_48_hours_only():
    stays = pd.DataFrame({"patient_key": ["p1", "p2", "p3"], "admitted_at": [T0, T0, T0],
                          "icu_type": ["Medical ICU", "Surgical ICU", "Medical ICU"],
                          "birth_date": [datetime(1950, 3, 1).date(), None, None], "sex": ["male", "female", None]})
    obs = pd.DataFrame([
        ("p1", "8867-4", 80.0, None, _at(1)), ("p1", "8867-4", 120.0, None, _at(47.9)),
        ("p1", "8867-4", 200.0, None, _at(48)),  # hour 48 is outside the first 48 h
        ("p1", "8867-4", 150.0, None, _at(-1)),  # before admission
        ("p1", "76215-0", 101.0, None, _at(2)), ("p1", "8480-6", 98.0, None, _at(2)),  # arterial vs cuff
        ("p1", "67775-7", None, "V", _at(3)), ("p1", "67775-7", None, "C", _at(4)),
        ("p2", "2524-7", 4.2, None, _at(5)),
        ("p1", "9187-6", 100.0, None, _at(1)), ("p1", "9187-6", 200.0, None, _at(30)),  # urine, mL
        ("p1", "3150-0", 50.0, None, _at(1)), ("p1", "2703-7", 100.0, None, _at(2)),  # FiO2 50 %, PaO2 100
        ("p1", "3150-0", 25.0, None, _at(6)), ("p1", "2703-7", 75.0, None, _at(7)), ("p1", "9269-2", 9.0, None, _at(3)),
        ("p2", "2703-7", 80.0, None, _at(5)),  # no FiO2 charted: no ratio
    ], columns=["patient_key", "code", "value", "value_text", "effective_at"])
    scores = pd.DataFrame([("p1", _at(1), 3, 0), ("p1", _at(10), 7, 2), ("p1", _at(50), 11, 3)],
                          columns=["patient_key", "scored_at", "news2_score", "qsofa_score"])
    outcomes = pd.DataFrame({"patient_key": ["p1", "p2", "p9"], "in_hospital_death": [True, False, True],
                             "saps_i": [19.0, None, 30.0], "sofa": [5.0, 2.0, 9.0]})

    frame = m.stay_frame(stays, obs, scores, outcomes).set_index("patient_key")

    assert list(frame.index) == ["p1", "p2"]  # p3 has no outcome, p9 no stay
    p1, p2 = frame.loc["p1"], frame.loc["p2"]
    assert (p1.hr_min, p1.hr_max, p1.hr_mean, p1.hr_last, p1.hr_count) == (80.0, 120.0, 100.0, 120.0, 2)
    assert (p1.sysabp_max, p1.nisysabp_max) == (101.0, 98.0)
    assert (p1.acvpu_worst, p1.acvpu_last) == (2.0, 1.0)
    assert (p1.max_news2, p1.mean_news2, p1.last_news2, p1.max_qsofa, p1.score_points) == (7.0, 5.0, 7.0, 2.0, 2.0)
    assert p1.age_years == pytest.approx(71.0, abs=0.01) and p1.male == 1.0 and p1.icu_2 == 1.0 and p1.icu_3 == 0.0
    assert p1.in_hospital_death == 1 and p2.in_hospital_death == 0
    assert p2.lactate_max == 4.2 and np.isnan(p2.hr_max) and np.isnan(p2.max_news2) and p2.male == 0.0
    assert np.isnan(p2.age_years) and np.isnan(p2.saps_i)
    assert (p1.urine_total, p1.urine_total_24h, p1.gcs_min) == (300.0, 100.0, 9.0)
    assert (p1.pf_ratio_min, p1.pf_ratio_last) == (200.0, 300.0) and np.isnan(p2.pf_ratio_min)
    assert set(m.feature_names()) <= set(frame.columns)


def test_platt_scaling_fitted_out_of_fold_calibrates_an_overconfident_model():
    rng = np.random.default_rng(5)
    truth = 1 / (1 + np.exp(-rng.normal(-1.5, 1.2, 4000)))
    y = (rng.random(truth.size) < truth).astype(int)
    overconfident = 1 / (1 + np.exp(-3 * np.log(truth / (1 - truth))))  # right order, extreme probabilities
    a, b = m.platt(overconfident[:2000], y[:2000])
    assert a == pytest.approx(1 / 3, abs=0.1)
    held_out = overconfident[2000:]
    fixed = m.apply_platt(held_out, a, b)
    assert m.hosmer_lemeshow(y[2000:], fixed) < m.hosmer_lemeshow(y[2000:], held_out) / 5
    assert np.all(np.diff(fixed[np.argsort(held_out)]) >= 0)  # the order is kept: AUROC is unchanged


def test_stay_frame_without_any_labelled_stay_says_what_to_do():
    empty = pd.DataFrame({"patient_key": [], "admitted_at": [], "icu_type": [], "birth_date": [], "sex": []})
    with pytest.raises(UsageError, match="--outcomes"):
        m.stay_frame(empty, pd.DataFrame(columns=["patient_key", "code", "value", "value_text", "effective_at"]),
                     pd.DataFrame(columns=["patient_key", "scored_at", "news2_score", "qsofa_score"]),
                     pd.DataFrame({"patient_key": ["p1"], "in_hospital_death": [True], "saps_i": [1.0],
                                   "sofa": [1.0]}))


def test_event1_is_the_smaller_of_sensitivity_and_positive_predictivity():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    flagged = np.array([1, 1, 1, 0, 1, 0, 0, 0, 0, 0], dtype=bool)  # Se 3/4, PPV 3/4
    assert m.event1(y, flagged) == 0.75
    flagged[5:] = True  # Se 3/4, PPV 3/9
    assert m.event1(y, flagged) == pytest.approx(1 / 3)
    assert m.event1(y, np.zeros(10, dtype=bool)) == 0.0


def test_best_threshold_maximises_event1():
    y = np.array([0, 0, 0, 1, 0, 1, 1])
    score = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    cut = m.best_threshold(y, score)
    assert cut == 4.0  # Se 1, PPV 3/4 -> 0.75; a cut at 6 gives Se 2/3, PPV 1 -> 0.667
    assert m.event1(y, score >= cut) == max(m.event1(y, score >= c) for c in score)


def test_hosmer_lemeshow_is_zero_when_calibrated_and_grows_when_not():
    y = np.array([0] * 9 + [1] + [0] * 5 + [1] * 5)
    calibrated = np.array([0.1] * 10 + [0.5] * 10)
    assert m.hosmer_lemeshow(y, calibrated, groups=2) == pytest.approx(0.0)
    # Every stay predicted 0.5 in two groups of 10: observed 1 vs 5 expected, then 5 vs 5.
    assert m.hosmer_lemeshow(y, np.full(20, 0.5), groups=2) == pytest.approx((1 - 5) ** 2 / (10 * 0.25))


def _synthetic(n: int, seed: int, *, signal_in: str) -> pd.DataFrame:
    """Stays whose death depends on lactate (signal_in='features') or on SAPS-I (signal_in='saps_i')."""
    rng = np.random.default_rng(seed)
    risk = rng.normal(size=n)
    y = (rng.random(n) < 1 / (1 + np.exp(-(2.5 * risk - 2)))).astype(int)
    frame = pd.DataFrame({name: np.nan for name in m.feature_names()}, index=range(n))
    frame["lactate_max"] = risk + rng.normal(0, 0.3, n) if signal_in == "features" else rng.normal(size=n)
    frame["hr_mean"] = rng.normal(90, 10, n)
    frame["saps_i"] = (risk if signal_in == "saps_i" else rng.normal(size=n)) * 5 + 15
    frame["sofa"] = rng.normal(5, 2, n)
    frame["max_news2"] = rng.integers(0, 12, n).astype(float)
    frame["patient_key"] = [f"p{i}" for i in range(n)]
    frame[m.LABEL] = y
    return frame


def test_cross_validation_compares_the_model_with_the_baselines_on_held_out_stays():
    frame = _synthetic(300, 1, signal_in="features")
    ev = m.cross_validate(frame, seed=7, folds=3, bootstraps=100)
    x = ev.metrics
    assert x["model_auroc"] > 0.8 and 0.35 < x["saps_i_auroc"] < 0.65
    assert x["model_auroc_ci_low"] < x["model_auroc"] < x["model_auroc_ci_high"]
    assert x["model_minus_saps_i_auroc_ci_low"] > 0 and x["model_event1"] > x["saps_i_event1"]
    assert m.is_champion(x)
    assert ev.counts == {"stays": 300, "deaths": int(frame[m.LABEL].sum()), "features": 3, "folds": 3,
                         "saps_i_missing": 0, "sofa_missing": 0, "max_news2_missing": 0}
    assert all(np.isfinite(p).all() for p in ev.probability.values())  # every stay predicted out of fold
    for who in ("model", "saps_i", "sofa", "max_news2"):
        assert 0 <= x[f"{who}_event1"] <= min(x[f"{who}_sensitivity"], x[f"{who}_ppv"]) + 1e-12
        assert x[f"{who}_hosmer_lemeshow_h"] >= 0 and 0 <= x[f"{who}_brier"] <= 1
    assert x["model_uncalibrated_hosmer_lemeshow_h"] >= 0 and 0 <= x["model_uncalibrated_brier"] <= 1


def test_too_few_deaths_for_the_folds_is_refused():
    frame = _synthetic(40, 2, signal_in="features")
    frame[m.LABEL] = 0
    frame.loc[:2, m.LABEL] = 1
    with pytest.raises(UsageError, match="3 in-hospital deaths: 5-fold"):
        m.cross_validate(frame, seed=1, folds=5, bootstraps=10)


def test_only_a_model_that_beats_saps_i_is_registered(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    weak = m.train(_synthetic(300, 3, signal_in="saps_i"), tracking_uri=uri, seed=1, folds=3, bootstraps=100)
    assert not weak.champion and weak.version is None and weak.metrics["saps_i_auroc"] > weak.metrics["model_auroc"]
    strong = m.train(_synthetic(300, 4, signal_in="features"), tracking_uri=uri, seed=1, folds=3, bootstraps=100)
    assert strong.champion and strong.version == "1"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert str(client.get_model_version_by_alias(m.MODEL_NAME, m.ALIAS).version) == "1"
    runs = {r.info.run_id: r for r in client.search_runs([client.get_experiment_by_name(m.EXPERIMENT).experiment_id])}
    assert set(runs) == {weak.run_id, strong.run_id}
    assert runs[weak.run_id].data.tags["carelake.champion"] == "false"
    assert runs[strong.run_id].data.metrics["model_event1"] == pytest.approx(strong.metrics["model_event1"])
