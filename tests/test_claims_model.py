"""Claims fraud model: provider split, metrics against the rules, champion only when it beats their AUPRC, the
unsupervised detector always registered; recall per pattern from gold rows and labels."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from gold.claims_fraud import FEATURES
from models.claims_fraud import (
    ANOMALY_NAME,
    GROUP,
    LABEL,
    MODEL_NAME,
    labels_from_truth,
    load_champion,
    pattern_recall,
    precision_at,
    split_providers,
    train,
    training_frame,
)
from pipelines.errors import UsageError


def synthetic(seed: int, *, rules_perfect: bool) -> pd.DataFrame:
    """Claims of 16 providers; fraud shows in rule_phantom_service and em_top_share. The rules' score sees only
    the phantom half of the fraud unless rules_perfect."""
    rng = np.random.default_rng(seed)
    n = 800
    label = (rng.random(n) < 0.15).astype(int)
    phantom = label * (rng.random(n) < 0.5)
    features = {f: rng.random(n) for f in FEATURES}
    features["rule_phantom_service"] = phantom.astype(float)
    features["em_top_share"] = np.clip(label * 0.6 + rng.random(n) * 0.5, 0, 1)
    rows = pd.DataFrame({"claim_id": [f"C{i:04d}" for i in range(n)], "provider": [f"P{i % 16}" for i in range(n)],
                         "score": np.where(label == 1, 60, 0) if rules_perfect else phantom * 60})
    rows["features"] = [dict(zip(FEATURES, vals, strict=True)) for vals in zip(*features.values(), strict=True)]
    labels = {c: {"upcoding"} for c, y in zip(rows["claim_id"], label, strict=True) if y}
    return training_frame(rows, labels, FEATURES)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One registry: a model that beats partial rules (champion), then one that cannot beat perfect rules."""
    folder = tmp_path_factory.mktemp("fraud-mlflow")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    winner = train(synthetic(1, rules_perfect=False), tracking_uri=uri, seed=3, test_fraction=0.3,
                   feature_names=FEATURES)
    loser = train(synthetic(2, rules_perfect=True), tracking_uri=uri, seed=3, test_fraction=0.3,
                  feature_names=FEATURES)
    return {"uri": uri, "winner": winner, "loser": loser}


def test_a_model_beating_the_rules_is_champion_and_both_models_are_registered(trained):
    from mlflow import MlflowClient

    winner, loser = trained["winner"], trained["loser"]
    assert winner.champion and winner.version == "1"
    assert winner.metrics["model_auprc"] > winner.metrics["rules_auprc"]
    for who in ("model", "anomaly", "rules"):
        for metric in ("auroc", "auprc", "precision_top_1pct", "precision_top_5pct"):
            assert 0 <= winner.metrics[f"{who}_{metric}"] <= 1
    assert winner.metrics["model_minus_rules_auprc_ci_low"] > 0 and winner.decision.startswith("champion: AUPRC")
    assert not loser.champion and loser.version is None  # perfect rules: AUPRC 1.0 cannot be beaten
    assert "does not lie above zero" in loser.decision
    client = MlflowClient(tracking_uri=trained["uri"], registry_uri=trained["uri"])
    assert str(client.get_model_version_by_alias(MODEL_NAME, "champion").version) == "1"
    assert str(client.get_model_version_by_alias(ANOMALY_NAME, "champion").version) == "2"
    assert {a.path for a in client.list_artifacts(winner.run_id)} >= {"precision_at_top.png", "model_inputs.json"}
    champion = load_champion(trained["uri"])
    assert champion.version == "1" and champion.feature_names == FEATURES
    frame = synthetic(5, rules_perfect=False)
    risk = champion.predict(frame)
    assert risk[frame[LABEL].to_numpy() == 1].mean() > risk[frame[LABEL].to_numpy() == 0].mean()


