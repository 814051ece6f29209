"""Deterioration model: labels from ground truth, the training frame, training tracked in MLflow, and the champion.

The model predicts, at each scoring point of gold.vitals_features, whether the deterioration event (models.label_event:
its peak by default, when it is clinically manifest) happens within the horizon. It is judged against NEWS2 >= 5 on
the same held-out patients: AUROC, AUPRC, median lead time before the event, share of deteriorating patients
caught, and alert episodes per 100 patient-days. Its alert threshold is chosen on the training patients to give
the same alert burden as NEWS2 >= 5 (or a configured rate), so the two are compared at equal cost in alarms. A
model becomes the registered champion only if its AUROC minus NEWS2's has a 95 % interval above zero (a paired,
patient-level bootstrap) and it alerts in time for no fewer deteriorating patients at that burden
(`champion_decision`); otherwise the run is logged and NEWS2 stays the alerting rule. Every run logs a model card
(`model_card.md`: data, label, metrics with intervals, intended use, limits, the decision).

MLflow layout: one experiment, `carelake-deterioration`; a run per training with params, metrics for model and
NEWS2, the ROC figure, feature names and the model (signature included); registered model
`carelake-deterioration`, alias `champion`, the alert threshold as a version tag. With a sqlite tracking URI the
artifacts live beside the database (`<dir>/artifacts`), never in ./mlruns. The tracking URI is always passed in;
MLflow's process-wide URI is set only inside a call and restored after it.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from models.evaluation import auroc_interval, wilson
from pipelines.errors import ConfigError, UsageError

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from pipelines.config import Config

MODEL_NAME = "carelake-deterioration"
ALIAS = "champion"
EXPERIMENT = "carelake-deterioration"
THRESHOLD_TAG = "carelake.threshold"
NEWS2_ALERT = 5  # NEWS2 aggregate >= 5: the "urgent response" trigger (RCP, NEWS2 2017, chart 2)
KEYS = ["patient_key", "scored_at"]
LABEL = "label"
TIME = "datetime64[us, UTC]"
MODEL_PARAMS = {"max_iter": 150, "learning_rate": 0.05, "max_leaf_nodes": 15, "min_samples_leaf": 20,
                "l2_regularization": 1.0}
ONE_THREAD_BELOW_ROWS = 200_000
BOOTSTRAPS = 300  # patient-level resamples behind each interval
_MLFLOW_LOCK = threading.RLock()
_PROGRESS_BAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
_CHAMPIONS: dict[tuple[str, str, str], Any] = {}


# -- labels and the training frame ---------------------------------------------------------------
def labels_from_truth(csv_path: str | Path, key_of_mrn: Callable[[str], str], event: str = "peak_time") -> pd.DataFrame:
    """Deterioration events (patient_key, onset_at UTC) from the simulator's truth/deteriorations.csv.

    `event` names the truth column that times the deterioration the model must foresee (models.label_event):
    `peak_time`, when it is clinically manifest (the default: vital signs drift from `onset_time` on, which is what
    an early warning can see), or `onset_time`, the first physiological change, which nothing before it announces.
    The frame calls that time `onset_at` whichever column it came from.
    """
    path = Path(csv_path)
    if not path.is_file():
        raise UsageError(f"labels file {path} does not exist: pass the simulator's ground truth, "
                         "DIR/truth/deteriorations.csv from `carelake simulate --out DIR`")
    truth = pd.read_csv(path, dtype=str)
    missing = sorted({"patient_mrn", event} - set(truth.columns))
    if missing:
        raise UsageError(f"labels file {path} lacks column(s) {missing}: expected patient_mrn, {event} "
                         f"(found {list(truth.columns)}; models.label_event names the event column)")
    truth = truth.dropna(subset=["patient_mrn", event])
    if truth.empty:
        raise UsageError(f"labels file {path} lists no deterioration onset: the model needs patients who "
                         "deteriorate (simulate more patients or hours)")
    onset = pd.to_datetime(truth[event], utc=True, errors="coerce")
    if onset.isna().any():
        bad = truth.loc[onset.isna(), event].head(3).tolist()
        raise UsageError(f"labels file {path}: {event} must be ISO-8601 times, got {bad}")
    keys = [key_of_mrn(mrn.strip()) for mrn in truth["patient_mrn"]]
    return pd.DataFrame({"patient_key": keys, "onset_at": onset.astype(TIME).to_numpy()})


def _keyed(frame: pd.DataFrame, what: str) -> pd.DataFrame:
    missing = [k for k in KEYS if k not in frame.columns]
    if missing:
        raise UsageError(f"{what} lacks column(s) {missing} (found {list(frame.columns)[:8]}...)")
    out = frame.assign(scored_at=pd.to_datetime(frame["scored_at"], utc=True).astype(TIME))
    return out.drop_duplicates(KEYS, keep="last")


def training_frame(features: pd.DataFrame, scores: pd.DataFrame, labels: pd.DataFrame,
                   horizon_ms: int) -> pd.DataFrame:
    """Features joined with NEWS2 on (patient_key, scored_at), labelled, points at or after onset left out.

    label = 1 when the patient's first deterioration onset lies in (scored_at, scored_at + horizon]. Adds
    news2_score, onset_at (NaT for patients who do not deteriorate) and label; sorted by patient and time.
    """
    if "news2_score" not in scores.columns:
        raise UsageError(f"the scores lack news2_score (found {list(scores.columns)[:8]}...)")
    news2 = _keyed(scores, "the scores")[[*KEYS, "news2_score"]]
    frame = _keyed(features, "the features").drop(columns=["news2_score", "onset_at", LABEL], errors="ignore")
    frame = frame.merge(news2, on=KEYS, how="inner")
    onsets = labels.assign(onset_at=pd.to_datetime(labels["onset_at"], utc=True).astype(TIME))
    first = onsets.groupby("patient_key")["onset_at"].min()
    frame["onset_at"] = frame["patient_key"].map(first).astype(TIME)
    frame = frame[frame["onset_at"].isna() | (frame["scored_at"] < frame["onset_at"])].copy()
    horizon = pd.Timedelta(milliseconds=horizon_ms)
    frame[LABEL] = (frame["onset_at"] <= frame["scored_at"] + horizon).fillna(False).astype("int8")
    return frame.sort_values(KEYS, kind="stable").reset_index(drop=True)


# -- evaluation ------------------------------------------------------------------------------------
class Timeline:
    """Per-patient time structure of a frame sorted by (patient_key, scored_at): alert episodes and exposure."""

    def __init__(self, frame: pd.DataFrame):
        keys = frame["patient_key"].to_numpy()
        self.first_of_patient = np.r_[True, keys[1:] != keys[:-1]] if len(keys) else np.zeros(0, bool)
        times = frame.groupby("patient_key", sort=False)["scored_at"]
        spans = (times.max() - times.min()).dt.total_seconds()
        self.patient_days = float(spans.sum()) / 86400 if len(spans) else 0.0

    def episodes(self, alerting: np.ndarray) -> int:
        """Rising edges of the alert condition, per patient (a patient's first point alerting counts)."""
        previous = np.r_[False, alerting[:-1]] if len(alerting) else alerting
        return int(np.sum(alerting & (self.first_of_patient | ~previous)))

    def rate(self, alerting: np.ndarray) -> float:
        """Alert episodes per 100 patient-days (patient-days = sum of each patient's observed span)."""
        return 100 * self.episodes(alerting) / self.patient_days if self.patient_days > 0 else math.nan


def lead_times_h(frame: pd.DataFrame, alerting: np.ndarray) -> tuple[float, float]:
    """(median hours from the first alert within the horizon to onset, share of deteriorating patients caught)."""
    within = frame[LABEL].to_numpy() == 1
    at_risk = frame.loc[within, ["patient_key", "scored_at", "onset_at"]]
    if at_risk.empty:
        return math.nan, math.nan
    caught = at_risk[alerting[within]]
    first = caught.groupby("patient_key").agg(first=("scored_at", "min"), onset=("onset_at", "first"))
    leads = (first["onset"] - first["first"]).dt.total_seconds() / 3600
    median = float(leads.median()) if len(leads) else math.nan
    return median, len(first) / at_risk["patient_key"].nunique()


def evaluate(frame: pd.DataFrame, score: np.ndarray, alerting: np.ndarray, who: str) -> dict[str, float]:
    """AUROC, AUPRC, lead time, patients caught and alert rate of one scorer on one (sorted) frame."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    y = frame[LABEL].to_numpy()
    lead, caught = lead_times_h(frame, alerting)
    at_risk = frame.loc[y == 1, "patient_key"].nunique()
    low, high = wilson(round(caught * at_risk), at_risk) if at_risk else (math.nan, math.nan)
    return {
        f"{who}_auroc": float(roc_auc_score(y, score)),
        f"{who}_auprc": float(average_precision_score(y, score)),
        f"{who}_median_lead_time_h": lead,
        f"{who}_detected_fraction": caught,
        f"{who}_detected_fraction_ci_low": low,
        f"{who}_detected_fraction_ci_high": high,
        f"{who}_ppv": float(y[alerting].mean()) if alerting.any() else math.nan,  # alerting points before an event
        f"{who}_alerts_per_100_patient_days": Timeline(frame).rate(alerting),
    }


def choose_threshold(frame: pd.DataFrame, risk: np.ndarray, target_rate: float) -> float:
    """The risk threshold whose alert-episode rate on `frame` comes closest to target_rate (ties: the higher)."""
    timeline = Timeline(frame)
    candidates = np.unique(np.quantile(risk, np.linspace(0, 1, 401)))
    candidates = np.r_[candidates, np.nextafter(risk.max(), np.inf)]  # "never alert" is a choice too
    best, best_gap = float(candidates[-1]), math.inf
    for t in candidates:
        gap = abs(timeline.rate(risk >= t) - target_rate)
        if gap <= best_gap:
            best, best_gap = float(t), gap
    return best


# -- the patient split -----------------------------------------------------------------------------
def split_patients(frame: pd.DataFrame, test_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of test rows: a seeded patient-level split, stratified by whether the patient deteriorates."""
    positive = frame.groupby("patient_key")[LABEL].max()
    rng = np.random.default_rng(seed)
    test: list[str] = []
    for keys in (sorted(positive.index[positive == 1]), sorted(positive.index[positive == 0])):
        n = len(keys)
        take = min(n - 1, max(1, round(test_fraction * n))) if n >= 2 else 0
        test += list(rng.permutation(np.array(keys, dtype=object))[:take])
    return frame["patient_key"].isin(set(test)).to_numpy()


def _check_trainable(frame: pd.DataFrame, feature_names: Sequence[str]) -> None:
    if frame.empty:
        raise UsageError("no training rows: no scoring point has both features and a NEWS2 score "
                         "(run `carelake run gold.early_warning_scores` over the data first)")
    missing = [c for c in feature_names if c not in frame.columns]
    if missing:
        raise UsageError(f"the training frame lacks feature column(s) {missing[:5]}: rebuild gold.vitals_features "
                         "with the configured gold.feature_windows")
    deteriorating = frame.loc[frame[LABEL] == 1, "patient_key"].nunique()
    if deteriorating < 2:
        raise UsageError(f"{deteriorating} patient(s) have a scoring point within the horizon before a "
                         "deterioration onset; training needs at least 2: check that the labels come from the "
                         "data loaded into this lakehouse (same simulation, same key secret), or simulate more")


# -- MLflow plumbing ---------------------------------------------------------------------------------
def default_tracking_uri(cfg: Config) -> str:
    """models.tracking_uri, else a sqlite store under <root>/_mlflow (artifacts in <root>/_mlflow/artifacts)."""
    if cfg.models.tracking_uri:
        return cfg.models.tracking_uri
    folder = cfg.path("_mlflow").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def _sqlite_path(uri: str) -> Path | None:
    if uri.startswith("sqlite:///") and ":memory:" not in uri:
        return Path(uri[len("sqlite:///"):].split("?", 1)[0])
    return None


def _artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps artifacts: beside a sqlite database; a server decides for itself."""
    db = _sqlite_path(uri)
    return (db.parent.resolve() / "artifacts").as_uri() if db else None


def _check_reachable(uri: str) -> None:
    """Fail fast (5 s, not MLflow's minutes of retries) when a tracking server does not answer."""
    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5).close()
        except (urllib.error.URLError, OSError) as exc:
            raise ConfigError(f"MLflow tracking server {uri} is unreachable ({exc}): start it, or pass "
                              "--tracking-uri / set models.tracking_uri to one that answers (empty = sqlite "
                              "under the lakehouse root)") from None
    db = _sqlite_path(uri)
    if db is not None:
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"MLflow tracking store {uri}: cannot create {db.parent} ({exc}); set "
                              "models.tracking_uri to a writable place") from None


