"""`carelake audit explain`: follow an alert or a score row back to the bytes as received, and check them.

The chain, each hop by the provenance the row carries:

    gold.deterioration_alerts (alert_id)  -> opened_at, observation_ids, model_version, scores_version
    gold.early_warning_scores (patient_key, scored_at) -> silver_version, code_version, input_observation_ids
    silver.observations as of silver_version (observation_id) -> source_record (bronze table, landing file,
                                                                  byte offset, sha256 of the unit)
    bronze.<feed> (landing_file, landing_position) -> the unit's bytes as stored, their sha256
    the landing file: the bytes at that offset, read and hashed now -> verified | MISMATCH | missing

Reads go through delta-rs without Spark. What bounds the cost: a score row and the silver rows are found in the
data files whose statistics can hold them (a time window around the score), a bronze record in the files of its
received time; an alert is found by reading only the `alert_id` column of the alerts table (so is an input older
than the `gold.history` window, e.g. an SpO2 scale-2 marker: only the `observation_id` column of every file).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.errors import CarelakeError, UsageError
from pipelines.timeutil import parse_timestamp

if TYPE_CHECKING:
    from pipelines.config import Config
    from pipelines.store import TableStore

ALERTS = "gold.deterioration_alerts"
SCORES = "gold.early_warning_scores"
OBSERVATIONS = "silver.observations"
VERIFIED, MISMATCH, MISSING = "verified", "MISMATCH", "missing"
_ALERT_COLUMNS = ("alert_id", "patient_key", "encounter_key", "level", "status", "opened_at", "resolved_at",
                  "news2_score", "news2_band", "qsofa_score", "model_risk", "model_version", "observation_ids",
                  "scores_version", "code_version", "computed_by", "computed_at")
_SCORE_COLUMNS = ("patient_key", "encounter_key", "scored_at", "news2_score", "news2_band", "news2_partial",
                  "qsofa_score", "sirs_count", "model_risk", "model_version", "input_observation_ids",
                  "silver_version", "code_version", "computed_by", "computed_at")
_OBSERVATION_COLUMNS = ("observation_id", "patient_key", "concept", "code", "value", "value_text", "unit",
                        "effective_at", "status", "source_feed", "source_system", "source_id", "source_version",
                        "received_at")
_BRONZE_WINDOW = timedelta(hours=1)  # around a silver row's received_at: the bronze files that can hold its record
_SCORE_COMMITS_AFTER = 3  # a score batch commits alerts, then scores (and features): within a few versions


class ExplainError(CarelakeError):
    """What was asked for is not in the tables (an unknown alert id, a score row that was withdrawn)."""


@dataclass(frozen=True)
class Target:
    """An alert id, or a score row key `patient_key@scored_at`."""

    alert_id: str | None = None
    patient_key: str | None = None
    scored_at: datetime | None = None

    @classmethod
    def parse(cls, text: str) -> Target:
        text = text.strip()
        if "@" in text:
            key, _, at = text.partition("@")
            if not key or not at:
                raise UsageError(f"{text!r}: a score row is PATIENT_KEY@SCORED_AT, e.g. 6c67d85f...@2026-11-21T10:00Z")
            return cls(patient_key=key, scored_at=parse_timestamp(at))
        if not text:
            raise UsageError("audit explain needs an alert_id or a score row key PATIENT_KEY@SCORED_AT")
        return cls(alert_id=text)


def score_key(patient_key: str, scored_at: datetime) -> str:
    """The text `audit explain` takes for a score row."""
    return f"{patient_key}@{scored_at.isoformat()}"


# -- reading a few rows ----------------------------------------------------------------------------------------
def find_rows(store: TableStore, name: str, version: int | None, match: Mapping[str, Any],
              since: tuple[str, datetime, datetime] | None = None, probe: str | None = None) -> list[dict]:
    """Rows of `name` (at `version`, default the newest) whose columns equal `match` (a list value: is in).

    `since=(column, t0, t1)` reads only the files whose statistics allow t0 <= column < t1; `probe` reads that one
    column of every file first and the whole file only where it matches (a key without useful statistics)."""
    from deltalake import DeltaTable

    from pipelines.store.deltars import _files_since, table_arrow_schema

    path = str(store.ref(name).path)
    if not store.exists(name):
        raise ExplainError(f"{name} does not exist under {store.cfg.root}; nothing to explain from it")
    dt = DeltaTable(path) if version is None else _open_version(store, name, path, version)
    schema = table_arrow_schema(dt)
    files = dt.file_uris() if since is None else _files_since(dt, path, *since)
    where = _match(match, schema)
    out: list[dict] = []
    try:
        for uri in files:
            if probe is not None and not _file_may_match(uri, probe, match[probe], schema):
                continue
            out += _read_file(uri, schema).filter(where).to_pylist()
    except FileNotFoundError as exc:
        from pipelines.errors import VersionNotFound

        raise VersionNotFound(f"{name} version {dt.version()} can no longer be read: a data file it needs was "
                              f"vacuumed ({exc.filename or exc}); storage.retention_days.audit keeps what audits "
                              "need") from exc
    return out


def _open_version(store: TableStore, name: str, path: str, version: int):
    from deltalake import DeltaTable

    from pipelines.errors import VersionNotFound

    try:
        return DeltaTable(path, version=version)
    except Exception as exc:  # delta-rs raises several types for a version it cannot load
        raise VersionNotFound(f"{name} version {version} can no longer be read (vacuumed or its log cleaned up: "
                              f"raise storage.retention_days.audit to keep what audits need): {exc}") from exc


def _read_file(uri: str, schema: pa.Schema, columns: list[str] | None = None) -> pa.Table:
    import pyarrow.parquet as pq

    return pq.read_table(_local(uri), schema=schema, columns=columns)


def _file_may_match(uri: str, column: str, value: Any, schema: pa.Schema) -> bool:
    col = _read_file(uri, schema, [column])[column]
    wanted = pa.array(value if isinstance(value, list) else [value], col.type)
    return pc.any(pc.is_in(col, value_set=wanted)).as_py() or False


def _match(match: Mapping[str, Any], schema: pa.Schema) -> pc.Expression:
    where = None
    for column, value in match.items():
        kind = schema.field(column).type
        expr = (pc.field(column).isin(pa.array(value, kind)) if isinstance(value, list)
                else pc.field(column) == pa.scalar(value, kind))
        where = expr if where is None else where & expr
    return where


def _local(uri: str) -> str:
    return unquote(urlsplit(uri).path) if uri.startswith("file:") else uri


# -- the landing bytes -----------------------------------------------------------------------------------------
def verify_landing(landing_file: str, offset: int, length: int, sha256: str) -> dict[str, Any]:
    """Read `length` bytes at `offset` of the landing file, hash them, and compare with the recorded sha256."""
    path = Path(_local(landing_file))
    out: dict[str, Any] = {"file": str(path), "offset": offset, "bytes": length, "sha256_recorded": sha256}
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read(length)
    except FileNotFoundError:
        return {**out, "sha256_read": None, "status": MISSING,
                "detail": "the landing file is gone (deleted by retention or moved); bronze still holds the bytes"}
    actual = hashlib.sha256(data).hexdigest()
    ok = len(data) == length and actual == sha256
    detail = None if ok else (f"only {len(data)} of {length} bytes are there" if len(data) != length
                              else "the bytes in the landing file are not the bytes received")
    return {**out, "sha256_read": actual, "status": VERIFIED if ok else MISMATCH, "detail": detail}


# -- the chain -------------------------------------------------------------------------------------------------
def explain(store: TableStore, cfg: Config, target: Target) -> dict[str, Any]:
    """The chain that produced an alert or a score row, with each landing unit verified against its file."""
    read: dict[str, int] = {}
    alert = None
    if target.alert_id is not None:
        read[ALERTS] = store.version(ALERTS)
        found = find_rows(store, ALERTS, read[ALERTS], {"alert_id": target.alert_id}, probe="alert_id")
        if not found:
            raise ExplainError(f"no alert {target.alert_id!r} in {ALERTS} (version {read[ALERTS]}); list alert ids "
                               f"with: carelake sql \"select alert_id, level, opened_at from {ALERTS}\"")
        alert = _pick(found[0], _ALERT_COLUMNS)
        patient_key, scored_at = alert["patient_key"], alert["opened_at"]
    else:
        patient_key, scored_at = target.patient_key, target.scored_at
    score = _score(store, read, patient_key, scored_at, alert["scores_version"] if alert else None)
    if score is None and alert is None:
        raise ExplainError(f"no score row {score_key(patient_key, scored_at)} in {SCORES} (version {read[SCORES]}): "
                           f"never scored, or withdrawn since; find when with carelake audit diff {SCORES} V1 V2")
    ids = list(score["input_observation_ids"] or []) if score else list(alert["observation_ids"] or [])
    observations = _observations(store, cfg, read, score, ids, scored_at) if score else []
    return {"target": target.alert_id or score_key(patient_key, scored_at), "alert": alert, "score": score,
            "model_version": (score or alert or {}).get("model_version"),
            "code_version": (score or alert or {}).get("code_version"),
            "tables_read": read, "observations": observations, "verdict": _verdict(score, ids, observations)}


def _score(store: TableStore, read: dict[str, int], patient_key: str, at: datetime,
           read_by_alert: int | None) -> dict | None:
    """The score row now; one withdrawn since (late or corrected data) as the batch that raised the alert wrote
    it: at the alert's scores_version or in the few versions after it."""
    latest = store.version(SCORES)
    tried = [latest] + ([] if read_by_alert is None else
                        list(range(read_by_alert, min(read_by_alert + _SCORE_COMMITS_AFTER, latest) + 1)))
    for version in tried:
        found = find_rows(store, SCORES, version, {"patient_key": patient_key, "scored_at": at},
                          since=("scored_at", at, at + timedelta(milliseconds=1)))
        if found:
            read[SCORES] = version
            return {**_pick(found[0], _SCORE_COLUMNS), "withdrawn_since": version != latest}
    read[SCORES] = latest
    return None


