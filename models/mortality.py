"""In-hospital mortality from the first 48 hours of an ICU stay (the PhysioNet/CinC Challenge 2012 task).

One row per ICU stay: what silver and gold hold about its first `WINDOW` (the measurements of each parameter
as min / max / mean / last / count, the worst and last consciousness level, age, sex, ICU type, and the NEWS2
and qSOFA scores carelake computed from the same readings), labelled with silver.outcomes' in_hospital_death.

Judged the way the Challenge judged it, beside AUROC and AUPRC, with stratified k-fold cross-validation (every
stay is predicted by a model that never saw it):

- **Event 1**: min(sensitivity, positive predictivity) of a binary prediction. The threshold is chosen on the
  training folds (the one that maximises the same score there) and applied to the held-out fold.
- **Event 2**: the Hosmer-Lemeshow H statistic of the predicted probabilities in deciles of risk (lower is
  better calibrated; the Challenge's calibration score).

Baselines on the same stays, through the same folds: SAPS-I and SOFA from the outcomes file, and the highest
NEWS2 carelake computed in the window. A score that is not a probability (the baselines) is mapped to one by a
logistic fit on the training folds before H is computed. Published references (Silva et al., Computing in
Cardiology 2012;39:245-8): Event 1 = 0.5353 for the winner on the hidden set C, 0.3125 for SAPS-I.

Confidence intervals are percentile bootstraps over stays (the out-of-fold predictions resampled), and the
model's AUROC minus SAPS-I's is bootstrapped pairwise. The model is registered (`carelake-mortality`, alias
`champion`) only when that difference's 95 % interval lies above zero and its Event 1 is no worse than
SAPS-I's; otherwise the run is logged and nothing is registered.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np
import pandas as pd

from models.evaluation import auroc_interval
from pipelines.errors import UsageError

MODEL_NAME = EXPERIMENT = "carelake-mortality"
ALIAS = "champion"
WINDOW = timedelta(hours=48)
LABEL = "in_hospital_death"
FOLDS = 5
BOOTSTRAPS = 1000
# Measurements by LOINC code: the Challenge's parameters silver takes (invasive and cuff pressures apart).
PARAMETERS: Mapping[str, str] = {
    "8867-4": "hr", "9279-1": "rr", "2708-6": "sao2", "8310-5": "temp", "3150-0": "fio2", "29463-7": "weight",
    "76215-0": "sysabp", "76213-5": "diasabp", "76214-3": "map", "8480-6": "nisysabp", "8462-4": "nidiasabp",
    "8478-0": "nimap", "2524-7": "lactate", "6690-2": "wbc", "2160-0": "creatinine",
    "9269-2": "gcs", "3094-0": "bun", "9187-6": "urine", "2744-1": "ph", "2703-7": "pao2", "2019-8": "paco2",
    "1960-4": "hco3", "777-3": "platelets", "1975-2": "bilirubin", "2345-7": "glucose", "2823-3": "k",
    "2951-2": "na", "4544-3": "hct", "1751-7": "albumin", "1742-6": "alt", "1920-8": "ast", "6768-6": "alp",
}
URINE, PAO2, FIO2 = "9187-6", "2703-7", "3150-0"
STATS = ("min", "max", "mean", "last", "count")
CONSCIOUSNESS = "67775-7"
ACVPU_RANK = {"A": 0, "C": 1, "V": 2, "P": 3, "U": 4}
ICU_TYPES = ("Coronary Care Unit", "Cardiac Surgery Recovery Unit", "Medical ICU", "Surgical ICU")
MODEL_PARAMS = {"max_iter": 200, "learning_rate": 0.05, "max_leaf_nodes": 15, "min_samples_leaf": 30,
                "l2_regularization": 1.0}
BASELINES = ("saps_i", "sofa", "max_news2")


def feature_names() -> list[str]:
    return [*(f"{p}_{s}" for p in PARAMETERS.values() for s in STATS), "acvpu_worst", "acvpu_last",
            "age_years", "male", *(f"icu_{i}" for i in range(len(ICU_TYPES))),
            "max_news2", "mean_news2", "last_news2", "max_qsofa", "score_points", *DERIVED]


# Figures of several readings: the urine charted over the window (and its first 24 h: oliguria is a SOFA criterion);
# PaO2/FiO2 (each PaO2 over the FiO2 charted last at or before it, within 24 h; FiO2 in silver is %).
DERIVED = ("urine_total", "urine_total_24h", "pf_ratio_min", "pf_ratio_last")


# -- the frame ---------------------------------------------------------------------------------------
def stay_frame(stays: pd.DataFrame, observations: pd.DataFrame, scores: pd.DataFrame,
               outcomes: pd.DataFrame) -> pd.DataFrame:
    """One row per stay with an outcome: features over [admitted_at, admitted_at + WINDOW) and the labels.

    stays: patient_key, admitted_at, icu_type, birth_date, sex. observations: patient_key, code, value,
    value_text, effective_at. scores: patient_key, scored_at, news2_score, qsofa_score. outcomes: patient_key,
    in_hospital_death, saps_i, sofa.
    """
    labelled = outcomes.dropna(subset=[LABEL]).drop_duplicates("patient_key")
    frame = stays.dropna(subset=["admitted_at"]).drop_duplicates("patient_key").merge(
        labelled[["patient_key", LABEL, "saps_i", "sofa"]], on="patient_key", how="inner")
    if frame.empty:
        raise UsageError("no ICU stay has both an admission time (silver.encounters) and an outcome "
                         "(silver.outcomes): import the records with --outcomes and run the jobs first")
    window = frame[["patient_key", "admitted_at"]]
    obs = _in_window(observations, window, "effective_at")
    pieces = [frame.set_index("patient_key"), _measurement_features(obs), _consciousness(obs),
              _score_features(_in_window(scores, window, "scored_at")), _derived_features(obs)]
    out = pd.concat(pieces, axis=1, join="outer").loc[frame["patient_key"]]
    admitted = pd.to_datetime(out["admitted_at"], utc=True)
    born = pd.to_datetime(out["birth_date"], utc=True)
    out["age_years"] = (admitted - born).dt.days / 365.25
    out["male"] = (out["sex"] == "male").astype(float).where(out["sex"].isin(["male", "female"]))
    for i, name in enumerate(ICU_TYPES):
        out[f"icu_{i}"] = (out["icu_type"] == name).astype(float)
    absent = [name for name in feature_names() if name not in out.columns]
    out = pd.concat([out, pd.DataFrame(np.nan, index=out.index, columns=absent)], axis=1)
    out[LABEL] = out[LABEL].astype(int)
    return out.reset_index(names="patient_key")


def _in_window(rows: pd.DataFrame, window: pd.DataFrame, time: str) -> pd.DataFrame:
    joined = rows.merge(window, on="patient_key", how="inner")
    at = pd.to_datetime(joined[time], utc=True)
    start = pd.to_datetime(joined["admitted_at"], utc=True)
    return joined[(at >= start) & (at < start + WINDOW)]


def _measurement_features(obs: pd.DataFrame) -> pd.DataFrame:
    numeric = obs[obs["code"].isin(PARAMETERS.keys()) & obs["value"].notna()].copy()
    numeric["parameter"] = numeric["code"].map(PARAMETERS)
    numeric = numeric.sort_values("effective_at", kind="stable")
    stats = numeric.groupby(["patient_key", "parameter"])["value"].agg(list(STATS)).unstack("parameter")
    stats.columns = [f"{parameter}_{stat}" for stat, parameter in stats.columns]
    return stats


def _derived_features(obs: pd.DataFrame) -> pd.DataFrame:
    """DERIVED, per stay (a stay without the readings has none)."""
    urine = obs[(obs["code"] == URINE) & obs["value"].notna()]
    first_day = pd.to_datetime(urine["effective_at"], utc=True) < (pd.to_datetime(urine["admitted_at"], utc=True)
                                                                    + timedelta(hours=24))
    out = pd.DataFrame({"urine_total": urine.groupby("patient_key")["value"].sum(),
                        "urine_total_24h": urine[first_day].groupby("patient_key")["value"].sum()})
    gases = obs[(obs["code"] == PAO2) & obs["value"].notna()][["patient_key", "effective_at", "value"]]
    fio2 = obs[(obs["code"] == FIO2) & (obs["value"] > 0)][["patient_key", "effective_at", "value"]]
    if len(gases) and len(fio2):
        gases = gases.assign(effective_at=pd.to_datetime(gases["effective_at"], utc=True)).sort_values("effective_at")
        fio2 = fio2.assign(effective_at=pd.to_datetime(fio2["effective_at"], utc=True)).sort_values("effective_at")
        paired = pd.merge_asof(gases, fio2.rename(columns={"value": "fio2"}), on="effective_at", by="patient_key",
                               tolerance=pd.Timedelta(hours=24))
        paired["pf"] = paired["value"] / (paired["fio2"] / 100.0)
        paired = paired.dropna(subset=["pf"])
        by = paired.groupby("patient_key")["pf"]
        out = out.join(pd.DataFrame({"pf_ratio_min": by.min(), "pf_ratio_last": by.last()}), how="outer")
    return out


def _consciousness(obs: pd.DataFrame) -> pd.DataFrame:
    levels = obs[(obs["code"] == CONSCIOUSNESS) & obs["value_text"].isin(ACVPU_RANK.keys())].copy()
    levels["rank"] = levels["value_text"].map(ACVPU_RANK).astype(float)
    levels = levels.sort_values("effective_at", kind="stable").groupby("patient_key")["rank"]
    return pd.DataFrame({"acvpu_worst": levels.max(), "acvpu_last": levels.last()})


def _score_features(scores: pd.DataFrame) -> pd.DataFrame:
    scores = scores.sort_values("scored_at", kind="stable")
    by = scores.groupby("patient_key")
    return pd.DataFrame({"max_news2": by["news2_score"].max(), "mean_news2": by["news2_score"].mean(),
                         "last_news2": by["news2_score"].last(), "max_qsofa": by["qsofa_score"].max(),
                         "score_points": by["news2_score"].count()}).astype(float)


# -- the Challenge's metrics -------------------------------------------------------------------------
def event1(y: np.ndarray, predicted: np.ndarray) -> float:
    """min(sensitivity, positive predictivity) of a binary prediction (Challenge 2012, Event 1)."""
    tp = float(np.sum(predicted & (y == 1)))
    positives, flagged = float(np.sum(y == 1)), float(np.sum(predicted))
    se = tp / positives if positives else 0.0
    ppv = tp / flagged if flagged else 0.0
    return min(se, ppv)


def best_threshold(y: np.ndarray, score: np.ndarray) -> float:
    """The cut (predict death when score >= cut) that maximises Event 1 on these stays."""
    candidates = np.unique(score[np.isfinite(score)])
    if candidates.size > 400:
        candidates = np.unique(np.quantile(score[np.isfinite(score)], np.linspace(0, 1, 401)))
    best, cut = -1.0, float(candidates[-1]) if candidates.size else 0.0
    for c in candidates:
        e = event1(y, score >= c)
        if e > best:
            best, cut = e, float(c)
    return cut


def hosmer_lemeshow(y: np.ndarray, p: np.ndarray, groups: int = 10) -> float:
    """The H statistic over deciles of predicted risk (Challenge 2012, Event 2): lower is better calibrated."""
    order = np.argsort(p, kind="stable")
    h = 0.0
    for part in np.array_split(order, groups):
        if part.size == 0:
            continue
        observed, expected, n = float(y[part].sum()), float(p[part].sum()), part.size
        mean = expected / n
        if 0 < mean < 1:
            h += (observed - expected) ** 2 / (n * mean * (1 - mean))
    return h


# -- cross-validation --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Evaluation:
    """Out-of-fold predictions and figures of the model and each baseline."""

    metrics: dict[str, float]
    counts: dict[str, int]
    probability: dict[str, np.ndarray] = field(repr=False)  # who -> out-of-fold probability per stay
    flagged: dict[str, np.ndarray] = field(repr=False)  # who -> out-of-fold binary prediction per stay


def _fit(x: pd.DataFrame, y: np.ndarray, seed: int):
    from sklearn.ensemble import HistGradientBoostingClassifier

    from models.deterioration import _threads

    model = HistGradientBoostingClassifier(**MODEL_PARAMS, random_state=seed)
    with _threads(len(x)):
        return model.fit(x.astype("float64"), y)


def inner_predictions(x: pd.DataFrame, y: np.ndarray, seed: int, folds: int = 3) -> np.ndarray:
    """Out-of-fold predictions inside these stays: what the Event 1 cut and the calibration are fitted on (on its
    own training rows a boosted model is overconfident: a cut chosen there flags too few stays elsewhere, and a
    calibration fitted there learns nothing)."""
    from sklearn.model_selection import StratifiedKFold

    folds = min(folds, int(y.sum()), int(len(y) - y.sum()))
    if folds < 2:  # too few of one outcome to hold any out: in-sample predictions are all there is
        return _fit(x, y, seed).predict_proba(x.astype("float64"))[:, 1]
    inner = np.zeros(len(y))
    for tr, te in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y):
        inner[te] = _fit(x.iloc[tr], y[tr], seed).predict_proba(x.iloc[te].astype("float64"))[:, 1]
    return inner


_EDGE = 1e-6  # probabilities are clipped this far from 0 and 1 before their logit is taken


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype="float64"), _EDGE, 1 - _EDGE)
    return np.log(p / (1 - p))


def platt(inner: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Platt scaling fitted on out-of-fold predictions: calibrated = sigmoid(a * logit(p) + b)."""
    from sklearn.linear_model import LogisticRegression

    fit = LogisticRegression(C=1e6).fit(_logit(inner).reshape(-1, 1), y)
    return float(fit.coef_[0, 0]), float(fit.intercept_[0])


