"""bronze.device_readings: bedside-device JSON lines, one row per line, bytes kept exactly.

Input is the landing zone read as whole files (Spark's binaryFile source): gateway segments, whose
records are HTTP bodies of JSON lines, and files dropped with `carelake ingest`. Bronze never rejects:
a line that is not a JSON object with a device id, or bytes from a corrupt segment tail, still land,
with parse_status saying why, so silver can quarantine them with their lineage.
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import (
    StringType,
    StructField,
    StructType,
)

from bronze.landed import landed_units, lineage_columns, lineage_fields, lines

FEED = "devices"

SCHEMA = StructType([
    *lineage_fields(),
    StructField("device_id", StringType(), True),
    StructField("reading_time", StringType(), True),
    StructField("parse_status", StringType(), False),
])


# The cheap keys, parsed once per line; a line that is not one JSON object fills _corrupt instead.
KEY_SCHEMA = "device_id STRING, time STRING, _corrupt STRING"
_KEY_OPTIONS = {"mode": "PERMISSIVE", "columnNameOfCorruptRecord": "_corrupt"}


def parse_status(raw_text: Column, keys: Column, landing_status: Column) -> Column:
    """'ok', or the reason silver will quarantine the line with."""
    device_id = keys.getField("device_id")
    return (
        F.when(landing_status == "corrupt", F.lit("corrupt_landing_record"))
        .when(~F.is_valid_utf8(raw_text), F.lit("invalid_utf8"))
        .when(keys.getField("_corrupt").isNotNull(), F.lit("invalid_json"))
        .when(device_id.isNull() | (F.trim(device_id) == ""), F.lit("missing_device_id"))
        .otherwise(F.lit("ok"))
    )


def device_readings(files: DataFrame, *, ingest_batch_id: str) -> DataFrame:
    """Landing files -> one bronze row per non-blank line, with lineage and cheap keys."""
    raw_text = F.col("payload").cast("string")  # unchecked: bytes as UTF-8
    text = F.make_valid_utf8(raw_text)  # invalid sequences become U+FFFD, for key extraction only
    units = landed_units(files, lines).withColumn("_keys", F.from_json(text, KEY_SCHEMA, _KEY_OPTIONS))
    keys = F.col("_keys")
    return units.select(
        *lineage_columns(FEED, ingest_batch_id),
        keys.getField("device_id").alias("device_id"),
        keys.getField("time").alias("reading_time"),
        parse_status(raw_text, keys, F.col("landing_status")).alias("parse_status"),
    )


TABLE = "bronze.device_readings"
TRANSFORM = device_readings