def test_champion_needs_enough_held_out_fraud_and_the_auprc_interval_above_zero():
    from models.claims_fraud import MIN_HELD_OUT_FRAUD, champion_decision

    clear = {"model_auprc": 0.9, "rules_auprc": 0.5, "model_minus_rules_auprc_ci_low": 0.2,
             "model_minus_rules_auprc_ci_high": 0.6}
    assert champion_decision(clear, {"test_fraud_claims": MIN_HELD_OUT_FRAUD}) == (
        True, f"champion: AUPRC difference +0.400 (95% CI +0.200 to +0.600) lies above zero on {MIN_HELD_OUT_FRAUD} "
        "held-out fraudulent claims")
    few, why = champion_decision(clear, {"test_fraud_claims": 3})  # the demo's case: a big win on 3 positives
    assert not few and why.startswith("not champion: 3 held-out fraudulent claim(s), fewer than the")
    straddles = clear | {"model_minus_rules_auprc_ci_low": -0.05}
    ok, why = champion_decision(straddles, {"test_fraud_claims": 200})
    assert not ok and "(95% CI -0.050 to +0.600) does not lie above zero" in why


def test_held_out_providers_are_never_trained_on():
    frame = synthetic(4, rules_perfect=False)
    held = split_providers(frame, 0.3, seed=9)
    assert set(frame.loc[held, GROUP]).isdisjoint(frame.loc[~held, GROUP])
    assert 0.25 <= held.mean() <= 0.45


def test_precision_at_the_top_of_the_list():
    y, score = np.array([1, 0, 1, 0, 0, 0, 0, 0, 0, 0]), np.arange(10, 0, -1).astype(float)
    assert precision_at(y, score, 0.01) == 1.0  # at least one claim: the top one
    assert precision_at(y, score, 0.3) == pytest.approx(2 / 3)


def test_too_few_labels_is_a_usage_error(tmp_path):
    frame = synthetic(6, rules_perfect=False)
    frame[LABEL] = 0
    with pytest.raises(UsageError, match="0 labelled fraudulent claim"):
        train(frame, tracking_uri=f"sqlite:///{tmp_path / 'm.db'}", seed=1, test_fraction=0.3,
              feature_names=FEATURES)


def test_recall_per_pattern_and_false_positives_from_gold_rows(tmp_path):
    reason = lambda *codes: [{"code": c, "detail": "", "lines": [1]} for c in codes]  # noqa: E731
    rows = pd.DataFrame({"claim_id": ["D", "U", "P", "P2", "K1", "K2", "K3"],
                         "reasons": [reason("duplicate"), reason("unbundling"), reason("phantom_service"), None,
                                     None, reason("upcoding"), None],
                         "model_probability": [0.9, 0.2, 0.8, 0.7, 0.6, 0.1, 0.1],
                         "model_version": ["3"] * 7})
    labels = {"D": {"duplicate_billing"}, "U": {"upcoding"}, "P": {"phantom_services"}, "P2": {"phantom_services"},
              "GONE": {"unbundling"}}
    report = pattern_recall(rows, labels)
    p = report["patterns"]
    assert (p["duplicate_billing"]["found"], p["duplicate_billing"]["recall"]) == (1, 1.0)
    assert (p["upcoding"]["found"], p["upcoding"]["flagged"]) == (0, 1)  # flagged, but not by its own rule
    assert (p["phantom_services"]["found"], p["phantom_services"]["labelled"], p["phantom_services"]["model_found"]) \
        == (1, 2, 2)
    assert (p["unbundling"]["labelled"], p["unbundling"]["recall"]) == (1, 0.0)  # labelled but never scored: missed
    assert p["impossible_volume"]["recall"] is None
    assert report["clean"] == {"claims": 3, "flagged": 1, "false_positive_rate": 1 / 3, "model_flagged": 1,
                               "model_false_positive_rate": 1 / 3}
    assert report["unscored_labelled_claims"] == ["GONE"] and report["model_version"] == "3"
    truth = tmp_path / "fraud_labels.csv"
    truth.write_text("claim_id,line,pattern,detail\nA,1,upcoding,x\nA,2,unbundling,y\n")
    assert labels_from_truth(truth) == {"A": {"upcoding", "unbundling"}}
    truth.write_text("claim,line\nA,1\n")
    with pytest.raises(UsageError, match="lacks column"):
        labels_from_truth(truth)
    with pytest.raises(UsageError, match="cannot be read"):
        labels_from_truth(tmp_path / "none.csv")


