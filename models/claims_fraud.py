"""Claims fraud models: a supervised gradient-boosted model on labelled claims and an unsupervised detector for payers
without labels, both over gold.claims_fraud_scores.features (the rules' values and the claim's descriptors).

Evaluation holds out whole PROVIDERS (the claim's main rendering provider; a group split), so a model cannot learn a
provider's identity instead of its behaviour: AUROC, AUPRC and precision at the top 1 % and 5 % of claims reviewed,
for the model, the unsupervised detector and the rules alone (their score). The supervised model becomes the
registered champion (`carelake-claims-fraud`, alias `champion`) only if it beats the rules' AUPRC with the paired
difference's 95 % interval above zero (a bootstrap over held-out PROVIDERS, since a provider's claims are not
independent) on at least MIN_HELD_OUT_FRAUD held-out fraudulent claims: on a handful of positives one ranking beats
another by chance, and a champion silently changes every score row after it. The scoring job then records the
champion's probability and version on each row. The unsupervised detector (IsolationForest; higher = more
unusual) is registered as `carelake-claims-anomaly` on every training: it needs no labels, so a payer without any
can still rank claims by it. MLflow plumbing is shared with models.deterioration.
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

from models import deterioration as shared
from models.evaluation import auprc_interval
from pipelines.errors import UsageError

MODEL_NAME = "carelake-claims-fraud"
ANOMALY_NAME = "carelake-claims-anomaly"
EXPERIMENT = "carelake-claims-fraud"
LABEL, GROUP = "label", "provider"
PATTERNS = ("duplicate_billing", "upcoding", "unbundling", "phantom_services", "impossible_volume")
TOP = (0.01, 0.05)  # precision at the top 1 % and 5 % of claims, the share a payment-integrity team reviews
MODEL_PARAMS = {"max_iter": 200, "learning_rate": 0.05, "max_leaf_nodes": 15, "min_samples_leaf": 10,
                "l2_regularization": 1.0}
ANOMALY_PARAMS = {"n_estimators": 200, "contamination": "auto"}
WHO = ("model", "anomaly", "rules")
MIN_HELD_OUT_FRAUD = 20  # held-out fraudulent claims below which an AUPRC difference is not judged (noise)
BOOTSTRAPS = 500


def labels_from_truth(path: str | Path) -> dict[str, set[str]]:
    """claim_id -> the fraud patterns labelled on its lines, from the simulator's truth/fraud_labels.csv."""
    file = Path(path)
    try:
        with open(file, newline="") as fh:
            reader = csv.DictReader(fh)
            missing = {"claim_id", "pattern"} - set(reader.fieldnames or ())
            if missing:
                raise UsageError(f"{file} lacks column(s) {sorted(missing)}: pass the simulator's "
                                 "truth/fraud_labels.csv (claim_id,line,pattern,detail)")
            out: dict[str, set[str]] = {}
            for row in reader:
                out.setdefault(row["claim_id"], set()).add(row["pattern"])
            return out
    except OSError as exc:
        raise UsageError(f"fraud labels {file} cannot be read ({exc.strerror}): pass the simulator's "
                         "DIR/truth/fraud_labels.csv") from None


def training_frame(scores: pd.DataFrame, labels: Mapping[str, set[str]], feature_names: Sequence[str]) -> pd.DataFrame:
    """Score rows (claim_id, provider, score, features) with the label: 1 when any line of the claim is labelled."""
    flat = pd.DataFrame(list(scores["features"]), columns=list(feature_names), index=scores.index)
    frame = pd.concat([scores[["claim_id", GROUP, "score"]], flat.astype("float64")], axis=1)
    frame[LABEL] = frame["claim_id"].map(lambda c: int(c in labels)).astype("int64")
    frame["patterns"] = frame["claim_id"].map(lambda c: ",".join(sorted(labels.get(c, ()))))
    return frame


