"""bronze.claim_files: every claims file exactly as received, one row per file (or per POSTed X12 body).

Input is two landing feeds read as one stream: `x12` (837P/837I/835 interchanges dropped with `carelake ingest
--feed x12` or POSTed to the gateway's /x12) and `claims` (FHIR Claim/ExplanationOfBenefit/Coverage JSON, CMS RIF
pipe-delimited extracts, the simulator's CSV). The payload is the whole file, byte for byte; a file holds many
interchanges and claims, which silver reads and quarantines one by one, so bronze never splits what it cannot
yet understand. Cheap keys from the first bytes: the format (x12, fhir, rif, csv), the document type (ST01 of the
first transaction, the FHIR resourceType, the RIF layout) and the first GS08 version. Bronze never rejects: an
empty body, an unrecognized format or a torn landing record lands with its parse_status and a detail.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import StringType, StructField, StructType

from bronze.landed import Unit, landed_units, lineage_columns, lineage_fields

FEEDS = ("x12", "claims")
TABLE = "bronze.claim_files"

KEYS = StructType([
    StructField("format", StringType(), True),  # x12 | fhir | rif | csv; null when unrecognized
    StructField("document_type", StringType(), True),  # 837, 835, Bundle, ExplanationOfBenefit, carrier, ...
    StructField("x12_version", StringType(), True),  # GS08 of the first functional group
    StructField("sniff_status", StringType(), True),
    StructField("sniff_detail", StringType(), True),
])

SCHEMA = StructType([
    *lineage_fields(),
    *KEYS.fields[:3],
    StructField("landing_status", StringType(), False),
    StructField("parse_status", StringType(), False),  # ok | empty | unrecognized_format | corrupt_landing_record
    StructField("parse_detail", StringType(), True),
])

_ST = re.compile(rb"ST\W(\d{3})")
_GS08 = re.compile(rb"GS(?:\W[^~\n]*?){7}\W(\d{6}X\d{3}A?\d?)")
_RESOURCE = re.compile(rb'"resourceType"\s*:\s*"(\w+)"')
# RIF layouts by a column only they have (BFD's extract headers), checked in this order.
RIF_LAYOUTS = (("PDE_ID", "pde"), ("DMERC_LINE_MTUS_CD", "dme"), ("CARR_CLM_BLG_NPI_NUM", "carrier"),
               ("CLM_DRG_OUTLIER_STAY_CD", "inpatient"), ("NCH_QLFYD_STAY_FROM_DT", "snf"),
               ("CLM_HOSPC_START_DT_ID", "hospice"), ("CLM_HHA_LUPA_IND_CD", "hha"),
               ("CLM_OP_PRVDR_PMT_AMT", "outpatient"), ("BENE_ID", "beneficiary"))
SNIFF_BYTES = 64 * 1024


def _first_line(head: bytes) -> str:
    return head.split(b"\n", 1)[0].decode("utf-8", "replace").strip()


def sniff(body: bytes) -> dict[str, Any]:
    """What kind of claims file this is, from its first bytes."""
    head = body[:SNIFF_BYTES].lstrip(b"\xef\xbb\xbf \t\r\n")
    if not head:
        return {"sniff_status": "empty", "sniff_detail": "the file holds no data"}
    if head.startswith(b"ISA"):
        st, gs = _ST.search(head), _GS08.search(head)
        return {"format": "x12", "document_type": st and st.group(1).decode(),
                "x12_version": gs and gs.group(1).decode(), "sniff_status": "ok"}
    if head[:1] in (b"{", b"["):
        kind = _RESOURCE.search(head)
        return {"format": "fhir", "document_type": kind and kind.group(1).decode(), "sniff_status": "ok"}
    header = _first_line(head)
    if "|" in header:
        columns = set(header.split("|"))
        layout = next((name for col, name in RIF_LAYOUTS if col in columns), None)
        if layout:
            return {"format": "rif", "document_type": layout, "sniff_status": "ok"}
    if header.startswith("claim_id,line,") or header.startswith("DESYNPUF_ID,"):
        return {"format": "csv", "document_type": header.split(",", 1)[0], "sniff_status": "ok"}
    return {"sniff_status": "unrecognized_format",
            "sniff_detail": f"not X12 (starts with ISA), FHIR JSON, a CMS RIF extract (pipe-delimited with BENE_ID) "
                            f"or the carelake claims CSV; first line: {header[:120]!r}"}


def whole_file(body: bytes, _meta: Mapping[str, Any]) -> list[Unit]:
    """The whole body as one unit, with its sniffed keys (an empty body too: it is kept and quarantined)."""
    return [(0, len(body), sniff(body))]


def claim_files(files: DataFrame, *, ingest_batch_id: str) -> DataFrame:
    """Landing files of the x12 and claims feeds -> one bronze row per file, with lineage and cheap keys."""
    units = landed_units(files, whole_file, KEYS)
    corrupt = F.col("landing_status") == "corrupt"
    feed = F.regexp_extract("landing_file", r"/landing/([^/]+)/", 1)
    lineage = [feed.alias("feed"), *lineage_columns("", ingest_batch_id)[1:]]  # the feed is the file's folder
    return units.select(
        *lineage,
        *(f.name for f in KEYS.fields[:3]),
        "landing_status",
        F.when(corrupt, F.lit("corrupt_landing_record")).otherwise(F.col("sniff_status")).alias("parse_status"),
        F.when(corrupt, F.col("landing_reason")).otherwise(F.col("sniff_detail")).alias("parse_detail"),
    )


TRANSFORM = claim_files