def _observations(store: TableStore, cfg: Config, read: dict[str, int], score: dict, ids: list[str],
                  at: datetime) -> list[dict]:
    version = score["silver_version"]
    read[OBSERVATIONS] = version
    history = timedelta(milliseconds=cfg.gold.history_ms)
    rows = find_rows(store, OBSERVATIONS, version, {"observation_id": ids},
                     since=("effective_at", at - history, at + timedelta(milliseconds=1)))
    by_id = {r["observation_id"]: r for r in rows}
    older = [i for i in ids if i not in by_id]  # an input from before the window (a scale-2 marker): look wider
    if older:
        by_id.update((r["observation_id"], r) for r in find_rows(store, OBSERVATIONS, version,
                                                                 {"observation_id": older}, probe="observation_id"))
    bronze_cache: dict[tuple, dict] = {}
    out = []
    for oid in ids:
        row = by_id.get(oid)
        if row is None:
            out.append({"observation_id": oid, "status_in_silver": MISSING})
            continue
        source = row["source_record"]
        key = (source["table"], source["landing_file"], source["landing_position"])
        if key not in bronze_cache:
            bronze_cache[key] = _bronze(store, read, source, row.get("received_at"))
        out.append({**_pick(row, _OBSERVATION_COLUMNS), "source_record": source, **bronze_cache[key]})
    return out


