"""One person's early-warning scores, features and alerts, computed step by step from a small bounded state.

This is the scoring kernel of gold: pure Python and NumPy, no Spark and no storage. The streaming score job keeps
one `PersonState` per person in Spark's state store and calls `step` with each batch's changes of that person; the
recompute job calls `step` once per person with every row of a time range, from an empty state. Both give the same
rows, because every figure is a function of the person's rows alone (never of how they were batched):

- A **point** is an instant at which a scored input (INPUTS) was measured; it gets one score row and one features
  row. Each input's value is the newest one at or before the point (of several rows at one instant, the one with
  the largest observation id); a value older than `lookback` is stale (named, not scored), older than `history`
  absent. SpO2 scale 2 applies from the time of a recorded hypercapnic target on (a marker row).
- **Features** per concept (gold.features.FEATURE_CONCEPTS): the last reading at or before the point and its age;
  per window w the change and slope since the window start and the readings in between. The window start is
  `ceil((point - w) / g) * g` on a fixed grid of g = w / GRID_STEPS (5 min for 1 h): the window is w long or up to
  one grid step shorter. The grid is what keeps the state bounded: the value and reading count at every grid
  boundary a later point can still ask for are kept (`_Snapshots`), so the state holds ~GRID_STEPS numbers per
  window and concept, never the readings of the whole window. Readings older than `history` before the point are
  not used.
- **Alerts**: one per person, level and episode (gold.deterioration_alerts has the rules), from the score rows in
  event-time order.

The state keeps the person's rows of the last `horizon` (the tail, measured back from their newest reading) row
by row, and everything older folded into carries (the newest value of each input, the newest encounter) and
grid snapshots. A change inside the tail rescores every point from its time on. A change older than the tail
updates the carries and snapshots exactly where it can (an insert always can; a retraction of the value a carry
or snapshot holds cannot: the state asks to be rebuilt from silver), rescores the tail, and asks the recompute job
for the points between the change and the tail (`Step.recompute`). Nothing is lost either way: the request names
the range, and the caller makes sure someone runs it.

A person idle for long (discharged) need not keep all that: with no alert episode running, `PersonState.asleep`
keeps only what a point more than `history` after their newest reading can still see (the newest encounter, the
scale-2 markers). From such a state, rows that late step exactly as from the full one; anything earlier (a late
reading, a retraction) is the caller's to rebuild from silver (`PersonState.wakes_exactly`).
"""

from __future__ import annotations

import copy
import hashlib
import math
import pickle
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import SimpleNamespace

import numpy as np
import pandas as pd

from gold import features, news2
from gold.features import FEATURE_CONCEPTS, window_name
from pipelines.config import ALERT_LEVELS as LEVELS

# Scoring inputs: silver concept -> the score row's value column.
INPUTS: Mapping[str, str] = {
    "rr": "respiratory_rate", "spo2": "spo2", "fio2": "fio2", "o2flow": "o2flow", "sbp": "systolic_bp",
    "hr": "pulse", "acvpu": "consciousness", "temp": "temperature", "wbc": "wbc",
}
TEXT_INPUTS = frozenset({"acvpu"})
# Observation statuses that are not a valid measurement (FHIR ObservationStatus; HL7 OBX-11 W/X/D).
NOT_MEASURED = ("deleted", "entered-in-error", "cancelled", "W", "X", "D")
USED_CONCEPTS = frozenset({*INPUTS, *FEATURE_CONCEPTS})
# The tail stores a concept as its index here (one byte a row instead of a string).
CONCEPTS = tuple(sorted(USED_CONCEPTS))
CODE = {c: i for i, c in enumerate(CONCEPTS)}
_IS_INPUT = np.array([c in INPUTS for c in CONCEPTS], dtype=bool)  # indexed by concept code
GRID_STEPS = 12  # a feature window's start moves on a grid of window / GRID_STEPS

OPEN, RESOLVED, WITHDRAWN = "open", "resolved", "withdrawn"
STATE_FORMAT = 1  # bump when PersonState changes shape: a state of another format is rebuilt, never misread

# The columns `step` reads from its rows (the silver.observations names, times as microseconds since the epoch).
ROW_COLUMNS = ("observation_id", "concept", "code", "value", "value_text", "status", "t", "encounter_key", "gone")


