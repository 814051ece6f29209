"""models.deterioration: labels, the training frame, training with MLflow (sqlite in tmp), the champion, the CLI."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from gold.features import feature_columns
from models.deterioration import (
    ALIAS,
    MODEL_NAME,
    THRESHOLD_TAG,
    Timeline,
    champion_decision,
    choose_threshold,
    default_tracking_uri,
    labels_from_truth,
    lead_times_h,
    load_champion,
    train,
    training_frame,
)
from pipelines.errors import ConfigError, UsageError
from tests.conftest import REPO

T0 = pd.Timestamp("2026-01-05T00:00:00Z")
FEATURES = ["hr_last", "hr_slope_1h", "rr_last", "noise"]
HOUR_MS = 3_600_000


def synthetic(seed: int, *, informative: str, patients: int = 30, hours: int = 24) -> pd.DataFrame:
    """A training frame: a point every 30 min per patient; a third deteriorate at a random hour.

    informative="features": heart rate climbs over the 6 h before onset, NEWS2 is noise.
    informative="news2": the features are noise, NEWS2 jumps during the 6 h before onset.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(patients):
        onset = T0 + pd.Timedelta(hours=float(rng.uniform(10, hours - 2))) if i % 3 == 0 else pd.NaT
        for t in pd.date_range(T0, periods=hours * 2, freq="30min"):
            if pd.notna(onset) and t >= onset:
                break
            ramp = 0.0 if pd.isna(onset) else max(0.0, 1 - (onset - t) / pd.Timedelta(hours=6))
            signal = ramp if informative == "features" else 0.0
            news2 = int(rng.integers(0, 7)) if informative == "features" else int(2 + 5 * ramp + rng.integers(0, 2))
            rows.append({"patient_key": f"p{i:03d}", "scored_at": t, "onset_at": onset,
                         "hr_last": 80 + 40 * signal + rng.normal(0, 5), "hr_slope_1h": 10 * signal + rng.normal(0, 2),
                         "rr_last": 16 + rng.normal(0, 2), "noise": rng.normal(), "news2_score": news2})
    frame = pd.DataFrame(rows)
    horizon = pd.Timedelta(hours=6)
    frame["label"] = ((frame["onset_at"] > frame["scored_at"]) & (frame["onset_at"] <= frame["scored_at"] + horizon))
    return frame.astype({"label": "int8"})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One registry, three trainings: a loser (no champion), a winner (champion), a loser again (champion stays)."""
    folder, cwd = tmp_path_factory.mktemp("mlflow"), tmp_path_factory.mktemp("cwd")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    kwargs = dict(tracking_uri=uri, seed=7, test_fraction=0.3, alert_rate_per_100_patient_days=0,
                  feature_names=FEATURES)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)  # MLflow's sqlite store likes to create ./mlruns: it must leave nothing here
        loser = train(synthetic(1, informative="news2"), **kwargs)
        after_loser = load_champion(uri)
        winner = train(synthetic(2, informative="features"), **kwargs)
        loser_again = train(synthetic(3, informative="news2"), **kwargs)
    return {"uri": uri, "folder": folder, "cwd": cwd, "loser": loser, "after_loser": after_loser,
            "winner": winner, "loser_again": loser_again}


def test_winner_is_logged_registered_and_champion(trained):
    from mlflow import MlflowClient

    winner = trained["winner"]
    assert winner.champion and winner.version == "1"
    assert winner.metrics["model_auroc"] > winner.metrics["news2_auroc"]
    client = MlflowClient(tracking_uri=trained["uri"], registry_uri=trained["uri"])
    run = client.get_run(winner.run_id)
    for who in ("model", "news2"):
        for metric in ("auroc", "auprc", "alerts_per_100_patient_days", "detected_fraction"):
            assert f"{who}_{metric}" in run.data.metrics
    assert run.data.metrics["threshold"] == pytest.approx(winner.threshold)
    assert run.data.params["seed"] == "7"
    assert {a.path for a in client.list_artifacts(winner.run_id)} >= {"roc.png", "model_inputs.json", "model_card.md"}
    card = client.download_artifacts(winner.run_id, "model_card.md", str(trained["folder"]))
    assert Path(card).read_text() == winner.card and winner.decision.startswith("champion: AUROC difference")
    assert f"| AUROC (95% CI) | {winner.metrics['model_auroc']:.3f} (" in winner.card and "## Limits" in winner.card
    for who in ("model", "news2"):
        assert winner.metrics[f"{who}_auroc_ci_low"] <= winner.metrics[f"{who}_auroc"] <= \
            winner.metrics[f"{who}_auroc_ci_high"]
    mv = client.get_model_version_by_alias(MODEL_NAME, ALIAS)
    assert str(mv.version) == "1" and float(mv.tags[THRESHOLD_TAG]) == pytest.approx(winner.threshold)
    assert set(winner.roc) == {"model", "news2"} and winner.roc["model"]["tpr"][-1] == 1.0


def test_artifacts_live_beside_the_database_and_mlflow_state_is_restored(trained):
    import mlflow

    assert list((trained["folder"] / "artifacts").rglob("MLmodel"))
    assert list((trained["folder"] / "artifacts").rglob("roc.png"))
    assert not any(trained["cwd"].iterdir())
    assert mlflow.get_tracking_uri() != trained["uri"] and os.environ.get("MLFLOW_TRACKING_URI") != trained["uri"]


def _decided(**overrides):
    metrics = {"model_auroc": 0.80, "news2_auroc": 0.75, "model_minus_news2_auroc_ci_low": 0.01,
               "model_minus_news2_auroc_ci_high": 0.09, "model_detected_fraction": 0.6,
               "news2_detected_fraction": 0.6, **overrides}
    return champion_decision(metrics)


def test_champion_needs_the_auroc_interval_above_zero_and_no_fewer_patients_caught():
    assert _decided()[0]
    ok, why = _decided(model_minus_news2_auroc_ci_low=-0.01)
    assert not ok and "does not lie above zero" in why and "NEWS2 >= 5 stays the alerting rule" in why
    ok, why = _decided(model_detected_fraction=0.5)  # better AUROC, fewer deteriorating patients alerted in time
    assert not ok and "fewer deteriorating patients (0.50 vs 0.60)" in why
    assert not _decided(model_minus_news2_auroc_ci_low=float("nan"))[0]  # no usable resample: no champion


def test_the_threshold_is_chosen_on_risks_from_models_that_did_not_see_the_patient():
    from models.deterioration import _fit, _out_of_fold_risk, _risk

    frame = synthetic(8, informative="features")
    oof = _out_of_fold_risk(frame, FEATURES, seed=1)
    in_sample = _risk(_fit(frame, FEATURES, 1), frame, FEATURES)
    assert oof.shape == in_sample.shape and not np.isnan(oof).any()
    positive = frame["label"].to_numpy() == 1
    # On its own training points the model is surer of the positives than a model that never saw them.
    assert np.median(in_sample[positive]) > np.median(oof[positive])
    # A concept measured on one patient only leaves some folds without it: those folds fit without it.
    rare = frame.assign(rr_last=np.where(frame["patient_key"] == "p001", frame["rr_last"], np.nan))
    assert not np.isnan(_out_of_fold_risk(rare, FEATURES, seed=1)).any()


def test_unreachable_tracking_server_is_a_config_error():
    with pytest.raises(ConfigError, match="unreachable"):
        load_champion("http://127.0.0.1:9")


def test_a_model_that_does_not_beat_news2_is_not_champion(trained):
    for result in (trained["loser"], trained["loser_again"]):
        assert not result.champion and result.version is None
        assert result.metrics["news2_auroc"] > result.metrics["model_auroc"]
    assert trained["after_loser"] is None  # a registry with runs but no champion
    champion = load_champion(trained["uri"])
    assert champion is not None and champion.version == trained["winner"].version  # the loser left it alone


def test_load_champion_predicts_probabilities_in_logged_order(trained):
    champion = load_champion(trained["uri"])
    assert champion.feature_names == tuple(FEATURES)
    assert champion.threshold == pytest.approx(trained["winner"].threshold)
    frame = synthetic(5, informative="features", patients=6)
    shuffled = frame[["news2_score", *reversed(FEATURES), "patient_key"]]
    risk = champion.predict(shuffled)
    assert risk.shape == (len(frame),) and np.all((risk >= 0) & (risk <= 1))
    assert np.allclose(risk, champion.model.predict_proba(frame[FEATURES].astype(float))[:, 1])
    assert load_champion(trained["uri"]) is champion  # cached by (uri, version)
    with pytest.raises(UsageError, match="needs feature column"):
        champion.predict(frame.drop(columns=["noise"]))


def test_load_champion_without_registry_is_none(tmp_path):
    assert load_champion(f"sqlite:///{tmp_path / 'none' / 'mlflow.db'}") is None
    assert not (tmp_path / "none").exists()


def test_training_frame_labels_and_exclusions_by_hand():
    t = [T0 + pd.Timedelta(hours=h) for h in range(6)]
    features = pd.DataFrame({"patient_key": ["a"] * 6 + ["b"] * 2, "scored_at": t + t[:2],
                             "hr_last": [float(i) for i in range(8)]})
    scores = pd.DataFrame({"patient_key": ["a"] * 6 + ["b"] * 2, "scored_at": t + t[:2],
                           "news2_score": [0, 1, 2, 3, 4, 5, 0, 0], "band": ["x"] * 8})
    # a: onset at 04:00, a later second onset that must not matter; b: never deteriorates
    labels = pd.DataFrame({"patient_key": ["a", "a"], "onset_at": [t[4], t[5] + pd.Timedelta(hours=3)]})
    frame = training_frame(features, scores, labels, horizon_ms=2 * HOUR_MS)
    got = list(zip(frame["patient_key"], frame["scored_at"].dt.hour, frame["label"], strict=True))
    # a at 00:00 and 01:00: onset 4 h / 3 h away, beyond the 2 h horizon; 02:00 (2 h, inclusive) and 03:00 positive;
    # 04:00 (= onset) and 05:00 excluded
    assert got == [("a", 0, 0), ("a", 1, 0), ("a", 2, 1), ("a", 3, 1), ("b", 0, 0), ("b", 1, 0)]
    assert list(frame["news2_score"]) == [0, 1, 2, 3, 0, 0] and "band" not in frame.columns


def test_labels_from_truth(tmp_path):
    csv = tmp_path / "deteriorations.csv"
    csv.write_text("patient_mrn,visit_number,kind,onset_time,peak_time,recovered\n"
                   "MRN1,V1,sepsis,2026-01-05T04:58:14Z,2026-01-05T12:58:14Z,no\n"
                   "MRN2,V2,haemorrhage,2026-01-05T10:23:00+01:00,2026-01-05T14:23:00Z,yes\n")
    labels = labels_from_truth(csv, lambda mrn: f"key-{mrn}", "onset_time")
    assert list(labels["patient_key"]) == ["key-MRN1", "key-MRN2"]
    assert list(labels["onset_at"]) == [pd.Timestamp("2026-01-05T04:58:14Z"), pd.Timestamp("2026-01-05T09:23:00Z")]
    # The default event is the peak: the deterioration the early warning must foresee, hours after the onset.
    peaks = labels_from_truth(csv, lambda mrn: f"key-{mrn}")
    assert list(peaks["onset_at"]) == [pd.Timestamp("2026-01-05T12:58:14Z"), pd.Timestamp("2026-01-05T14:23:00Z")]
    with pytest.raises(UsageError, match=r"lacks column\(s\) \['peak_time'\]"):
        (tmp_path / "old.csv").write_text("patient_mrn,onset_time\nMRN1,2026-01-05T04:58:14Z\n")
        labels_from_truth(tmp_path / "old.csv", str)
    with pytest.raises(UsageError, match="does not exist"):
        labels_from_truth(tmp_path / "nope.csv", str)
    (tmp_path / "empty.csv").write_text("patient_mrn,onset_time,peak_time\n")
    with pytest.raises(UsageError, match="no deterioration onset"):
        labels_from_truth(tmp_path / "empty.csv", str)


def test_threshold_matches_the_target_alert_rate():
    frame = pd.DataFrame({"patient_key": ["a"] * 4 + ["b"] * 4,
                          "scored_at": [T0 + pd.Timedelta(hours=h) for h in (0, 8, 16, 24)] * 2})
    timeline = Timeline(frame)
    assert timeline.patient_days == 2.0
    alerting = np.array([True, True, False, True, False, False, False, True])
    assert timeline.episodes(alerting) == 3 and timeline.rate(alerting) == 150.0
    risk = np.array([0.9, 0.8, 0.1, 0.7, 0.2, 0.3, 0.1, 0.6])
    assert choose_threshold(frame, risk, 50.0) == 0.9  # one episode in 2 patient-days
    assert choose_threshold(frame, risk, 0.0) > 0.9  # never alert
    assert math.isclose(timeline.rate(risk >= choose_threshold(frame, risk, 100.0)), 100.0)


def test_lead_time_and_patients_caught_by_hand():
    onset = T0 + pd.Timedelta(hours=10)
    frame = pd.DataFrame({"patient_key": ["a"] * 4 + ["b"] * 2 + ["c"] * 2,
                          "scored_at": [T0 + pd.Timedelta(hours=h) for h in (0, 5, 6, 8, 5, 9, 0, 1)],
                          "onset_at": [onset] * 6 + [pd.NaT] * 2, "label": [0, 1, 1, 1, 1, 1, 0, 0]})
    alerting = np.array([True, False, True, True, False, False, True, False])
    # a: the alert at 00:00 is before the horizon; the first in it is 06:00 -> 4 h before onset. b: never alerted.
    assert lead_times_h(frame, alerting) == (4.0, 0.5)


def test_no_positive_labels_is_a_usage_error(tmp_path):
    frame = synthetic(4, informative="features").assign(label=0)
    with pytest.raises(UsageError, match="at least 2"):
        train(frame, tracking_uri=f"sqlite:///{tmp_path / 'm.db'}", seed=1, test_fraction=0.3,
              alert_rate_per_100_patient_days=0, feature_names=FEATURES)


def run_cli_in_process(root: Path, *args: str, monkeypatch) -> int:
    from pipelines.cli import main

    for name in [k for k in os.environ if k.startswith("CARELAKE_")]:
        monkeypatch.delenv(name)
    return main(["--root", str(root), "--env", "test", "--conf-dir", str(REPO / "conf"), *args])


def test_cli_train_without_gold_tables_says_what_to_run(tmp_path, monkeypatch, capsys):
    labels = tmp_path / "deteriorations.csv"
    labels.write_text("patient_mrn,onset_time\nMRN1,2026-01-05T04:58:14Z\n")
    code = run_cli_in_process(tmp_path / "lake", "train", "deterioration", "--labels", str(labels),
                              monkeypatch=monkeypatch)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "carelake run gold.early_warning_scores" in err[0] and "gold.vitals_features" in err[0]


def test_cli_trains_from_gold_tables_and_registers(cfg, store, monkeypatch, capsys):
    """gold tables written through the store, labels by MRN -> keys with the lakehouse secret, default tracking."""
    from pipelines.secrets import key_secret
    from silver.identity import PATIENT, identity_key

    frame = synthetic(6, informative="features")
    mrn = {k: f"MRN{k[1:]}" for k in frame["patient_key"].unique()}
    key = {k: identity_key(key_secret(cfg), PATIENT, cfg.silver.mrn_system, m) for k, m in mrn.items()}
    frame["patient_key"] = frame["patient_key"].map(key)
    names = feature_columns(cfg.gold.feature_windows_ms)
    features = pd.DataFrame({"patient_key": frame["patient_key"], "scored_at": frame["scored_at"],
                             **{n: frame[n] if n in frame else np.nan for n in names}})
    store.append("gold.vitals_features", pa.Table.from_pandas(features, preserve_index=False))
    store.append("gold.early_warning_scores",
                 pa.Table.from_pandas(frame[["patient_key", "scored_at", "news2_score"]], preserve_index=False))
    onsets = frame.dropna(subset=["onset_at"]).drop_duplicates("patient_key")
    labels = cfg.root / "deteriorations.csv"
    pd.DataFrame({"patient_mrn": [mrn[k] for k in onsets["patient_key"].map({v: k for k, v in key.items()})],
                  "peak_time": onsets["onset_at"].dt.strftime("%Y-%m-%dT%H:%M:%SZ")}).to_csv(labels, index=False)
    assert run_cli_in_process(cfg.root, "train", "deterioration", "--labels", str(labels), monkeypatch=monkeypatch) == 0
    out = capsys.readouterr().out
    assert "AUROC" in out and "NEWS2 >= 5" in out and "registered carelake-deterioration version 1" in out, out
    tracking = cfg.root / "_mlflow"
    assert (tracking / "mlflow.db").is_file() and list((tracking / "artifacts").rglob("MLmodel"))
    champion = load_champion(default_tracking_uri(cfg))
    assert champion.feature_names == tuple(n for n in names if n in FEATURES)  # unmeasured concepts are left out
