"""silver.imaging_studies on the driver: a small fused batch's studies recomputed in Python, by key.

A batch of bronze.dicom_instances that the runner writes through the driver (continuous mode: one or a few
instances) does not run silver.imaging_studies' Spark plan, whose windows, aggregation and bronze scan cost 1-4 s
on a loaded 2-core machine whatever the batch holds. This module computes the same rows from the same inputs:

1. the batch's own bronze rows (collected once by the runner: `carried_rows`), and the rows bronze already holds
   of the studies they touch, read by study UID with delta-rs (files whose statistics cannot hold those UIDs are
   skipped: `pipelines.store.deltars.read_where(keys=)`);
2. each usable instance once (its newest receipt), its header attributes read from the DICOM JSON as Spark's
   `get_json_object` reads them, the study time in UTC as `silver.imaging_studies.study_time_utc` computes it;
3. one row per study with the same aggregates (latest study-level values, most frequent modality and body part,
   distinct series and instances, first and last receipt, the newest instance's lineage), and the unusable
   instances as silver.quarantine rows.

tests/test_imaging_study_rows.py holds both paths equal on random instances (odd times, offsets, zones, JSON nulls,
repeated receipts, missing values) and through the runner.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta, timezone
from functools import lru_cache
from typing import Any

import pyarrow as pa

from silver.identity import PATIENT, identity_key
from silver.imaging_studies import _STUDY_LEVEL, _TAGS, BRONZE, INSTANCE_COLUMNS, SCHEMA, STUDIES
from silver.quarantine import QUARANTINE, QUARANTINE_SCHEMA, quarantine_id

# Whole-text matches (Spark's patterns end in \z: no line terminator after the value).
_DATE = re.compile(r"[0-9]{8}", re.ASCII)
_CLOCK = re.compile(r"[0-9]{0,6}", re.ASCII)
_FRACTION = re.compile(r"\.([0-9]{1,6})", re.ASCII)
_OFFSET = re.compile(r"[+-](0[0-9]|1[0-4])[0-5][0-9]", re.ASCII)


def _path(tag_path: str) -> tuple[str, str | None]:
    """'$.00100010.Value[0].Alphabetic' -> ('00100010', 'Alphabetic'); '$.00080060.Value[0]' -> ('00080060', None)."""
    parts = tag_path.split(".")
    return parts[1], parts[3] if len(parts) > 3 else None


_PATHS = {name: _path(p) for name, p in _TAGS.items()}


def _json_text(value: Any) -> str | None:
    """A JSON value as get_json_object returns it: a string as itself, JSON null as null, anything else as JSON."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _refuse(token: str) -> None:
    raise ValueError(f"{token} is not JSON")


def header_values(header_json: str | None) -> dict[str, str | None]:
    """The header attributes silver reads (silver.imaging_studies._TAGS): each tag's first value (a name's
    alphabetic group), null when the header, the tag or the value is absent or null."""
    try:  # Spark's JSON reader refuses NaN and Infinity: a header that holds one gives nothing there
        header = json.loads(header_json, parse_constant=_refuse) if header_json else None
    except (ValueError, RecursionError):
        header = None
    out: dict[str, str | None] = {}
    for name, (tag, member) in _PATHS.items():
        element = header.get(tag) if isinstance(header, dict) else None
        values = element.get("Value") if isinstance(element, dict) else None
        first = values[0] if isinstance(values, list) and values else None
        if member is not None:
            first = first.get(member) if isinstance(first, dict) else None
        out[name] = _json_text(first)
    return out


@lru_cache(maxsize=64)
def _zone(name: str):
    from zoneinfo import ZoneInfo

    return ZoneInfo(name)


def study_time_utc(date: str | None, time: str | None, offset: str | None, zone: str) -> datetime | None:
    """silver.imaging_studies.study_time_utc on values: DA + TM in the sent offset, else the hospital's zone."""
    whole = (time or "").split(".", 1)[0].replace(":", "")
    if date is None or not _DATE.fullmatch(date) or date.startswith("0000") or not _CLOCK.fullmatch(whole):
        return None
    found = _FRACTION.search(time) if time is not None else None
    clock, micros = whole.ljust(6, "0"), int((found.group(1) if found else "").ljust(6, "0"))
    try:
        local = datetime(int(date[:4]), int(date[4:6]), int(date[6:]), int(clock[:2]), int(clock[2:4]),
                         int(clock[4:]), micros)
    except ValueError:
        return None
    if offset is not None and _OFFSET.fullmatch(offset):
        sign = -1 if offset[0] == "-" else 1
        tz: Any = timezone(sign * timedelta(hours=int(offset[1:3]), minutes=int(offset[3:])))
    else:
        tz = _zone(zone)
    try:
        return local.replace(tzinfo=tz).astimezone(UTC)
    except OverflowError:  # before year 1 or after 9999 in UTC: no time (the Spark plan agrees)
        return None