def split_providers(frame: pd.DataFrame, test_fraction: float, seed: int) -> np.ndarray:
    """True for the rows of held-out providers: a seeded shuffle of providers, about test_fraction of the claims."""
    sizes = frame.groupby(GROUP).size()
    order = np.random.default_rng(seed).permutation(sizes.index.to_numpy())
    held, total = [], 0
    for provider in order:
        if total >= test_fraction * len(frame):
            break
        held.append(provider)
        total += sizes[provider]
    return frame[GROUP].isin(held).to_numpy()


def precision_at(y: np.ndarray, score: np.ndarray, fraction: float) -> float:
    """Precision among the top `fraction` of claims by score (at least one claim; ties broken by order)."""
    k = max(1, math.ceil(fraction * len(y)))
    top = np.argsort(-score, kind="stable")[:k]
    return float(y[top].mean())


def evaluate(y: np.ndarray, score: np.ndarray, who: str) -> dict[str, float]:
    """AUROC, AUPRC and precision at the top 1 % / 5 % of claims."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    out = {f"{who}_auroc": float(roc_auc_score(y, score)), f"{who}_auprc": float(average_precision_score(y, score))}
    out.update({f"{who}_precision_top_{round(f * 100)}pct": precision_at(y, score, f) for f in TOP})
    return out


def _check_trainable(frame: pd.DataFrame) -> None:
    positives, providers = int(frame[LABEL].sum()), frame[GROUP].nunique()
    if positives < 4 or providers < 3:
        raise UsageError(f"{positives} labelled fraudulent claim(s) over {providers} provider(s) in "
                         "gold.claims_fraud_scores; training needs at least 4 and 3: check that the labels come from "
                         "the simulation loaded into this lakehouse, or simulate more patients or higher "
                         "simulator.fraud rates")


@dataclass(frozen=True)
class FraudTrainResult:
    """What a training produced: the run, the registered versions and the figures on held-out providers."""

    run_id: str
    version: str | None  # of carelake-claims-fraud; None when it did not beat the rules
    anomaly_version: str
    champion: bool
    metrics: dict[str, float]
    counts: dict[str, int]
    feature_names: tuple[str, ...]
    decision: str  # why it is or is not champion, with the figures


def _fit(train_rows: pd.DataFrame, feature_names: Sequence[str], seed: int):
    from sklearn.ensemble import HistGradientBoostingClassifier, IsolationForest

    x = train_rows[list(feature_names)]
    with shared._threads(len(train_rows)):
        model = HistGradientBoostingClassifier(**MODEL_PARAMS, random_state=seed).fit(x, train_rows[LABEL])
        anomaly = IsolationForest(**ANOMALY_PARAMS, random_state=seed).fit(x)
    return model, anomaly


def _scores(model, anomaly, rows: pd.DataFrame, feature_names: Sequence[str]) -> dict[str, np.ndarray]:
    x = rows[list(feature_names)]
    with shared._threads(len(rows)):
        return {"model": model.predict_proba(x)[:, 1], "anomaly": -anomaly.score_samples(x),
                "rules": rows["score"].to_numpy(dtype="float64")}


def train(frame: pd.DataFrame, *, tracking_uri: str, seed: int, test_fraction: float, feature_names: Sequence[str],
          params: Mapping[str, Any] | None = None) -> FraudTrainResult:
    """Fit both models on a provider split of `frame` (training_frame), compare with the rules, log and register."""
    _check_trainable(frame)
    frame = frame.sort_values("claim_id", kind="stable").reset_index(drop=True)
    held = split_providers(frame, test_fraction, seed)
    train_rows, test_rows = frame[~held].reset_index(drop=True), frame[held].reset_index(drop=True)
    if train_rows[LABEL].nunique() < 2 or test_rows[LABEL].nunique() < 2:
        raise UsageError("the provider split left a set without both fraudulent and clean claims; simulate more "
                         "patients or change models.test_fraction")
    model, anomaly = _fit(train_rows, feature_names, seed)
    y = test_rows[LABEL].to_numpy()
    metrics: dict[str, float] = {}
    scored = _scores(model, anomaly, test_rows, feature_names)
    for who, score in scored.items():
        metrics.update(evaluate(y, score, who))
    counts = {"train_claims": len(train_rows), "test_claims": len(test_rows),
              "train_providers": train_rows[GROUP].nunique(), "test_providers": test_rows[GROUP].nunique(),
              "train_fraud_claims": int(train_rows[LABEL].sum()), "test_fraud_claims": int(y.sum())}
    metrics["model_minus_rules_auprc_ci_low"], metrics["model_minus_rules_auprc_ci_high"] = auprc_interval(
        y, scored["model"], minus=scored["rules"], groups=test_rows[GROUP].to_numpy(), seed=seed,
        resamples=BOOTSTRAPS)
    champion, decision = champion_decision(metrics, counts)
    run_id, version, anomaly_version = _log(tracking_uri, (model, anomaly), train_rows, feature_names, metrics,
                                            counts, champion, {**MODEL_PARAMS, "seed": seed, "bootstraps": BOOTSTRAPS,
                                                               "min_held_out_fraud": MIN_HELD_OUT_FRAUD,
                                                               "test_fraction": test_fraction, **(params or {})},
                                            decision)
    return FraudTrainResult(run_id, version, anomaly_version, champion, metrics, counts, tuple(feature_names),
                            decision)


def champion_decision(metrics: Mapping[str, float], counts: Mapping[str, int]) -> tuple[bool, str]:
    """Champion only on at least MIN_HELD_OUT_FRAUD held-out fraudulent claims AND with the model's AUPRC minus the
    rules' 95 % interval (provider bootstrap) above zero; otherwise the rules stay the ranking."""
    low, high = metrics["model_minus_rules_auprc_ci_low"], metrics["model_minus_rules_auprc_ci_high"]
    diff = metrics["model_auprc"] - metrics["rules_auprc"]
    interval = f"AUPRC difference {diff:+.3f} (95% CI {low:+.3f} to {high:+.3f})"
    held = counts["test_fraud_claims"]
    if held < MIN_HELD_OUT_FRAUD:
        return False, (f"not champion: {held} held-out fraudulent claim(s), fewer than the {MIN_HELD_OUT_FRAUD} "
                       f"needed to judge an AUPRC difference ({interval}); the rules stay the ranking: simulate more "
                       "claims or train on more labelled history")
    if not low > 0:
        return False, f"not champion: {interval} does not lie above zero; the rules stay the ranking"
    return True, f"champion: {interval} lies above zero on {held} held-out fraudulent claims"


