"""gold.early_warning_scores and gold.deterioration_alerts through the runner, from silver rows written directly.

The scoring arithmetic is tested edge by edge in test_news2.py; here: as-of inputs, the look-back, partial
scores, SpO2 scale 2, identity resolution across feeds, late data rescoring later rows, alert episodes with
escalation / resolution / withdrawal, and idempotent replays.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pytest

from gold.deterioration_alerts import ALERTS
from gold.early_warning_scores import FEATURES, SCORES
from silver.observations import OBSERVATIONS
from silver.observations import SCHEMA as OBS_SCHEMA
from silver.patients import PATIENTS
from silver.patients import SCHEMA as PATIENT_SCHEMA

T0 = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)
CODES = {"rr": "9279-1", "spo2": "59408-5", "fio2": "3150-0", "o2flow": "3151-8", "sbp": "8480-6",
         "hr": "8867-4", "acvpu": "67775-7", "temp": "8310-5", "wbc": "6690-2"}


def obs(patient: str, concept: str, value, minutes: float, *, code: str | None = None, status: str = "final"):
    at = T0 + timedelta(minutes=minutes)
    text = value if isinstance(value, str) else None
    oid = hashlib.sha256(f"{patient}|{concept}|{code}|{at.isoformat()}".encode()).hexdigest()[:32]
    return {"observation_id": oid, "patient_key": patient, "encounter_key": f"enc-{patient}",
            "code": code or CODES.get(concept), "concept": concept if code is None else None,
            "value": None if text else float(value), "value_text": text, "effective_at": at, "status": status,
            "source_feed": "devices", "source_version": "1",
            "source_record": {"table": "bronze.device_readings", "landing_file": "f", "landing_position": 0,
                              "sha256": oid},
            "ingested_at": T0}


def vitals(patient: str, minutes: float, **values) -> list[dict]:
    return [obs(patient, concept, value, minutes) for concept, value in values.items()]


@pytest.fixture
def lake(tmp_path, spark):
    from pyspark.sql.pandas.types import to_arrow_schema

    from pipelines.jobs import load_registry
    from pipelines.runner import Runner, Trigger
    from pipelines.store import open_store
    from tests.conftest import make_config

    cfg = make_config(tmp_path / "lake")
    store = open_store(cfg, spark)
    runner = Runner(cfg, spark, store, load_registry(cfg))

    class Lake:
        def add(self, rows: list[dict]) -> None:
            store.append(OBSERVATIONS, pa.Table.from_pylist(rows, schema=to_arrow_schema(OBS_SCHEMA)))

        def link(self, identity: str, person: str) -> None:
            row = {"patient_key": identity, "identity_kind": "fhir-patient", "merged_into": person,
                   "ingested_at": T0}
            store.append(PATIENTS, pa.Table.from_pylist([row], schema=to_arrow_schema(PATIENT_SCHEMA)))

        def run(self) -> None:
            runner.run([SCORES], Trigger(available_now=True))  # alerts are a side output of the score job

        def scores(self, patient: str) -> dict[int, dict]:
            rows = [r for r in store.read_arrow(SCORES).to_pylist() if r["patient_key"] == patient]
            return {int((r["scored_at"] - T0).total_seconds() // 60): r for r in rows}

        def alerts(self, patient: str) -> list[dict]:
            rows = [r for r in store.read_arrow(ALERTS).to_pylist() if r["patient_key"] == patient]
            return sorted(rows, key=lambda r: (r["opened_at"], r["level"]))

    lake = Lake()
    lake.arrow_schema = to_arrow_schema(OBS_SCHEMA)
    lake.store = store
    lake.cfg = cfg
    lake.add([])
    return lake


def minutes(at: datetime | None) -> float | None:
    return None if at is None else (at - T0).total_seconds() / 60


def test_scores_as_of_inputs_lookback_partial_and_alert_lifecycle(lake):
    # 10:00 a full set: RR 22 (2), SpO2 95 (1), air (0), SBP 105 (1), HR 95 (1), alert (0), 38.5 C (1) = 6 medium.
    lake.add(vitals("p1", 0, rr=22, spo2=95, fio2=21, sbp=105, hr=95, acvpu="A", temp=38.5))
    lake.add(vitals("p1", 30, hr=135))  # only the pulse: the rest carry forward; HR 135 scores 3 -> 8, high
    lake.add(vitals("p1", 300, hr=80))  # 15:00: everything else is older than the 4 h look-back
    lake.add(vitals("p1", 370, hr=82))  # still out 70 min later: the alerts resolve (gold.alert_resolve_after 1 h)
    lake.run()

    s = lake.scores("p1")
    assert sorted(s) == [0, 30, 300, 370]
    first = s[0]
    assert (first["news2_score"], first["news2_band"], first["news2_partial"]) == (6, "medium", False)
    assert [first[c] for c in ("news2_respiratory_rate", "news2_spo2", "news2_supplemental_o2", "news2_systolic_bp",
                               "news2_pulse", "news2_consciousness", "news2_temperature")] == [2, 1, 0, 1, 1, 0, 1]
    assert (first["qsofa_score"], first["sirs_count"]) == (1, 3)  # RR >= 22; temp > 38, HR > 90, RR > 20
    assert first["missing_inputs"] == [] and first["on_oxygen"] is False and first["spo2_scale"] == 1
    assert len(first["input_observation_ids"]) == 7 and first["encounter_key"] == "enc-p1"
    assert (s[30]["news2_score"], s[30]["news2_band"], s[30]["pulse"], s[30]["respiratory_rate"]) == (
        8, "high", 135.0, 22.0)
    late = s[300]
    assert late["news2_partial"] is True and late["news2_pulse"] == 0 and late["news2_score"] == 0
    assert set(late["missing_inputs"]) == {"news2_respiratory_rate", "news2_spo2", "news2_supplemental_o2",
                                           "news2_systolic_bp", "news2_consciousness", "news2_temperature"}
    assert set(late["stale_inputs"]) == {"respiratory_rate", "spo2", "fio2", "systolic_bp", "consciousness",
                                         "temperature"}
    assert late["respiratory_rate"] is None and late["silver_version"] is not None

    alerts = {(a["level"], minutes(a["opened_at"])): a for a in lake.alerts("p1")}
    assert set(alerts) == {("news2_medium", 0), ("news2_high", 30)}
    medium, high = alerts[("news2_medium", 0)], alerts[("news2_high", 30)]
    assert (medium["status"], minutes(medium["resolved_at"]), minutes(medium["escalated_at"])) == ("resolved", 300, 30)
    assert medium["escalated_to"] == high["alert_id"] and medium["peak_news2_score"] == 8
    assert sorted(medium["observation_ids"]) == sorted(first["input_observation_ids"])
    assert (high["status"], minutes(high["resolved_at"]), high["news2_score"]) == ("resolved", 300, 8)

    features = [r for r in lake.store.read_arrow(FEATURES).to_pylist() if r["patient_key"] == "p1"]
    at30 = next(r for r in features if minutes(r["scored_at"]) == 30)
    assert at30["hr_last"] == 135.0 and at30["hr_change_1h"] is None and at30["hr_count_1h"] == 2

    # A replay of the same silver versions changes nothing.
    versions = (lake.store.version(SCORES), lake.store.version(ALERTS))
    lake.run()
    assert (lake.store.version(SCORES), lake.store.version(ALERTS)) == versions


def test_late_reading_rescores_later_rows_and_moves_the_alert(lake):
    lake.add(vitals("p1", 0, rr=22, spo2=95, fio2=21, sbp=105, hr=95, acvpu="A", temp=38.5))
    lake.add(vitals("p1", 30, hr=135))
    lake.run()
    before = {(a["level"], minutes(a["opened_at"])): a for a in lake.alerts("p1")}
    assert before[("news2_high", 30)]["status"] == "open" and before[("news2_medium", 0)]["status"] == "open"

    lake.add(vitals("p1", 15, sbp=85))  # arrives late: SBP 85 scores 3 from 10:15 on
    lake.run()
    s = lake.scores("p1")
    assert (s[15]["news2_score"], s[15]["news2_band"]) == (8, "high")
    assert (s[30]["news2_score"], s[30]["systolic_bp"], s[30]["qsofa_score"]) == (10, 85.0, 2)
    after = {(a["level"], minutes(a["opened_at"])): a for a in lake.alerts("p1")}
    assert after[("news2_high", 30)]["status"] == "withdrawn"  # kept for audit, no longer an open alert
    assert after[("news2_high", 15)]["status"] == "open"
    assert after[("qsofa", 15)]["status"] == "open"  # RR 22 and SBP 85
    assert minutes(after[("news2_medium", 0)]["escalated_at"]) == 15
    open_per_level = {}
    for a in lake.alerts("p1"):
        if a["status"] == "open":
            open_per_level[a["level"]] = open_per_level.get(a["level"], 0) + 1
    assert open_per_level == {"news2_medium": 1, "news2_high": 1, "qsofa": 1}


def test_readings_retracted_or_moved_to_another_patient_withdraw_the_old_score_and_its_alert(lake):
    from pipelines.store.base import MergeSpec

    lake.add(vitals("p1", 0, rr=16, spo2=97, fio2=21, sbp=120, hr=75, acvpu="A", temp=37.0))
    lake.add(vitals("p2", 0, rr=16, spo2=97, fio2=21, sbp=120, hr=75, acvpu="A", temp=37.0))
    rr, sbp = vitals("p1", 30, rr=25, sbp=90)  # RR 25 -> 3, SBP 90 -> 3: NEWS2 6 (medium), qSOFA 2
    lake.add([rr, sbp])
    # p3: medium and qSOFA 2 at 10:00, normal at 10:20, and a pulse at 11:30 that shows 70 min out of both levels:
    # the alerts resolve (gold.alert_resolve_after 1 h) at 10:20 - but only as long as that pulse counts.
    lake.add(vitals("p3", 0, rr=25, spo2=97, fio2=21, sbp=90, hr=75, acvpu="A", temp=37.0)
             + vitals("p3", 20, rr=16, sbp=120))
    proof = vitals("p3", 90, hr=75)[0]
    # A reading already retracted when it first reaches gold, alone in its minute: nothing to keep, nothing to score.
    lake.add([proof, obs("p2", "hr", 70, 50, status="entered-in-error")])
    lake.run()
    assert sorted(lake.scores("p1")) == [0, 30] and lake.scores("p1")[30]["news2_band"] == "medium"
    assert {(a["level"], a["status"]) for a in lake.alerts("p1")} == {("news2_medium", "open"), ("qsofa", "open")}
    assert [(a["level"], a["status"], minutes(a["resolved_at"])) for a in lake.alerts("p3")] == [
        ("news2_medium", "resolved", 20), ("qsofa", "resolved", 20)]

    def correct(row: dict) -> None:
        lake.store.merge(OBSERVATIONS, pa.Table.from_pylist([row], schema=lake.arrow_schema),
                         MergeSpec(keys=("observation_id",)))
        lake.run()

    # The respiratory rate belonged to p2, charted a minute later: p1 is rescored from 10:30 without it.
    correct({**rr, "patient_key": "p2", "encounter_key": "enc-p2", "effective_at": T0 + timedelta(minutes=31),
             "source_version": "2"})
    p1, p2 = lake.scores("p1"), lake.scores("p2")
    assert (p1[30]["respiratory_rate"], p1[30]["news2_score"], p1[30]["news2_band"]) == (16.0, 3, "low-medium")
    assert rr["observation_id"] not in p1[30]["input_observation_ids"]
    assert {(a["level"], a["status"]) for a in lake.alerts("p1")} == {("news2_medium", "withdrawn"),
                                                                      ("qsofa", "withdrawn")}
    assert sorted(p2) == [0, 31]
    assert (p2[31]["respiratory_rate"], p2[31]["news2_score"], p2[31]["news2_band"]) == (25.0, 3, "low-medium")
    assert rr["observation_id"] in p2[31]["input_observation_ids"]

    # The blood pressure was entered in error: p1 has no reading left at 10:30, and no score row there. p3's
    # pulse was too: nothing shows p3 70 min out of the levels any more, so its alerts are open again.
    late_retracted = obs("p2", "hr", 70, 55, status="entered-in-error")  # and another, once the tables exist
    lake.store.merge(OBSERVATIONS, pa.Table.from_pylist([{**row, "status": "entered-in-error", "source_version": "2"}
                                                         for row in (sbp, proof)] + [late_retracted],
                                                        schema=lake.arrow_schema),
                     MergeSpec(keys=("observation_id",)))
    lake.run()
    assert sorted(lake.scores("p1")) == [0] and sorted(lake.scores("p3")) == [0, 20]
    assert [(a["level"], a["status"], a["resolved_at"]) for a in lake.alerts("p3")] == [
        ("news2_medium", "open", None), ("qsofa", "open", None)]
    assert not [r for r in lake.store.read_arrow(FEATURES).to_pylist()
                if (r["patient_key"], r["scored_at"]) == ("p1", T0 + timedelta(minutes=30))]
    from gold.early_warning_scores import MINUTES
    assert {(r["patient_key"], r["minute"].minute) for r in lake.store.read_arrow(MINUTES).to_pylist()} == {
        ("p1", 0), ("p2", 0), ("p2", 31), ("p3", 0), ("p3", 20)}  # emptied minutes (p1 10:30, p3 11:30) are deleted


def test_feeds_of_one_person_score_together_and_scale2(lake):
    # HL7 / monitors key the MRN identity; FHIR Observations the Patient/<id> identity linked to it.
    lake.link("fhir-p2", "p2")
    lake.add(vitals("p2", 0, rr=16, fio2=21, sbp=120, hr=70, acvpu="A", temp=37.0))
    lake.add(vitals("fhir-p2", 5, spo2=88))
    lake.add([obs("p2", "problem", "13645005", -600, code="11450-4")])  # COPD on the problem list: scale 2
    lake.run()
    s = lake.scores("p2")
    assert "fhir-p2" not in {r["patient_key"] for r in lake.store.read_arrow(SCORES).to_pylist()}
    assert s[5]["spo2"] == 88.0 and s[5]["spo2_scale"] == 2 and s[5]["news2_spo2"] == 0
    assert (s[5]["news2_score"], s[5]["news2_partial"]) == (0, False)
    assert s[0]["news2_partial"] is True and s[0]["missing_inputs"] == ["news2_spo2"]


def test_an_identity_merged_into_another_person_closes_its_open_alerts_as_merged(lake):
    """ADT A40 / FHIR replaced-by: the merged identity's open alerts become `merged` in the next batch, its score
    rows stay, and its readings score under the survivor, whose own alert carries the finding on."""
    bad = dict(rr=26, spo2=90, fio2=21, sbp=88, hr=135, acvpu="A", temp=38.5)  # NEWS2 13 (high), qSOFA 2
    lake.add(vitals("x1", 0, **bad) + vitals("x2", 0, **bad))
    lake.run()
    levels = ("news2_medium", "news2_high", "qsofa")
    assert {a["level"]: a["status"] for a in lake.alerts("x1")} == dict.fromkeys(levels, "open")
    lake.link("x1", "p7")
    lake.add(vitals("p7", 5, hr=136))  # the survivor's first reading: x1's other inputs carry forward
    lake.run()
    assert {a["level"]: a["status"] for a in lake.alerts("x1")} == dict.fromkeys(levels, "merged")
    assert sorted(lake.scores("x1")) == [0]
    s = lake.scores("p7")
    assert (s[5]["news2_band"], s[5]["respiratory_rate"], s[5]["pulse"]) == ("high", 26.0, 136.0)
    assert {(a["level"], a["status"], minutes(a["opened_at"])) for a in lake.alerts("p7")} == {
        (level, "open", 5) for level in levels}
    assert {a["level"]: a["status"] for a in lake.alerts("x2")} == dict.fromkeys(levels, "open")
    lake.link("x2", "p8")  # a later merge: found though x1 was already cleared
    lake.add(vitals("p7", 6, hr=137))  # later batches leave the merged identity alone
    lake.run()
    assert {a["level"]: a["status"] for a in lake.alerts("x1")} == dict.fromkeys(levels, "merged")
    assert {a["level"]: a["status"] for a in lake.alerts("x2")} == dict.fromkeys(levels, "merged")
    assert sorted(lake.scores("x1")) == [0] and len(lake.alerts("p7")) == 3


def test_scale2_marker_from_its_own_batch_counts_later_and_stops_when_entered_in_error(lake):
    """The score job keeps hypercapnic-target markers as silver rows stream past (gold.spo2_scale2_markers), so a
    marker that came in a batch without any vital sign still sets scale 2 later, and its retraction ends it."""
    from gold.early_warning_scores import SCALE2

    base = dict(rr=16, fio2=21, sbp=120, hr=70, acvpu="A", temp=37.0)
    lake.add(vitals("p5", 0, spo2=88, **base))
    lake.run()
    assert lake.scores("p5")[0]["spo2_scale"] == 1  # no marker yet: scale 1, SpO2 88 scores 3
    marker = obs("p5", "problem", "J96.12", -60, code="11450-4")
    lake.add([marker])  # a batch of its own: nothing to score in it
    lake.run()
    kept = [r for r in lake.store.read_arrow(SCALE2).to_pylist() if r["patient_key"] == "p5"]
    assert [(r["observation_id"], r["status"]) for r in kept] == [(marker["observation_id"], "final")]
    lake.add(vitals("p5", 10, spo2=88, **base))
    lake.run()
    s = lake.scores("p5")
    assert (s[10]["spo2_scale"], s[10]["news2_spo2"]) == (2, 0)
    lake.add([{**marker, "status": "entered-in-error", "source_version": "2"}])  # silver appends the retraction
    lake.add(vitals("p5", 20, spo2=88, **base))
    lake.run()
    s = lake.scores("p5")
    assert (s[20]["spo2_scale"], s[20]["news2_spo2"]) == (1, 3)
    assert [r["status"] for r in lake.store.read_arrow(SCALE2).to_pylist()] == ["entered-in-error"]


def test_recompute_from_reaches_back_to_running_episodes_also_when_two_open_at_once():
    from gold.deterioration_alerts import _recompute_from

    at = [T0 + timedelta(minutes=m) for m in range(6)]
    # Two levels opened at the same instant (medium and qsofa): one still open, one resolved. Regression: sorting
    # the (opened, resolved) pairs compared None with a time and failed the alert job in the demo.
    known = [{"patient_key": "p", "opened_at": at[1], "resolved_at": None},
             {"patient_key": "p", "opened_at": at[1], "resolved_at": at[2]},
             {"patient_key": "q", "opened_at": at[0], "resolved_at": at[1]},  # over before q's change
             {"patient_key": "r", "opened_at": at[0], "resolved_at": at[4]},  # running at r's change, and
             {"patient_key": "r", "opened_at": at[3], "resolved_at": None}]   # so is this one, opened later
    starts = _recompute_from({"p": at[3], "q": at[3], "r": at[3] + timedelta(seconds=30)}, known, timedelta(0))
    assert starts == {"p": at[1], "q": at[3], "r": at[0]}
    # q's episode resolved 2 min before its change: within a 5 min resolve_after a row back in the level would
    # continue it, so it is recomputed whole; within 1 min it stays over.
    changed = {"p": at[3], "q": at[3], "r": at[3]}
    assert _recompute_from(changed, known, timedelta(minutes=5))["q"] == at[0]
    assert _recompute_from(changed, known, timedelta(minutes=1))["q"] == at[3]


def test_alert_hysteresis_one_alert_for_a_finding_that_flickers(lake):
    """A finding back within gold.alert_resolve_after (1 h) continues its alert; after longer out, a new alert;
    an alert stays open until a score that much later shows the patient stayed out."""
    base = dict(rr=26, spo2=97, fio2=21, sbp=120, acvpu="A", temp=37.0)  # RR 26 scores 3
    # Pulse 140 (3) <-> 80 (0): NEWS2 6 (medium) <-> 3 (low-medium) every 10 min, then out from 60 to 130 (70 min),
    # back in at 200, out again at 210 with nothing later.
    for m, hr in [(0, 80), (10, 140), (20, 80), (30, 140), (40, 80), (50, 140), (60, 80), (130, 80), (200, 140),
                  (210, 80)]:
        lake.add(vitals("p4", m, hr=hr, **base))
    lake.run()
    medium = [a for a in lake.alerts("p4") if a["level"] == "news2_medium"]
    assert [(minutes(a["opened_at"]), minutes(a["last_scored_at"]), a["status"], minutes(a["resolved_at"]))
            for a in medium] == [(10, 50, "resolved", 60), (200, 200, "open", None)]
    assert medium[0]["alert_id"] != medium[1]["alert_id"] and medium[0]["peak_news2_score"] == 6


def test_history_read_in_minutes_gives_exactly_the_scores_features_and_alerts_of_every_row(
        tmp_path, spark, monkeypatch):
    """A monitor's history before the batch is read from gold.vitals_minutes, which the score job keeps: the same
    gold rows as reading silver row by row, at window edges, ties, an encounter change, a retraction, a late
    reading, a retraction in a minute that only a later batch reads back, and a person charted under two linked
    identities."""
    from pyspark.sql.pandas.types import to_arrow_schema

    from gold import early_warning_scores as ews
    from gold.features import FEATURE_CONCEPTS
    from pipelines.jobs import load_registry
    from pipelines.runner import Runner, Trigger
    from pipelines.store import MergeSpec, open_store
    from tests.conftest import make_config

    def rows_until(first: float, last: float, every_s: int, patient: str, enc_switch: float | None = None,
                   encounter: bool = True):
        out, t = [], first * 60
        while t < last * 60:
            m = t / 60
            values = {"hr": 80 + (t % 17), "rr": 16 + (t % 9), "spo2": 93 + (t % 5), "sbp": 100 + (t % 40),
                      "temp": 37 + (t % 3) / 2, "fio2": 21}
            rows = [obs(patient, c, v, m) for c, v in values.items()]
            if t % 60 == 0:
                rows.append(obs(patient, "acvpu", "A" if t % 600 else "V", m))
            if t % 180 == 0:
                rows.append(obs(patient, "lactate", 1.5 + (t % 7) / 10, m))
            for r in rows:
                r["encounter_key"] = (None if not encounter else f"enc-{patient}-b"
                                      if enc_switch is not None and m >= enc_switch else r["encounter_key"])
            out += rows
            t += every_s
        return out

    def tied(patient: str, concept: str, value, minutes: float, tag: str, **changes):
        row = {**obs(patient, concept, value, minutes), **changes}
        row["observation_id"] = hashlib.sha256(f"{row['observation_id']}|{tag}".encode()).hexdigest()[:32]
        return row

    # Batch 2 scores p1 and p3 from 40:00 (p2 from its late reading at 25:00) with windows 5 and 15 min: for p1
    # the minutes 25-28, 35-38 and 40 on hold probes (read row by row); 20-24, 29-34 and 39 come from the table.
    # p2 is also charted under a FHIR identity linked to it (silver.patients), at other instants: one person.
    history = [*rows_until(0, 40, 7, "p1", enc_switch=22.5), *rows_until(0, 40, 120, "p2"),
               *rows_until(0.75, 40, 300, "p2-fhir"), *rows_until(0, 40, 30, "p3", encounter=False)]
    extra = [
        tied("p1", "hr", 131, 31.5, "a"), tied("p1", "hr", 60, 31.5, "b"),  # ties in a rolled-up minute
        tied("p1", "hr", 129, 35, "a"), tied("p1", "temp", 39.4, 35, "a"),  # ties at a 5-min probe instant
        obs("p1", "rr", 30, 32, status="entered-in-error"),  # a retraction in a rolled-up minute
        # p3 carries no encounter but at 21:00, where two inputs name two: the larger is carried forward.
        tied("p3", "hr", 90, 21, "x", encounter_key="enc-x1"), tied("p3", "rr", 18, 21, "x", encounter_key="enc-x2"),
    ]
    tail = [*rows_until(40, 43, 7, "p1", enc_switch=22.5), *rows_until(40, 42, 120, "p2"),
            *rows_until(40.75, 42, 300, "p2-fhir"), *rows_until(40, 41, 30, "p3", encounter=False),
            obs("p2", "hr", 140, 25)]
    # Batch 2 also retracts p3's lactate at 33:00 (no score input: nothing is rescored for it, but p3's later
    # 15-min windows count one reading less), and brings p3 a late heart rate at 34:10, p1 a late temperature.
    retracted = [obs("p3", "lactate", 1.5 + (33 * 60 % 7) / 10, 33, status="entered-in-error")]
    late = [{**obs("p3", "hr", 150, 34 + 1 / 6), "encounter_key": None}, obs("p1", "temp", 38.9, 31.2)]
    # Batch 3: p3 is scored from 41:00; its minutes 28-35 come from the table, as batch 2 left them.
    tail2 = [*rows_until(41, 42, 30, "p3", encounter=False), *rows_until(43, 44, 7, "p1", enc_switch=22.5)]
    seen: list[int] = []
    as_of = ews._as_of

    def spy(history_rows, inputs):
        seen.append(history_rows.count())
        return as_of(history_rows, inputs)

    monkeypatch.setattr(ews, "_as_of", spy)

    def gold(roll_up: bool, root) -> dict[str, list]:
        monkeypatch.setattr(ews, "ROLL_UP", roll_up)
        cfg = make_config(root, **{"gold.feature_windows": ["5m", "15m"], "gold.history": "20m",
                                   "gold.lookback": "10m", "gold.alert_resolve_after": "5m"})
        store = open_store(cfg, spark)
        runner = Runner(cfg, spark, store, load_registry(cfg))
        schema = to_arrow_schema(OBS_SCHEMA)
        link = {"patient_key": "p2-fhir", "identity_kind": "fhir-patient", "merged_into": "p2", "ingested_at": T0}
        store.append(PATIENTS, pa.Table.from_pylist([link], schema=to_arrow_schema(PATIENT_SCHEMA)))
        for n, batch in enumerate(([*history, *extra], [*tail, *late], tail2)):
            if n == 1:
                store.merge(OBSERVATIONS, pa.Table.from_pylist(retracted, schema=schema),
                            MergeSpec(keys=("observation_id",)))
            store.append(OBSERVATIONS, pa.Table.from_pylist(batch, schema=schema))
            runner.run([SCORES], Trigger(available_now=True))
        provenance = {"silver_version", "scores_version", "code_version", "computed_by", "computed_at"}

        def comparable(row: dict) -> tuple:
            return tuple(sorted((k, round(v, 9) if isinstance(v, float) else tuple(v) if isinstance(v, list) else v)
                                for k, v in row.items() if k not in provenance))

        out = {t: sorted(map(comparable, store.read_arrow(t).to_pylist()), key=repr)
               for t in (SCORES, FEATURES, ALERTS)}
        out["minutes"] = store.read_arrow(ews.MINUTES).to_pylist()
        return out

    rolled, row_by_row = gold(True, tmp_path / "rolled"), gold(False, tmp_path / "rows")
    assert len(seen) == 6
    # The later batches read their history in minutes (batch 2 rescores p1 from 31:12, so most of it row by row).
    assert seen[1] < seen[4] and seen[2] < 0.75 * seen[5], seen
    rows = {r["observation_id"]: r for r in [*history, *extra, *tail, *late, *tail2]}
    rows.update({r["observation_id"]: r for r in retracted})
    points = {(r["patient_key"].removesuffix("-fhir"), r["effective_at"]) for r in rows.values()
              if r["status"] == "final"}
    assert len(rolled[SCORES]) == len(points)
    p3 = [dict(r) for r in rolled[SCORES] if dict(r)["patient_key"] == "p3"]
    assert {r["encounter_key"] for r in p3 if minutes(r["scored_at"]) >= 40} == {"enc-x2"}
    p2 = {minutes(dict(r)["scored_at"]): dict(r) for r in rolled[SCORES] if dict(r)["patient_key"] == "p2"}
    assert p2[40.75]["encounter_key"] == "enc-p2-fhir" and p2[40]["encounter_key"] == "enc-p2"  # both feeds, one row
    assert not [r for r in rolled[SCORES] if dict(r)["patient_key"] == "p2-fhir"]
    assert {a for r in rolled[ALERTS] for k, a in r if k == "level"}  # alerts were raised to compare
    for table in (SCORES, FEATURES, ALERTS):
        assert rolled[table] == row_by_row[table], table
    # The table holds each minute's readings as silver holds them now: the retracted lactate no longer counts.
    counts: dict[tuple, int] = {}
    for r in rows.values():
        if r["status"] == "final" and r["concept"] in FEATURE_CONCEPTS:
            key = (r["patient_key"], r["concept"], r["effective_at"].replace(second=0, microsecond=0))
            counts[key] = counts.get(key, 0) + 1
    kept = {(r["patient_key"], r["concept"], r["minute"].replace(tzinfo=UTC)): r["readings"]
            for r in rolled["minutes"] if r["readings"]}
    assert kept == counts
    assert not [r for r in rolled["minutes"]  # its minute held nothing else: the row is gone
                if (r["patient_key"], r["concept"], r["minute"].minute) == ("p3", "lactate", 33)]
    assert all(r["readings"] or r["pick_at"] for r in rolled["minutes"])


def test_a_lakehouse_scored_before_the_minutes_table_gets_all_its_minutes_once(lake, tmp_path, spark):
    """An upgrade: scores exist, gold.vitals_minutes does not. The next batch fills it from all of silver, so the
    features of its points count the readings of every earlier minute."""
    import shutil

    from gold.early_warning_scores import MINUTES
    from pipelines.jobs import load_registry
    from pipelines.runner import Runner, Trigger
    from pipelines.store import open_store
    from tests.conftest import make_config

    for m in range(0, 30, 3):
        lake.add(vitals("p1", m, hr=80 + m, rr=16) + vitals("p2", m + 1, hr=90))
    lake.run()
    # The lakehouse as an earlier release left it: everything but the minutes table (a copy: delta-rs remembers
    # the tables this process has read).
    root = tmp_path / "upgraded"
    shutil.copytree(lake.cfg.root, root, ignore=lambda folder, names: ["vitals_minutes"] if "gold" in folder else [])
    cfg = make_config(root)
    store = open_store(cfg, spark)
    assert not store.exists(MINUTES) and store.exists(SCORES)
    store.append(OBSERVATIONS, pa.Table.from_pylist(vitals("p1", 100, hr=70), schema=lake.arrow_schema))
    Runner(cfg, spark, store, load_registry(cfg)).run([SCORES], Trigger(available_now=True))

    kept = {(r["patient_key"], r["concept"], int(minutes(r["minute"].replace(tzinfo=UTC)))): r["readings"]
            for r in store.read_arrow(MINUTES).to_pylist()}
    expected = {**{("p1", c, m): 1 for m in range(0, 30, 3) for c in ("hr", "rr")},
                **{("p2", "hr", m + 1): 1 for m in range(0, 30, 3)}, ("p1", "hr", 100): 1}
    assert kept == expected
    at100 = next(r for r in store.read_arrow(FEATURES).to_pylist()
                 if r["patient_key"] == "p1" and minutes(r["scored_at"]) == 100)
    assert (at100["hr_count_4h"], at100["hr_count_1h"], at100["hr_last"]) == (11, 1, 70.0)
    scores = store.read_arrow(SCORES).to_pylist()
    last = max(r["computed_at"] for r in scores)  # the upgraded job went on from its checkpoint: one new point
    assert [(r["patient_key"], minutes(r["scored_at"])) for r in scores if r["computed_at"] == last] == [("p1", 100)]


def test_times_collected_across_a_daylight_saving_change_come_back_as_the_same_utc_instants(spark):
    """Spark hands timestamps to Python as naive local times; the score job makes them aware UTC at once
    (`_utc`). Under a zone with daylight saving, the hour that happens twice (01:00-02:00 BST then GMT on
    2026-10-25 in London) must not fold into one, and minute arithmetic must stay in UTC."""
    import os
    import time

    from gold import early_warning_scores as ews

    before = os.environ.get("TZ")
    os.environ["TZ"] = "Europe/London"
    time.tzset()
    try:
        instants = [datetime(2026, 10, 25, 0, 15, 30, tzinfo=UTC) + timedelta(minutes=20 * k) for k in range(8)]
        rows = spark.createDataFrame([(t,) for t in instants], "at timestamp").orderBy("at").collect()
        back = [ews._utc(r["at"]) for r in rows]
        assert back == instants and len(set(back)) == len(instants)
        floors = [ews._minute_floor(t) for t in back]
        assert [(f.hour, f.minute, f.second) for f in floors] == [(t.hour, t.minute, 0) for t in instants]
        assert all(f.tzinfo == UTC for f in floors)
    finally:
        if before is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = before
        time.tzset()