@contextmanager
def _mlflow_at(uri: str) -> Iterator[None]:
    """MLflow pointed at `uri` and quiet for the block, then restored; one block at a time.

    Quiet: no INFO lines (a new sqlite store logs each of its ~40 migrations) and no download progress bars.
    MLflow's sqlite store also creates an empty ./mlruns in the working directory whatever the artifact
    location; it is removed again when it was not there before.
    """
    import mlflow

    stray = Path.cwd() / "mlruns"
    stray_existed = stray.exists()
    with _MLFLOW_LOCK:
        previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
        bar = os.environ.get(_PROGRESS_BAR)
        logging_floor = logging.root.manager.disable
        mlflow.set_tracking_uri(uri)
        os.environ[_PROGRESS_BAR] = "false"
        logging.disable(logging.INFO)
        try:
            yield
        finally:
            logging.disable(logging_floor)
            os.environ.pop(_PROGRESS_BAR) if bar is None else os.environ.__setitem__(_PROGRESS_BAR, bar)
            mlflow.set_tracking_uri(previous)
            if not stray_existed and stray.is_dir() and not any(f for _, _, f in os.walk(stray) if f):
                shutil.rmtree(stray, ignore_errors=True)


@lru_cache(maxsize=8)
def _client(uri: str) -> MlflowClient:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    _check_reachable(uri)
    try:
        with _mlflow_at(uri):
            client = MlflowClient(tracking_uri=uri, registry_uri=uri)
            client.search_registered_models(max_results=1)  # opens (and on first use creates) the registry
            return client
    except MlflowException as exc:
        raise ConfigError(f"MLflow tracking store {uri} cannot be opened: {str(exc).splitlines()[0]}") from None


