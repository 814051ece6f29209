"""The critical-finding model: what is known when a study arrives -> the probability that it holds a critical finding.

Inputs (one-hot, a fixed vocabulary so the signature never depends on the data): the order's priority, the study's
modality and body part, the indication categories (gold.imaging_rank) and the ICD-10-CM chapters of the indication
codes, the location class, the patient's NEWS2 band when the study arrived and whether a deterioration alert was
open then. Labels: the simulator's ground truth
(truth/imaging.csv `critical_finding`), joined by accession number.

Judged on held-out patients (a patient-level split: no patient in both sets) against order priority alone (STAT >
ASAP > ROUTINE > no order) as a ranking of the same studies: AUROC of each for the critical label. The model becomes
the registered champion (`carelake-critical-finding`, alias `champion`) only if its AUROC beats priority's, judged
on at least MIN_HELD_OUT_CRITICAL critical studies (fewer: logged, never registered). A
logistic regression: its coefficients are readable, and its probabilities are what the worklist adds as points.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.errors import UsageError

MODEL_NAME = "carelake-critical-finding"
EXPERIMENT = "carelake-critical-finding"
ALIAS = "champion"
LABEL = "critical_finding"
VOCABULARY = {
    "priority": ("STAT", "ASAP", "ROUTINE"),
    "modality": ("CT", "MR", "CR", "DX", "US", "NM", "XA"),
    "body_part": ("HEAD", "CHEST", "ABDOMEN", "PELVIS", "SPINE", "EXTREMITY"),
    "indication": ("stroke", "pe", "bleed", "trauma"),
    "location_class": ("ED", "ICU", "WARD", "OUTPATIENT"),
    "news2_band": ("low", "low-medium", "medium", "high"),
    # ICD-10-CM chapter of the indication codes (their first letter): symptoms (R), injuries (S/T), digestive (K),
    # circulatory (I), respiratory (J), infections (A), encounters (Z) ... carry their own yields
    "icd10_chapter": tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ"),
}
FEATURES = (*(f"{k}_{v}" for k, values in VOCABULARY.items() for v in values), "open_alert")
PRIORITY_SCORE = {"STAT": 3.0, "ASAP": 2.0, "ROUTINE": 1.0}  # priority alone as a ranking score (no order: 0)
MODEL_PARAMS = {"C": 1.0, "max_iter": 1000}
MIN_HELD_OUT_CRITICAL = 10  # fewer critical studies among the held-out ones: an AUROC too noisy to crown a champion


def features(items: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per item (priority, modality, body_part, indication_categories, indication_codes, location_class,
    news2_band, open_alert_levels) -> the model's input columns, in FEATURES order."""
    rows = np.zeros((len(items), len(FEATURES)))
    at = {name: i for i, name in enumerate(FEATURES)}
    for n, item in enumerate(items):
        values = {k: item.get(k) for k in VOCABULARY if k not in ("indication", "icd10_chapter")}
        for key, value in values.items():
            column = at.get(f"{key}_{value}")
            if column is not None:
                rows[n, column] = 1.0
        for category in item.get("indication_categories") or ():
            if f"indication_{category}" in at:
                rows[n, at[f"indication_{category}"]] = 1.0
        for code in item.get("indication_codes") or ():
            chapter = f"icd10_chapter_{code.rsplit('|', 1)[-1].strip()[:1].upper()}"
            if chapter in at:
                rows[n, at[chapter]] = 1.0
        rows[n, at["open_alert"]] = 1.0 if item.get("open_alert_levels") else 0.0
    return pd.DataFrame(rows, columns=list(FEATURES))


def labels_from_truth(csv_path: str | Path) -> dict[str, int]:
    """accession_number -> critical_finding (1/0) from the simulator's truth/imaging.csv."""
    path = Path(csv_path)
    if not path.is_file():
        raise UsageError(f"{path} not found: pass the simulator's DIR/truth/imaging.csv")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"accession_number", LABEL} - set(reader.fieldnames or ())
        if missing:
            raise UsageError(f"{path} lacks column(s) {sorted(missing)}: it must be a truth/imaging.csv written by a "
                             "simulator that records ground-truth findings")
        out = {}
        for row in reader:
            value = (row[LABEL] or "").strip()
            if value not in ("0", "1"):
                raise UsageError(f"{path}: critical_finding must be 1 or 0, got {value!r} for accession "
                                 f"{row['accession_number']!r}")
            out[row["accession_number"]] = int(value)
    return out


def split_patients(patient_keys: Sequence[str], test_fraction: float, seed: int) -> np.ndarray:
    """True for the rows of held-out patients (a seeded choice of patients, never of rows)."""
    keys = np.asarray(patient_keys, dtype=object)
    unique = np.array(sorted(set(keys)), dtype=object)
    rng = np.random.default_rng(seed)
    held = set(rng.choice(unique, size=max(1, round(len(unique) * test_fraction)), replace=False))
    return np.array([k in held for k in keys])


