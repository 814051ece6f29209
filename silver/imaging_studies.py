"""silver.imaging_studies: one row per DICOM study (Study Instance UID), from bronze.dicom_instances.

Each batch takes the studies its new bronze rows touch and recomputes them whole from every usable instance of
theirs in bronze (the instances of a study arrive over many batches and from several senders), so a row is the
same whatever the batches were and a replay changes nothing; the MERGE replaces it. An instance counts once
however often it was sent (its SOP Instance UID, the newest receipt). Study-level attributes come from the
newest instance that carries them.

Instances bronze could not read whole (parse_status other than ok: not DICOM, truncated, no usable file meta,
missing UIDs) go to silver.quarantine with their bronze lineage, reason `dicom_<status>` and the parse detail.

| column              | from                                                                               |
|---------------------|------------------------------------------------------------------------------------|
| study_time_utc      | (0008,0020) Study Date + (0008,0030) Study Time, in the (0008,0201) offset if sent, |
|                     | else the hospital's zone (silver.timezone); null when the date is missing or bad   |
| accession_number    | (0008,0050)                                                                        |
| referring_physician | (0008,0090), the alphabetic name                                                  |
| patient_key         | silver.identity over (0010,0020) Patient ID in (0010,0021) Issuer (else the        |
|                     | hospital's MRN system): the key HL7 and FHIR rows of the same MRN get              |
| modality, modalities| the most frequent (0008,0060) of the study's instances; all of them, sorted        |
| body_part           | the most frequent (0018,0015) Body Part Examined                                   |
| series_count        | distinct (0020,000E) Series Instance UIDs; instance_count: distinct SOP instances  |

Patient name, ID and birth date are direct identifiers: they stay in silver (like silver.patients).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import (
    ArrayType,
    IntegerType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

from silver.identity import PATIENT, identity_key_column
from silver.quarantine import QUARANTINE, QUARANTINE_SCHEMA, quarantine_id_column
from silver.routing import SOURCE_RECORD

log = logging.getLogger("carelake.imaging")
STUDIES = "silver.imaging_studies"
BRONZE = "bronze.dicom_instances"

SCHEMA = StructType([
    StructField("study_instance_uid", StringType(), False),
    StructField("patient_key", StringType(), True),
    StructField("patient_id", StringType(), True),
    StructField("patient_id_issuer", StringType(), True),
    StructField("patient_name", StringType(), True),
    StructField("patient_birth_date", StringType(), True),
    StructField("accession_number", StringType(), True),
    StructField("study_id", StringType(), True),
    StructField("study_description", StringType(), True),
    StructField("study_time_utc", TimestampType(), True),
    StructField("referring_physician", StringType(), True),
    StructField("modality", StringType(), True),
    StructField("modalities", ArrayType(StringType()), True),
    StructField("body_part", StringType(), True),
    StructField("series_count", IntegerType(), False),
    StructField("instance_count", IntegerType(), False),
    StructField("first_received_at", TimestampType(), False),
    StructField("last_received_at", TimestampType(), False),
    StructField("source_feed", StringType(), False),
    StructField("source_record", SOURCE_RECORD, False),  # the newest instance of the study in bronze
    StructField("ingested_at", TimestampType(), False),
])

# (column, DICOM JSON path): the header attributes silver reads, first value; a PN value's alphabetic group.
_TAGS = {
    "modality_1": "$.00080060.Value[0]", "body_part_1": "$.00180015.Value[0]",
    "study_date": "$.00080020.Value[0]", "study_time": "$.00080030.Value[0]", "tz_offset": "$.00080201.Value[0]",
    "accession_number": "$.00080050.Value[0]", "study_id": "$.00200010.Value[0]",
    "study_description": "$.00081030.Value[0]", "referring_physician": "$.00080090.Value[0].Alphabetic",
    "patient_id": "$.00100020.Value[0]", "patient_id_issuer": "$.00100021.Value[0]",
    "patient_name": "$.00100010.Value[0].Alphabetic", "patient_birth_date": "$.00100030.Value[0]",
}
# The bronze columns a study is computed from (the batch's rows and those bronze holds of its studies).
INSTANCE_COLUMNS = ("study_instance_uid", "series_instance_uid", "sop_instance_uid", "modality", "header_json",
                    "parse_status", "parse_detail", "received_at", "landing_file", "landing_position", "sha256")
NEWEST = ("received_at", "landing_file", "landing_position")  # an instance's order of receipt
_STUDY_LEVEL = ("accession_number", "study_id", "study_description", "referring_physician", "patient_id",
                "patient_id_issuer", "patient_name", "patient_birth_date", "study_time_utc")


def study_time_utc(date: Column, time: Column, offset: Column, timezone: str) -> Column:
    """DA + TM (HH, HHMM, HHMMSS, HHMMSS.F..., or the old HH:MM:SS) in the sent offset (+HHMM) or `timezone`."""
    whole = F.regexp_replace(F.split(F.coalesce(time, F.lit("")), r"\.").getItem(0), ":", "")
    fraction = F.coalesce(F.regexp_extract(time, r"\.([0-9]{1,6})", 1), F.lit(""))
    clock = F.rpad(whole, 6, "0")
    # An impossible date or time (month 13, hour 24) is null, not an error that fails the batch (ANSI mode).
    local = F.try_to_timestamp(F.concat(date, clock, F.lit("."), F.rpad(fraction, 6, "0")),
                               F.lit("yyyyMMddHHmmss.SSSSSS"))
    zone = F.when(offset.rlike(r"^[+-](0[0-9]|1[0-4])[0-5][0-9]\z"),
                  F.concat(F.substring(offset, 1, 3), F.lit(":"), F.substring(offset, 4, 2))).otherwise(F.lit(timezone))
    # Year 0000 (a placeholder some modalities send) is no time: Python has no year 0, and neither has a study.
    valid = date.rlike(r"^[0-9]{8}\z") & ~date.startswith("0000") & whole.rlike(r"^[0-9]{0,6}\z")
    utc = F.to_utc_timestamp(local, zone)
    return F.when(valid & F.year(utc).between(1, 9999), utc)  # years Python (the driver path) can hold too


def canonical_system(issuer: Column, mrn_system: str, aliases: tuple[tuple[str, str], ...]) -> Column:
    """The identifier system silver keys MRNs under: the issuer's canonical name, or the hospital's MRN system."""
    out = F.coalesce(F.nullif(F.trim(issuer), F.lit("")), F.lit(mrn_system))
    for alias, canonical in aliases:
        out = F.when(out == alias, F.lit(canonical)).otherwise(out)
    return out


def _first_value(path: str) -> Column:
    """get_json_object of a tag's first value, a JSON null as null (get_json_object gives the text "null" for it,
    as for the string "null"): the tag's Value array is read once, its first element from that."""
    tag, _, rest = path.partition(".Value[0]")
    values = F.get_json_object("header_json", f"{tag}.Value")
    return F.when(~values.rlike(r"^\[null[,\]]"), F.get_json_object(values, f"$[0]{rest}"))