def _experiment_id(client: MlflowClient, uri: str, name: str = EXPERIMENT) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=_artifact_location(uri))


# -- training ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainResult:
    """What a training produced: the run, the registered version (None when not registered) and the figures."""

    run_id: str
    version: str | None
    champion: bool
    threshold: float
    metrics: dict[str, float]
    counts: dict[str, int]
    feature_names: tuple[str, ...]  # the model's inputs, in order: the given ones that had any value
    roc: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # who -> {"fpr": [...], "tpr": [...]}
    decision: str = ""  # why it is (not) the champion, in one sentence
    card: str = ""  # the model card (Markdown), logged as model_card.md


def _roc_points(y: np.ndarray, scores: Mapping[str, np.ndarray]) -> dict[str, dict[str, list[float]]]:
    from sklearn.metrics import roc_curve

    out = {}
    for who, score in scores.items():
        fpr, tpr, _ = roc_curve(y, score)
        out[who] = {"fpr": fpr.round(5).tolist(), "tpr": tpr.round(5).tolist()}
    return out


def _roc_figure(roc: Mapping[str, Mapping[str, list[float]]], metrics: Mapping[str, float]):
    """Model vs NEWS2 ROC curves (a bare Figure: no pyplot state, no GUI backend)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    labels = {"model": "model", "news2": "NEWS2"}
    for who, points in roc.items():
        ax.plot(points["fpr"], points["tpr"], label=f"{labels[who]} (AUROC {metrics[f'{who}_auroc']:.3f})")
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="Deterioration within horizon (test)")
    ax.legend(loc="lower right")
    return fig


@contextmanager
def _threads(rows: int) -> Iterator[None]:
    """One OpenMP thread below ONE_THREAD_BELOW_ROWS rows: scikit-learn's gradient boosting otherwise spins
    threads that, beside Spark or on a busy machine, make a sub-second fit take many seconds."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1 if rows < ONE_THREAD_BELOW_ROWS else None, user_api="openmp"):
        yield


