"""A test-only job reading two bronze feeds as one stream and writing a side output."""

from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from pipelines.jobs import Job, Output, TableSource


def feed_rows(changes: DataFrame) -> dict[str, DataFrame]:
    """Keyed rows of either feed to silver.toy_feed_rows; rows bronze could not key to silver.toy_rejects."""
    inserted = changes.where("_change_type = 'insert'")
    key = F.coalesce("device_id", "control_id")
    good = inserted.where("parse_status = 'ok'").select("feed", key.alias("key"), "sha256")
    bad = inserted.where("parse_status <> 'ok'").select("feed", "parse_status", "landing_position")
    return {"silver.toy_feed_rows": good, "silver.toy_rejects": bad}


JOBS = [
    Job("silver.toy_feed_rows", TableSource("bronze.device_readings", "bronze.hl7_messages"), feed_rows,
        side_outputs=(Output("silver.toy_rejects"),)),
]