def apply_platt(p: np.ndarray, a: float, b: float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(a * _logit(p) + b)))


class PlattCalibrated:
    """The registered model: the boosted trees' probability through the Platt map fitted on their out-of-fold
    predictions (scikit-learn's predict_proba interface, so MLflow serves it like any classifier)."""

    def __init__(self, model, a: float, b: float):
        self.model, self.a, self.b = model, a, b
        self.classes_ = model.classes_

    def predict_proba(self, x) -> np.ndarray:
        p = apply_platt(self.model.predict_proba(x)[:, 1], self.a, self.b)
        return np.column_stack([1 - p, p])

    def predict(self, x) -> np.ndarray:
        return (self.predict_proba(x)[:, 1] >= 0.5).astype(int)


def _calibrated(train_score: np.ndarray, y: np.ndarray, test_score: np.ndarray) -> np.ndarray:
    """A baseline score mapped to a probability by a logistic fit on the training folds (missing = median)."""
    from sklearn.linear_model import LogisticRegression

    fill = float(np.nanmedian(train_score)) if np.isfinite(train_score).any() else 0.0
    a, b = np.nan_to_num(train_score, nan=fill), np.nan_to_num(test_score, nan=fill)
    fit = LogisticRegression().fit(a.reshape(-1, 1), y)
    return fit.predict_proba(b.reshape(-1, 1))[:, 1]