def _fit(frame: pd.DataFrame, feature_names: Sequence[str], seed: int):
    from sklearn.ensemble import HistGradientBoostingClassifier

    model = HistGradientBoostingClassifier(**MODEL_PARAMS, random_state=seed)
    with _threads(len(frame)):
        return model.fit(frame[list(feature_names)].astype("float64"), frame[LABEL].to_numpy())


def _risk(model, frame: pd.DataFrame, feature_names: Sequence[str]) -> np.ndarray:
    with _threads(len(frame)):
        return model.predict_proba(frame[list(feature_names)].astype("float64"))[:, 1]


def _news2(frame: pd.DataFrame) -> np.ndarray:
    return frame["news2_score"].astype("float64").fillna(-1).to_numpy()


def train(frame: pd.DataFrame, *, tracking_uri: str, seed: int, test_fraction: float,
          alert_rate_per_100_patient_days: float, feature_names: Sequence[str],
          params: Mapping[str, Any] | None = None) -> TrainResult:
    """Train on a patient split of `frame` (training_frame), compare with NEWS2 >= 5, log and maybe register.

    alert_rate_per_100_patient_days 0 = alert as often as NEWS2 >= 5 does on the training patients. `params` are
    extra run parameters to record (e.g. the gold table versions the frame was read from).
    """
    _check_trainable(frame, feature_names)
    frame = frame.sort_values(KEYS, kind="stable").reset_index(drop=True)
    is_test = split_patients(frame, test_fraction, seed)
    train_rows, test_rows = frame[~is_test].reset_index(drop=True), frame[is_test].reset_index(drop=True)
    if test_rows.empty or test_rows[LABEL].nunique() < 2 or train_rows[LABEL].nunique() < 2:
        raise UsageError("the patient split left a set without both outcomes; add patients or change "
                         "models.test_fraction")
    if Timeline(train_rows).patient_days <= 0:
        raise UsageError("the training patients have no observed time span (one scoring point each): "
                         "alert rates per patient-day cannot be matched; train on longer stays")
    given, feature_names = list(feature_names), _usable(train_rows, feature_names)
    model = _fit(train_rows, feature_names, seed)
    news2_alert = _news2(train_rows) >= NEWS2_ALERT
    target = alert_rate_per_100_patient_days or Timeline(train_rows).rate(news2_alert)
    threshold = choose_threshold(train_rows, _out_of_fold_risk(train_rows, feature_names, seed), target)
    risk, news2 = _risk(model, test_rows, feature_names), _news2(test_rows)
    metrics = {**evaluate(test_rows, risk, risk >= threshold, "model"),
               **evaluate(test_rows, news2, news2 >= NEWS2_ALERT, "news2"),
               "threshold": threshold, "target_alerts_per_100_patient_days": target}
    metrics.update(_intervals(test_rows, risk, news2, seed))
    counts = _counts(train_rows, test_rows)
    roc = _roc_points(test_rows[LABEL].to_numpy(), {"model": risk, "news2": news2})
    champion, decision = champion_decision(metrics)
    unused = [c for c in given if c not in feature_names]
    run_params = {**MODEL_PARAMS, "seed": seed, "test_fraction": test_fraction, "news2_alert": NEWS2_ALERT,
                  "alert_rate_per_100_patient_days": alert_rate_per_100_patient_days, "features": len(feature_names),
                  "unused_features": len(unused), "bootstrap_resamples": BOOTSTRAPS, **(params or {})}
    card = model_card(metrics, counts, feature_names, decision, run_params)
    run_id, version = _log(tracking_uri, model, train_rows, (feature_names, unused), metrics, counts, roc,
                           (champion, card), run_params)
    return TrainResult(run_id, version, champion, threshold, metrics, counts, tuple(feature_names), roc, decision,
                       card)


