"""The critical-finding model: trained and tracked in MLflow, champion only when it beats order priority, and the
worklist's ranking with it."""

from __future__ import annotations

from datetime import timedelta

import pytest

from gold import imaging_rank
from gold.imaging_worklist import rank_unread
from models import critical_finding as cf
from pipelines.imaging_replay import read_truth
from tests.conftest import make_config
from tests.imaging_tables import START, truth_rows, write_truth


@pytest.fixture(scope="module")
def ranking(tmp_path_factory):
    return imaging_rank.Ranking.of(make_config(tmp_path_factory.mktemp("lake")).imaging)


@pytest.fixture
def items(tmp_path, ranking):
    rows = read_truth(write_truth(tmp_path / "imaging.csv", truth_rows(400, seed=11)))
    imaging_rank.prepare(rows, ranking, None)
    return rows


def test_a_model_that_beats_priority_is_the_champion_and_the_worklist_uses_it(tmp_path, items, ranking):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = cf.train(items, [int(i["critical"]) for i in items], tracking_uri=uri, seed=42, test_fraction=0.3)
    assert result.metrics["model_auroc"] > result.metrics["priority_auroc"] and result.champion
    assert result.metrics["test_critical"] >= cf.MIN_HELD_OUT_CRITICAL
    assert result.version == "1"
    champion = cf.load_champion(uri)
    assert champion.version == "1"
    stroke = next(i for i in items if i["indication_categories"] == ["stroke"] and i["priority"] == "ROUTINE")
    cough = next(i for i in items if not i["indication_categories"] and i["priority"] == "ROUTINE")
    p_stroke, p_cough = champion.predict([stroke, cough])
    assert 0 < p_cough < p_stroke < 1

    now = START + timedelta(hours=1)
    rows = rank_unread([{**cough, "available_at": START}, {**stroke, "available_at": START}], ranking, now, champion)
    assert [r["study_instance_uid"] for r in rows] == [stroke["study_instance_uid"], cough["study_instance_uid"]]
    model = {f[0]: f for f in rows[0]["factors"]}["critical_model"]
    assert model == ("critical_model", f"{p_stroke:.3f}", round(ranking.points.points_model * p_stroke, 1))
    assert rows[0]["critical_model_version"] == "1"


def test_a_model_no_better_than_priority_is_logged_but_not_registered(tmp_path, items):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    labels = [int(i["priority"] == "STAT") for i in items]  # priority alone is a perfect ranking here
    result = cf.train(items, labels, tracking_uri=uri, seed=42, test_fraction=0.3)
    assert result.metrics["priority_auroc"] == 1.0 and not result.champion and result.version is None
    assert cf.load_champion(uri) is None
    few = cf.train(items[:60], [int(i["critical"]) for i in items[:60]], tracking_uri=uri, seed=42, test_fraction=0.3)
    assert few.metrics["test_critical"] < cf.MIN_HELD_OUT_CRITICAL and not few.champion  # too few to judge


def test_features_have_a_fixed_vocabulary_and_labels_are_checked(tmp_path):
    frame = cf.features([{"priority": "STAT", "modality": "CT", "body_part": "HEAD", "location_class": "ED",
                          "indication_categories": ["stroke", "bleed"], "news2_band": "high",
                          "indication_codes": ["ICD-10-CM|I61.9", "S06.5X0A"],
                          "open_alert_levels": ["qsofa"]}, {"priority": "LATER", "modality": "PET"}])
    assert list(frame.columns) == list(cf.FEATURES)
    on = frame.columns[frame.iloc[0] == 1].tolist()
    assert on == ["priority_STAT", "modality_CT", "body_part_HEAD", "indication_stroke", "indication_bleed",
                  "location_class_ED", "news2_band_high", "icd10_chapter_I", "icd10_chapter_S", "open_alert"]
    assert frame.iloc[1].sum() == 0  # values outside the vocabulary set nothing
    bad = tmp_path / "imaging.csv"
    bad.write_text("accession_number,critical_finding\nA1,maybe\n")
    with pytest.raises(Exception, match="critical_finding must be 1 or 0, got 'maybe'"):
        cf.labels_from_truth(bad)