@dataclass(frozen=True)
class Settings:
    """What the scores depend on, in microseconds (gold.* in the configuration)."""

    lookback_us: int
    history_us: int
    windows_us: tuple[int, ...]
    horizon_us: int
    resolve_after_us: int
    scale2_codes: frozenset[str] = frozenset()
    tail_rows: int = 500  # the tail keeps at least this many of the newest rows (within `history`)
    charts: news2.Charts = news2.RCP_2017
    levels: tuple[str, ...] = LEVELS  # the alert levels raised
    qsofa_from: int = 2  # the qsofa level: qSOFA at least this

    def __post_init__(self) -> None:
        if self.lookback_us <= 0 or self.horizon_us < 0 or self.resolve_after_us < 0:
            raise ValueError("lookback must be positive; horizon and resolve_after must not be negative")
        if not self.windows_us or any(w <= 0 or w % GRID_STEPS for w in self.windows_us):
            raise ValueError(f"feature windows must be positive multiples of {GRID_STEPS} microseconds, got "
                             f"{list(self.windows_us)}")
        if self.history_us < max(self.lookback_us, *self.windows_us):
            raise ValueError("history must be at least the look-back and the longest feature window")

    @classmethod
    def from_ms(cls, *, lookback_ms: int, history_ms: int, windows_ms: Sequence[int], horizon_ms: int,
                resolve_after_ms: int, scale2_codes: Iterable[str] = (), **more) -> Settings:
        return cls(lookback_ms * 1000, history_ms * 1000, tuple(int(w) * 1000 for w in windows_ms), horizon_ms * 1000,
                   resolve_after_ms * 1000, frozenset(scale2_codes), **more)

    @classmethod
    def of(cls, gold) -> Settings:
        """The settings of a configuration's `gold` section (pipelines.config.GoldConfig)."""
        return cls.from_ms(lookback_ms=gold.lookback_ms, history_ms=gold.history_ms,
                           windows_ms=gold.feature_windows_ms, horizon_ms=gold.state_horizon_ms,
                           resolve_after_ms=gold.alert_resolve_after_ms, scale2_codes=gold.spo2_scale2_codes,
                           charts=gold.charts, levels=tuple(gold.alert_levels), qsofa_from=gold.qsofa_alert_from)

    @property
    def window_names(self) -> tuple[str, ...]:
        return tuple(window_name(w // 1000) for w in self.windows_us)

    def grid(self, window_us: int) -> int:
        return window_us // GRID_STEPS

    def window_start(self, points: np.ndarray, window_us: int) -> np.ndarray:
        """ceil((point - w) / g) * g for each point (int64 microseconds)."""
        g = self.grid(window_us)
        return -((-(points - window_us)) // g) * g


# -- rows ----------------------------------------------------------------------------------------------------
@dataclass
class Table:
    """Columns of equal length as NumPy arrays: a person's rows or points, cheap to mask and append (a step
    handles a few rows; pandas' per-call overhead would be most of its cost)."""

    cols: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(next(iter(self.cols.values()))) if self.cols else 0

    def __getitem__(self, name: str) -> np.ndarray:
        return self.cols[name]

    def where(self, mask: np.ndarray) -> Table:
        return Table({k: v[mask] for k, v in self.cols.items()})

    def append(self, more: Table) -> Table:
        if not len(more):
            return self
        if not len(self):
            return more
        return Table({k: np.concatenate([v, more.cols[k]]) for k, v in self.cols.items()})

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame({k: list(v) if v.dtype == object else v for k, v in self.cols.items()})

    @staticmethod
    def of(frame: pd.DataFrame, names: Sequence[str]) -> Table:
        def column(n: str) -> np.ndarray:
            if n == "t":
                return frame[n].to_numpy(dtype="int64")
            if n == "value":
                return pd.to_numeric(frame[n], errors="coerce").to_numpy(dtype="float64")
            return frame[n].to_numpy(dtype=object)

        return Table({n: column(n) for n in names})


_KEEP = ("observation_id", "concept", "value", "value_text", "t", "encounter_key")


def _empty_rows() -> Table:
    dtypes = {"t": "int64", "value": "float64", "concept": "int8"}
    return Table({n: np.zeros(0, dtype=dtypes.get(n, object)) for n in _KEEP})


class _View:
    """Rows (the tail, or the rows being folded) sorted once: each concept's rows by time, then value."""

    def __init__(self, rows: Table):
        self.rows = rows
        codes = rows["concept"]
        self._order = np.lexsort((rows["value"], rows["t"], codes))
        self._bounds = np.searchsorted(codes[self._order], np.arange(len(CONCEPTS) + 1))

    def of(self, concept: str) -> np.ndarray:
        k = CODE[concept]
        return self._order[self._bounds[k]:self._bounds[k + 1]]

    def readings(self, concept: str) -> tuple[np.ndarray, np.ndarray]:
        """A concept's numeric readings by (time, value): the last of an instant is its largest value."""
        idx = self.of(concept)
        t, v = self.rows["t"][idx], self.rows["value"][idx]
        ok = ~np.isnan(v)
        return t[ok], v[ok]

    def instants(self, concept: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per instant of an input's rows, ascending: (time, the largest id, that row's value, whether it has one)."""
        idx = self.of(concept)
        t = self.rows["t"][idx]
        if len(t) > 1 and np.any(t[1:] == t[:-1]):  # rows sharing an instant: the one with the largest id counts
            ids = self.rows["observation_id"][idx]
            best: dict[int, int] = {}
            for k, (at, oid) in enumerate(zip(t.tolist(), ids, strict=True)):
                if at not in best or oid > ids[best[at]]:
                    best[at] = k
            idx = idx[sorted(best.values())]
            t = self.rows["t"][idx]
        obs = self.rows["observation_id"][idx]
        if concept in TEXT_INPUTS:
            value = self.rows["value_text"][idx]
            valued = np.array([x is not None for x in value], dtype=bool)
        else:
            value = self.rows["value"][idx]
            valued = ~np.isnan(value)
        return t, obs, value, valued

    def encounters(self) -> tuple[np.ndarray, np.ndarray]:
        """Per instant of the input rows that name an encounter, ascending: (time, the largest key)."""
        idx = np.concatenate([self.of(c) for c in INPUTS])
        idx = idx[pd.notna(self.rows["encounter_key"][idx])]
        if not len(idx):
            return np.zeros(0, "int64"), np.zeros(0, object)
        idx = idx[np.argsort(self.rows["t"][idx], kind="stable")]
        t, enc = self.rows["t"][idx], self.rows["encounter_key"][idx]
        last = np.append(t[1:] != t[:-1], True)
        out_t, out_enc = t[last], enc[last]
        shared = ~last[:-1] & (enc[1:] != enc[:-1]) if len(t) > 1 else np.zeros(0, bool)
        if shared.any():  # different encounters named at one instant (rare): the largest key
            best: dict[int, str] = {}
            for at, e in zip(t.tolist(), enc, strict=True):
                if at not in best or e > best[at]:
                    best[at] = e
            out_enc = np.array([best[at] for at in out_t.tolist()], dtype=object)
        return out_t, out_enc


def _is_marker(rows: Table, codes: frozenset[str]) -> np.ndarray:
    if not codes:
        return np.zeros(len(rows), dtype=bool)
    wanted = list(codes)
    return np.isin(rows["code"], wanted) | np.isin(rows["value_text"], wanted)


def _records(rows: Table) -> Iterator[SimpleNamespace]:
    """Each row as an object with one attribute per column (the few rows a step handles one by one)."""
    names = list(rows.cols)
    for values in zip(*rows.cols.values(), strict=True):
        yield SimpleNamespace(**dict(zip(names, values, strict=True)))


# -- the carries: what the folded rows leave for the points after them ---------------------------------------
@dataclass
class _InputCarry:
    """An input's as-of state after the folded rows: the newest instant and its largest id; the newest value."""

    id_t: int | None = None
    obs_id: str | None = None
    value_t: int | None = None
    value: object = None


@dataclass
class _FeatureCarry:
    """A feature concept's as-of state after the folded rows: the last reading and how many there were."""

    last_t: int | None = None
    last_v: float = math.nan
    n: int = 0


@dataclass
class _Snapshots:
    """Per feature window: the grid boundaries before the fold line a later point may ask for, and per concept the
    last reading (time, value) at or before each and the readings up to it."""

    bounds: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype="int64"))
    last_t: dict[str, np.ndarray] = field(default_factory=dict)  # int64, -1: none
    last_v: dict[str, np.ndarray] = field(default_factory=dict)
    n: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class _Machine:
    """One alert level's episode state after the folded points (see `_run_alerts`)."""

    episode: dict | None = None  # the running episode's alert fields
    out_start: int | None = None  # first point of the current run out of the level (None: in, or no points yet)
    last_t: int | None = None


@dataclass
class PersonState:
    """Everything `step` needs of a person's past (see the module docstring)."""

    fold: int | None = None  # rows before this instant are folded; the tail holds the rest row by row
    tail: Table = field(default_factory=_empty_rows)
    inputs: dict[str, _InputCarry] = field(default_factory=lambda: {c: _InputCarry() for c in INPUTS})
    encounter: tuple[int | None, str | None] = (None, None)
    features: dict[str, _FeatureCarry] = field(default_factory=lambda: {c: _FeatureCarry() for c in FEATURE_CONCEPTS})
    snapshots: dict[int, _Snapshots] = field(default_factory=dict)
    markers: dict[str, int] = field(default_factory=dict)  # valid marker observation id -> its time
    points: Table | None = None  # what alerts read of the tail's points' score rows, as last emitted
    machines: dict[str, _Machine] = field(default_factory=lambda: {lv: _Machine() for lv in LEVELS})
    emitted: dict[str, dict] = field(default_factory=dict)  # alert rows that the tail can still change
    inexact: bool = False  # a folded carry or snapshot lost its value: rebuild from silver
    newest: int | None = None
    identities: tuple[str, ...] = ()  # the identity keys whose rows the state holds (the caller keeps it)
    sleeping: bool = False  # `asleep`: only what outlives `history` is kept

    def can_sleep(self) -> bool:
        """No alert episode running and nothing owed to a rebuild: nothing of the past beyond the newest encounter and
        the markers can change a point more than `history` after the newest reading."""
        return not self.inexact and all(m.episode is None for m in self.machines.values())

    def asleep(self) -> PersonState:
        """What a point more than `history` after `newest` still reads of this state (see `can_sleep`)."""
        if not self.can_sleep():
            raise ValueError("a person with an alert episode running, or owed a rebuild, keeps their whole state")
        return PersonState(encounter=self.encounter, markers=dict(self.markers), newest=self.newest,
                           identities=self.identities, sleeping=True)

    def wakes_exactly(self, rows: pd.DataFrame, s: Settings) -> bool:
        """Whether `step` may take `rows` from this state: always when it is whole; when it sleeps, only inserts
        more than `history` after the newest reading, which no point of theirs can see (anything else reads the
        person's past from silver)."""
        if not self.sleeping or self.newest is None or not len(rows):
            return True
        return not rows["gone"].astype(bool).any() and int(rows["t"].min()) > self.newest + s.history_us

    def dumps(self) -> bytes:
        if self.sleeping:  # only its own fields: a sleeping state is stored by the million, at ~150 bytes each
            kept = (self.encounter, self.markers, self.newest, self.identities)
            return pickle.dumps((STATE_FORMAT, kept), protocol=5)
        return pickle.dumps((STATE_FORMAT, self), protocol=5)

    @staticmethod
    def loads(blob: bytes | None) -> PersonState | None:
        """The state in `blob`, or None for no state or a state of another format (then the person is rebuilt)."""
        if not blob:
            return None
        fmt, state = pickle.loads(blob)
        if fmt != STATE_FORMAT:
            return None
        if isinstance(state, tuple):
            encounter, markers, newest, identities = state
            return PersonState(encounter=encounter, markers=markers, newest=newest, identities=identities,
                               sleeping=True)
        return state


@dataclass
class Step:
    """What one step gives: score rows (with their features) of the rescored points, the points withdrawn,
    alert rows that changed (withdrawn ones with that status), and a range the tail could not rescore."""

    state: PersonState
    scores: Table  # `.frame()` for a DataFrame
    withdrawn: list[int]
    alerts: list[dict]
    recompute: tuple[int, int] | None = None  # [from, to) in microseconds: points the recompute job must redo
    rebuild: bool = False  # the state cannot follow a retraction older than its tail: rebuild it from silver


# -- the step ------------------------------------------------------------------------------------------------
def step(state: PersonState | None, rows: pd.DataFrame, settings: Settings, *, person: str, now_us: int,
         predict: Callable[[pd.DataFrame], tuple[np.ndarray, np.ndarray, str]] | None = None) -> Step:
    """Apply one batch of a person's changed rows and rescore what they change.

    `rows` (ROW_COLUMNS), in the order the changes happened: each changed observation's state after the change (of
    several, the last counts), and a `gone` row for each observation that no longer counts for this person, with
    the values it had (a deletion, a correction's old
    version, a reading moved to another person or time). `now_us`: the batch's processing time; a reading dated
    after it does not move the fold line (a clock set a year ahead must not fold everyone's tail).
    `predict(features) -> (risk, alert, model version)` scores the model, when one is registered.
    """
    state = state or PersonState()
    if state.sleeping:
        if not state.wakes_exactly(rows, settings):
            raise ValueError("a sleeping state takes only inserts later than `history` after its newest reading; "
                             "rebuild the person from silver for anything else")
        state.sleeping = False
    rows = Table.of(rows, ROW_COLUMNS)
    touched: list[int] = []
    recompute_from: int | None = None
    fold = state.fold if state.fold is not None else np.iinfo("int64").min
    gone_mask = rows["gone"].astype(bool)
    measured = ~np.isin(rows["status"], NOT_MEASURED)

    # Markers (scale 2 from their time on), whatever their concept.
    for i in np.flatnonzero(_is_marker(rows, settings.scale2_codes)):
        oid = rows["observation_id"][i]
        before = state.markers.pop(oid, None)
        if before is not None:
            touched.append(before)
        if not gone_mask[i] and measured[i]:
            state.markers[oid] = int(rows["t"][i])
            touched.append(int(rows["t"][i]))

    used = np.isin(rows["concept"], list(USED_CONCEPTS))
    # Gone rows first (a correction's old version), then what stands now, each in the tail or the folded past.
    gone = rows.where(used & gone_mask)
    now = rows.where(used & ~gone_mask)
    if len(now):  # of several states of one observation, the last
        _, last = np.unique(now["observation_id"][::-1].astype(str), return_index=True)
        now = now.where(np.sort(len(now) - 1 - last))
    in_tail = np.isin(state.tail["observation_id"], np.concatenate([gone["observation_id"], now["observation_id"]]))
    touched += state.tail["t"][in_tail].tolist()
    state.tail = state.tail.where(~in_tail)
    touched += gone["t"].tolist()
    for r in _records(gone.where(gone["t"] < fold)):
        _unfold(state, r)
    has_value = ~np.isnan(now["value"]) | np.array([v is not None for v in now["value_text"]], dtype=bool)
    keep = now.where(has_value & ~np.isin(now["status"], NOT_MEASURED))
    touched += keep["t"].tolist()
    for r in _records(keep.where(keep["t"] < fold)):
        _fold_late(state, r)
    fresh = Table({k: keep[k] for k in _KEEP}).where(keep["t"] >= fold)
    fresh.cols["concept"] = np.array([CODE[c] for c in fresh["concept"]], dtype="int8")
    state.tail = state.tail.append(fresh)
    if not touched and state.points is not None:
        return Step(state, Table({}), [], [])
    start = min(touched) if touched else fold
    if start < fold:
        recompute_from, start = start, fold
    if len(state.tail):
        newest = int(state.tail["t"].max())
        state.newest = newest if state.newest is None else max(state.newest, newest)

    scores = _score_points(state, settings, start, predict)
    previous = state.points
    withdrawn: list[int] = []
    if previous is not None and len(previous):
        redone = previous["scored_at"] >= start
        withdrawn = np.setdiff1d(previous["scored_at"][redone], scores["scored_at"]).tolist() if len(scores) \
            else previous["scored_at"][redone].tolist()
        previous = previous.where(~redone)
    slim = Table({k: scores[k] for k in _ALERT_INPUTS}) if len(scores) else None
    state.points = slim if previous is None else previous.append(slim) if slim is not None else previous
    alerts = _alerts(state, settings, person)
    _advance_fold(state, settings, now_us, person)
    recompute = (recompute_from, fold) if recompute_from is not None else None
    return Step(state, scores, withdrawn, alerts, recompute, rebuild=state.inexact)


# What the alerts read of a score row (kept in the state for the tail's points).
_ALERT_INPUTS = ("scored_at", "encounter_key", "news2_score", "news2_band", "qsofa_score", "model_risk",
                 "model_version", "model_alert", "input_observation_ids")


def _unfold(state: PersonState, r) -> None:
    """A folded row no longer counts: take it out of the carries and snapshots where that can be done exactly."""
    t = int(r.t)
    if r.concept in INPUTS:
        carry = state.inputs[r.concept]
        if (carry.id_t is not None and t >= carry.id_t) or (carry.value_t is not None and t >= carry.value_t):
            state.inexact = True
        if state.encounter[0] is not None and t >= state.encounter[0] and r.encounter_key is not None:
            state.inexact = True
    value = _number(r.value)
    if r.concept in FEATURE_CONCEPTS and not math.isnan(value):
        carry = state.features[r.concept]
        carry.n -= 1
        if carry.last_t is not None and (t, value) == (carry.last_t, carry.last_v):
            state.inexact = True
        for snaps in state.snapshots.values():
            hit = snaps.bounds >= t
            if not hit.any():
                continue
            snaps.n[r.concept][hit] -= 1
            if np.any((snaps.last_t[r.concept][hit] == t) & (snaps.last_v[r.concept][hit] == value)):
                state.inexact = True


def _fold_late(state: PersonState, r) -> None:
    """A row older than the fold line arrived: add it to the carries and snapshots (an insert is always exact)."""
    t = int(r.t)
    if r.concept in INPUTS:
        carry = state.inputs[r.concept]
        value = r.value_text if r.concept in TEXT_INPUTS else _number(r.value)
        has_value = value is not None and not (isinstance(value, float) and math.isnan(value))
        if carry.id_t is None or t > carry.id_t:  # a newer instant (no folded row shares it)
            carry.id_t, carry.obs_id = t, r.observation_id
            if has_value:
                carry.value_t, carry.value = t, value
        elif t == carry.id_t:
            if r.observation_id > carry.obs_id:
                state.inexact = True  # the instant's row (and value) changes; its other rows are not kept
        elif has_value and (carry.value_t is None or t >= carry.value_t):
            state.inexact = True  # may become the newest value: whether a row of its instant outranks it is unknown
        if r.encounter_key is not None:
            enc_t, enc = state.encounter
            if enc_t is None or t > enc_t:
                state.encounter = (t, r.encounter_key)
            elif t == enc_t and r.encounter_key > enc:
                state.encounter = (t, r.encounter_key)
    value = _number(r.value)
    if r.concept in FEATURE_CONCEPTS and not math.isnan(value):
        carry = state.features[r.concept]
        carry.n += 1
        if carry.last_t is None or (t, value) > (carry.last_t, carry.last_v):
            carry.last_t, carry.last_v = t, value
        for snaps in state.snapshots.values():
            hit = snaps.bounds >= t
            snaps.n[r.concept][hit] += 1
            newer = hit & ((snaps.last_t[r.concept] < t)
                           | ((snaps.last_t[r.concept] == t) & (snaps.last_v[r.concept] < value)))
            snaps.last_t[r.concept][newer] = t
            snaps.last_v[r.concept][newer] = value


def _number(v) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return math.nan
    return x


# -- scores --------------------------------------------------------------------------------------------------
def _score_points(state: PersonState, s: Settings, start: int,
                  predict: Callable[[pd.DataFrame], tuple[np.ndarray, np.ndarray, str]] | None) -> Table:
    """Score rows (with features) of the tail's points from `start` on."""
    tail = state.tail
    view = _View(tail)
    points = np.unique(tail["t"][_IS_INPUT[tail["concept"]]])
    points = points[points >= start]
    n = len(points)
    if not n:
        return Table({})
    out: dict[str, np.ndarray] = {"scored_at": points}
    values: dict[str, np.ndarray] = {}
    stale = [[] for _ in range(n)]
    ids = [[] for _ in range(n)]
    fresh_from = points - (s.lookback_us // 1_000_000) * 1_000_000
    absent_before = points - s.history_us
    for c, column in INPUTS.items():
        v, v_t, obs = _as_of_input(view, c, state.inputs[c], points)
        known = (v_t >= 0) & (v_t >= absent_before)
        fresh = known & (v_t >= fresh_from)
        values[column] = np.where(fresh, v, None if c in TEXT_INPUTS else np.nan)
        for i in np.flatnonzero(known & ~fresh):
            stale[i].append(column)
        for i in np.flatnonzero(fresh):
            ids[i].append(obs[i])
    marker_times = np.array(sorted(state.markers.values()), dtype="int64")
    scale2 = np.searchsorted(marker_times, points, side="right") > 0
    on_o2 = news2.on_oxygen_array(values["fio2"], values["o2flow"])
    scored = news2.news2_arrays(values["respiratory_rate"], values["spo2"], on_o2, values["systolic_bp"],
                                values["pulse"], values["consciousness"], values["temperature"], scale2, s.charts)
    q, q_partial = news2.qsofa_arrays(values["respiratory_rate"], values["systolic_bp"], values["consciousness"])
    out.update({
        "encounter_key": _as_of_encounter(view, state.encounter, points),
        "news2_score": scored["news2_score"], "news2_band": scored["news2_band"],
        **{c: scored[c] for c in news2.COMPONENTS},
        "news2_partial": scored["news2_partial"],
        "missing_inputs": objects([list(m) for m in scored["news2_missing"]]),
        "stale_inputs": objects(stale), "spo2_scale": np.where(scale2, 2, 1),
        **values,
        "on_oxygen": np.array([None if math.isnan(x) else bool(x) for x in on_o2], dtype=object),
        "input_observation_ids": objects(ids), "qsofa_score": q, "qsofa_partial": q_partial,
        "sirs_count": news2.sirs_arrays(values["temperature"], values["pulse"], values["respiratory_rate"],
                                        values["wbc"]),
    })
    feats = _features(state, view, s, points)
    out.update(feats)
    if predict is not None:
        risk, alert, version = predict(pd.DataFrame(feats))
        out["model_risk"] = np.asarray(risk, dtype="float64")
        out["model_alert"] = np.asarray(alert, dtype=object)
        out["model_version"] = np.full(n, version, dtype=object)
    else:
        out["model_risk"] = np.full(n, np.nan)
        out["model_alert"] = np.full(n, None, dtype=object)
        out["model_version"] = np.full(n, None, dtype=object)
    return Table(out)


def objects(items: list) -> np.ndarray:
    """A list of lists as a one-dimensional object array (NumPy would make a 2-D array of equal-length lists)."""
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


def _as_of_input(view: _View, concept: str, carry: _InputCarry, points: np.ndarray):
    """Each point's newest value of one input (value, its time or -1, the newest instant's largest id)."""
    t, obs, v, valued = view.instants(concept)
    vt, vv = t[valued], v[valued]
    i = np.searchsorted(t, points, side="right") - 1
    j = np.searchsorted(vt, points, side="right") - 1
    obs_out = np.where(i >= 0, obs[np.maximum(i, 0)] if len(obs) else None, carry.obs_id)
    carry_t = -1 if carry.value_t is None else carry.value_t
    value_t = np.where(j >= 0, vt[np.maximum(j, 0)] if len(vt) else -1, carry_t)
    if concept in TEXT_INPUTS:
        value = np.where(j >= 0, vv[np.maximum(j, 0)] if len(vv) else None, carry.value)
    else:
        carried = np.nan if carry.value is None else float(carry.value)
        value = np.where(j >= 0, vv[np.maximum(j, 0)] if len(vv) else np.nan, carried).astype("float64")
    return value, value_t.astype("int64"), obs_out


def _as_of_encounter(view: _View, carry: tuple[int | None, str | None], points: np.ndarray) -> np.ndarray:
    """Each point's newest encounter (the largest key at an instant), carried over instants without one."""
    t, enc = view.encounters()
    i = np.searchsorted(t, points, side="right") - 1
    return np.where(i >= 0, enc[np.maximum(i, 0)] if len(enc) else None, carry[1])


# -- features ------------------------------------------------------------------------------------------------
def feature_columns(windows_us: Sequence[int]) -> list[str]:
    """gold.features.feature_columns for windows in microseconds."""
    return features.feature_columns([w // 1000 for w in windows_us])


def _as_of_reading(t: np.ndarray, v: np.ndarray, carry: _FeatureCarry, at: np.ndarray):
    """(last time or -1, last value or NaN, readings so far) at each instant of `at` from the tail and the carry."""
    i = np.searchsorted(t, at, side="right")
    has = i > 0
    k = np.maximum(i - 1, 0)
    last_t = np.where(has, t[k] if len(t) else -1, -1 if carry.last_t is None else carry.last_t)
    last_v = np.where(has, v[k] if len(v) else np.nan, carry.last_v)
    return last_t.astype("int64"), last_v.astype("float64"), carry.n + i


def _features(state: PersonState, view: _View, s: Settings, points: np.ndarray) -> dict[str, np.ndarray]:
    cols: dict[str, np.ndarray] = {}
    fold = state.fold
    oldest = points - s.history_us
    for c in FEATURE_CONCEPTS:
        t, v = view.readings(c)
        carry = state.features[c]
        last_t, last_v, n_now = _as_of_reading(t, v, carry, points)
        usable = (last_t >= 0) & (last_t >= oldest)
        last_v = np.where(usable, last_v, np.nan)
        cols[f"{c}_last"] = last_v
        cols[f"{c}_age_s"] = np.where(usable, (points - last_t) / 1e6, np.nan)
        for w, name in zip(s.windows_us, s.window_names, strict=True):
            starts = s.window_start(points, w)
            st_t, st_v, st_n = _as_of_reading(t, v, carry, starts)
            if fold is not None:
                before = starts < fold
                if before.any():
                    snaps = state.snapshots[w]
                    k = np.searchsorted(snaps.bounds, starts[before])
                    if np.any(k >= len(snaps.bounds)) or np.any(snaps.bounds[np.minimum(k, len(snaps.bounds) - 1)]
                                                                  != starts[before]):
                        raise AssertionError("a window start before the fold line has no snapshot")
                    st_t[before] = snaps.last_t[c][k]
                    st_v[before] = snaps.last_v[c][k]
                    st_n[before] = snaps.n[c][k]
            st_ok = (st_t >= 0) & (st_t >= oldest)
            start_v = np.where(st_ok, st_v, np.nan)
            change = last_v - start_v
            hours = np.where(st_ok & usable, (last_t - st_t) / 3.6e9, np.nan)
            with np.errstate(invalid="ignore", divide="ignore"):
                slope = np.where(hours > 0, change / hours, np.nan)
            cols[f"{c}_change_{name}"] = change
            cols[f"{c}_slope_{name}"] = slope
            cols[f"{c}_count_{name}"] = (n_now - st_n).astype("int64")
    return {name: cols[name] for name in feature_columns(s.windows_us)}


# -- alerts --------------------------------------------------------------------------------------------------
def _in_level(points: Table, s: Settings) -> dict[str, np.ndarray]:
    """Each raised level's condition over score rows (gold.deterioration_alerts has the table)."""
    band = points["news2_band"]
    every = {
        "news2_medium": lambda: np.isin(band, ["medium", "high"]),
        "news2_high": lambda: band == "high",
        "qsofa": lambda: points["qsofa_score"] >= s.qsofa_from,
        "model": lambda: np.array([x is True or x is np.True_ for x in points["model_alert"]], dtype=bool),
    }
    return {level: every[level]() for level in s.levels}


def alert_id(person: str, level: str, opened_at_us: int) -> str:
    """hash(person, level, opening time to the microsecond): the same episode has the same id in every run."""
    when = datetime.fromtimestamp(opened_at_us // 1_000_000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S") + \
        f".{opened_at_us % 1_000_000:06d}"
    return hashlib.sha256(f"{person}|{level}|{when}".encode()).hexdigest()[:32]


def _run(machine: _Machine, level: str, points: Table, inside: np.ndarray, resolve_after: int,
         person: str, done: list[dict]) -> None:
    """Advance one level's machine over points (ascending); episodes it closes are appended to `done`.

    An episode opens at a point in the level and runs while the person is in it or has been out of it for less
    than `resolve_after`; it resolves at the first point of a run out of the level that lasts that long (to the
    next point back in the level, or to its own last point while none follows)."""
    times, scores, bands = points["scored_at"], points["news2_score"], points["news2_band"]
    for i in range(len(times)):
        at = int(times[i])
        ep = machine.episode
        if inside[i]:
            if ep is not None and machine.out_start is not None and at - machine.out_start >= resolve_after:
                ep["status"], ep["resolved_at"] = RESOLVED, machine.out_start
                done.append(ep)
                ep = machine.episode = None
            if ep is None:
                ep = machine.episode = {
                    "alert_id": alert_id(person, level, at), "patient_key": person, "level": level,
                    "status": OPEN, "opened_at": at, "resolved_at": None,
                    "encounter_key": points["encounter_key"][i], "news2_score": int(scores[i]),
                    "news2_band": bands[i], "qsofa_score": int(points["qsofa_score"][i]),
                    "model_risk": points["model_risk"][i], "model_version": points["model_version"][i],
                    "observation_ids": list(points["input_observation_ids"][i]),
                    "peak_news2_score": int(scores[i]), "last_scored_at": at, "_high_at": None}
            ep["peak_news2_score"] = max(ep["peak_news2_score"], int(scores[i]))
            ep["last_scored_at"] = at
            if ep["_high_at"] is None and bands[i] == "high":
                ep["_high_at"] = at
            machine.out_start = None
        else:
            if machine.out_start is None:
                machine.out_start = at
            if ep is not None and at - machine.out_start >= resolve_after:
                ep["status"], ep["resolved_at"] = RESOLVED, machine.out_start
                done.append(ep)
                machine.episode = None
        machine.last_t = at


def _plain(v):
    """A value as alert rows compare and store it: NaN as None, NumPy scalars as Python ones."""
    if isinstance(v, np.generic):
        v = v.item()
    return None if isinstance(v, float) and math.isnan(v) else v


def _finish(ep: dict) -> dict:
    """An episode as a gold.deterioration_alerts row (times in microseconds)."""
    row = {k: _plain(v) for k, v in ep.items() if not k.startswith("_")}
    high = ep["_high_at"] if ep["level"] == "news2_medium" else None
    row["escalated_at"] = high
    row["escalated_to"] = None if high is None else alert_id(ep["patient_key"], "news2_high", high)
    return row


def _alerts(state: PersonState, s: Settings, person: str) -> list[dict]:
    """The alert rows the tail's points give, against what was emitted before: changed and withdrawn ones."""
    points = state.points
    episodes: list[dict] = []
    flags = _in_level(points, s) if points is not None and len(points) else None
    for level in s.levels:
        machine = copy.deepcopy(state.machines[level])  # the state at the fold line stays as it was
        if flags is not None:
            _run(machine, level, points, flags[level], s.resolve_after_us, person, episodes)
        if machine.episode is not None:
            episodes.append(machine.episode)
    rows = {ep["alert_id"]: _finish(ep) for ep in episodes}
    changed = [row for aid, row in rows.items() if state.emitted.get(aid) != row]
    gone = [{**row, "status": WITHDRAWN} for aid, row in state.emitted.items() if aid not in rows]
    state.emitted = rows
    return changed + gone


# -- folding -------------------------------------------------------------------------------------------------
def _fold_line(state: PersonState, s: Settings, now_us: int) -> int | None:
    """Where the tail should start: `horizon` behind the newest reading (never past `now_us`: a clock set a year
    ahead must not fold everyone's tail), or earlier to keep the newest `tail_rows` rows (a ward patient's few
    readings stay row by row for hours), but not more than `history` back."""
    newest = min(state.newest, now_us)
    line = newest - s.horizon_us
    t = state.tail["t"]
    if np.count_nonzero(t >= line) < s.tail_rows and len(t):
        kept = np.sort(t)[-s.tail_rows:]
        line = max(min(line, int(kept[0])), newest - s.history_us)
    return line


def _advance_fold(state: PersonState, s: Settings, now_us: int, person: str) -> None:
    """Move the fold line forward (`_fold_line`) and fold what falls behind it into carries and snapshots."""
    if state.newest is None:
        return
    line = _fold_line(state, s, now_us)
    old = state.fold
    if old is not None and line <= old:
        return
    tail = state.tail
    going = _View(tail.where(tail["t"] < line))
    # Snapshots at the grid boundaries a point at or after the new line may ask for.
    for w in s.windows_us:
        g = s.grid(w)
        first_needed = int(s.window_start(np.array([line], "int64"), w)[0])
        snaps = state.snapshots.get(w) or _Snapshots()
        keep = snaps.bounds >= first_needed
        lo = first_needed if old is None else max(first_needed, -((-old) // g) * g)
        new_bounds = np.arange(lo, line, g, dtype="int64") if lo < line else np.zeros(0, "int64")
        new_bounds = new_bounds[~np.isin(new_bounds, snaps.bounds[keep])]
        if not len(new_bounds) and keep.all() and w in state.snapshots:
            continue  # no grid boundary crossed: the snapshots stand
        fresh = _Snapshots(bounds=np.concatenate([snaps.bounds[keep], new_bounds]))
        for c in FEATURE_CONCEPTS:
            t, v = going.readings(c)
            lt, lv, n = _as_of_reading(t, v, state.features[c], new_bounds)
            fresh.last_t[c] = np.concatenate([snaps.last_t.get(c, np.zeros(0, "int64"))[keep], lt])
            fresh.last_v[c] = np.concatenate([snaps.last_v.get(c, np.zeros(0, "float64"))[keep], lv])
            fresh.n[c] = np.concatenate([snaps.n.get(c, np.zeros(0, "int64"))[keep], n])
        state.snapshots[w] = fresh
    for c in FEATURE_CONCEPTS:
        t, v = going.readings(c)
        if len(t):
            carry = state.features[c]
            carry.last_t, carry.last_v, carry.n = int(t[-1]), float(v[-1]), carry.n + len(t)
    for c in INPUTS:
        t, obs, v, valued = going.instants(c)
        if len(t):
            carry = state.inputs[c]
            carry.id_t, carry.obs_id = int(t[-1]), obs[-1]
            if valued.any():
                k = int(np.flatnonzero(valued)[-1])
                carry.value_t, carry.value = int(t[k]), v[k].item() if isinstance(v[k], np.generic) else v[k]
    enc_t, enc = going.encounters()
    if len(enc_t):
        state.encounter = (int(enc_t[-1]), enc[-1])
    # Alert machines past the folded points; alert rows of episodes that ended before the line are final.
    if state.points is not None and len(state.points):
        past = state.points.where(state.points["scored_at"] < line)
        if len(past):
            flags = _in_level(past, s)
            for level in s.levels:
                _run(state.machines[level], level, past, flags[level], s.resolve_after_us, person, [])
            running = {m.episode["alert_id"] for m in state.machines.values() if m.episode is not None}
            state.emitted = {aid: row for aid, row in state.emitted.items()
                             if aid in running or row["opened_at"] >= line}
        state.points = state.points.where(state.points["scored_at"] >= line)
    state.tail = tail.where(tail["t"] >= line)
    state.fold = line