def _intervals(test_rows: pd.DataFrame, risk: np.ndarray, news2: np.ndarray, seed: int) -> dict[str, float]:
    """95 % intervals by a patient-level bootstrap: each AUROC and the model's minus NEWS2's, paired."""
    y, groups = test_rows[LABEL].to_numpy(), test_rows["patient_key"].to_numpy()
    out = {}
    for who, score in (("model", risk), ("news2", news2)):
        out[f"{who}_auroc_ci_low"], out[f"{who}_auroc_ci_high"] = auroc_interval(
            y, score, groups=groups, seed=seed, resamples=BOOTSTRAPS)
    out["model_minus_news2_auroc_ci_low"], out["model_minus_news2_auroc_ci_high"] = auroc_interval(
        y, risk, minus=news2, groups=groups, seed=seed, resamples=BOOTSTRAPS)
    return out


def champion_decision(metrics: Mapping[str, float]) -> tuple[bool, str]:
    """Champion only when the model beats NEWS2 >= 5 on AUROC with the difference's 95 % interval above zero AND
    alerts in time for no fewer deteriorating patients at the matched alert burden; otherwise NEWS2 stays the rule."""
    low, high = metrics["model_minus_news2_auroc_ci_low"], metrics["model_minus_news2_auroc_ci_high"]
    diff = metrics["model_auroc"] - metrics["news2_auroc"]
    interval = f"AUROC difference {diff:+.3f} (95% CI {low:+.3f} to {high:+.3f})"
    if not low > 0:
        return False, f"not champion: {interval} does not lie above zero; NEWS2 >= 5 stays the alerting rule"
    model, news2 = metrics["model_detected_fraction"], metrics["news2_detected_fraction"]
    if not model >= news2:
        return False, (f"not champion: {interval}, but it alerted in time for fewer deteriorating patients "
                       f"({model:.2f} vs {news2:.2f}) at the matched alert burden; NEWS2 >= 5 stays the alerting rule")
    return True, (f"champion: {interval} lies above zero and it alerted in time for as many or more deteriorating "
                  f"patients ({model:.2f} vs {news2:.2f}) at the matched alert burden")


