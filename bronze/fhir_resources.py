"""bronze.fhir_resources: FHIR R4 resources exactly as received, one row per resource.

Input is the landing zone read as whole files: HTTP gateway segments (a record is one POSTed body:
a Bundle, a resource or NDJSON, with its content type) and files dropped with `carelake ingest`.
Bundles are exploded into their entries with the bundle id kept, and each row's payload is the
resource's own bytes (`landing_position` is their offset in the landing file). Keys: resourceType,
id, meta.versionId, meta.lastUpdated, and for Bundle entries the bundle id/type, entry index,
fullUrl and the transaction request (a DELETE entry lands as a row with an empty payload).
Bronze never rejects: what cannot be read lands with parse_status (invalid_utf8, invalid_json,
not_a_resource, missing_resource_type, missing_id, corrupt_landing_record) and a detail.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import (
    IntegerType,
    StringType,
    StructField,
    StructType,
)

from bronze.fhir_split import split_resources
from bronze.landed import Unit, landed_units, lineage_columns, lineage_fields

FEED = "fhir"

KEYS = StructType([
    StructField("resource_type", StringType(), True),
    StructField("resource_id", StringType(), True),
    StructField("version_id", StringType(), True),
    StructField("last_updated", StringType(), True),
    StructField("bundle_id", StringType(), True),
    StructField("bundle_type", StringType(), True),
    StructField("entry_index", IntegerType(), True),
    StructField("full_url", StringType(), True),
    StructField("request_method", StringType(), True),
    StructField("request_url", StringType(), True),
    StructField("split_status", StringType(), True),
    StructField("split_detail", StringType(), True),
])

SCHEMA = StructType([
    *lineage_fields(),
    *KEYS.fields[:10],
    StructField("landing_status", StringType(), False),
    StructField("parse_status", StringType(), False),
    StructField("parse_detail", StringType(), True),
])


def resources(body: bytes, meta: Mapping[str, Any]) -> list[Unit]:
    """Each resource in a POSTed body or dropped file, with its keys."""
    content_type = meta.get("content_type")
    if content_type is None and str(meta.get("landing_file", "")).endswith(".ndjson"):
        content_type = "application/fhir+ndjson"
    out = []
    for u in split_resources(body, content_type):
        keys = {"resource_type": u.resource_type, "resource_id": u.id, "version_id": u.version_id,
                "last_updated": u.last_updated, "bundle_id": u.bundle_id, "bundle_type": u.bundle_type,
                "entry_index": u.entry_index, "full_url": u.full_url, "request_method": u.request_method,
                "request_url": u.request_url, "split_status": u.parse_status, "split_detail": u.parse_detail}
        out.append((u.offset, u.length, keys))
    return out


def fhir_resources(files: DataFrame, *, ingest_batch_id: str) -> DataFrame:
    """Landing files -> one bronze row per FHIR resource, with lineage, keys and a parse status."""
    units = landed_units(files, resources, KEYS)
    corrupt = F.col("landing_status") == "corrupt"
    return units.select(
        *lineage_columns(FEED, ingest_batch_id),
        *(f.name for f in KEYS.fields[:10]),
        "landing_status",
        F.when(corrupt, F.lit("corrupt_landing_record")).otherwise(F.col("split_status")).alias("parse_status"),
        F.when(corrupt, F.col("landing_reason")).otherwise(F.col("split_detail")).alias("parse_detail"),
    )


TABLE = "bronze.fhir_resources"
TRANSFORM = fhir_resources