def _bronze(store: TableStore, read: dict[str, int], source: Mapping[str, Any], received_at: datetime | None) -> dict:
    """The bronze record a silver row points at, and its landing unit verified."""
    table = source["table"]
    read.setdefault(table, store.version(table))
    since = None if received_at is None else ("received_at", received_at - _BRONZE_WINDOW,
                                              received_at + _BRONZE_WINDOW)
    found = find_rows(store, table, read[table], {"landing_file": source["landing_file"],
                                                   "landing_position": source["landing_position"]}, since=since)
    if not found:
        return {"bronze": None, "landing": {"file": _local(source["landing_file"]), "offset":
                source["landing_position"], "status": MISSING, "detail": f"no record in {table}"}}
    rec = found[0]
    payload = rec.get("payload") or b""
    bronze = {"table": table, "landing_file": rec["landing_file"], "landing_position": rec["landing_position"],
              "received_at": rec["received_at"], "ingest_batch_id": rec["ingest_batch_id"], "sha256": rec["sha256"],
              "bytes": len(payload), "payload_sha256_matches": hashlib.sha256(payload).hexdigest() == rec["sha256"]}
    landing = verify_landing(rec["landing_file"], rec["landing_position"], len(payload), source["sha256"])
    if landing["status"] == VERIFIED and (rec["sha256"] != source["sha256"] or not bronze["payload_sha256_matches"]):
        landing = {**landing, "status": MISMATCH, "detail": "the landing bytes match silver's hash but bronze's "
                   "stored bytes do not"}
    return {"bronze": bronze, "landing": landing}


def _verdict(score: dict | None, ids: list[str], observations: list[dict]) -> str:
    statuses = [o["landing"]["status"] if "landing" in o else MISSING for o in observations]
    if MISMATCH in statuses:
        return MISMATCH
    if score is None or not ids or len(statuses) < len(ids) or any(s != VERIFIED for s in statuses):
        return "incomplete"
    return VERIFIED


def _pick(row: Mapping[str, Any], columns: Iterable[str]) -> dict[str, Any]:
    return {c: row.get(c) for c in columns}
