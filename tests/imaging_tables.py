"""Tiny hand-made imaging tables in the imaging contract's columns (silver.imaging_orders, silver.imaging_reports),
silver.imaging_studies, and the clinical gold tables the worklist joins, for the worklist's tests and benchmark."""

from __future__ import annotations

import csv
import random
from datetime import UTC, datetime, timedelta
from typing import Any

from pyspark.sql.types import ArrayType, BooleanType, StringType, StructField, StructType, TimestampType

ORDERS_SCHEMA = StructType([
    *(StructField(c, StringType(), c != "order_key") for c in (
        "order_key", "order_number", "filler_order_number", "accession_number", "patient_key", "encounter_key",
        "procedure_code", "procedure_system", "procedure_display", "modality", "body_part", "priority",
        "priority_raw", "indication_text")),
    StructField("indication_codes", ArrayType(StringType()), True),
    StructField("ordered_at", TimestampType(), True),
    *(StructField(c, StringType(), True) for c in ("location_class", "ordering_location", "status", "source_feed")),
    StructField("ingested_at", TimestampType(), True),
])
REPORTS_SCHEMA = StructType([
    *(StructField(c, StringType(), c != "report_key") for c in (
        "report_key", "accession_number", "order_number", "study_instance_uid", "patient_key", "status")),
    StructField("read_at", TimestampType(), True), StructField("reader", StringType(), True),
    StructField("critical", BooleanType(), True), StructField("conclusion", StringType(), True),
    StructField("ingested_at", TimestampType(), True),
])


def study(uid: str, patient: str, accession: str | None, at: datetime, modality: str, body_part: str) -> dict:
    source = {"table": "bronze.dicom_instances", "landing_file": "f", "landing_position": 0, "sha256": "x"}
    return {"study_instance_uid": uid, "patient_key": patient, "accession_number": accession, "study_time_utc": at,
            "modality": modality, "modalities": [modality], "body_part": body_part, "series_count": 1,
            "instance_count": 1, "first_received_at": at, "last_received_at": at, "source_feed": "dicom",
            "source_record": source, "ingested_at": at}


def order(key: str, patient: str, accession: str, at: datetime, priority: str, location: str | None = None,
          modality: str = "CT", body_part: str = "HEAD", text: str | None = None, codes: list[str] | None = None,
          status: str = "active") -> dict:
    return {"order_key": key, "order_number": f"ORD-{key}", "accession_number": accession, "patient_key": patient,
            "procedure_display": f"{modality} {body_part}", "modality": modality, "body_part": body_part,
            "priority": priority, "priority_raw": priority[0], "indication_text": text, "indication_codes": codes or [],
            "ordered_at": at, "location_class": location, "status": status, "source_feed": "hl7", "ingested_at": at}


def report(key: str, accession: str, at: datetime, status: str = "final") -> dict:
    return {"report_key": key, "accession_number": accession, "status": status, "read_at": at, "reader": "Dr R",
            "critical": False, "ingested_at": at}


def score(patient: str, at: datetime, band: str, points: int) -> dict:
    return {"patient_key": patient, "scored_at": at, "news2_band": band, "news2_score": points, "silver_version": 1}


def alert(patient: str, at: datetime, level: str, status: str = "open") -> dict:
    return {"alert_id": f"{patient}-{level}", "patient_key": patient, "level": level, "status": status,
            "opened_at": at}


def write(spark, store, table: str, rows: list[dict[str, Any]], schema: StructType) -> None:
    """Append rows (missing columns null) to a table, creating it."""
    full = [{f.name: r.get(f.name) for f in schema.fields} for r in rows]
    store.append(table, spark.createDataFrame(full, schema).toArrow())


def accession_match(orders, studies, *, window):
    """The contract's first rule only (accession number): stands in for silver.imaging_match in these tests."""
    from pyspark.sql import functions as F

    pairs = orders.select("order_key", "accession_number").join(
        studies.select("study_instance_uid", "accession_number"), "accession_number", "full_outer")
    return pairs.select("order_key", "study_instance_uid",
                        F.when(F.col("order_key").isNotNull() & F.col("study_instance_uid").isNotNull(),
                               F.lit("accession")).alias("match_method"))


# A simulated day's truth/imaging.csv (the imaging contract's columns), for the replay and the model.
START = datetime(2026, 1, 5, tzinfo=UTC)
COLUMNS = ("order_number", "accession_number", "visit_number", "patient_mrn", "procedure_code", "priority",
           "ordered_time", "study_time", "study_instance_uid", "indication_code", "indication_text", "location_class",
           "critical_finding", "finding", "read_time", "reader")


def truth_rows(n: int = 260, seed: int = 3) -> list[dict]:
    """A day of studies: STAT ones often critical, and ED strokes and bleeds ordered ASAP/ROUTINE that often are."""
    rng = random.Random(seed)
    rows = []
    for k in range(n):
        at = START + timedelta(minutes=rng.uniform(0, 24 * 60))
        kind = rng.random()
        if kind < 0.15:
            priority, cpt, code, text, where, p = "stat", "71250", "I26.99", "? PE", "ICU", 0.3
        elif kind < 0.30:
            priority, cpt, code, text, where, p = rng.choice(["asap", "routine"]), "70450", "I63.9", "stroke", "ED", 0.4
        else:
            priority, cpt, code, text, where, p = rng.choice(["asap", "routine", "routine"]), "71046", "R05", "cough", \
                "WARD", 0.02
        rows.append({"order_number": f"O{k}", "accession_number": f"A{k}", "patient_mrn": f"M{k % 90}",
                     "procedure_code": cpt, "priority": priority, "ordered_time": at.isoformat(),
                     "study_time": at.strftime("%Y-%m-%dT%H:%M:%SZ"), "study_instance_uid": f"1.2.{k}",
                     "indication_code": code, "indication_text": text, "location_class": where,
                     "critical_finding": "1" if rng.random() < p else "0"})
    rows.append({"order_number": "O-none", "accession_number": "A-none", "procedure_code": "70450", "priority": "stat",
                 "study_time": "", "study_instance_uid": "", "critical_finding": "0"})  # ordered, never imaged
    return rows


def write_truth(path, rows, columns=COLUMNS):
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def simulated_day(cfg, folder, seed: int = 11, hours: int = 24):
    """The simulator's own emergency-department and outpatient imaging of one seeded day (its case mix, priorities,
    under-triage and ground-truth findings; no inpatients, so no Spark), written as folder/truth/imaging.csv."""
    from pipelines.simulator.acuity import WardCharts
    from pipelines.simulator.params import resolve_params
    from pipelines.simulator.population import Census
    from pipelines.simulator.run import _csv
    from pipelines.simulator.timeline import _imaging_orders
    from pipelines.simulator.truth import IMAGING_COLUMNS, _imaging_row, _iso

    params = resolve_params(cfg.simulator, folder, seed=seed, hours=hours, force=True)
    orders = _imaging_orders(Census([], 1), params, WardCharts({}))
    uids = {o.order_no: f"1.2.826.0.1.3680043.10.{seed}.{n}" for n, o in enumerate(orders) if o.study_s is not None}
    path = folder / "truth" / "imaging.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    _csv(path, IMAGING_COLUMNS, [_imaging_row(o, uids, _iso(params)) for o in orders])
    return path
