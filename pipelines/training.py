"""`carelake train deterioration`: gold features + scores + the simulator's labels -> an MLflow run and model.

Reads gold.vitals_features and gold.early_warning_scores through the table store (Arrow, no Spark), trains
with models.deterioration, and prints a summary. The demo calls the same function.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

from pipelines.config import Config
from pipelines.errors import UsageError
from pipelines.output import print_table
from pipelines.store import TableStore

log = logging.getLogger("carelake.train")
FEATURES, SCORES = "gold.vitals_features", "gold.early_warning_scores"


def train_deterioration(cfg: Config, store: TableStore, labels_path: str | Path, *, tracking_uri: str | None = None):
    """Train and (if it beats NEWS2) register the deterioration model; returns (TrainResult, tracking URI)."""
    from gold.features import feature_columns
    from models.deterioration import default_tracking_uri, labels_from_truth, train, training_frame
    from pipelines.secrets import key_secret
    from silver.identity import PATIENT, identity_key

    missing = [t for t in (FEATURES, SCORES) if not store.exists(t)]
    if missing:
        raise UsageError(f"{' and '.join(missing)} not found under {cfg.root}: run `carelake run "
                         "gold.early_warning_scores` first (it writes both)")
    labels = labels_from_truth(labels_path, partial(identity_key, key_secret(cfg), PATIENT, cfg.silver.mrn_system),
                              cfg.models.label_event)
    names = feature_columns(cfg.gold.feature_windows_ms)
    features = _read_columns(store, FEATURES, ["patient_key", "scored_at", *names])
    if features.empty:
        raise UsageError(f"{FEATURES} has no rows: load observations and run `carelake run "
                         "gold.early_warning_scores` first")
    scores = _read_columns(store, SCORES, ["patient_key", "scored_at", "news2_score"])
    frame = training_frame(features, scores, labels, cfg.models.horizon_ms)
    uri = tracking_uri or default_tracking_uri(cfg)
    log.info("training on %s points from %s and %s; tracking at %s", f"{len(frame):,}", FEATURES, SCORES, uri)
    provenance = {f"{t}.version": store.version(t) for t in (FEATURES, SCORES)}
    result = train(frame, tracking_uri=uri, seed=cfg.models.seed, test_fraction=cfg.models.test_fraction,
                   alert_rate_per_100_patient_days=cfg.models.alert_rate_per_100_patient_days,
                   feature_names=names, params={**provenance, "horizon": cfg.models.horizon,
                                                "feature_windows": ",".join(cfg.gold.feature_windows),
                                                "labels": str(labels_path)})
    return result, uri


def _read_columns(store: TableStore, table: str, columns: list[str]):
    """A gold table's columns (those it has) as pandas."""
    data = store.read_arrow(table)
    return data.select([c for c in columns if c in data.column_names]).to_pandas()


def print_training(result, requested_rate: float, uri: str) -> None:
    c, m = result.counts, result.metrics
    print(f"points: {c['train_rows']:,} train / {c['test_rows']:,} test; patients: {c['train_patients']:,} / "
          f"{c['test_patients']:,} (deteriorating {c['train_deteriorating_patients']} / "
          f"{c['test_deteriorating_patients']}); positive points: {c['train_positive_rows']:,} / "
          f"{c['test_positive_rows']:,}")
    rows = [(label, *(f"{m[f'{who}_{key}']:.{digits}f}" for who in ("model", "news2")))
            for label, key, digits in (("AUROC", "auroc", 3), ("AUPRC", "auprc", 3),
                                       ("median lead time before the event (h)", "median_lead_time_h", 1),
                                       ("deteriorating patients alerted in time", "detected_fraction", 2),
                                       ("alert episodes per 100 patient-days", "alerts_per_100_patient_days", 1))]
    print_table(["held-out patients", "model", "NEWS2 >= 5"], rows)
    basis = "models.alert_rate_per_100_patient_days" if requested_rate else "NEWS2 >= 5 on the training patients"
    print(f"threshold: risk >= {result.threshold:.4f}, for {m['target_alerts_per_100_patient_days']:.1f} alert "
          f"episodes per 100 patient-days (as {basis})")
    if result.champion:
        print(f"registered carelake-deterioration version {result.version} as champion (beats NEWS2 AUROC); "
              f"run {result.run_id} at {uri}")
    else:
        print(f"not registered: the model's AUROC does not beat NEWS2's, the champion is unchanged; "
              f"run {result.run_id} at {uri}")