def priority_score(items: Sequence[Mapping[str, Any]]) -> np.ndarray:
    return np.array([PRIORITY_SCORE.get(item.get("priority") or "", 0.0) for item in items])


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    version: str | None
    champion: bool
    metrics: dict[str, float]


def _auroc(y: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, score)) if len(set(y.tolist())) == 2 else float("nan")


def train(items: Sequence[Mapping[str, Any]], labels: Sequence[int], *, tracking_uri: str, seed: int,
          test_fraction: float, params: Mapping[str, Any] | None = None) -> TrainResult:
    """Fit on the training patients, compare with priority alone on the held-out ones, log, maybe register."""
    y = np.asarray(labels, dtype=int)
    test = split_patients([i.get("patient_key") or "" for i in items], test_fraction, seed)
    if len(set(y[~test].tolist())) < 2 or len(set(y[test].tolist())) < 2:
        raise UsageError(f"the patient split left a set without both outcomes ({int(y.sum())} critical of {len(y)} "
                         "studies): simulate more patients or change models.test_fraction")
    x = features(items)
    model = _estimator(seed).fit(x[~test], y[~test])
    probability = model.predict_proba(x[test])[:, 1]
    held = [i for i, t in zip(items, test, strict=True) if t]
    metrics = {"model_auroc": _auroc(y[test], probability),
               "priority_auroc": _auroc(y[test], priority_score(held)),
               "train_studies": float((~test).sum()), "test_studies": float(test.sum()),
               "train_critical": float(y[~test].sum()), "test_critical": float(y[test].sum())}
    champion = metrics["model_auroc"] > metrics["priority_auroc"] and metrics["test_critical"] >= MIN_HELD_OUT_CRITICAL
    run_id, version = _log(tracking_uri, model, x[~test], metrics, champion,
                           {**MODEL_PARAMS, "seed": seed, "test_fraction": test_fraction, **(params or {})})
    return TrainResult(run_id, version, champion, metrics)


def _estimator(seed: int):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(**MODEL_PARAMS, random_state=seed)


def fit(items: Sequence[Mapping[str, Any]], labels: Sequence[int], *, seed: int) -> Champion:
    """The model fitted on all these studies, neither judged nor logged: for evaluations that hold out whole days
    (`carelake imaging replay --model cross-day`); version "unregistered"."""
    return Champion("unregistered", _estimator(seed).fit(features(items), np.asarray(labels, dtype=int)))


def _log(uri: str, model, sample: pd.DataFrame, metrics: dict[str, float], champion: bool,
         params: Mapping[str, Any]) -> tuple[str, str | None]:
    import mlflow
    import mlflow.sklearn
    import sklearn
    from mlflow.models import infer_signature

    from models.deterioration import _client, _experiment_id, _mlflow_at

    client = _client(uri)
    with _mlflow_at(uri):
        with mlflow.start_run(experiment_id=_experiment_id(client, uri, EXPERIMENT)) as run:
            mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
            mlflow.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)})
            mlflow.log_dict({"features": list(FEATURES), "coefficients": model.coef_[0].round(4).tolist()},
                            "model_inputs.json")
            head = sample.head(200)
            info = mlflow.sklearn.log_model(model, name="model",
                                            signature=infer_signature(head, model.predict_proba(head)[:, 1]),
                                            pip_requirements=[f"scikit-learn=={sklearn.__version__}"])
            mlflow.set_tags({"carelake.champion": str(champion).lower()})
        if not champion:
            return run.info.run_id, None
        version = _register(client, info, run.info.run_id, metrics)
    return run.info.run_id, version


def _register(client, info, run_id: str, metrics: Mapping[str, float]) -> str:
    from models.deterioration import register_champion

    tags = {f"carelake.{k}": f"{metrics[k]:.4f}" for k in ("model_auroc", "priority_auroc")}
    return register_champion(client, MODEL_NAME, "Critical finding in an imaging study, from what is known on "
                             "arrival; champion = beats order priority alone (held-out AUROC)", info, run_id, tags)


@dataclass(frozen=True)
class Champion:
    version: str
    model: Any

    def predict(self, items: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Probability of a critical finding per item."""
        if not items:
            return np.zeros(0)
        return self.model.predict_proba(features(items))[:, 1]


def load_champion(tracking_uri: str) -> Champion | None:
    """The model under alias `champion`, or None when none is registered. Cached by (uri, version)."""
    from models.deterioration import cached_champion

    return cached_champion(tracking_uri, MODEL_NAME, _load_version)


def _load_version(uri: str, mv) -> Champion:
    import mlflow.sklearn

    from models.deterioration import _mlflow_at

    with _mlflow_at(uri):
        return Champion(str(mv.version), mlflow.sklearn.load_model(mv.source))
