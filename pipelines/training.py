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
    """Train and (when champion_decision says so) register the deterioration model; returns (TrainResult, URI)."""
    from models.deterioration import default_tracking_uri, train

    frame, names = deterioration_frame(cfg, store, labels_path)
    uri = tracking_uri or default_tracking_uri(cfg)
    log.info("training on %s points from %s and %s; tracking at %s", f"{len(frame):,}", FEATURES, SCORES, uri)
    provenance = {f"{t}.version": store.version(t) for t in (FEATURES, SCORES)}
    result = train(frame, tracking_uri=uri, seed=cfg.models.seed, test_fraction=cfg.models.test_fraction,
                   alert_rate_per_100_patient_days=cfg.models.alert_rate_per_100_patient_days,
                   feature_names=names, params={**provenance, "horizon": cfg.models.horizon,
                                                "feature_windows": ",".join(cfg.gold.feature_windows),
                                                "labels": str(labels_path)})
    return result, uri


def deterioration_frame(cfg: Config, store: TableStore, labels_path: str | Path):
    """The labelled frame train_deterioration trains on (gold features + NEWS2 + labels) and the feature names."""
    from gold.features import feature_columns
    from models.deterioration import labels_from_truth, training_frame
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
    return training_frame(features, scores, labels, cfg.models.horizon_ms), names


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
                                       ("PPV of an alerting point", "ppv", 3),
                                       ("alert episodes per 100 patient-days", "alerts_per_100_patient_days", 1))]
    print_table(["held-out patients", "model", "NEWS2 >= 5"], rows)
    basis = "models.alert_rate_per_100_patient_days" if requested_rate else "NEWS2 >= 5 on the training patients"
    print(f"threshold: risk >= {result.threshold:.4f}, for {m['target_alerts_per_100_patient_days']:.1f} alert "
          f"episodes per 100 patient-days (as {basis})")
    print(f"AUROC 95% CI (patient bootstrap): model {m['model_auroc_ci_low']:.3f}-{m['model_auroc_ci_high']:.3f}, "
          f"NEWS2 {m['news2_auroc_ci_low']:.3f}-{m['news2_auroc_ci_high']:.3f}")
    where = f"run {result.run_id} at {uri} (model card: model_card.md)"
    if result.champion:
        print(f"{result.decision}: registered carelake-deterioration version {result.version}; {where}")
    else:
        print(f"{result.decision}; the registered champion is unchanged; {where}")


# -- in-hospital mortality (PhysioNet/CinC Challenge 2012) -------------------------------------------
OUTCOMES, ENCOUNTERS, PATIENTS, OBSERVATIONS = ("silver.outcomes", "silver.encounters", "silver.patients",
                                                "silver.observations")


def train_mortality(cfg: Config, store: TableStore, *, tracking_uri: str | None = None, folds: int = 5):
    """Cross-validated mortality model on the imported ICU stays (models.mortality); returns (result, uri)."""
    from models.deterioration import default_tracking_uri
    from models.mortality import train

    frame = mortality_frame(cfg, store)
    uri = tracking_uri or default_tracking_uri(cfg)
    log.info("cross-validating on %s ICU stays (%s deaths); tracking at %s", f"{len(frame):,}",
             f"{int(frame['in_hospital_death'].sum()):,}", uri)
    provenance = {f"{t}.version": store.version(t) for t in (OUTCOMES, OBSERVATIONS, SCORES)}
    return train(frame, tracking_uri=uri, seed=cfg.models.seed, folds=folds, params=provenance), uri


def mortality_frame(cfg: Config, store: TableStore):
    """One row per imported ICU stay with an outcome: the features and labels train_mortality uses."""
    from models.mortality import stay_frame

    missing = [t for t in (OUTCOMES, ENCOUNTERS, PATIENTS, OBSERVATIONS, SCORES) if not store.exists(t)]
    if missing:
        raise UsageError(f"{', '.join(missing)} not found under {cfg.root}: import the records with "
                         "`carelake import physionet2012 DIR --outcomes FILE`, then `carelake run all --available-now`")
    return stay_frame(
        _stays(store),
        store.read_arrow(OBSERVATIONS, columns=["patient_key", "code", "value", "value_text", "effective_at",
                                                "status"]).to_pandas(),
        store.read_arrow(SCORES, columns=["patient_key", "scored_at", "news2_score", "qsofa_score"]).to_pandas(),
        store.read_arrow(OUTCOMES, columns=["patient_key", "in_hospital_death", "saps_i", "sofa"]).to_pandas())


