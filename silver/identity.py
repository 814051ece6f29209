"""Pseudonymous keys: one keyed hash per source identity, the same in Python and in Spark.

`patient_key` and `encounter_key` are SHA-256 over a per-lakehouse secret and the identity
(`kind|system|value`), cut to 32 hex characters. Without the secret nobody can compute the key of
a known MRN, so gold and SQL can expose the key while direct identifiers stay in silver. The secret
comes first and the message has a fixed shape, so the plain keyed hash is not open to length
extension; it is computed identically by `identity_key` (parsers in Python) and `identity_key_column`
(Spark columns, for device readings at scale), and a test holds them equal.

Kinds: `patient` and `encounter` for identifiers with a system (MRN, visit number); `fhir-patient`,
`fhir-encounter` for FHIR resource ids (server-scoped, so system is empty) and `fhir-fullurl` for
`urn:uuid:` references inside Bundles. silver.patients and silver.encounters link every key of one
person or stay to a single surviving key (`merged_into`), so resolution never needs a lookup here.
"""

from __future__ import annotations

import hashlib

from pyspark.sql import Column
from pyspark.sql import functions as F

KEY_HEX = 32
PATIENT, ENCOUNTER = "patient", "encounter"
FHIR_PATIENT, FHIR_ENCOUNTER, FHIR_FULLURL = "fhir-patient", "fhir-encounter", "fhir-fullurl"


def identity_key(secret: str, kind: str, system: str | None, value: str) -> str:
    """The pseudonymous key of one identity."""
    text = "|".join((secret, kind, system or "", value))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:KEY_HEX]


def identity_key_column(secret: str, kind: str, system: Column, value: Column) -> Column:
    """identity_key as a Spark column (null when the value is null)."""
    text = F.concat_ws("|", F.lit(secret), F.lit(kind), F.coalesce(system, F.lit("")), value)
    return F.when(value.isNotNull(), F.substring(F.sha2(text, 256), 1, KEY_HEX))


def reference_identity(reference: str | None) -> tuple[str, str] | None:
    """(kind, value) of a FHIR Patient/Encounter reference: 'Patient/x', an absolute URL, or 'urn:uuid:...'."""
    if not reference:
        return None
    if reference.startswith(("urn:uuid:", "urn:oid:")):
        return FHIR_FULLURL, reference
    parts = reference.rstrip("/").split("/")
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    if len(parts) >= 2 and parts[-2] in ("Patient", "Encounter"):
        return (FHIR_PATIENT if parts[-2] == "Patient" else FHIR_ENCOUNTER), parts[-1]
    return None
