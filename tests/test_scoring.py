"""The scoring kernel (gold.scoring): a person scored batch by batch from a bounded state gives exactly what one
pass over all of their rows gives (the NumPy NEWS2/qSOFA/SIRS against the Python reference: test_news2.py)."""

from __future__ import annotations

import math
import random

import numpy as np
import pandas as pd
import pytest

from gold import scoring

MIN = 60_000_000  # microseconds
HOUR = 60 * MIN
T0 = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z

SETTINGS = scoring.Settings.from_ms(lookback_ms=30 * 60_000, history_ms=5 * 3_600_000,
                                    windows_ms=[3_600_000, 4 * 3_600_000], horizon_ms=20 * 60_000,
                                    resolve_after_ms=30 * 60_000, scale2_codes=["J96.1"], tail_rows=40)


def _row(oid, concept, t, value=None, text=None, *, code=None, status="final", encounter="E1", gone=False):
    return {"observation_id": oid, "concept": concept, "code": code, "value": value, "value_text": text,
            "status": status, "t": t, "encounter_key": encounter, "gone": gone}


def _stay(seed: int, hours: int = 14) -> list[dict]:
    """One person's rows: a monitor every ~1-3 min, ward rounds, labs, ACVPU (some not a letter), readings
    sharing an instant, value-less rows, a scale-2 marker, an encounter change, and a deterioration."""
    rng = random.Random(seed)
    rows, n = [], 0

    def add(concept, t, value=None, text=None, **kw):
        nonlocal n
        n += 1
        rows.append(_row(f"o{n:05d}", concept, t, value, text, **kw))

    t = T0
    sick_from = T0 + rng.randint(3, 8) * HOUR
    while t < T0 + hours * HOUR:
        sick = max(0.0, (t - sick_from) / (3 * HOUR))
        encounter = "E1" if t < T0 + 6 * HOUR else "E2"
        add("hr", t, round(80 + 40 * sick + rng.gauss(0, 5), 1), encounter=encounter)
        add("rr", t, round(16 + 10 * sick + rng.gauss(0, 2)), encounter=encounter)
        add("spo2", t, round(97 - 8 * sick + rng.gauss(0, 1)), encounter=encounter)
        if rng.random() < 0.3:
            add("sbp", t, round(125 - 35 * sick + rng.gauss(0, 8)), encounter=encounter)
            add("dbp", t, round(75 - 15 * sick + rng.gauss(0, 5)), encounter=encounter)
        if rng.random() < 0.1:
            add("temp", t, round(37 + 1.8 * sick + rng.gauss(0, 0.3), 1), encounter=encounter)
        if rng.random() < 0.05:
            add("acvpu", t, text=rng.choice(["A", "A", "A", "V", "C", "alert?"]), encounter=encounter)
        if rng.random() < 0.05:
            add("fio2", t, rng.choice([21.0, 28.0, 40.0]), encounter=encounter)
        if rng.random() < 0.04:
            add("hr", t, round(85 + rng.gauss(0, 5), 1), encounter=encounter)  # a second reading at the instant
        if rng.random() < 0.02:
            add("rr", t, text="unreadable", encounter=encounter)  # a row with no number
        if rng.random() < 0.02:
            add("wbc", t - rng.randint(1, 10) * MIN, round(9 + 8 * sick, 1), encounter=None)
            add("lactate", t - rng.randint(1, 10) * MIN, round(1 + 3 * sick, 1), encounter=None)
        t += rng.randint(60, 180) * 1_000_000
    add("problem", T0 + rng.randint(1, 10) * HOUR, text="J96.1", code="J96.1", encounter=None)
    return rows


