"""bronze.dicom_instances: one row per DICOM instance received, its header as DICOM JSON and where its bytes are.

Input is the landing zone read as whole files: gateway segments (a record is one Part 10 instance, from C-STORE or
STOW-RS) and files dropped with `carelake ingest --feed dicom` (one instance a file: PACS exports, backfills).
The instance's bytes stay where they landed; a row points at them (`stored_uri`, `landing_file` +
`landing_position` + `stored_bytes`) with their sha256, and carries the header in the DICOM JSON model (PS3.18
F.2): pixel data left out, other binary values of 1 KB or more as a BulkDataURI (`stored_uri` + `tag=GGGGEEEE`).
Bronze never rejects: bytes that are not DICOM, truncated, or without a usable file meta land with a parse_status
(`bronze.dicom_wire`) and a detail saying why, for silver to quarantine.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import LongType, StringType, StructField, StructType

from bronze.dicom_wire import parse_instance
from bronze.landed import Unit, landed_units, lineage_fields

FEED = "dicom"
TABLE = "bronze.dicom_instances"
READ_CONTENT = False  # the job reads each landing file itself, mapped (LandingSource(content=False))

# What the header gives, in both the parsed keys and the table (text, null when absent).
_HEADER_KEYS = ("sop_class_uid", "sop_instance_uid", "series_instance_uid", "study_instance_uid",
                "transfer_syntax_uid", "modality", "specific_character_set", "header_json")

KEYS = StructType([StructField(name, StringType(), True) for name in (
    "stored_uri", "source", "calling_ae", *_HEADER_KEYS, "instance_status", "instance_detail")])

SCHEMA = StructType([
    *(f for f in lineage_fields() if f.name != "payload"),  # the bytes stay in the landing zone: stored_uri
    StructField("stored_uri", StringType(), False),  # the landing file, + #bytes=FIRST-LAST inside a segment
    StructField("stored_bytes", LongType(), False),
    StructField("source", StringType(), False),  # dimse (C-STORE) | dicomweb (STOW-RS) | file (carelake ingest)
    StructField("peer", StringType(), True),  # the sender's address:port (gateway only)
    StructField("calling_ae", StringType(), True),  # C-STORE: the modality's calling AE title
    # header_json: the DICOM JSON model of the data set (no pixel data)
    *(StructField(name, StringType(), True) for name in _HEADER_KEYS),
    StructField("landing_status", StringType(), False),
    StructField("parse_status", StringType(), False),  # ok | no_file_meta | bad_file_meta | missing_uids | ...
    StructField("parse_detail", StringType(), True),
])


def stored_uri(landing_file: str, position: int, size: int, whole_file: bool) -> str:
    """The landing file; a byte range of it (`#bytes=FIRST-LAST`, inclusive) for an instance inside a segment."""
    return landing_file if whole_file else f"{landing_file}#bytes={position}-{position + size - 1}"


def instance(body: bytes, meta: Mapping[str, Any]) -> list[Unit]:
    """A record body or dropped file is one instance (an empty one too: it lands as not_dicom)."""
    body = body if isinstance(body, bytes) else bytes(body)  # a mapped dropped file: this one instance in memory
    path, position = str(meta.get("landing_file", "")), int(meta.get("landing_position", 0))
    protocol = meta.get("protocol")
    uri = stored_uri(path, position, len(body), whole_file=protocol is None)
    sep = "&" if "#" in uri else "#"
    parsed = parse_instance(body, lambda tag: f"{uri}{sep}tag={tag:08X}")
    keys = {"stored_uri": uri, "source": protocol or "file", "calling_ae": meta.get("calling_ae"),
            "header_json": parsed.header_json, "instance_status": parsed.status, "instance_detail": parsed.detail}
    for name in ("sop_class_uid", "sop_instance_uid", "series_instance_uid", "study_instance_uid",
                 "transfer_syntax_uid", "modality", "specific_character_set"):
        keys[name] = getattr(parsed, name)
    return [(0, len(body), keys)]


def _byte_range():
    """stored_uri for a row the splitter never saw (a corrupt segment tail): its bytes in the landing file."""
    last = F.col("landing_position") + F.col("payload_bytes") - 1
    return F.concat_ws("", "landing_file", F.lit("#bytes="), "landing_position", F.lit("-"), last)


def dicom_instances(files: DataFrame, *, ingest_batch_id: str) -> DataFrame:
    """Landing files -> one bronze row per instance: lineage, digest, keys, DICOM JSON header, parse status."""
    units = landed_units(files, instance, KEYS, keep_payload=False)
    corrupt = F.col("landing_status") == "corrupt"
    return units.select(
        F.lit(FEED).alias("feed"), "landing_file", "landing_position", "received_at",
        F.lit(ingest_batch_id).alias("ingest_batch_id"), F.col("payload_sha256").alias("sha256"),
        F.coalesce("stored_uri", _byte_range()).alias("stored_uri"),
        F.col("payload_bytes").alias("stored_bytes"),
        F.coalesce("source", F.lit("gateway")).alias("source"),
        "peer", "calling_ae", "sop_class_uid", "sop_instance_uid", "series_instance_uid", "study_instance_uid",
        "transfer_syntax_uid", "modality", "specific_character_set", "header_json", "landing_status",
        F.when(corrupt, F.lit("corrupt_landing_record")).otherwise(F.col("instance_status")).alias("parse_status"),
        F.when(corrupt, F.col("landing_reason")).otherwise(F.col("instance_detail")).alias("parse_detail"),
    )


TRANSFORM = dicom_instances
