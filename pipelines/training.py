"""`carelake train deterioration`: gold features + scores + the simulator's labels -> an MLflow run and model.

Reads gold.vitals_features and gold.early_warning_scores through the table store (Arrow, no Spark), trains
with models.deterioration, and prints a summary. The demo calls the same function.
"""

from __future__ import annotations

import logging
from datetime import timedelta
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


def train_critical_finding(cfg: Config, spark, store: TableStore, labels_path: str | Path, *,
                           tracking_uri: str | None = None, match=None):
    """Train (and, if it beats order priority, register) the critical-finding model on every study in the lakehouse
    with a label; returns (TrainResult, tracking URI). `match`: silver.imaging_match's rule unless given."""
    from gold import imaging_rank
    from gold import imaging_worklist as w
    from models.critical_finding import labels_from_truth, train
    from models.deterioration import default_tracking_uri

    if not store.exists(w.STUDIES):
        raise UsageError(f"{w.STUDIES} not found under {cfg.root}: ingest DICOM and run `carelake run {w.STUDIES}`")
    labels = labels_from_truth(labels_path)
    from pipelines.jobs import _match_orders_to_studies

    studies, _, reports, matched = w.load_inputs(store.read, store.exists, spark, match or _match_orders_to_studies,
                                                 timedelta(seconds=cfg.imaging.seconds("match_window")))
    items = w.study_items(studies, matched, w.final_reads(reports, studies, matched))
    scores = store.read(w.SCORES) if store.exists(w.SCORES) else None
    alerts = store.read(w.ALERTS) if store.exists(w.ALERTS) else None
    rows = w.arrival_context(items, scores, alerts, cfg.imaging.seconds("news2_current_for")).toArrow().to_pylist()
    rows = [r for r in rows if r.get("accession_number") in labels]
    if not rows:
        raise UsageError(f"no study in {w.STUDIES} has an accession number in {labels_path}: train on the lakehouse "
                         "the same simulation was loaded into")
    imaging_rank.prepare(rows, imaging_rank.Ranking.of(cfg.imaging), None)
    uri = tracking_uri or default_tracking_uri(cfg)
    log.info("training the critical-finding model on %s studies; tracking at %s", f"{len(rows):,}", uri)
    result = train(rows, [labels[r["accession_number"]] for r in rows], tracking_uri=uri, seed=cfg.models.seed,
                   test_fraction=cfg.models.test_fraction,
                   params={f"{t}.version": store.version(t) for t in (w.STUDIES, w.ORDERS) if store.exists(t)})
    return result, uri


def print_critical_finding(result, uri: str) -> None:
    m = result.metrics
    print(f"studies: {int(m['train_studies']):,} train / {int(m['test_studies']):,} held-out (critical "
          f"{int(m['train_critical'])} / {int(m['test_critical'])}); held-out AUROC: model {m['model_auroc']:.3f}, "
          f"order priority alone {m['priority_auroc']:.3f}")
    if result.champion:
        print(f"registered carelake-critical-finding version {result.version} as champion (beats order priority); "
              f"run {result.run_id} at {uri}")
    else:
        print(f"not registered: the model does not beat order priority, the champion is unchanged; "
              f"run {result.run_id} at {uri}")