def _header_columns(df: DataFrame) -> DataFrame:
    return df.select("*", *(_first_value(path).alias(name) for name, path in _TAGS.items()))


def _most_frequent(column: str) -> Column:
    """The value most instances carry (ties: the greatest), nulls aside."""
    counted = F.struct(F.col(f"{column}_count").alias("n"), F.col(column).alias("v"))
    return F.max_by(F.col(column), counted)


def _latest(column: str) -> Column:
    """The newest instance's value (receipt, then landing file and position), among the instances that carry one."""
    return F.max_by(F.col(column), F.when(F.col(column).isNotNull(), F.struct(*NEWEST)))


def quarantined(changes: DataFrame, processed_at: datetime) -> DataFrame:
    """Bronze instances silver cannot use, as silver.quarantine rows."""
    bad = changes.where(F.col("parse_status") != "ok")
    reason = F.concat(F.lit("dicom_"), F.col("parse_status"))
    return bad.select(
        quarantine_id_column(STUDIES, F.lit(BRONZE), F.col("landing_file"), F.col("landing_position"),
                             F.lit("instance"), reason).alias("quarantine_id"),
        F.lit("dicom").alias("feed"), F.lit(BRONZE).alias("source_table"), "landing_file", "landing_position",
        "sha256", F.lit("instance").alias("item"), reason.alias("reason"), F.col("parse_detail").alias("detail"),
        F.lit(STUDIES).alias("job"), F.lit(processed_at).cast("timestamp").alias("quarantined_at"),
    ).select(*(F.col(f.name).cast(f.dataType) for f in QUARANTINE_SCHEMA.fields))


def _instances(rows: DataFrame, timezone: str) -> DataFrame:
    """Usable instances, once each (newest receipt), with the header attributes silver reads."""
    from pyspark.sql import Window

    newest = F.row_number().over(_by_instance())
    first = F.min("received_at").over(Window.partitionBy("sop_instance_uid"))
    usable = rows.where((F.col("parse_status") == "ok") & F.col("study_instance_uid").isNotNull())
    once = usable.withColumn("_n", newest).withColumn("first_seen", first).where(F.col("_n") == 1).drop("_n")
    cols = _header_columns(once)
    return cols.withColumn("study_time_utc", study_time_utc(F.col("study_date"), F.col("study_time"),
                                                             F.col("tz_offset"), timezone))


def _by_instance():
    from pyspark.sql import Window

    return Window.partitionBy("sop_instance_uid").orderBy(F.col("received_at").desc(), F.col("landing_file").desc(),
                                                          F.col("landing_position").desc())


