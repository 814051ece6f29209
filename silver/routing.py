"""What the silver jobs share: parameters, routed rows (one Arrow batch feeding a table and silver.quarantine),
bronze lineage, and the small value helpers their parsers use."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pyspark.sql.types import LongType, StringType, StructField, StructType

from silver import hl7_parse
from silver.identity import PATIENT, identity_key, reference_identity
from silver.quarantine import QUARANTINE, QUARANTINE_SCHEMA, quarantine_id

OUTPUT = "_output"

SOURCE_RECORD = StructType([
    StructField("table", StringType(), True),
    StructField("landing_file", StringType(), True),
    StructField("landing_position", LongType(), True),
    StructField("sha256", StringType(), True),
])

BRONZE_TABLES = {"hl7": "bronze.hl7_messages", "fhir": "bronze.fhir_resources", "devices": "bronze.device_readings"}


@dataclass(frozen=True)
class Params:
    """What the parsers need besides the rows: the key secret, the zone, identifier systems, validation."""

    secret: str
    timezone: str
    mrn_system: str
    system_aliases: tuple[tuple[str, str], ...]
    fhir_validation: str
    job: str

    def canonical(self, system: str | None) -> str:
        if system is None or not str(system).strip():
            return self.mrn_system
        return dict(self.system_aliases).get(system, system)


def routed_schema(schema: StructType) -> StructType:
    """`_output`, then the columns of `schema` and of silver.quarantine, all nullable."""
    fields = [StructField(OUTPUT, StringType(), False)]
    for f in [*schema.fields, *QUARANTINE_SCHEMA.fields]:
        if f.name not in {g.name for g in fields}:
            fields.append(StructField(f.name, f.dataType, True))
    return StructType(fields)


def applied_version_columns(*versions: str) -> list[StructField]:
    """The closing columns of a current-state table: what the applied update cleared, its feed, its version(s)
    (`source_version` first, then `versions`), its bronze lineage, when it was received and ingested."""
    from pyspark.sql.types import ArrayType, TimestampType

    return [StructField("nulled_fields", ArrayType(StringType()), True), StructField("source_feed", StringType(), True),
            *(StructField(v, StringType(), True) for v in ("source_version", *versions)),
            StructField("source_record", SOURCE_RECORD, True), StructField("received_at", TimestampType(), True),
            StructField("ingested_at", TimestampType(), False)]


def lineage(src: dict[str, Any]) -> dict[str, Any]:
    """The bronze row a silver row came from (SOURCE_RECORD)."""
    return {k: src[k] for k in ("table", "landing_file", "landing_position", "sha256")}


def clean(value: Any) -> Any:
    """An HL7 explicit null ("") or an empty string is no value here."""
    return None if isinstance(value, hl7_parse.Hl7Null) or value == "" else value


def iso(at: datetime | None) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ") if at else ""


def fhir_patient_key(p: Params, obs: dict) -> str | None:
    if obs.get("subject_identifier_value"):
        return identity_key(p.secret, PATIENT, p.canonical(obs.get("subject_identifier_system")),
                            obs["subject_identifier_value"])
    ref = reference_identity(obs.get("subject_reference"))
    return identity_key(p.secret, ref[0], None, ref[1]) if ref else None


class RoutedRows:
    """Collects the routed rows of one Arrow batch: a silver table's rows and silver.quarantine's."""

    def __init__(self, p: Params, processed_at: datetime):
        self.p = p
        self.processed_at = processed_at
        self.rows: list[dict[str, Any]] = []

    def quarantine(self, src: dict[str, Any], item: str, reason: str, detail: str | None) -> None:
        self.rows.append({
            OUTPUT: QUARANTINE, "quarantine_id": quarantine_id(
                self.p.job, src["table"], src["landing_file"], src["landing_position"], item, reason),
            "feed": src["feed"], "source_table": src["table"], "landing_file": src["landing_file"],
            "landing_position": src["landing_position"], "sha256": src["sha256"], "item": item,
            "reason": reason, "detail": (detail or "")[:2000], "job": self.p.job,
            "quarantined_at": self.processed_at})