def model_card(metrics: Mapping[str, float], counts: Mapping[str, int], feature_names: Sequence[str],
               decision: str, params: Mapping[str, Any]) -> str:
    """The model card (Markdown): data, label, metrics with intervals, intended use, limits, the decision."""
    m = metrics

    def ci(who: str, key: str, digits: int = 3) -> str:
        low, high = m.get(f"{who}_{key}_ci_low", math.nan), m.get(f"{who}_{key}_ci_high", math.nan)
        return f"{m[f'{who}_{key}']:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"

    rows = [("AUROC (95% CI)", ci("model", "auroc"), ci("news2", "auroc")),
            ("AUPRC", f"{m['model_auprc']:.3f}", f"{m['news2_auprc']:.3f}"),
            ("deteriorating patients alerted in time (95% CI)", ci("model", "detected_fraction", 2),
             ci("news2", "detected_fraction", 2)),
            ("median lead time before the event (h)", f"{m['model_median_lead_time_h']:.1f}",
             f"{m['news2_median_lead_time_h']:.1f}"),
            ("alert episodes per 100 patient-days", f"{m['model_alerts_per_100_patient_days']:.1f}",
             f"{m['news2_alerts_per_100_patient_days']:.1f}"),
            ("PPV of an alerting point (event within the horizon)", f"{m['model_ppv']:.3f}", f"{m['news2_ppv']:.3f}")]
    table = "\n".join(["| held-out patients | model | NEWS2 >= 5 |", "|---|---|---|",
                        *(f"| {a} | {b} | {c} |" for a, b, c in rows)])
    return f"""# Model card: {MODEL_NAME}

## Decision
{decision}.

## Data
Points: {counts['train_rows']:,} training / {counts['test_rows']:,} held out; patients {counts['train_patients']:,} /
{counts['test_patients']:,}, of whom {counts['train_deteriorating_patients']} / {counts['test_deteriorating_patients']}
deteriorate. Inputs: gold.vitals_features ({len(feature_names)} features) and gold.early_warning_scores at each
scoring point; provenance: {', '.join(f'{k}={v}' for k, v in params.items() if k.endswith('.version')) or 'n/a'};
labels: {params.get('labels', 'n/a')}.

## Label
1 when the patient's deterioration event ({params.get('labels', 'the labels file')}) falls within the horizon
({params.get('horizon', 'models.horizon')}) after the scoring point; points at or after the event are not scored.

## Metrics (held-out patients; 95% intervals by a patient-level bootstrap, {BOOTSTRAPS} resamples, or Wilson)
{table}

Alert threshold: risk >= {m['threshold']:.4f}, chosen on the training patients' out-of-fold risks for
{m['target_alerts_per_100_patient_days']:.1f} alert episodes per 100 patient-days (NEWS2 >= 5's burden unless
configured).

## Intended use
Decision support beside NEWS2 on adult inpatients with regular vital signs: it ranks who to look at first. It
does not replace NEWS2's escalation rules, and it is only used for alerts when it is the registered champion.

## Limits
Trained and evaluated on the data named above: when those are the simulator's, the figures describe the simulator,
not a hospital. Intervals are wide with few deteriorating patients held out. Not validated on children, pregnancy,
or patients with chronic hypoxia on a scale-2 target. Recalibrate and re-evaluate before using it on another
population.
"""


