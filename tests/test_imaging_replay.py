"""`carelake imaging replay`: the reading-room simulation, its policies and loads, the patients' acuity at arrival,
on the simulator's own seeded imaging days and hand-made truth files (pure Python: no Spark)."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from gold import imaging_rank
from models import critical_finding as cf
from pipelines.errors import UsageError
from pipelines.imaging_replay import (
    TRUTH_COLUMNS,
    Acuity,
    Room,
    add_acuity,
    chooser,
    read_truth,
    read_vitals,
    replay,
    replay_acuity,
    simulate,
)
from tests.conftest import make_config
from tests.imaging_tables import COLUMNS, START, simulated_day, truth_rows, write_truth

MINUTES = {"CT": 10.0, "CR": 3.0, "other": 8.0}


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return make_config(tmp_path_factory.mktemp("lake"))


@pytest.fixture(scope="module")
def ranking(cfg):
    return imaging_rank.Ranking.of(cfg.imaging)


def test_on_a_seeded_day_the_worklist_reads_critical_studies_sooner_than_priority_and_fifo(cfg, ranking,
                                                                                          tmp_path_factory):
    """The simulator's ED and outpatient imaging of seed 13 (its day 11 trains the model: a day never ranks with a
    model that saw its own findings), 3 radiologists 90 % busy."""
    train = read_truth(simulated_day(cfg, tmp_path_factory.mktemp("day11"), seed=11))
    imaging_rank.prepare(train, ranking, None)
    model = cf.fit(train, [int(i["critical"]) for i in train], seed=1)
    items = read_truth(simulated_day(cfg, tmp_path_factory.mktemp("day13"), seed=13))
    assert {i["priority"] for i in items if i["critical"]} == {"STAT", "ASAP", "ROUTINE"}  # under-triage happens
    room = Room(3, dict(cfg.imaging.replay_read_minutes)).at_utilisation(items, 0.9)
    figures = replay(items, ranking, room, model)
    medians = {p: figures[p]["critical_median_min"] for p in ("fifo", "priority", "worklist")}
    assert medians["worklist"] < medians["priority"] < medians["fifo"], medians
    assert figures["worklist"]["critical_p90_min"] < figures["priority"]["critical_p90_min"]
    assert figures["worklist"]["routine_within_sla"] == 1.0  # the reordering costs routine studies no SLA here
    assert figures["critical_studies"] == sum(i["critical"] for i in items)


def test_every_study_is_read_once_and_no_reader_does_two_at_a_time(ranking):
    items = [{"study_instance_uid": str(k), "available_at": START, "priority": "ROUTINE", "modality": "CT"}
             for k in range(5)]
    got = simulate(items, chooser("fifo", ranking), Room(2, MINUTES))
    assert sorted(t for _, t in got.values()) == [10.0, 10.0, 20.0, 20.0, 30.0]
    assert sorted(w for w, _ in got.values()) == [0.0, 0.0, 10.0, 10.0, 20.0]
    late = [{"study_instance_uid": "x", "available_at": START + timedelta(hours=5), "priority": "STAT",
             "modality": "CR"}]
    assert simulate(items[:1] + late, chooser("priority", ranking), Room(1, MINUTES, pace=2.0)) == {
        "0": (0.0, 20.0), "x": (0.0, 6.0)}


def test_at_night_one_radiologist_reads_and_the_others_come_back_in_the_morning(ranking):
    room = Room(2, MINUTES, night_radiologists=1, night_hours=(20, 8))
    assert [room.on_duty(START + timedelta(hours=h)) for h in (7, 8, 19, 20, 23)] == [1, 2, 2, 1, 1]

    def studies(hour: float, n: int) -> list[dict]:
        at = START + timedelta(hours=hour)
        return [{"study_instance_uid": f"{hour}-{k}", "available_at": at, "priority": "ROUTINE", "modality": "CT"}
                for k in range(n)]

    night = simulate(studies(21, 3), chooser("fifo", ranking), room)
    assert sorted(night.values()) == [(0.0, 10.0), (10.0, 20.0), (20.0, 30.0)]  # one reader, one after the other
    dawn = simulate(studies(7 + 55 / 60, 2), chooser("fifo", ranking), room)
    assert sorted(dawn.values()) == [(0.0, 10.0), (5.0, 15.0)]  # the second reader starts at 08:00
    day = [{"available_at": START, "modality": "CT"}, {"available_at": START + timedelta(hours=24), "modality": "CT"}]
    assert room.at_utilisation(day, 1.0).pace == pytest.approx((12 * 60 * 1 + 12 * 60 * 2) / 20)


def test_the_pace_makes_the_reads_fill_the_asked_share_of_the_radiologists_time():
    items = [{"available_at": START + timedelta(hours=h), "modality": m} for h, m in ((0, "CT"), (10, "CR"), (5, "MR"))]
    room = Room(2, MINUTES).at_utilisation(items, 0.5)  # 10 + 3 + 8 (other) = 21 minutes of reads in 10 hours
    assert room.pace == pytest.approx(0.5 * 2 * 600 / 21)
    assert room.read_time(items[2]) == timedelta(minutes=8 * room.pace)
    with pytest.raises(UsageError, match="needs studies spread over time"):
        Room(2, MINUTES).at_utilisation(items[:1], 0.9)


VITALS = ("patient_mrn,visit_number,time,respiratory_rate,spo2_pct,fio2_pct,o2_flow_l_min,systolic_bp_mmhg,pulse,"
          "temperature_c,acvpu\n")


def test_the_worklist_sees_the_news2_band_and_open_alerts_gold_would_at_arrival(cfg, tmp_path):
    normal, high = "14,97,21,0,120,70,36.8,A", "26,90,40,6,88,125,38.9,C"  # NEWS2 0 (low) and 15 (high)
    rows = [("V1", "00:00", normal), ("V1", "02:00", high), ("V1", "03:00", normal), ("V1", "03:30", normal),
            ("V1", "04:30", normal), ("V2", "00:00", high)]
    path = tmp_path / "ward_vitals.csv"
    path.write_text(VITALS + "".join(f"M,{v},2026-01-05T{t}:00Z,{x}\n" for v, t, x in rows))
    acuity = replay_acuity(cfg)
    assert acuity == Acuity(cfg.gold.charts, timedelta(hours=24), timedelta(hours=1), ("news2_medium", "news2_high"))
    vitals = read_vitals(path, acuity)
    assert [b for _, b in vitals["V1"]] == ["low", "high", "low", "low", "low"]
    at = {"02:30": ("high", ["news2_medium", "news2_high"]), "03:15": ("low", ["news2_medium", "news2_high"]),
          "04:45": ("low", []), "01:00": ("low", [])}
    items = [{"visit_number": "V1", "available_at": START + timedelta(hours=int(t[:2]), minutes=int(t[3:]))}
             for t in at]
    items += [{"visit_number": "V2", "available_at": START + timedelta(hours=25)},  # the score is 25 h old
              {"visit_number": None, "available_at": START}]  # an ED walk-in: nothing charted
    add_acuity(items, vitals, acuity)
    assert [(i["news2_band"], i["open_alert_levels"]) for i in items] == [*at.values(), (None, ["news2_medium",
                                                                                                "news2_high"]),
                                                                          (None, [])]
    only_high = Acuity(cfg.gold.charts, timedelta(hours=24), timedelta(hours=1), ("news2_high",))  # gold.alert_levels
    add_acuity(items[:1], vitals, only_high)
    assert items[0]["open_alert_levels"] == ["news2_high"]
    path.write_text(VITALS + "M,V1,yesterday,14,97,21,0,120,70,36.8,A\n")
    with pytest.raises(UsageError, match="ward_vitals.csv line 2: "):
        read_vitals(path, acuity)


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


def test_the_cli_prints_one_json_line_per_load_across_days(tmp_path, capsys):
    from pipelines.cli import main

    days = [write_truth(tmp_path / f"day{n}.csv", truth_rows(60, seed=n)) for n in (1, 2)]
    args = ["--env", "test", "--root", str(tmp_path / "lake"), "imaging", "replay", "--truth", str(days[0]),
            "--truth", str(days[1]), "--radiologists", "1", "--utilisation", "0.7,1.1"]
    assert main([*args, "--model", "cross-day"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    figures = json.loads(out[0])
    assert (figures["radiologists"], figures["studies"], figures["acuity_from_ward_vitals"]) == (1, [60, 60],
                                                                                                  [False, False])
    assert [x["utilisation"] for x in figures["loads"]] == [0.7, 1.1]
    assert figures["critical_model_version"] == ["unregistered"]
    spread = figures["loads"][0]["worklist"]["critical_median_min"]
    assert spread["range"][0] <= spread["median"] <= spread["range"][1]
    with pytest.raises(SystemExit):
        main([*args[:-1], "0.7,x"])
    assert "expected comma-separated shares like 0.8,0.9,1.0, got '0.7,x'" in capsys.readouterr().err
    assert main([*args[:8], "--model", "cross-day"]) != 0  # one day: no other day to fit on
    assert "pass at least two --truth files" in capsys.readouterr().err


def test_the_demo_report_shows_the_time_to_read_comparison_or_why_not(tmp_path):
    from pipelines.report import imaging_sections

    cfg = make_config(tmp_path / "lake")
    lines, blocks = imaging_sections(cfg, write_truth(tmp_path / "imaging.csv", truth_rows(80)))
    assert "  (no unread study on gold.imaging_worklist)" in lines
    assert any(line.startswith("time to read (minutes), 80 studies") for line in lines)
    assert len(blocks) == 1 and "carelake worklist" in blocks[0] and "order priority only" in blocks[0]
    lines, blocks = imaging_sections(cfg, write_truth(tmp_path / "old.csv", truth_rows(3), COLUMNS[:9]))
    assert lines[-1].startswith("time-to-read replay: not run (") and blocks == []