def precision_figure(metrics: Mapping[str, float]):
    """Precision at the top 1 % / 5 % of claims: model, anomaly detector and rules (a bare Figure)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    width = 0.25
    for i, who in enumerate(WHO):
        values = [metrics[f"{who}_precision_top_{round(f * 100)}pct"] for f in TOP]
        ax.bar([k + (i - 1) * width for k in range(len(TOP))], values, width, label=who)
    ax.set_xticks(range(len(TOP)), [f"top {round(f * 100)} %" for f in TOP])
    ax.set(ylim=(0, 1), ylabel="precision (held-out providers)", title="Claims reviewed: precision")
    ax.legend(loc="lower right")
    return fig


def _log(uri: str, models: tuple, train_rows: pd.DataFrame, feature_names: Sequence[str], metrics: dict[str, float],
         counts: dict[str, int], champion: bool, params: Mapping[str, Any],
         decision: str) -> tuple[str, str | None, str]:
    """One MLflow run with both models; the supervised one registered as champion only when it beats the rules."""
    import mlflow
    import mlflow.sklearn
    import sklearn
    from mlflow.models import infer_signature

    model, anomaly = models
    client = shared._client(uri)
    requirements = [f"scikit-learn=={sklearn.__version__}"]
    with shared._mlflow_at(uri):
        with mlflow.start_run(experiment_id=shared._experiment_id(client, uri, EXPERIMENT)) as run:
            mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
            mlflow.log_metrics({k: float(v) for k, v in {**metrics, **counts}.items() if math.isfinite(v)})
            mlflow.log_figure(precision_figure(metrics), "precision_at_top.png")
            mlflow.log_dict({"feature_names": list(feature_names)}, "model_inputs.json")
            sample = train_rows[list(feature_names)].head(200)
            info = mlflow.sklearn.log_model(model, name="model", pip_requirements=requirements,
                                            signature=infer_signature(sample, model.predict_proba(sample)[:, 1]))
            anomaly_info = mlflow.sklearn.log_model(anomaly, name="anomaly", pip_requirements=requirements,
                                                    signature=infer_signature(sample, anomaly.score_samples(sample)))
            mlflow.set_tags({"carelake.champion": str(champion).lower(), "carelake.decision": decision})
        tags = {f"carelake.{k}": f"{metrics[k]:.4f}" for k in ("model_auprc", "rules_auprc", "anomaly_auprc")}
        anomaly_version = shared.register_champion(
            client, ANOMALY_NAME, "Unusual claims without labels (IsolationForest over the fraud features; higher "
            "-score_samples = more unusual)", anomaly_info, run.info.run_id, tags)
        version = shared.register_champion(
            client, MODEL_NAME, "Fraudulent claim probability over the fraud features; champion = beats the rules' "
            f"AUPRC on held-out providers, the difference's 95% interval above zero, on at least {MIN_HELD_OUT_FRAUD} "
            "held-out fraudulent claims", info, run.info.run_id, tags) if champion else None
        client.set_tag(run.info.run_id, "carelake.registered_version", version or "")
    return run.info.run_id, version, anomaly_version


def load_champion(tracking_uri: str) -> shared.Champion | None:
    """The registered fraud model under alias `champion` (cached while it is unchanged), or None."""
    return shared.cached_champion(tracking_uri, MODEL_NAME, shared._load_version)


# -- evaluation against the labels ------------------------------------------------------------------------------------
RULE_OF = {"duplicate_billing": "duplicate", "upcoding": "upcoding", "unbundling": "unbundling",
           "phantom_services": "phantom_service", "impossible_volume": "impossible_volume"}
MODEL_FLAG = 0.5


def _codes(reasons) -> set[str]:
    return {r["code"] for r in (reasons if reasons is not None else ())}


def pattern_recall(rows: pd.DataFrame, labels: Mapping[str, set[str]]) -> dict:
    """Per labelled pattern: claims, found by the pattern's rule, flagged by any rule (and by the model at
    MODEL_FLAG); on clean claims: flagged and the false-positive rate. Rows are gold.claims_fraud_scores'."""
    codes = dict(zip(rows["claim_id"], rows["reasons"].map(_codes), strict=True))
    probability = dict(zip(rows["claim_id"], rows["model_probability"], strict=True))
    has_model = rows["model_probability"].notna().any()

    def model_count(ids: list[str]) -> int | None:
        return sum(bool(probability.get(c) is not None and probability[c] >= MODEL_FLAG) for c in ids) \
            if has_model else None

    patterns = {}
    for pattern in PATTERNS:
        ids = [c for c, found_in in labels.items() if pattern in found_in]  # a labelled claim not scored is missed
        found = sum(RULE_OF[pattern] in codes.get(c, ()) for c in ids)
        patterns[pattern] = {"labelled": len(ids), "found": found, "recall": found / len(ids) if ids else None,
                             "flagged": sum(bool(codes.get(c)) for c in ids), "model_found": model_count(ids)}
    clean = [c for c in codes if c not in labels]
    flagged, model_flagged = sum(bool(codes[c]) for c in clean), model_count(clean)
    versions = sorted({v for v in rows["model_version"].dropna()})
    return {"patterns": patterns, "model_version": ",".join(versions) or None,
            "unscored_labelled_claims": sorted(set(labels) - set(codes)),
            "clean": {"claims": len(clean), "flagged": flagged,
                      "false_positive_rate": flagged / len(clean) if clean else 0.0, "model_flagged": model_flagged,
                      "model_false_positive_rate": None if model_flagged is None or not clean
                      else model_flagged / len(clean)}}