def _out_of_fold_risk(rows: pd.DataFrame, feature_names: Sequence[str], seed: int, folds: int = 3) -> np.ndarray:
    """Each training point's risk from a model fitted without its patient (patient folds, deteriorating patients
    spread across them). The alert threshold is chosen on these: on its own training points a boosted model is
    overconfident, and a threshold chosen there can flag nobody on new patients."""
    positive = rows.groupby("patient_key")[LABEL].max()
    rng = np.random.default_rng(seed)
    fold_of: dict[str, int] = {}
    for keys in (sorted(positive.index[positive == 1]), sorted(positive.index[positive == 0])):
        for i, key in enumerate(rng.permutation(np.array(keys, dtype=object))):
            fold_of[key] = i % folds
    fold = rows["patient_key"].map(fold_of).to_numpy()
    risk = np.full(len(rows), np.nan)
    for k in range(folds):
        held, rest = fold == k, fold != k
        measured = [c for c in feature_names if rows.loc[rest, c].notna().any()]  # a fold may lack a rare concept
        if not held.any() or rows.loc[rest, LABEL].nunique() < 2 or not measured:
            return _risk(_fit(rows, feature_names, seed), rows, feature_names)  # too few patients to hold any out
        risk[held] = _risk(_fit(rows[rest], measured, seed), rows[held], measured)
    return risk


def _usable(train_rows: pd.DataFrame, feature_names: Sequence[str]) -> list[str]:
    """The features with at least one value on the training patients (a concept nobody measured is left out)."""
    usable = [c for c in feature_names if train_rows[c].notna().any()]
    if not usable:
        raise UsageError("no feature has a value on the training patients: gold.vitals_features holds no "
                         "measurements of the feature concepts")
    return usable


def _counts(train_rows: pd.DataFrame, test_rows: pd.DataFrame) -> dict[str, int]:
    out = {}
    for name, rows in (("train", train_rows), ("test", test_rows)):
        out[f"{name}_rows"] = len(rows)
        out[f"{name}_patients"] = rows["patient_key"].nunique()
        out[f"{name}_positive_rows"] = int(rows[LABEL].sum())
        out[f"{name}_deteriorating_patients"] = rows.loc[rows[LABEL] == 1, "patient_key"].nunique()
    return out


def _log(uri: str, model, train_rows: pd.DataFrame, inputs: tuple[list[str], list[str]], metrics: dict[str, float],
         counts: dict[str, int], roc: dict, decided: tuple[bool, str],
         params: Mapping[str, Any]) -> tuple[str, str | None]:
    """One MLflow run with everything (the model card too); registered and aliased champion only when it is one."""
    feature_names, unused = inputs
    champion, card = decided
    import mlflow
    import mlflow.sklearn
    import sklearn
    from mlflow.models import infer_signature

    client = _client(uri)
    with _mlflow_at(uri):
        experiment_id = _experiment_id(client, uri)
        with mlflow.start_run(experiment_id=experiment_id) as run:
            mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
            mlflow.log_metrics({k: float(v) for k, v in {**metrics, **counts}.items() if math.isfinite(v)})
            mlflow.log_figure(_roc_figure(roc, metrics), "roc.png")
            mlflow.log_text(card, "model_card.md")
            mlflow.log_dict({"feature_names": list(feature_names), "unused_features": list(unused),
                             "roc_test": roc}, "model_inputs.json")
            sample = train_rows[list(feature_names)].astype("float64").head(200)
            info = mlflow.sklearn.log_model(
                model, name="model", signature=infer_signature(sample, model.predict_proba(sample)[:, 1]),
                pip_requirements=[f"scikit-learn=={sklearn.__version__}"])
            mlflow.set_tags({THRESHOLD_TAG: repr(metrics["threshold"]), "carelake.champion": str(champion).lower()})
        if not champion:
            return run.info.run_id, None
        version = _register(client, info, run.info.run_id, metrics)
        client.set_tag(run.info.run_id, "carelake.registered_version", version)
    return run.info.run_id, version