def _with_counts(instances: DataFrame, column: str) -> DataFrame:
    from pyspark.sql import Window

    w = Window.partitionBy("study_instance_uid", column)
    return instances.withColumn(f"{column}_count", F.when(F.col(column).isNotNull(), F.count("*").over(w)))


def studies(instances: DataFrame, *, secret: str, mrn_system: str, aliases: tuple[tuple[str, str], ...],
            processed_at: datetime) -> DataFrame:
    """Usable instances of whole studies -> one silver.imaging_studies row per study."""
    counted = _with_counts(_with_counts(instances.withColumnRenamed("modality", "modality_0")
                                        .withColumn("modality", F.coalesce("modality_1", "modality_0")),
                                        "modality").withColumnRenamed("body_part_1", "body_part"), "body_part")
    agg = counted.groupBy("study_instance_uid").agg(
        *(_latest(c).alias(c) for c in _STUDY_LEVEL),
        _most_frequent("modality").alias("modality"),
        F.array_sort(F.collect_set("modality")).alias("modalities"),
        _most_frequent("body_part").alias("body_part"),
        F.countDistinct("series_instance_uid").cast("int").alias("series_count"),
        F.countDistinct("sop_instance_uid").cast("int").alias("instance_count"),
        F.min("first_seen").alias("first_received_at"), F.max("received_at").alias("last_received_at"),
        F.max_by(F.struct(F.lit(BRONZE).alias("table"), "landing_file", "landing_position", "sha256"),
                 F.struct(*NEWEST)).alias("source_record"),
    )
    system = canonical_system(F.col("patient_id_issuer"), mrn_system, aliases)
    out = agg.withColumn("patient_key", identity_key_column(secret, PATIENT, system, F.nullif(F.col("patient_id"),
                                                                                              F.lit(""))))
    out = out.withColumn("source_feed", F.lit("dicom")).withColumn("ingested_at",
                                                                   F.lit(processed_at).cast("timestamp"))
    return out.select(*(F.col(f.name).cast(f.dataType) for f in SCHEMA.fields))


def imaging_studies(changes: DataFrame, *, read_table: Callable[..., DataFrame],
                    table_version: Callable[[str], int | None], processed_at: datetime, secret: str, timezone: str,
                    mrn_system: str, system_aliases: tuple[tuple[str, str], ...], via_driver: bool = False,
                    carried_rows: Any = None, read_rows: Callable[..., Any] | None = None) -> dict[str, Any]:
    """bronze.dicom_instances changes -> the touched studies, recomputed whole; unusable instances quarantined.

    A study's instances are the batch's own rows and those bronze already holds: inside a fused bronze batch
    (streaming.fuse) the batch's rows are not committed yet; read from bronze's change feed they are in both, and
    an instance counts once either way. A batch the runner writes through the driver (`via_driver`) is computed
    there, in Python, from the batch's rows (the carrier's, collected once: `carried_rows`) and bronze's rows of
    its studies read by key (`read_rows`): silver.imaging_study_rows, the same rows as the Spark plan below."""
    inserted = changes.where(F.col("_change_type") == "insert") if "_change_type" in changes.columns else changes
    if via_driver and read_rows is not None:
        from pipelines.timeutil import Steps
        from silver import imaging_study_rows as on_driver

        steps = Steps()
        batch = carried_rows if carried_rows is not None else inserted.select(*INSTANCE_COLUMNS).toArrow()
        touched_uids, version = on_driver.touched(batch), table_version(BRONZE)
        steps.done("batch")
        held = None
        if touched_uids and version is not None:
            held = read_rows(BRONZE, version, None, list(INSTANCE_COLUMNS), keys=("study_instance_uid", touched_uids))
        steps.done("bronze by key")
        out = on_driver.on_driver(batch, held, secret=secret, timezone=timezone, mrn_system=mrn_system,
                                  system_aliases=system_aliases, processed_at=processed_at)
        steps.done("rows")
        log.info("%s driver path: %d study(ies) from %d batch row(s) + %d bronze row(s) read by key; steps (s): %s",
                 STUDIES, out[STUDIES].num_rows, batch.num_rows, held.num_rows if held is not None else 0,
                 steps.line())
        return out
    touched = inserted.where(F.col("parse_status") == "ok").select("study_instance_uid").distinct()
    whole = inserted.select(*INSTANCE_COLUMNS)
    if table_version(BRONZE) is not None:
        held = read_table(BRONZE).select(*INSTANCE_COLUMNS)
        held = held.join(F.broadcast(touched), "study_instance_uid", "left_semi")
        whole = held.unionByName(whole)
    rows = studies(_instances(whole, timezone), secret=secret, mrn_system=mrn_system, aliases=system_aliases,
                   processed_at=processed_at)
    return {STUDIES: rows, QUARANTINE: quarantined(inserted, processed_at)}