def _deliveries(rows: list[dict], seed: int, max_delay_us: int, corrections: bool = True):
    """(delivered at, row) in delivery order: most rows on time, some late by up to `max_delay_us`; with
    `corrections`, some rows later corrected (value or time) or retracted, each within `max_delay_us`."""
    rng = random.Random(seed)
    out = []
    for r in rows:
        late = rng.random() < 0.1
        out.append((r["t"] + (rng.randint(1, max_delay_us) if late else 0), r))
    if corrections:
        for r in rng.sample(rows, len(rows) // 25):
            at = r["t"] + rng.randint(1, max_delay_us // 2)
            old = {**r, "gone": True}
            kind = rng.random()
            if kind < 0.4:
                new = {**r, "value": None if r["value"] is None else r["value"] + 7}
            elif kind < 0.7:
                new = {**r, "t": r["t"] + rng.randint(-max_delay_us // 4, max_delay_us // 4)}
            else:
                new = {**r, "status": "entered-in-error"}
            out.append((at, old))
            out.append((at, new))
    out.sort(key=lambda x: x[0])
    return out


def _stream(deliveries, batch_us: int, person: str = "P1"):
    """Run the kernel batch by batch; return the score and alert tables the steps' output builds up."""
    state, scores, alerts, requests = None, {}, {}, []
    batch, end = [], None
    for at, r in [*deliveries, (None, None)]:
        if at is not None and (end is None or at < end):
            end = end or at + batch_us
            batch.append(r)
            continue
        if batch:
            out = scoring.step(state, pd.DataFrame(batch, columns=scoring.ROW_COLUMNS), SETTINGS, person=person,
                               now_us=end)
            state = scoring.PersonState.loads(out.state.dumps())  # through the bytes the state store keeps
            for t in out.withdrawn:
                scores.pop(t, None)
            for row in out.scores.frame().to_dict("records"):
                scores[row["scored_at"]] = row
            for row in out.alerts:
                alerts[row["alert_id"]] = row
            if out.recompute:
                requests.append(out.recompute)
        if at is None:
            break
        batch, end = [r], at + batch_us
    return scores, alerts, requests, state


def _final(deliveries) -> list[dict]:
    """Each observation as it stands after every correction: what silver holds."""
    now: dict[str, dict] = {}
    for _, r in deliveries:
        if r["gone"]:
            now.pop(r["observation_id"], None)
        else:
            now[r["observation_id"]] = r
    return list(now.values())


def _whole(rows, person: str = "P1"):
    out = scoring.step(None, pd.DataFrame(rows, columns=scoring.ROW_COLUMNS), SETTINGS, person=person,
                       now_us=max(r["t"] for r in rows))
    scores = {row["scored_at"]: row for row in out.scores.frame().to_dict("records")}
    return scores, {a["alert_id"]: a for a in out.alerts}


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, list | tuple | np.ndarray) or isinstance(b, list | tuple | np.ndarray):
        return list(a) == list(b)
    return a == b or (a is None and isinstance(b, float) and math.isnan(b)) or \
        (b is None and isinstance(a, float) and math.isnan(a))


def _assert_tables_equal(got: dict, want: dict, what: str) -> None:
    assert sorted(got) == sorted(want), f"{what}: keys differ: {sorted(set(got) ^ set(want))[:5]}"
    for key in want:
        diff = [c for c in want[key] if not _same(got[key].get(c), want[key][c])]
        assert not diff, f"{what} {key}: {[(c, got[key].get(c), want[key][c]) for c in diff[:4]]}"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_batch_by_batch_equals_one_pass_over_all_rows(seed):
    rows = _stay(seed)
    deliveries = _deliveries(rows, seed, max_delay_us=15 * MIN)  # inside the 20 min tail
    scores, alerts, requests, state = _stream(deliveries, batch_us=2 * MIN)
    want_scores, want_alerts = _whole(_final(deliveries))
    assert not requests
    assert state.fold is not None and len(state.tail) < len(rows) / 10  # the state was folded, not kept whole
    _assert_tables_equal(scores, want_scores, "score")
    live = {k: a for k, a in alerts.items() if a["status"] != scoring.WITHDRAWN}
    _assert_tables_equal(live, want_alerts, "alert")
    assert {a["level"] for a in want_alerts.values()} >= {"news2_medium", "news2_high"}
    assert any(a["status"] == scoring.RESOLVED for a in want_alerts.values()) or seed != 1
    assert any(r["spo2_scale"] == 2 for r in want_scores.values())
    assert any(r["stale_inputs"] for r in want_scores.values())


def test_a_change_older_than_the_tail_rescores_the_tail_and_asks_for_the_rest():
    rows = _stay(7, hours=6)
    deliveries = _deliveries(rows, 7, max_delay_us=5 * MIN, corrections=False)
    late = _row("late-1", "temp", T0 + 2 * HOUR + 30_000_000, 40.5)
    at = T0 + 5 * HOUR
    deliveries = sorted([*deliveries, (at, late)], key=lambda x: x[0])
    scores, _, requests, state = _stream(deliveries, batch_us=2 * MIN)
    assert len(requests) == 1
    start, end = requests[0]
    assert start == late["t"] and end <= at - SETTINGS.horizon_us + 3 * MIN and end > late["t"]
    want, _ = _whole(_final(deliveries))
    # The stream's rows equal one pass over all rows outside the requested range; inside it the recompute job
    # replaces them (here: the one-pass rows of the range).
    merged = {t: r for t, r in scores.items() if not start <= t < end} | \
        {t: r for t, r in want.items() if start <= t < end}
    _assert_tables_equal(merged, want, "score")
    assert not state.inexact


def test_retracting_a_value_a_folded_carry_holds_asks_for_a_rebuild():
    rows = [_row(f"o{i}", "hr", T0 + i * MIN, 80.0 + i) for i in range(60)]
    state = scoring.step(None, pd.DataFrame(rows, columns=scoring.ROW_COLUMNS), SETTINGS, person="P",
                         now_us=T0 + HOUR).state
    assert state.fold is not None
    newest_folded = max(r["t"] for r in rows if r["t"] < state.fold)
    gone = next({**r, "gone": True} for r in rows if r["t"] == newest_folded)
    out = scoring.step(state, pd.DataFrame([gone], columns=scoring.ROW_COLUMNS), SETTINGS, person="P",
                       now_us=T0 + HOUR)
    assert out.rebuild and out.recompute == (newest_folded, state.fold)
    older = next({**r, "gone": True} for r in rows if r["t"] == T0 + MIN)  # no carry or snapshot holds it
    fresh = scoring.step(None, pd.DataFrame(rows, columns=scoring.ROW_COLUMNS), SETTINGS, person="P",
                         now_us=T0 + HOUR).state
    assert not scoring.step(fresh, pd.DataFrame([older], columns=scoring.ROW_COLUMNS), SETTINGS, person="P",
                            now_us=T0 + HOUR).rebuild


def test_a_state_of_another_format_is_rebuilt_not_misread():
    blob = scoring.PersonState().dumps()
    assert isinstance(scoring.PersonState.loads(blob), scoring.PersonState)
    import pickle
    assert scoring.PersonState.loads(pickle.dumps((scoring.STATE_FORMAT + 1, object()))) is None
    assert scoring.PersonState.loads(None) is None


def test_a_ward_patients_readings_stay_in_the_tail_for_hours_so_a_late_one_rescores_from_the_state():
    settings = scoring.Settings.from_ms(lookback_ms=4 * 3_600_000, history_ms=12 * 3_600_000,
                                        windows_ms=[3_600_000], horizon_ms=5 * 60_000, resolve_after_ms=3_600_000,
                                        tail_rows=50)
    rows = [_row(f"o{h}-{c}", c, T0 + h * HOUR, v) for h in range(8) for c, v in (("hr", 80.0 + h), ("rr", 16.0))]
    state = scoring.step(None, pd.DataFrame(rows, columns=scoring.ROW_COLUMNS), settings, person="W",
                         now_us=T0 + 8 * HOUR).state
    assert len(state.tail) == len(rows)  # 16 rows over 7 h: all kept, nothing folded out of reach
    late = _row("late", "sbp", T0 + 2 * HOUR + MIN, 85.0)  # charted 5 h late
    out = scoring.step(state, pd.DataFrame([late], columns=scoring.ROW_COLUMNS), settings, person="W",
                       now_us=T0 + 8 * HOUR)
    assert out.recompute is None and not out.rebuild
    rescored = out.scores.frame().set_index("scored_at")
    assert rescored.loc[T0 + 2 * HOUR + MIN, "news2_systolic_bp"] == 3
    assert rescored.loc[T0 + 3 * HOUR, "systolic_bp"] == 85.0  # carried forward to the points after it


def test_a_retraction_that_leaves_the_tail_without_points_keeps_the_running_alert_open():
    settings = scoring.Settings.from_ms(lookback_ms=4 * 3_600_000, history_ms=12 * 3_600_000,
                                        windows_ms=[3_600_000], horizon_ms=5 * 60_000, resolve_after_ms=3_600_000,
                                        tail_rows=1)
    high = [_row(f"a-{c}", c, T0, v) for c, v in (("rr", 26.0), ("spo2", 90.0), ("hr", 135.0))]
    state = scoring.step(None, pd.DataFrame(high, columns=scoring.ROW_COLUMNS), settings, person="R",
                         now_us=T0).state
    calm = _row("b-hr", "hr", T0 + 20 * MIN, 80.0)  # 20 min later: folds the first point away
    first = scoring.step(state, pd.DataFrame([calm], columns=scoring.ROW_COLUMNS), settings, person="R",
                         now_us=T0 + 20 * MIN)
    assert first.state.fold > T0 and {a["status"] for a in first.alerts} <= {scoring.OPEN}
    gone = {**calm, "gone": True}
    out = scoring.step(first.state, pd.DataFrame([gone], columns=scoring.ROW_COLUMNS), settings, person="R",
                       now_us=T0 + 20 * MIN)
    assert out.withdrawn == [calm["t"]]
    assert not [a for a in out.alerts if a["status"] == scoring.WITHDRAWN]  # the episode from T0 still runs


def test_a_local_chart_and_the_raised_levels_come_from_the_settings():
    from gold import news2

    rows = [_row(f"x-{c}", c, T0, v) for c, v in (("rr", 22.0), ("spo2", 95.0), ("sbp", 105.0), ("hr", 95.0),
                                                    ("temp", 38.5), ("fio2", 21.0))]
    rows.append(_row("x-acvpu", "acvpu", T0, text="A"))
    frame = pd.DataFrame(rows, columns=scoring.ROW_COLUMNS)
    rcp = scoring.step(None, frame, SETTINGS, person="L", now_us=T0)
    first = rcp.scores.frame().iloc[0]
    assert (first["news2_score"], first["news2_band"], first["qsofa_score"]) == (6, "medium", 1)
    assert {a["level"] for a in rcp.alerts} == {"news2_medium"}
    local = scoring.Settings(**{**SETTINGS.__dict__, "charts": news2.Charts.of({"high_from": 6}),
                                "levels": ("news2_high", "qsofa"), "qsofa_from": 1})
    out = scoring.step(None, frame, local, person="L", now_us=T0)
    assert out.scores.frame().iloc[0]["news2_band"] == "high"
    assert {a["level"] for a in out.alerts} == {"news2_high", "qsofa"}  # no medium alert: not raised here


def _vitals(start: int, minutes: int, *, high_from: int, high_to: int, prefix: str, encounter) -> list[dict]:
    """A monitor every minute: normal, then high (RR 26, SpO2 90, HR 135) for [high_from, high_to) minutes."""
    rows = []
    for m in range(minutes):
        high = high_from <= m < high_to
        for concept, calm, sick in (("rr", 16.0, 26.0), ("spo2", 97.0, 90.0), ("hr", 80.0, 135.0)):
            rows.append(_row(f"{prefix}{m:04d}{concept}", concept, start + m * MIN, sick if high else calm,
                             encounter=encounter))
    return rows


def test_a_sleeping_state_scores_a_returning_person_as_one_pass_over_all_their_rows():
    first = _vitals(T0, 180, high_from=60, high_to=120, prefix="a", encounter="E1")
    first.append(_row("marker", "problem", T0 + 10 * MIN, text="J96.1", code="J96.1", encounter=None))
    state = scoring.step(None, pd.DataFrame(first, columns=scoring.ROW_COLUMNS), SETTINGS, person="P",
                         now_us=T0 + 180 * MIN).state
    assert state.can_sleep()  # the episode resolved 30 min after the person left the level
    asleep = scoring.PersonState.loads(state.asleep().dumps())
    assert len(asleep.dumps()) < len(state.dumps()) / 20 and asleep.sleeping

    back = state.newest + SETTINGS.history_us + MIN  # readmitted: no encounter on the monitor's rows this time
    second = _vitals(back, 90, high_from=30, high_to=60, prefix="b", encounter=None)
    rows = pd.DataFrame(second, columns=scoring.ROW_COLUMNS)
    assert asleep.wakes_exactly(rows, SETTINGS)
    woke = scoring.step(asleep, rows, SETTINGS, person="P", now_us=back + 90 * MIN)
    want_scores, want_alerts = _whole(first + second, person="P")
    got = {row["scored_at"]: row for row in woke.scores.frame().to_dict("records")}
    _assert_tables_equal(got, {t: r for t, r in want_scores.items() if t >= back}, "score")
    assert all(r["spo2_scale"] == 2 and r["encounter_key"] == "E1" for r in got.values())  # what sleep kept
    _assert_tables_equal({a["alert_id"]: a for a in woke.alerts},
                         {k: a for k, a in want_alerts.items() if a["opened_at"] >= back}, "alert")
    assert woke.alerts and not woke.state.sleeping


def test_a_sleeping_state_refuses_what_it_cannot_score_exactly():
    rows = _vitals(T0, 90, high_from=30, high_to=200, prefix="a", encounter="E1")
    state = scoring.step(None, pd.DataFrame(rows, columns=scoring.ROW_COLUMNS), SETTINGS, person="P",
                         now_us=T0 + 90 * MIN).state
    assert not state.can_sleep()  # an episode is running: it must see the next points
    with pytest.raises(ValueError, match="keeps their whole state"):
        state.asleep()
    state = scoring.step(None, pd.DataFrame(rows[:30], columns=scoring.ROW_COLUMNS), SETTINGS, person="P",
                         now_us=T0 + 10 * MIN).state.asleep()
    early = pd.DataFrame([_row("late", "hr", state.newest + SETTINGS.history_us, 88.0)],  # its point sees newest
                         columns=scoring.ROW_COLUMNS)
    gone = pd.DataFrame([{**rows[0], "gone": True, "t": state.newest + SETTINGS.history_us + MIN}],
                        columns=scoring.ROW_COLUMNS)
    for batch in (early, gone):
        assert not state.wakes_exactly(batch, SETTINGS)
        with pytest.raises(ValueError, match="rebuild the person from silver"):
            scoring.step(state, batch, SETTINGS, person="P", now_us=T0 + 20 * HOUR)