def _register(client: MlflowClient, info, run_id: str, metrics: Mapping[str, float]) -> str:
    tags = {THRESHOLD_TAG: repr(metrics["threshold"]), "carelake.model_auroc": f"{metrics['model_auroc']:.4f}",
            "carelake.news2_auroc": f"{metrics['news2_auroc']:.4f}"}
    return register_champion(client, MODEL_NAME, "Deterioration within the horizon, from vitals features; champion "
                             "= beats NEWS2 >= 5 on held-out patients", info, run_id, tags)


def register_champion(client: MlflowClient, model_name: str, description: str, info, run_id: str,
                      tags: Mapping[str, str]) -> str:
    """A new version of the registered model (created on first use) from a logged model, aliased `champion`."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(model_name, description=description)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    mv = client.create_model_version(model_name, source=info.model_uri, run_id=run_id, tags=dict(tags),
                                     model_id=info.model_id)
    client.set_registered_model_alias(model_name, ALIAS, mv.version)
    return str(mv.version)


# -- scoring -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Champion:
    """The registered champion: version, alert threshold, feature names in model order, and the model."""

    version: str
    threshold: float
    feature_names: tuple[str, ...]
    model: Any
    run_id: str | None = None

    def predict(self, features: pd.DataFrame) -> np.ndarray:
        """Deterioration risk (probability in [0, 1]) per row of `features` (extra columns are ignored)."""
        missing = [c for c in self.feature_names if c not in features.columns]
        if missing:
            raise UsageError(f"model {MODEL_NAME} v{self.version} needs feature column(s) {missing[:5]} "
                             f"({len(missing)} missing): score with the feature windows it was trained on")
        if features.empty:
            return np.zeros(0)
        return _risk(self.model, features, self.feature_names)


def _not_found(exc: Exception) -> bool:
    code = getattr(exc, "error_code", "")
    return code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND") or (
        code == "INVALID_PARAMETER_VALUE" and "not found" in str(exc))


def load_champion(tracking_uri: str) -> Champion | None:
    """The model under alias `champion`, or None when none is registered. Cached by (uri, version)."""
    return cached_champion(tracking_uri, MODEL_NAME, _load_version)


def cached_champion(tracking_uri: str, model_name: str, load: Callable[[str, Any], Any]) -> Any:
    """`load(uri, model version)` of the version under alias `champion` of a registered model, or None when none is
    registered. Cached per (uri, model, version): a new champion replaces its predecessor in the cache."""
    from mlflow.exceptions import MlflowException

    db = _sqlite_path(tracking_uri)
    if db is not None and not db.exists():
        return None
    client = _client(tracking_uri)
    try:
        mv = client.get_model_version_by_alias(model_name, ALIAS)
    except MlflowException as exc:
        if _not_found(exc):
            return None
        raise ConfigError(f"MLflow registry {tracking_uri}: {str(exc).splitlines()[0]}") from None
    key = (tracking_uri, model_name, str(mv.version))
    cached = _CHAMPIONS.get(key)
    if cached is None:
        cached = load(tracking_uri, mv)
        for old in [k for k in _CHAMPIONS if k[:2] == key[:2]]:
            del _CHAMPIONS[old]
        _CHAMPIONS[key] = cached
    return cached


def _load_version(uri: str, mv) -> Champion:
    import mlflow
    import mlflow.sklearn
    from mlflow.models import Model

    with _mlflow_at(uri), tempfile.TemporaryDirectory(prefix="carelake-model-") as tmp:
        local = mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=tmp)
        model = mlflow.sklearn.load_model(local)
        signature = Model.load(local).signature
    names = signature.inputs.input_names() if signature else list(model.feature_names_in_)
    threshold = float(mv.tags.get(THRESHOLD_TAG, "0.5"))
    return Champion(str(mv.version), threshold, tuple(names), model, mv.run_id)