def _stays(store: TableStore):
    """One row per patient (their MRN identity): the first admission, its ICU unit, birth date and sex.

    A FHIR Encounter names its subject by the Patient resource; silver.patients links that identity to the MRN
    one through merged_into, which is the key observations and outcomes carry.
    """
    patients = store.read_arrow(PATIENTS, columns=["patient_key", "merged_into", "birth_date", "sex"]).to_pandas()
    link = dict(zip(patients["patient_key"], patients["merged_into"], strict=True))

    def resolve(key):
        for _ in range(8):  # merge chains are short; a cycle stops here
            nxt = link.get(key)
            if not isinstance(nxt, str) or nxt == key:
                return key
            key = nxt
        return key

    enc = store.read_arrow(ENCOUNTERS, columns=["patient_key", "admitted_at", "location_point_of_care",
                                                "status"]).to_pandas()
    enc = enc[enc["patient_key"].notna() & enc["admitted_at"].notna() & (enc["status"] != "entered-in-error")]
    enc = enc.assign(patient_key=enc["patient_key"].map(resolve)).sort_values("admitted_at", kind="stable")
    stays = enc.drop_duplicates("patient_key").rename(columns={"location_point_of_care": "icu_type"})
    demographics = patients[patients["birth_date"].notna() | patients["sex"].notna()]
    demographics = demographics.assign(patient_key=demographics["patient_key"].map(resolve))
    demographics = demographics.drop_duplicates("patient_key")[["patient_key", "birth_date", "sex"]]
    return stays[["patient_key", "admitted_at", "icu_type"]].merge(demographics, on="patient_key", how="left")


def print_mortality(result, uri: str) -> None:
    m, c = result.metrics, result.counts
    rows = [[who, f"{m[f'{who}_auroc']:.3f} ({m[f'{who}_auroc_ci_low']:.3f}-{m[f'{who}_auroc_ci_high']:.3f})",
             f"{m[f'{who}_auprc']:.3f}", f"{m[f'{who}_event1']:.3f}", f"{m[f'{who}_sensitivity']:.3f}",
             f"{m[f'{who}_ppv']:.3f}", f"{m[f'{who}_hosmer_lemeshow_h']:.1f}", f"{m[f'{who}_brier']:.4f}"]
            for who in ("model", "saps_i", "sofa", "max_news2")]
    print(f"in-hospital mortality, {c['folds']}-fold cross-validation on {c['stays']:,} ICU stays "
          f"({c['deaths']:,} deaths), {c['features']} features; MLflow run {result.run_id} at {uri}")
    print_table(["predictor", "AUROC (95% CI)", "AUPRC", "Event 1", "Se", "PPV", "H (HL)", "Brier"], rows)
    print(f"model calibration (Platt scaling fitted on out-of-fold predictions of the training folds): H "
          f"{m['model_uncalibrated_hosmer_lemeshow_h']:.1f} before, {m['model_hosmer_lemeshow_h']:.1f} after; Brier "
          f"{m['model_uncalibrated_brier']:.4f} before, {m['model_brier']:.4f} after")
    diff = (f"{m['model_minus_saps_i_auroc']:+.3f} (95% CI {m['model_minus_saps_i_auroc_ci_low']:+.3f} to "
            f"{m['model_minus_saps_i_auroc_ci_high']:+.3f})")
    if result.champion:
        print(f"model AUROC - SAPS-I AUROC = {diff}: registered carelake-mortality v{result.version} as champion")
    else:
        print(f"model AUROC - SAPS-I AUROC = {diff}: not registered (champion needs the interval above zero "
              "and an Event 1 no worse than SAPS-I's)")
    missing = ", ".join(f"{b} {c[f'{b}_missing']}" for b in ("saps_i", "sofa", "max_news2") if c[f"{b}_missing"])
    if missing:
        print(f"stays without a baseline value (ranked lowest): {missing}")


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
        from models.critical_finding import MIN_HELD_OUT_CRITICAL

        why = ("the model does not beat order priority" if m["model_auroc"] <= m["priority_auroc"] else
               f"fewer than {MIN_HELD_OUT_CRITICAL} critical studies held out (simulate more days)")
        print(f"not registered: {why}; the champion is unchanged; run {result.run_id} at {uri}")


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
        print(f"registered carelake-claims-fraud version {result.version} as {result.decision}; "
              f"run {result.run_id} at {uri}")
    else:
        print(f"carelake-claims-fraud not registered, the champion is unchanged: {result.decision}; "
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
