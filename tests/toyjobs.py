"""Test-only jobs chained behind bronze.device_readings: an append hop and a merge hop.

Loaded through `jobs.modules` (CARELAKE_JOBS__MODULES=tests.toyjobs), the same way a site adds jobs.
"""

from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from pipelines.jobs import Job, TableSource
from pipelines.store import MergeSpec


def readings_copy(changes: DataFrame) -> DataFrame:
    """Inserted bronze rows that parsed, reduced to their lineage."""
    return changes.where("_change_type = 'insert' AND parse_status = 'ok'").select(
        "device_id", "landing_file", "landing_position", "sha256")


def device_totals(changes: DataFrame) -> DataFrame:
    """How many readings each device sent in this batch (merged as a running total)."""
    return (changes.where("_change_type = 'insert'").groupBy("device_id")
            .agg(F.count(F.lit(1)).cast("long").alias("readings")))


JOBS = [
    Job("silver.toy_readings", TableSource("bronze.device_readings"), readings_copy),
    Job("gold.toy_device_totals", TableSource("silver.toy_readings"), device_totals, write="merge",
        merge=MergeSpec(keys=("device_id",), update={"readings": "t.readings + s.readings"})),
]