def cross_validate(frame: pd.DataFrame, *, seed: int, folds: int = FOLDS,
                   bootstraps: int = BOOTSTRAPS) -> Evaluation:
    from sklearn.model_selection import StratifiedKFold

    y = frame[LABEL].to_numpy().astype(int)
    deaths = int(y.sum())
    if deaths < folds or len(y) - deaths < folds:
        raise UsageError(f"{len(y)} stays with {deaths} in-hospital deaths: {folds}-fold cross-validation needs "
                         f"at least {folds} of each outcome; import more records")
    names = [c for c in feature_names() if frame[c].notna().any()]
    x = frame[names]
    who = ("model", *BASELINES)
    probability = {w: np.full(len(y), np.nan) for w in who}
    flagged = {w: np.zeros(len(y), dtype=bool) for w in who}
    uncalibrated = np.full(len(y), np.nan)
    for fold, (tr, te) in enumerate(StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y)):
        model = _fit(x.iloc[tr], y[tr], seed + fold)
        p_te = model.predict_proba(x.iloc[te].astype("float64"))[:, 1]
        inner = inner_predictions(x.iloc[tr], y[tr], seed + fold)
        uncalibrated[te] = p_te
        probability["model"][te] = apply_platt(p_te, *platt(inner, y[tr]))
        flagged["model"][te] = p_te >= best_threshold(y[tr], inner)
        for b in BASELINES:
            s = frame[b].to_numpy(dtype="float64")
            s_tr = np.nan_to_num(s[tr], nan=-np.inf)
            flagged[b][te] = np.nan_to_num(s[te], nan=-np.inf) >= best_threshold(y[tr], s_tr)
            probability[b][te] = _calibrated(s[tr], y[tr], s[te])
    metrics = _figures(y, probability, flagged, frame, seed, bootstraps, uncalibrated)
    counts = {"stays": len(y), "deaths": deaths, "features": len(names), "folds": folds,
              **{f"{b}_missing": int(frame[b].isna().sum()) for b in BASELINES}}
    return Evaluation(metrics, counts, probability, flagged)


