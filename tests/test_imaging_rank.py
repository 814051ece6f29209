"""gold.imaging_rank (pure Python): factors, points, order; and the imaging configuration's checks."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from gold import imaging_rank
from pipelines.errors import ConfigError
from tests.conftest import make_config

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def ranking(tmp_path_factory):
    return imaging_rank.Ranking.of(make_config(tmp_path_factory.mktemp("lake")).imaging)


def item(uid: str, **more):
    base = {"study_instance_uid": uid, "available_at": NOW - timedelta(minutes=30), "priority": "ROUTINE",
            "modality": "CR", "body_part": "CHEST"}
    return {**base, **more}


def test_every_factor_is_listed_with_its_value_and_points(ranking):
    scored = imaging_rank.score(item("1", priority="STAT", modality="CT", body_part="HEAD",
                                     indication_codes=["http://hl7.org/fhir/sid/icd-10-cm|I63.9"],
                                     indication_text="left sided weakness", location_class="ED", news2_band="high",
                                     open_alert_levels=["news2_high", "news2_medium"], critical_probability=0.5),
                                ranking, NOW)
    assert [(f["factor"], f["value"], f["points"]) for f in scored.factors] == [
        ("priority", "STAT", 40.0), ("exam", "CT/HEAD", 15.0), ("indication", "stroke", 30.0), ("location", "ED", 15.0),
        ("news2_band", "high", 20.0), ("open_alert", "news2_high,news2_medium", 15.0),
        ("waited", "30 min of 60 min SLA", 10.0), ("critical_model", "0.500", 50.0)]
    assert scored.score == 195.0
    assert scored.sla_due_at == NOW + timedelta(minutes=30)
    assert scored.indication_category == "stroke"


def test_indications_from_text_whole_words_and_from_dotless_codes(ranking):
    cats = imaging_rank.indication_categories
    assert cats([], "Code STROKE, ? PE", ranking) == ["stroke", "pe"]
    assert cats(["ICD-10-CM|S065X0A"], None, ranking) == ["bleed", "trauma"]  # S06.5: subdural; S0: head injury
    assert cats([], "pelvic pain; speech fine", ranking) == []  # 'pe' only as a whole word
    assert cats(["SNOMED|59282003"], "", ranking) == ["pe"]


def test_without_order_or_model_the_row_says_so(ranking):
    scored = imaging_rank.score(item("1", priority=None, available_at=None), ranking, NOW)
    by = {f["factor"]: f for f in scored.factors}
    assert by["priority"] == {"factor": "priority", "value": "no order", "points": 10.0}
    assert by["critical_model"]["value"] == imaging_rank.NO_MODEL and by["critical_model"]["points"] == 0
    assert by["waited"]["value"] == "study time unknown" and scored.sla_due_at is None


def test_waiting_counts_up_to_the_cap(ranking):
    late = imaging_rank.score(item("1", available_at=NOW - timedelta(days=30)), ranking, NOW)
    assert {f["factor"]: f["points"] for f in late.factors}["waited"] == 60.0  # 20 points per SLA, 3 SLAs at most


def test_order_is_score_then_due_time_then_uid(ranking):
    items = [item("b"), item("a"), item("c", priority="STAT"), item("d", available_at=NOW - timedelta(hours=1))]
    got = [(n, i["study_instance_uid"]) for n, i, _ in imaging_rank.ranked(items, ranking, NOW)]
    assert got == [(1, "c"), (2, "d"), (3, "a"), (4, "b")]


@pytest.mark.parametrize(("setting", "message"), [
    ("imaging.sla.STAT=0s", "imaging.sla.STAT must be a positive duration"),
    ("imaging.points_priority.STAT=-1", "points must be whole numbers from 0 to 1000"),
    ("imaging.exam_points=[ct/head=3]", "must look like MODALITY/BODY_PART=points"),
    ("imaging.clock=tomorrow", "imaging.clock must be wall"),
    ("imaging.replay_radiologists=0", "imaging.replay_radiologists must be at least 1"),
    ("imaging.replay_read_minutes={other: 0}", r"replay_read_minutes must give positive minutes per DICOM modality"),
    ("imaging.replay_night_radiologists=4", r"replay_night_radiologists must be from 1 to imaging.replay_radiologists"),
    ("imaging.replay_night_hours=[20]", r"replay_night_hours must be \[from, to\] hours of the day"),
    ("imaging.replay_utilisation=[0.9, 3]", r"replay_utilisation must list shares .* got \[0.9, 3.0\]"),
    ("imaging.indication_pe.codes=[]", None),
])
def test_bad_settings_name_the_key_and_the_fix(tmp_path, setting, message):
    key, value = setting.split("=", 1)
    if message is None:  # codes off, words still there: fine
        assert make_config(tmp_path, **{key: value}).imaging.indication_pe.codes == ()
        return
    with pytest.raises(ConfigError, match=message):
        make_config(tmp_path, **{key: value})


def test_a_category_without_codes_or_words_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="indication_pe needs some codes or words"):
        make_config(tmp_path, **{"imaging.indication_pe.codes": "[]", "imaging.indication_pe.words": "[]"})


def test_the_model_reorders_within_a_priority_and_lifts_under_triaged_studies(ranking):
    stat_film = item("stat-film", priority="STAT", location_class="ED", critical_probability=0.02)
    routine_bleed = item("routine-bleed", modality="CT", body_part="ABDOMEN", location_class="ED",
                         indication_codes=["ICD-10-CM|K92.2"], critical_probability=0.3)
    older_stroke = item("older-stroke", priority="STAT", modality="CT", body_part="HEAD", indication_text="stroke",
                        location_class="ED", critical_probability=0.05, available_at=NOW - timedelta(minutes=40))
    likely_stroke = item("likely-stroke", priority="STAT", modality="CT", body_part="HEAD", indication_text="stroke",
                         location_class="ED", critical_probability=0.4, available_at=NOW)
    got = [i["study_instance_uid"] for _, i, _ in imaging_rank.ranked(
        [stat_film, routine_bleed, older_stroke, likely_stroke], ranking, NOW)]
    # within STAT the likelier stroke goes first though it came later; a GI bleed ordered ROUTINE outranks a STAT
    # chest film that is probably normal
    assert got == ["likely-stroke", "older-stroke", "routine-bleed", "stat-film"]