def canonical_system(issuer: str | None, mrn_system: str, aliases: Iterable[tuple[str, str]]) -> str:
    """silver.imaging_studies.canonical_system on a value."""
    out = issuer.strip(" ") if issuer is not None else ""
    out = out or mrn_system
    for alias, canonical in aliases:
        if out == alias:
            out = canonical
    return out


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def instances(rows: Iterable[Mapping[str, Any]], zone: str) -> list[dict[str, Any]]:
    """silver.imaging_studies._instances on rows: each usable instance once (its newest receipt), with first_seen
    and the header attributes."""
    newest: dict[Any, dict[str, Any]] = {}
    first: dict[Any, datetime] = {}
    for r in rows:
        if r["parse_status"] != "ok" or r["study_instance_uid"] is None:
            continue
        sop, at = r["sop_instance_uid"], _aware(r["received_at"])
        first[sop] = min(first.get(sop, at), at)
        held = newest.get(sop)
        if held is None or (at, r["landing_file"], r["landing_position"]) > _order(held):
            newest[sop] = {**r, "received_at": at}
    out = []
    for sop, r in newest.items():
        values = header_values(r["header_json"])
        out.append({**r, **values, "first_seen": first[sop],
                    "study_time_utc": study_time_utc(values["study_date"], values["study_time"],
                                                     values["tz_offset"], zone)})
    return out


def _order(r: Mapping[str, Any]) -> tuple:
    return r["received_at"], r["landing_file"], r["landing_position"]


def _most_frequent(values: list[str | None]) -> str | None:
    """The value most instances carry; of equal counts the greatest (Spark's max_by over (count, value))."""
    counts: dict[str, int] = {}
    for v in values:
        if v is not None:
            counts[v] = counts.get(v, 0) + 1
    return max(counts, key=lambda v: (counts[v], v)) if counts else None


def studies(usable: list[dict[str, Any]], *, secret: str, mrn_system: str, aliases: Iterable[tuple[str, str]],
            processed_at: datetime) -> list[dict[str, Any]]:
    """silver.imaging_studies.studies on rows: one row per study."""
    by_study: dict[str, list[dict[str, Any]]] = {}
    for r in usable:
        by_study.setdefault(r["study_instance_uid"], []).append(r)
    out = []
    for uid, group in by_study.items():
        group.sort(key=_order)  # oldest first: the last carrier of a value is the newest
        row: dict[str, Any] = {"study_instance_uid": uid}
        for column in _STUDY_LEVEL:
            row[column] = next((r[column] for r in reversed(group) if r[column] is not None), None)
        modalities = [r["modality_1"] if r["modality_1"] is not None else r["modality"] for r in group]
        newest = group[-1]
        patient_id = row["patient_id"] or None
        system = canonical_system(row["patient_id_issuer"], mrn_system, aliases)
        row.update(
            modality=_most_frequent(modalities), modalities=sorted({m for m in modalities if m is not None}),
            body_part=_most_frequent([r["body_part_1"] for r in group]),
            series_count=len({r["series_instance_uid"] for r in group if r["series_instance_uid"] is not None}),
            instance_count=len({r["sop_instance_uid"] for r in group if r["sop_instance_uid"] is not None}),
            first_received_at=min(r["first_seen"] for r in group), last_received_at=newest["received_at"],
            patient_key=identity_key(secret, PATIENT, system, patient_id) if patient_id is not None else None,
            source_feed="dicom", ingested_at=processed_at.astimezone(UTC),
            source_record={"table": BRONZE, "landing_file": newest["landing_file"],
                           "landing_position": newest["landing_position"], "sha256": newest["sha256"]})
        out.append(row)
    return out


def quarantined(rows: Iterable[Mapping[str, Any]], processed_at: datetime) -> list[dict[str, Any]]:
    """silver.imaging_studies.quarantined on rows."""
    out = []
    for r in rows:
        if r["parse_status"] == "ok":
            continue
        reason = f"dicom_{r['parse_status']}"
        out.append({"quarantine_id": quarantine_id(STUDIES, BRONZE, r["landing_file"], r["landing_position"],
                                                   "instance", reason),
                    "feed": "dicom", "source_table": BRONZE, "landing_file": r["landing_file"],
                    "landing_position": r["landing_position"], "sha256": r["sha256"], "item": "instance",
                    "reason": reason, "detail": r["parse_detail"], "job": STUDIES,
                    "quarantined_at": processed_at.astimezone(UTC)})
    return out


@lru_cache(maxsize=1)
def arrow_schemas() -> tuple[pa.Schema, pa.Schema]:
    from pyspark.sql.pandas.types import to_arrow_schema

    return to_arrow_schema(SCHEMA), to_arrow_schema(QUARANTINE_SCHEMA)


def on_driver(batch: pa.Table, held: pa.Table | None, *, secret: str, timezone: str, mrn_system: str,
              system_aliases: Iterable[tuple[str, str]], processed_at: datetime) -> dict[str, pa.Table]:
    """A batch's bronze rows (and bronze's rows of the studies they touch) -> the touched studies, recomputed
    whole, and the batch's unusable instances as quarantine rows, as Arrow tables in the tables' schemas."""
    mine = batch.select(list(INSTANCE_COLUMNS)).to_pylist()
    rows = [*(held.select(list(INSTANCE_COLUMNS)).to_pylist() if held is not None else ()), *mine]
    study_rows = studies(instances(rows, timezone), secret=secret, mrn_system=mrn_system,
                         aliases=tuple(system_aliases), processed_at=processed_at)
    schemas = arrow_schemas()
    return {STUDIES: pa.Table.from_pylist(study_rows, schema=schemas[0]),
            QUARANTINE: pa.Table.from_pylist(quarantined(mine, processed_at), schema=schemas[1])}


def touched(batch: pa.Table) -> set[str]:
    """The study UIDs of a batch's usable instances."""
    return {r["study_instance_uid"] for r in batch.select(["study_instance_uid", "parse_status"]).to_pylist()
            if r["parse_status"] == "ok" and r["study_instance_uid"] is not None}