def _figures(y: np.ndarray, probability: Mapping[str, np.ndarray], flagged: Mapping[str, np.ndarray],
             frame: pd.DataFrame, seed: int, bootstraps: int, uncalibrated: np.ndarray) -> dict[str, float]:
    """Per predictor: ranking figures of its raw score (the model's before calibration: each fold's Platt map is
    monotonic, but pooling folds with different maps would reorder stays), calibration figures of its
    probability; the model's H and Brier before calibration too."""
    from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

    raw = {"model": uncalibrated, **{b: frame[b].to_numpy(dtype="float64") for b in BASELINES}}
    out: dict[str, float] = {}
    for w, p in probability.items():
        ranked = np.nan_to_num(raw[w], nan=np.nanmin(raw[w]) - 1 if np.isfinite(raw[w]).any() else 0.0)
        out[f"{w}_auroc"] = roc_auc_score(y, ranked)
        out[f"{w}_auprc"] = average_precision_score(y, ranked)
        out[f"{w}_event1"] = event1(y, flagged[w])
        tp = float(np.sum(flagged[w] & (y == 1)))
        out[f"{w}_sensitivity"] = tp / max(1.0, float(y.sum()))
        out[f"{w}_ppv"] = tp / max(1.0, float(flagged[w].sum()))
        out[f"{w}_hosmer_lemeshow_h"] = hosmer_lemeshow(y, p)
        out[f"{w}_brier"] = brier_score_loss(y, p)
        out[f"{w}_auroc_ci_low"], out[f"{w}_auroc_ci_high"] = auroc_interval(y, ranked, seed=seed,
                                                                            resamples=bootstraps)
    out["model_uncalibrated_hosmer_lemeshow_h"] = hosmer_lemeshow(y, uncalibrated)
    out["model_uncalibrated_brier"] = brier_score_loss(y, uncalibrated)
    saps = np.nan_to_num(raw["saps_i"], nan=np.nanmin(raw["saps_i"]) - 1 if np.isfinite(raw["saps_i"]).any() else 0)
    low, high = auroc_interval(y, uncalibrated, minus=saps, seed=seed, resamples=bootstraps)
    out["model_minus_saps_i_auroc"] = out["model_auroc"] - out["saps_i_auroc"]
    out["model_minus_saps_i_auroc_ci_low"], out["model_minus_saps_i_auroc_ci_high"] = low, high
    return out


