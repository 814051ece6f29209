"""silver.quarantine: every bronze record (or part of one) silver could not use, with why.

Written by each silver job as a side output of its batches. A row names its bronze lineage (table,
landing file, byte offset, sha256), the part of the record (`item`: record, message, OBX[3],
Observation.component[1], reading, ...), a stable reason code and a readable detail. `quarantine_id`
is a hash of job, lineage, item and reason, so replays and resends never add a row twice.
"""

from __future__ import annotations

import hashlib
from typing import Any

from pyspark.sql import Column
from pyspark.sql import functions as F
from pyspark.sql.types import LongType, StringType, StructField, StructType, TimestampType

QUARANTINE = "silver.quarantine"

QUARANTINE_SCHEMA = StructType([
    StructField("quarantine_id", StringType(), False),
    StructField("feed", StringType(), False),
    StructField("source_table", StringType(), False),
    StructField("landing_file", StringType(), False),
    StructField("landing_position", LongType(), False),
    StructField("sha256", StringType(), False),
    StructField("item", StringType(), False),
    StructField("reason", StringType(), False),
    StructField("detail", StringType(), True),
    StructField("job", StringType(), False),
    StructField("quarantined_at", TimestampType(), False),
])


def quarantine_id(job: str, table: str, landing_file: str, position: int, item: str, reason: str) -> str:
    parts: tuple[Any, ...] = (job, table, landing_file, position, item, reason)
    return hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()[:32]


def quarantine_id_column(job: str, table: Column, landing_file: Column, position: Column, item: Column,
                         reason: Column) -> Column:
    """quarantine_id as a Spark column (same value as the Python function)."""
    text = F.concat_ws("|", F.lit(job), table, landing_file, position.cast("string"), item, reason)
    return F.substring(F.sha2(text, 256), 1, 32)
