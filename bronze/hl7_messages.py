"""bronze.hl7_messages: HL7 v2 messages exactly as received, one row per message, with cheap keys.

Input is the landing zone read as whole files: MLLP gateway segments (a record is one message, or an
FHS/BHS batch) and files dropped with `carelake ingest` (any number of messages back to back, any
segment terminator). Each message is keyed by its header (MSH-9 type, MSH-10 control id, MSH-7 time,
MSH-3/4 sender) read as bytes, so an id is kept exactly as sent. Bronze never rejects: a message
whose header cannot be read lands with parse_status naming why (missing_msh, bad_delimiters,
missing_control_id, missing_message_type), and bytes from a corrupt segment tail land as
corrupt_landing_record.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import StringType, StructField, StructType

from bronze.hl7_wire import Hl7HeaderError, parse_header, split_messages
from bronze.landed import Unit, landed_units, lineage_columns, lineage_fields

FEED = "hl7"

KEYS = StructType([
    StructField("control_id", StringType(), True),
    StructField("message_type", StringType(), True),
    StructField("message_time", StringType(), True),
    StructField("sending_application", StringType(), True),
    StructField("sending_facility", StringType(), True),
    StructField("header_status", StringType(), True),
    StructField("header_detail", StringType(), True),
])

SCHEMA = StructType([
    *lineage_fields(),
    StructField("control_id", StringType(), True),  # MSH-10
    StructField("message_type", StringType(), True),  # MSH-9 as sent, e.g. ORU^R01^ORU_R01
    StructField("message_time", StringType(), True),  # MSH-7 as sent (HL7 TS; silver makes it UTC)
    StructField("sending_application", StringType(), True),  # MSH-3
    StructField("sending_facility", StringType(), True),  # MSH-4
    StructField("landing_status", StringType(), False),  # the gateway's verdict: accepted | error | rejected
    StructField("parse_status", StringType(), False),
    StructField("parse_detail", StringType(), True),
])


def _keys(message: bytes) -> Mapping[str, Any]:
    try:
        h, status, detail = parse_header(message), "ok", None
    except Hl7HeaderError as exc:
        h, status, detail = exc.header, exc.reason, exc.text
    keys = {"header_status": status, "header_detail": detail}
    if h is not None:
        keys.update(control_id=h.control_id or None, message_type=h.message_type or None,
                    message_time=h.timestamp or None, sending_application=h.sending_application or None,
                    sending_facility=h.sending_facility or None)
    return keys


def messages(body: bytes, _meta: Mapping[str, Any] | None = None) -> list[Unit]:
    """Each message in a record body or dropped file, with its header keys."""
    return [(off, n, _keys(body[off:off + n])) for off, n in split_messages(body)]


def hl7_messages(files: DataFrame, *, ingest_batch_id: str) -> DataFrame:
    """Landing files -> one bronze row per HL7 message, with lineage, header keys and a parse status."""
    units = landed_units(files, messages, KEYS)
    corrupt = F.col("landing_status") == "corrupt"
    return units.select(
        *lineage_columns(FEED, ingest_batch_id),
        "control_id",
        "message_type",
        "message_time",
        "sending_application",
        "sending_facility",
        F.col("landing_status"),
        F.when(corrupt, F.lit("corrupt_landing_record")).otherwise(F.col("header_status")).alias("parse_status"),
        F.when(corrupt, F.col("landing_reason")).otherwise(F.col("header_detail")).alias("parse_detail"),
    )


TABLE = "bronze.hl7_messages"
TRANSFORM = hl7_messages