def is_champion(metrics: Mapping[str, float]) -> bool:
    """Beats SAPS-I: the AUROC difference's 95 % interval above zero and an Event 1 no worse."""
    return metrics["model_minus_saps_i_auroc_ci_low"] > 0 and metrics["model_event1"] >= metrics["saps_i_event1"]


# -- training and tracking ---------------------------------------------------------------------------
@dataclass(frozen=True)
class MortalityResult:
    run_id: str
    version: str | None
    champion: bool
    metrics: dict[str, float]
    counts: dict[str, int]


def train(frame: pd.DataFrame, *, tracking_uri: str, seed: int, params: Mapping[str, Any] | None = None,
          folds: int = FOLDS, bootstraps: int = BOOTSTRAPS) -> MortalityResult:
    """Cross-validate, fit the final model on every stay, log both to MLflow, register it when it is champion."""
    evaluation = cross_validate(frame, seed=seed, folds=folds, bootstraps=bootstraps)
    names = [c for c in feature_names() if frame[c].notna().any()]
    y = frame[LABEL].to_numpy().astype(int)
    inner = inner_predictions(frame[names], y, seed)
    model = PlattCalibrated(_fit(frame[names], y, seed), *platt(inner, y))
    threshold = float(apply_platt(np.array([best_threshold(y, inner)]), model.a, model.b)[0])  # on its output
    champion = is_champion(evaluation.metrics)
    run_id, version = _log(tracking_uri, model, frame[names], evaluation, champion, threshold, {
        **MODEL_PARAMS, "seed": seed, "folds": folds, "bootstraps": bootstraps, "window_hours": 48,
        **(params or {})})
    return MortalityResult(run_id, version, champion, evaluation.metrics, evaluation.counts)


