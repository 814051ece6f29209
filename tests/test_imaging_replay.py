"""`carelake imaging replay`: the reading-room simulation and its policies, on a hand-made truth/imaging.csv."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from gold import imaging_rank
from pipelines.errors import UsageError
from pipelines.imaging_replay import TRUTH_COLUMNS, Room, chooser, read_truth, replay, simulate
from tests.conftest import make_config
from tests.imaging_tables import COLUMNS, START, truth_rows, write_truth


@pytest.fixture(scope="module")
def ranking(tmp_path_factory):
    return imaging_rank.Ranking.of(make_config(tmp_path_factory.mktemp("lake")).imaging)


def test_the_worklist_reads_critical_studies_sooner_than_fifo_and_priority(tmp_path, ranking):
    items = read_truth(write_truth(tmp_path / "imaging.csv", truth_rows()))
    assert len(items) == 260 and {(i["modality"], i["body_part"]) for i in items} == {("CT", "CHEST"), ("CT", "HEAD"),
                                                                                    ("CR", "CHEST")}
    figures = replay(items, ranking, Room(radiologists=2, reads_per_hour=6))
    assert figures["worklist_cuts_critical_median"] is True
    medians = {p: figures[p]["critical"]["median_min"] for p in ("fifo", "priority", "worklist")}
    assert medians["worklist"] < medians["priority"] < medians["fifo"]
    assert figures["critical_studies"] == sum(i["critical"] for i in items)
    assert figures["critical_model_version"] is None


def test_every_study_is_read_once_and_no_reader_does_two_at_a_time(ranking):
    at = START
    items = [{"study_instance_uid": str(k), "available_at": at, "priority": "ROUTINE"} for k in range(5)]
    minutes = simulate(items, chooser("fifo", ranking), 2, timedelta(minutes=10))
    assert sorted(minutes.values()) == [10.0, 10.0, 20.0, 20.0, 30.0]
    late = [{"study_instance_uid": "x", "available_at": at + timedelta(hours=5), "priority": "STAT"}]
    assert simulate(items[:1] + late, chooser("priority", ranking), 1, timedelta(minutes=10)) == {"0": 10.0, "x": 10.0}


def test_truth_files_that_cannot_be_replayed_are_refused_with_the_reason(tmp_path):
    old = write_truth(tmp_path / "old.csv", truth_rows(3), COLUMNS[:9])
    with pytest.raises(UsageError, match=r"lacks column\(s\) \['indication_code'"):
        read_truth(old)
    bad = truth_rows(2)
    bad[1]["critical_finding"] = "yes"
    with pytest.raises(UsageError, match="line 3: critical_finding must be 1 or 0, got 'yes'"):
        read_truth(write_truth(tmp_path / "bad.csv", bad))
    with pytest.raises(UsageError, match="not found"):
        read_truth(tmp_path / "missing.csv")
    assert set(TRUTH_COLUMNS) <= set(COLUMNS)


def test_the_cli_prints_one_json_line(tmp_path, capsys):
    from pipelines.cli import main

    truth = write_truth(tmp_path / "imaging.csv", truth_rows(60))
    code = main(["--env", "test", "--root", str(tmp_path / "lake"), "imaging", "replay", "--truth", str(truth),
                 "--radiologists", "1", "--reads-per-hour", "3", "--model", "none"])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and len(out) == 1
    figures = json.loads(out[0])
    assert (figures["radiologists"], figures["reads_per_hour"], figures["studies"]) == (1, 3.0, 60)
    assert set(figures["worklist"]) == {"critical", "all"}


def test_the_demo_report_shows_the_time_to_read_comparison_or_why_not(tmp_path):
    from pipelines.report import imaging_sections

    cfg = make_config(tmp_path / "lake")
    lines, blocks = imaging_sections(cfg, write_truth(tmp_path / "imaging.csv", truth_rows(80)))
    assert "  (no unread study on gold.imaging_worklist)" in lines
    assert any(line.startswith("time to read (minutes), 80 studies") for line in lines)
    assert len(blocks) == 1 and "carelake worklist" in blocks[0] and "order priority only" in blocks[0]
    lines, blocks = imaging_sections(cfg, write_truth(tmp_path / "old.csv", truth_rows(3), COLUMNS[:9]))
    assert lines[-1].startswith("time-to-read replay: not run (") and blocks == []
