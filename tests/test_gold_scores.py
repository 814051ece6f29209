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
    return make_lake(tmp_path, spark)


def make_lake(tmp_path, spark, **overrides):
    from pyspark.sql.pandas.types import to_arrow_schema

    from pipelines.jobs import load_registry
    from pipelines.runner import Runner, Trigger
    from pipelines.store import open_store
    from tests.conftest import make_config

    cfg = make_config(tmp_path / "lake", **overrides)
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
    rows stay, and its readings score under the survivor, whose own alerts carry the finding on from when the
    person (under either identity) first showed it."""
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
        (level, "open", 0) for level in levels}
    assert {a["level"]: a["status"] for a in lake.alerts("x2")} == dict.fromkeys(levels, "open")
    lake.link("x2", "p8")  # a later merge: found though x1 was already cleared
    lake.add(vitals("p7", 6, hr=137))  # later batches leave the merged identity alone
    lake.run()
    assert {a["level"]: a["status"] for a in lake.alerts("x1")} == dict.fromkeys(levels, "merged")
    assert {a["level"]: a["status"] for a in lake.alerts("x2")} == dict.fromkeys(levels, "merged")
    assert sorted(lake.scores("x1")) == [0] and len(lake.alerts("p7")) == 3


def test_scale2_applies_from_the_marker_on_also_when_it_arrives_late_and_ends_with_its_retraction(lake):
    """SpO2 scale 2 holds from the time of a recorded hypercapnic target on: a marker that arrives later than the
    readings after it (in a batch of its own, with nothing to score) rescores them, and its retraction rescores
    them back to scale 1."""
    from pipelines.store.base import MergeSpec

    base = dict(rr=16, fio2=21, sbp=120, hr=70, acvpu="A", temp=37.0)
    lake.add(vitals("p5", 0, spo2=88, **base))
    lake.run()
    assert lake.scores("p5")[0]["spo2_scale"] == 1  # no marker yet: scale 1, SpO2 88 scores 3
    marker = obs("p5", "problem", "J96.12", -60, code="11450-4")
    lake.add([marker])  # a batch of its own, dated an hour before the reading
    lake.run()
    assert (lake.scores("p5")[0]["spo2_scale"], lake.scores("p5")[0]["news2_spo2"]) == (2, 0)
    lake.add(vitals("p5", 10, spo2=88, **base))
    lake.run()
    assert (lake.scores("p5")[10]["spo2_scale"], lake.scores("p5")[10]["news2_spo2"]) == (2, 0)
    lake.store.merge(OBSERVATIONS, pa.Table.from_pylist([{**marker, "status": "entered-in-error",
                                                          "source_version": "2"}], schema=lake.arrow_schema),
                     MergeSpec(keys=("observation_id",)))
    lake.add(vitals("p5", 20, spo2=88, **base))
    lake.run()
    s = lake.scores("p5")
    assert [(m, s[m]["spo2_scale"], s[m]["news2_spo2"]) for m in (0, 10, 20)] == [(0, 1, 3), (10, 1, 3), (20, 1, 3)]


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


def _stay_rows(patient: str, seed: int, hours: float, *, alias: str | None = None) -> list[dict]:
    """A person's silver rows: monitor sets every ~2-4 min with a deterioration from a random hour, ward checks,
    labs, ACVPU, some values as FHIR (under `alias`, an identity linked to the person)."""
    import random

    rng = random.Random(seed)
    out, m = [], 0.0
    sick_from = rng.uniform(2, hours - 4) * 60
    while m < hours * 60:
        sick = max(0.0, (m - sick_from) / 180)
        who = alias if alias and rng.random() < 0.3 else patient
        values = dict(hr=round(78 + 45 * sick + rng.gauss(0, 4), 1), rr=round(15 + 11 * sick + rng.gauss(0, 1.5)),
                      spo2=round(97 - 9 * sick + rng.gauss(0, 1)))
        if rng.random() < 0.3:
            values |= dict(sbp=round(124 - 38 * sick + rng.gauss(0, 6)), dbp=round(74 - 14 * sick))
        if rng.random() < 0.1:
            values |= dict(temp=round(37 + 1.9 * sick + rng.gauss(0, 0.2), 1), acvpu=rng.choice("AAAAV"))
        if rng.random() < 0.05:
            values |= dict(fio2=rng.choice([21.0, 35.0]))
        out += [obs(who, c, v, m) for c, v in values.items()]
        if rng.random() < 0.03:
            out.append(obs(patient, "wbc", round(8 + 9 * sick, 1), m - rng.uniform(1, 30)))
        m += rng.uniform(2, 4)
    return out


def test_streaming_scores_equal_a_recompute_of_the_same_silver(lake, tmp_path, spark):
    """The differential test: scores, features and alerts the stream computed batch by batch from its state (late
    readings inside and beyond the state's tail, corrections, a retraction, a linked identity, a scale-2 marker)
    equal a recompute over the same silver rows in a fresh lakehouse, row for row."""
    import random

    from pipelines.store.base import MergeSpec

    lake.link("fhir-pa", "pa")
    rows = (_stay_rows("pa", 1, 10, alias="fhir-pa") + _stay_rows("pb", 2, 10) + _stay_rows("pc", 3, 6)
            + [obs("pb", "problem", "J96.12", 200, code="11450-4")])
    rng = random.Random(9)
    rows.sort(key=lambda r: r["effective_at"])
    chunks: list[list[dict]] = [list(rows[i * len(rows) // 6:(i + 1) * len(rows) // 6]) for i in range(6)]
    # Late inside the state's tail: the last minutes of a chunk arrive in a batch of their own after it.
    tail_end = chunks[1][-1]["effective_at"]
    late = [r for r in chunks[1] if r["effective_at"] > tail_end - timedelta(minutes=5) and rng.random() < 0.5]
    chunks[1] = [r for r in chunks[1] if r not in late]
    chunks.insert(2, late)
    # Late beyond the tail: a reading of the first hours arrives with the last batch.
    far = next(r for r in chunks[0] if r["concept"] == "rr" and r["patient_key"] == "pb")
    chunks[0].remove(far)
    chunks[-1].append(far)
    for k, chunk in enumerate(chunks):
        lake.add(chunk)
        if k == 4:  # corrections of rows already scored: a value, a time, a retraction
            fixed = rng.sample([r for r in chunks[3] if r["concept"] in ("hr", "rr", "spo2")], 6)
            corrected = [{**fixed[0], "value": fixed[0]["value"] + 30, "source_version": "2"},
                         {**fixed[1], "effective_at": fixed[1]["effective_at"] + timedelta(minutes=1),
                          "source_version": "2"},
                         *[{**r, "status": "entered-in-error", "source_version": "2"} for r in fixed[2:]]]
            lake.store.merge(OBSERVATIONS, pa.Table.from_pylist(corrected, schema=lake.arrow_schema),
                             MergeSpec(keys=("observation_id",)))
        lake.run()

    table = _assert_stream_equals_recompute(lake, tmp_path, spark)
    scores = table(lake.store, SCORES, ("patient_key", "scored_at"))
    assert {k[0] for k in scores} == {"pa", "pb", "pc"} and len(scores) > 500
    assert any(r["spo2_scale"] == 2 for r in scores.values())
    alerts = table(lake.store, ALERTS, ("alert_id",)).values()
    assert {a["level"] for a in alerts} >= {"news2_medium", "news2_high"}


def _assert_stream_equals_recompute(lake, tmp_path, spark):
    """Every score, feature and alert row the stream wrote equals a recompute of the same silver rows in a fresh
    lakehouse (withdrawn alerts aside); returns the table reader for further checks."""
    from pipelines.jobs import load_registry
    from pipelines.runner import Runner
    from pipelines.store import open_store
    from tests.conftest import make_config

    # A fresh lakehouse with the same silver rows, recomputed in one pass.
    cfg2 = make_config(tmp_path / "again")
    store2 = open_store(cfg2, spark)
    store2.append(OBSERVATIONS, lake.store.read_arrow(OBSERVATIONS))
    if lake.store.exists(PATIENTS):
        store2.append(PATIENTS, lake.store.read_arrow(PATIENTS))
    Runner(cfg2, spark, store2, load_registry(cfg2)).recompute(SCORES, T0 - timedelta(days=1), T0 + timedelta(days=1))

    provenance = {"silver_version", "scores_version", "code_version", "computed_by", "computed_at"}

    def table(store, name, key):
        out = {}
        for r in store.read_arrow(name).to_pylist():
            if name == ALERTS and r["status"] == "withdrawn":
                continue  # the stream's record of an episode later data dissolved: history, not a result
            out[tuple(r[k] for k in key)] = {c: v for c, v in r.items() if c not in provenance}
        return out

    for name, key in ((SCORES, ("patient_key", "scored_at")), (FEATURES, ("patient_key", "scored_at")),
                      (ALERTS, ("alert_id",))):
        streamed, recomputed = table(lake.store, name, key), table(store2, name, key)
        assert streamed.keys() == recomputed.keys(), (name, sorted(set(streamed) ^ set(recomputed))[:5])
        differ = [(k, c, streamed[k][c], recomputed[k][c]) for k in streamed for c in streamed[k]
                  if streamed[k][c] != recomputed[k][c] and not (streamed[k][c] != streamed[k][c]
                                                                  and recomputed[k][c] != recomputed[k][c])]
        assert not differ, (name, differ[:5])
    return table


def test_the_score_state_has_its_own_partitions_and_the_session_keeps_its_own(tmp_path, spark):
    from pyspark.sql.pandas.types import to_arrow_schema

    from pipelines.jobs import load_registry
    from pipelines.runner import Runner, Trigger
    from pipelines.store import open_store
    from tests.conftest import make_config

    cfg = make_config(tmp_path / "lake", **{"gold.state_partitions": 3})
    store = open_store(cfg, spark)
    store.append(OBSERVATIONS, pa.Table.from_pylist(vitals("p1", 0, rr=16, hr=70) + vitals("p2", 0, hr=120),
                                                    schema=to_arrow_schema(OBS_SCHEMA)))
    before = spark.conf.get("spark.sql.shuffle.partitions")
    Runner(cfg, spark, store, load_registry(cfg)).run([SCORES], Trigger(available_now=True))
    assert spark.conf.get("spark.sql.shuffle.partitions") == before == "2"
    state = cfg.path("_checkpoints", SCORES, "state", "0")
    assert sorted(p.name for p in state.iterdir() if p.name.isdigit()) == ["0", "1", "2"]
    assert {r["patient_key"] for r in store.read_arrow(SCORES).to_pylist()} == {"p1", "p2"}


def test_a_checkpoint_from_before_the_job_kept_state_is_set_aside_and_the_job_starts_over(lake):
    lake.add(vitals("p1", 0, rr=16, hr=70))
    old = lake.cfg.path("_checkpoints", SCORES)
    (old / "commits").mkdir(parents=True)
    (old / "commits" / "0").write_text("v1\n{}\n")  # what a stateless query's checkpoint holds, no state/
    (old / "metadata").write_text('{"id":"00000000-0000-0000-0000-000000000000"}\n')
    lake.run()
    assert sorted(lake.scores("p1")) == [0]
    aside = [p.name for p in lake.cfg.path("_checkpoints").iterdir() if p.name.startswith(f"{SCORES}.before-state-")]
    assert len(aside) == 1 and (lake.cfg.path("_checkpoints", SCORES) / "state").is_dir()


def test_an_idle_person_sleeps_and_wakes_exactly_or_is_rebuilt(tmp_path, spark):
    """gold.state_idle: a person without changes that long keeps ~150 bytes of state (their alert episode over);
    a late reading that their past can see rebuilds them from silver; readmitted more than `history` after their
    newest reading, they score from the sleeping state. Either way the stream equals a recompute."""
    import time

    from gold import scoring

    lake = make_lake(tmp_path, spark, **{"gold.state_idle": "1s"})
    calm, sick = {"rr": 16, "spo2": 97, "hr": 80, "sbp": 120}, {"rr": 26, "spo2": 90, "hr": 135, "sbp": 95}

    def stay(start: int, end: int, sick_from: int, sick_to: int) -> list[dict]:
        return [r for m in range(start, end, 5)
                for r in vitals("p1", m, **(sick if sick_from <= m < sick_to else calm))]

    def states() -> dict[str, tuple[int, scoring.PersonState]]:
        rows = spark.read.format("statestore").load(str(lake.cfg.path("_checkpoints", SCORES))).collect()
        blobs = {r["key"]["_person"]: bytes(r["value"]["groupState"]["state"]) for r in rows}
        return {person: (len(blob), scoring.PersonState.loads(blob)) for person, blob in blobs.items()}

    def idle_then_someone_else(minute: int) -> None:
        time.sleep(1.5)
        lake.add(vitals("p2", minute, **calm))  # p1's timeout fires in the next batch that runs
        lake.run()

    lake.add(stay(0, 240, 60, 120) + vitals("p2", 0, **calm))
    lake.run()
    idle_then_someone_else(5)
    size, p1 = states()["p1"]
    assert p1.sleeping and size < 300 and not states()["p2"][1].sleeping

    lake.add(vitals("p1", 200, hr=95))  # late, inside what p1's past can see: rebuilt from silver
    lake.run()
    assert not states()["p1"][1].sleeping and 200 in lake.scores("p1")
    idle_then_someone_else(10)
    assert states()["p1"][1].sleeping

    back = 235 + 12 * 60 + 5  # readmitted more than gold.history (12 h) after their newest reading
    lake.add(stay(back, back + 60, back + 20, back + 60))
    lake.run()
    assert not states()["p1"][1].sleeping and back in lake.scores("p1")
    assert [minutes(a["opened_at"]) for a in lake.alerts("p1") if a["level"] == "news2_high"] == [60, back + 20]
    _assert_stream_equals_recompute(lake, tmp_path, spark)