def _log(uri: str, model, x: pd.DataFrame, evaluation: Evaluation, champion: bool, threshold: float,
         params: Mapping[str, Any]) -> tuple[str, str | None]:
    import mlflow
    import mlflow.sklearn
    import sklearn
    from mlflow.models import infer_signature

    from models.deterioration import _client, _experiment_id, _mlflow_at, register_champion

    client = _client(uri)
    with _mlflow_at(uri):
        with mlflow.start_run(experiment_id=_experiment_id(client, uri, EXPERIMENT)) as run:
            mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
            mlflow.log_metrics({k: float(v) for k, v in {**evaluation.metrics, **evaluation.counts}.items()
                                if math.isfinite(v)})
            mlflow.log_dict({"feature_names": list(x.columns), "threshold": threshold,
                             "platt": {"a": model.a, "b": model.b}}, "model_inputs.json")
            sample = x.astype("float64").head(200)
            info = mlflow.sklearn.log_model(
                model, name="model", signature=infer_signature(sample, model.predict_proba(sample)[:, 1]),
                pip_requirements=[f"scikit-learn=={sklearn.__version__}"])
            mlflow.set_tags({"carelake.champion": str(champion).lower(), "carelake.threshold": repr(threshold)})
        if not champion:
            return run.info.run_id, None
        version = register_champion(client, MODEL_NAME, "In-hospital death from the first 48 h of an ICU stay; "
                                    "champion = beats SAPS-I (AUROC CI, Event 1)", info, run.info.run_id,
                                    {"carelake.threshold": repr(threshold)})
    return run.info.run_id, version