def test_the_demo_report_shows_the_top_flagged_claims_and_model_vs_rules(tmp_path):
    """The report's claims part from a gold table: the top flagged claims with their reasons, then model vs rules
    from a training result, or the rules alone with the reason no model was trained."""
    from datetime import date
    from decimal import Decimal

    import pyarrow as pa
    from pyspark.sql.pandas.types import to_arrow_schema

    from gold.claims_fraud import SCHEMA
    from models.claims_fraud import FraudTrainResult
    from pipelines.report import claims_sections
    from pipelines.store.deltars import DeltaRsStore
    from tests.conftest import make_config

    def row(claim_id, score, band, *codes, p=None):
        return {f.name: None for f in SCHEMA.fields} | {
            "claim_key": claim_id.lower(), "claim_id": claim_id, "provider_npi": "1245319599",
            "service_from": date(2026, 1, 7), "billed_amount": Decimal("120.00"), "score": score, "band": band,
            "reasons": [{"code": c, "detail": f"{c} found", "lines": [1]} for c in codes] or None,
            "model_probability": p, "scored_at": pd.Timestamp("2026-01-20", tz="UTC")}

    cfg = make_config(tmp_path / "lake")
    rows = [row("D2", 60, "high", "duplicate", p=0.2), row("X", 100, "high", "duplicate", "after_death", p=0.9),
            row("U", 30, "medium", "unbundling"), row("OK", 0, "none"), row("OK2", 0, "none")]
    DeltaRsStore(cfg).append("gold.claims_fraud_scores", pa.Table.from_pylist(rows, to_arrow_schema(SCHEMA)))
    labels = tmp_path / "fraud_labels.csv"
    labels.write_text("claim_id,line,pattern,detail\nD2,1,duplicate_billing,x\nU,1,unbundling,y\n")

    lines, blocks = claims_sections(cfg, labels, None, "2 labelled fraudulent claim(s)")
    assert lines[1] == ("claims scored: 5; flagged 3 (high 2, medium 1, low 0); reasons: duplicate 2, after_death 1, "
                        "unbundling 1")
    assert lines[2].startswith("recall per labelled pattern (its own rule): duplicate_billing 1/1, unbundling 1/1;")
    top = lines.index("top flagged claims:")
    assert [row.split()[0] for row in lines[top + 1].splitlines()[1:]] == ["X", "D2", "U"]  # score, then model
    assert lines[top + 2] == "  X: duplicate: duplicate found; after_death: after_death found"
    assert "fraud model: not trained (2 labelled fraudulent claim(s))" in lines
    assert len(blocks) == 2 and "The fraud model was not trained" in blocks[1] and "<img" not in blocks[1]

    metrics = {f"{who}_{m}": 0.5 for who in ("model", "anomaly", "rules")
               for m in ("auroc", "auprc", "precision_top_1pct", "precision_top_5pct")} | {"model_auprc": 0.8}
    counts = {"train_claims": 90, "test_claims": 40, "train_providers": 7, "test_providers": 3,
              "train_fraud_claims": 9, "test_fraud_claims": 4}
    result = FraudTrainResult("run", "2", "1", True, metrics, counts, FEATURES, "champion: AUPRC difference +0.300")
    lines, blocks = claims_sections(cfg, labels, result)
    assert any(line.startswith("fraud model vs rules on 40 claims of 3 held-out providers (4 fraudulent)")
               and line.endswith("carelake-claims-fraud version 2, champion: AUPRC difference +0.300:")
               for line in lines)
    assert "model  anomaly  rules" in lines[-1] and "AUPRC  0.800" in lines[-1]
    assert len(blocks) == 2 and "<img src='data:image/png;base64," in blocks[1]
