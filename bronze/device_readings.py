"""bronze.device_readings: bedside-device JSON lines, one row per line, bytes kept exactly.

Input is the landing zone read as whole files (Spark's binaryFile source: path, modificationTime,
length, content). Bronze never rejects: a line that is not a JSON object with a device id still
lands, with parse_status saying why, so silver can quarantine it with its lineage.
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import (
    BinaryType,
    IntegerType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

FEED = "devices"

SCHEMA = StructType([
    StructField("feed", StringType(), False),
    StructField("landing_file", StringType(), False),
    StructField("landing_position", IntegerType(), False),
    StructField("received_at", TimestampType(), False),
    StructField("ingest_batch_id", StringType(), False),
    StructField("sha256", StringType(), False),
    StructField("payload", BinaryType(), False),
    StructField("device_id", StringType(), True),
    StructField("reading_time", StringType(), True),
    StructField("parse_status", StringType(), False),
])

# Latin-1 maps every byte to one character and back, so splitting the decoded text and
# re-encoding each piece returns the original bytes exactly, whatever the file's encoding.
_BYTES_AS_TEXT = "ISO-8859-1"


def split_lines(content: Column) -> Column:
    """File bytes -> array of line bytes (newline removed, a CR before it kept: bytes as sent)."""
    return F.transform(F.split(F.decode(content, _BYTES_AS_TEXT), "\n"), lambda s: F.encode(s, _BYTES_AS_TEXT))


def parse_status(raw_text: Column, text: Column, device_id: Column) -> Column:
    """'ok', or the reason silver will quarantine the line with."""
    return (
        F.when(~F.is_valid_utf8(raw_text), F.lit("invalid_utf8"))
        .when(F.get_json_object(text, "$").isNull() | ~F.ltrim(text).startswith("{"), F.lit("invalid_json"))
        .when(device_id.isNull() | (F.trim(device_id) == ""), F.lit("missing_device_id"))
        .otherwise(F.lit("ok"))
    )


def device_readings(files: DataFrame, *, ingest_batch_id: str) -> DataFrame:
    """Landing files -> one bronze row per non-blank line, with lineage and cheap keys."""
    lines = files.select(
        F.col("path").alias("landing_file"),
        F.col("modificationTime").alias("received_at"),
        F.posexplode(split_lines(F.col("content"))).alias("landing_position", "payload"),
    ).where(F.length(F.trim(F.decode("payload", _BYTES_AS_TEXT))) > 0)
    raw_text = F.col("payload").cast("string")  # unchecked: bytes as UTF-8
    text = F.make_valid_utf8(raw_text)  # invalid sequences become U+FFFD, for key extraction only
    device_id = F.get_json_object(text, "$.device_id")
    return lines.select(
        F.lit(FEED).alias("feed"),
        "landing_file",
        F.col("landing_position").cast("int").alias("landing_position"),
        "received_at",
        F.lit(ingest_batch_id).alias("ingest_batch_id"),
        F.sha2(F.col("payload"), 256).alias("sha256"),
        "payload",
        device_id.alias("device_id"),
        F.get_json_object(text, "$.time").alias("reading_time"),
        parse_status(raw_text, text, device_id).alias("parse_status"),
    )