# -- claims fraud ---------------------------------------------------------------------------------------------------
CLAIM_SCORES = "gold.claims_fraud_scores"


def _fraud_rows(cfg: Config, store: TableStore):
    """gold.claims_fraud_scores as pandas (the columns training and evaluation read)."""
    if not store.exists(CLAIM_SCORES):
        raise UsageError(f"{CLAIM_SCORES} not found under {cfg.root}: ingest claims and run `carelake run "
                         f"{CLAIM_SCORES} --available-now` first")
    rows = _read_columns(store, CLAIM_SCORES, ["claim_id", "provider_npi", "score", "band", "reasons", "features",
                                               "model_probability", "model_version"])
    if rows.empty:
        raise UsageError(f"{CLAIM_SCORES} has no rows: ingest claims and run `carelake run {CLAIM_SCORES} "
                         "--available-now` first")
    return rows.rename(columns={"provider_npi": "provider"})


def train_fraud(cfg: Config, store: TableStore, labels_path: str | Path, *, tracking_uri: str | None = None):
    """Train the claims fraud model and anomaly detector on gold.claims_fraud_scores and the labels; returns
    (FraudTrainResult, tracking URI)."""
    from gold.claims_fraud import FEATURES
    from models.claims_fraud import labels_from_truth, train, training_frame
    from models.deterioration import default_tracking_uri

    frame = training_frame(_fraud_rows(cfg, store), labels_from_truth(labels_path), FEATURES)
    uri = tracking_uri or default_tracking_uri(cfg)
    log.info("training on %s claims of %s providers from %s; tracking at %s", f"{len(frame):,}",
             frame["provider"].nunique(), CLAIM_SCORES, uri)
    result = train(frame, tracking_uri=uri, seed=cfg.models.seed, test_fraction=cfg.models.test_fraction,
                   feature_names=FEATURES, params={f"{CLAIM_SCORES}.version": store.version(CLAIM_SCORES),
                                                   "labels": str(labels_path)})
    return result, uri


def print_fraud_training(result, uri: str) -> None:
    c, m = result.counts, result.metrics
    print(f"claims: {c['train_claims']:,} train / {c['test_claims']:,} held out; providers: {c['train_providers']} / "
          f"{c['test_providers']}; fraudulent claims: {c['train_fraud_claims']:,} / {c['test_fraud_claims']:,}")
    rows = [(label, *(f"{m[f'{who}_{key}']:.3f}" for who in ("model", "anomaly", "rules")))
            for label, key in (("AUROC", "auroc"), ("AUPRC", "auprc"), ("precision, top 1 % of claims",
                                                                         "precision_top_1pct"),
                               ("precision, top 5 % of claims", "precision_top_5pct"))]
    print_table(["held-out providers", "model", "anomaly (no labels)", "rules"], rows)
    print(f"registered carelake-claims-anomaly version {result.anomaly_version} (unsupervised)")
    if result.champion:
        print(f"registered carelake-claims-fraud version {result.version} as champion (beats the rules' AUPRC); "
              f"run {result.run_id} at {uri}")
    else:
        print(f"carelake-claims-fraud not registered: its AUPRC does not beat the rules', the champion is unchanged; "
              f"run {result.run_id} at {uri}")


def evaluate_fraud(cfg: Config, store: TableStore, labels_path: str | Path) -> dict:
    """Recall per labelled pattern and the false-positive rate on clean claims, gold vs the labels."""
    from models.claims_fraud import labels_from_truth, pattern_recall

    return pattern_recall(_fraud_rows(cfg, store), labels_from_truth(labels_path))


def print_fraud_evaluation(report: dict) -> None:
    rows = [(p, f"{r['labelled']:,}", f"{r['found']:,}", "-" if r["recall"] is None else f"{r['recall']:.2f}",
             f"{r['flagged']:,}",
             "" if r["model_found"] is None else f"{r['model_found']:,}") for p, r in report["patterns"].items()]
    clean = report["clean"]
    rows.append(("clean claims", f"{clean['claims']:,}", "", "", f"{clean['flagged']:,}",
                 "" if clean["model_flagged"] is None else f"{clean['model_flagged']:,}"))
    print_table(["pattern", "claims", "found by its rule", "recall", "flagged (any rule)", "model >= 0.5"], rows)
    print(f"false-positive rate on clean claims: {clean['false_positive_rate']:.3f} (rules)"
          + ("" if clean["model_false_positive_rate"] is None else
             f", {clean['model_false_positive_rate']:.3f} (model version {report['model_version']})"))
