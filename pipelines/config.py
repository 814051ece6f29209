"""Configuration: conf/base.yaml + an overlay, then CARELAKE_* environment, then flags.

Everything resolves into frozen dataclasses that validate themselves, so a wrong value fails
at start-up with a message that names the key, where it came from, and what would be right.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipelines.errors import ConfigError

ENGINES = ("auto", "delta-rs", "delta-spark")
LAYERS = ("bronze", "silver", "gold", "ops")
# storage.retention_days: the layers, the landing zone, and the floor for what audits walk (pipelines/retention.py).
RETENTION_KEYS = (*LAYERS, "landing", "audit")
LOG_LEVELS = ("ERROR", "WARN", "INFO", "DEBUG")
_ENV_PREFIX = "CARELAKE_"
_ENV_RESERVED = {"CARELAKE_ENV", "CARELAKE_CONF_DIR", "CARELAKE_GATEWAY_TOKENS"}  # not configuration keys
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_FEED = re.compile(r"^[a-z][a-z0-9_]*$")


def parse_duration_ms(value: Any, key: str) -> int:
    """'500ms', '5s', '2m', '1h', '7d' (or a bare number of milliseconds) -> milliseconds."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a duration like 500ms, 5s or 2m, got {value!r}")
    if isinstance(value, int | float):
        return int(value)
    m = _DURATION.match(str(value))
    if not m:
        raise ConfigError(f"{key}: expected a duration like 500ms, 5s or 2m, got {value!r}")
    scale = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}[m.group(2)]
    return int(float(m.group(1)) * scale)


@dataclass(frozen=True)
class SparkConfig:
    master: str
    app_name: str
    shuffle_partitions: int
    ui: bool
    log_level: str
    driver_memory: str
    conf: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.shuffle_partitions < 1:
            raise ConfigError(f"spark.shuffle_partitions must be at least 1, got {self.shuffle_partitions}")
        if self.log_level.upper() not in LOG_LEVELS:
            raise ConfigError(f"spark.log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        object.__setattr__(self, "log_level", self.log_level.upper())
        if not re.fullmatch(r"\d+[kmgt]", self.driver_memory.lower()):
            raise ConfigError(f"spark.driver_memory must look like 2g or 512m, got {self.driver_memory!r}")


@dataclass(frozen=True)
class StorageConfig:
    engine: str
    commit_retries: int
    target_file_size_mb: int
    retention_days: Mapping[str, int]
    # PHI at rest: what carelake creates is owner-only, or readable by this OS group too ("" = nobody else).
    group: str = ""
    # A micro-batch this small (changed rows from a table, or landing megabytes) is written from the driver;
    # a larger one by the executors. 0 and 0: always the executors.
    driver_write_max_rows: int = 50_000
    driver_write_max_mb: int = 32

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ConfigError(f"storage.engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.commit_retries < 1:
            raise ConfigError(f"storage.commit_retries must be at least 1, got {self.commit_retries}")
        if self.target_file_size_mb < 1:
            raise ConfigError(f"storage.target_file_size_mb must be at least 1, got {self.target_file_size_mb}")
        if self.driver_write_max_rows < 0 or self.driver_write_max_mb < 0:
            raise ConfigError("storage.driver_write_max_rows and storage.driver_write_max_mb must be 0 or more, got "
                              f"{self.driver_write_max_rows} and {self.driver_write_max_mb}; 0 sends every batch "
                              "to the executors")
        missing = [layer for layer in RETENTION_KEYS if layer not in self.retention_days]
        unknown = [layer for layer in self.retention_days if layer not in RETENTION_KEYS]
        if missing or unknown:
            raise ConfigError(
                f"storage.retention_days needs exactly the keys {', '.join(RETENTION_KEYS)}"
                f" (missing: {missing or 'none'}, unknown: {unknown or 'none'})"
            )
        for layer, days in self.retention_days.items():
            if days < 1:
                raise ConfigError(f"storage.retention_days.{layer} must be at least 1 day, got {days}")


@dataclass(frozen=True)
class StreamingConfig:
    interval: str
    max_files_per_trigger: int
    stop_timeout: str
    max_rows_per_batch: int = 500_000
    max_restarts: int = 5
    max_mb_per_trigger: int = 0
    max_mapped_files_per_trigger: int = 1000
    # "upstream > downstream" job pairs: the downstream's transform runs inside the upstream's batches (see fused).
    fuse: tuple[str, ...] = ()

    @property
    def fused(self) -> tuple[tuple[str, str], ...]:
        """streaming.fuse as (upstream job, downstream job) pairs: a bronze job whose batches also write a silver
        job's tables, so a reading reaches silver in the micro-batch that lands it in bronze."""
        pairs = []
        for item in self.fuse:
            up, sep, down = item.partition(">")
            if not sep or not up.strip() or not down.strip() or ">" in down:
                raise ConfigError(f"streaming.fuse entries are 'upstream > downstream' (e.g. 'bronze.device_readings >"
                                  f" silver.observations'), got {item!r}")
            pairs.append((up.strip(), down.strip()))
        return tuple(pairs)

    @property
    def landing_admission(self) -> tuple[str, int]:
        """The file source's bound on one bronze micro-batch: ("maxBytesPerTrigger", bytes) or
        ("maxFilesPerTrigger", files). Spark takes one of the two, never both."""
        if self.max_mb_per_trigger:
            return "maxBytesPerTrigger", self.max_mb_per_trigger * 1024 * 1024
        return "maxFilesPerTrigger", self.max_files_per_trigger

    def __post_init__(self) -> None:
        if self.interval_ms < 1:
            raise ConfigError(f"streaming.interval must be positive, got {self.interval!r}")
        if self.max_mb_per_trigger < 0:
            raise ConfigError(f"streaming.max_mb_per_trigger must be 0 (bound by files) or more, got "
                              f"{self.max_mb_per_trigger}")
        if self.max_files_per_trigger < 0 or (self.max_files_per_trigger == 0) == (self.max_mb_per_trigger == 0):
            raise ConfigError(
                "set exactly one of streaming.max_mb_per_trigger (landing megabytes a bronze batch admits) and"
                " streaming.max_files_per_trigger (landing files), the other 0; got"
                f" max_mb_per_trigger={self.max_mb_per_trigger}, max_files_per_trigger={self.max_files_per_trigger}")
        parse_duration_ms(self.stop_timeout, "streaming.stop_timeout")
        if self.max_rows_per_batch < 1:
            raise ConfigError(f"streaming.max_rows_per_batch must be at least 1 row, got {self.max_rows_per_batch}; "
                              "a larger batch is written in chunks of at most this many rows")
        if self.max_mapped_files_per_trigger < 1:
            raise ConfigError(f"streaming.max_mapped_files_per_trigger must be at least 1 file, got "
                              f"{self.max_mapped_files_per_trigger}")
        if self.max_restarts < 0:
            raise ConfigError(f"streaming.max_restarts must be 0 or more, got {self.max_restarts}; 0 fails the run at "
                              "a job's first error")
        ups = [up for up, _ in self.fused]
        if len(set(ups)) != len(ups):
            raise ConfigError(f"streaming.fuse names a job twice as upstream ({', '.join(self.fuse)}); a bronze job's "
                              "batches carry at most one downstream job")

    @property
    def interval_ms(self) -> int:
        return parse_duration_ms(self.interval, "streaming.interval")

    @property
    def stop_timeout_s(self) -> float:
        return parse_duration_ms(self.stop_timeout, "streaming.stop_timeout") / 1000


@dataclass(frozen=True)
class LandingConfig:
    feeds: tuple[str, ...]
    fsync: bool

    def __post_init__(self) -> None:
        if not self.feeds:
            raise ConfigError("landing.feeds is empty: list at least one feed, e.g. [hl7, fhir, devices]")
        for feed in self.feeds:
            if not _FEED.match(feed):
                raise ConfigError(f"landing.feeds: {feed!r} is not a valid feed name (lowercase letters, digits, _)")


_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: 16 characters, no backslash or controls


def check_ae_title(value: str, key: str) -> str:
    """An AE title as DICOM allows it (1-16 printable ASCII characters, not only spaces, no backslash)."""
    if not _AE_TITLE.match(value) or not value.strip():
        raise ConfigError(f"{key} must be a DICOM AE title: 1-16 printable ASCII characters, not only spaces, no "
                          f"backslash; got {value!r}")
    return value.strip()


MAX_DICOM_WORKERS = 64


@dataclass(frozen=True)
class DicomGatewayConfig:
    enabled: bool
    port: int
    ae_title: str
    calling_ae_titles: tuple[str, ...]
    any_sop_class: bool
    max_instance_mb: int
    max_associations: int
    store_timeout: str
    workers: int = 4  # acceptor processes behind the one port (0: C-STORE in the gateway's own process)

    def __post_init__(self) -> None:
        if not 0 <= self.workers <= MAX_DICOM_WORKERS:
            raise ConfigError(f"gateway.dicom.workers must be 0-{MAX_DICOM_WORKERS} (acceptor processes for C-STORE, "
                              f"about one per core; 0 = in the gateway's own process), got {self.workers}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"gateway.dicom.port must be a TCP port 0-65535 (0 = pick a free one), got {self.port}")
        check_ae_title(self.ae_title, "gateway.dicom.ae_title")
        for i, title in enumerate(self.calling_ae_titles):
            check_ae_title(title, f"gateway.dicom.calling_ae_titles[{i}]")
        if not 1 <= self.max_instance_mb <= 2047:
            raise ConfigError(f"gateway.dicom.max_instance_mb must be 1-2047 (bronze reads a landing file as one "
                              f"value, at most 2 GB), got {self.max_instance_mb}")
        if self.max_associations < 1:
            raise ConfigError(f"gateway.dicom.max_associations must be at least 1, got {self.max_associations}")
        if parse_duration_ms(self.store_timeout, "gateway.dicom.store_timeout") <= 0:
            raise ConfigError(f"gateway.dicom.store_timeout must be a positive duration (like 30s), got "
                              f"{self.store_timeout!r}")

    @property
    def store_timeout_s(self) -> float:
        return parse_duration_ms(self.store_timeout, "gateway.dicom.store_timeout") / 1000


@dataclass(frozen=True)
class GatewaySecurityConfig:
    """TLS and sender authentication (pipelines/gateway/security.py; docs/operations.md). Paths name files; the
    secrets themselves never sit in conf/."""

    tls_cert: str = ""  # PEM certificate chain the gateway presents on MLLP and HTTP; "" = plain TCP
    tls_key: str = ""  # its private key
    client_ca: str = ""  # PEM CA bundle: a sender may prove who it is with a certificate it signed (mutual TLS)
    require_client_cert: bool = False  # every MLLP and HTTP connection must present such a certificate
    tokens_file: str = ""  # HTTP bearer tokens, hashed: one NAME:SHA256HEX per line
    tokens_env: str = "CARELAKE_GATEWAY_TOKENS"  # an environment variable holding more such lines
    sending_facilities: tuple[str, ...] = ()  # MLLP: MSH-4 values (namespace id) allowed to send; () = any

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("gateway.security.tls_cert and tls_key go together: set both (PEM files) for TLS, or "
                              "neither for plain TCP")
        if self.client_ca and not self.tls_cert:
            raise ConfigError("gateway.security.client_ca needs TLS: set gateway.security.tls_cert and tls_key too")
        if self.require_client_cert and not self.client_ca:
            raise ConfigError("gateway.security.require_client_cert needs gateway.security.client_ca: the CA bundle "
                              "sender certificates are checked against")
        if self.tokens_env and (not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.tokens_env) or (
                self.tokens_env.startswith(_ENV_PREFIX) and self.tokens_env not in _ENV_RESERVED)):
            raise ConfigError(f"gateway.security.tokens_env must be an environment variable name, and not one "
                              f"starting with {_ENV_PREFIX} (those set configuration keys) other than "
                              f"CARELAKE_GATEWAY_TOKENS; got {self.tokens_env!r}")
        for i, facility in enumerate(self.sending_facilities):
            if not facility.strip() or "|" in facility or "^" in facility:
                raise ConfigError(f"gateway.security.sending_facilities[{i}] must be an MSH-4 namespace id (no | or ^),"
                                  f" got {facility!r}")


@dataclass(frozen=True)
class GatewayConfig:
    host: str
    mllp_port: int
    http_port: int
    max_message_mb: int
    group_commit: str
    segment_mb: int
    segment_age: str
    idle_timeout: str
    ack_timeout: str
    send_retries: int
    # Slow and hostile senders: how long a request head, an HTTP body and an MLLP frame may take to arrive, and how
    # long a stop may take. Refused traffic: what of an oversized body is kept, and how much the rejects area holds.
    header_timeout: str
    body_timeout: str
    frame_timeout: str
    shutdown_timeout: str
    max_batch_messages: int
    reject_keep_kb: int
    rejects_max_mb: int
    rejects_max_age: str
    dicom: DicomGatewayConfig
    security: GatewaySecurityConfig = field(default_factory=GatewaySecurityConfig)

    _DURATIONS = ("group_commit", "segment_age", "idle_timeout", "ack_timeout", "header_timeout", "body_timeout",
                  "frame_timeout", "shutdown_timeout", "rejects_max_age")
    _POSITIVE = ("segment_age", "idle_timeout", "ack_timeout", "header_timeout", "body_timeout", "frame_timeout",
                 "shutdown_timeout", "rejects_max_age")

    def __post_init__(self) -> None:
        for name in ("mllp_port", "http_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise ConfigError(f"gateway.{name} must be a TCP port 0-65535 (0 = pick a free one), got {port}")
        for name in ("max_message_mb", "segment_mb"):
            if getattr(self, name) < 1:
                raise ConfigError(f"gateway.{name} must be at least 1, got {getattr(self, name)}")
        if self.send_retries < 0:
            raise ConfigError(f"gateway.send_retries must be 0 or more, got {self.send_retries}")
        for name in self._DURATIONS:
            parse_duration_ms(getattr(self, name), f"gateway.{name}")
        for name in self._POSITIVE:
            if self._seconds(name) <= 0:
                raise ConfigError(f"gateway.{name} must be a positive duration (like 500ms, 10s or 2m), got "
                                  f"{getattr(self, name)!r}")
        self._check_limits()

    def _check_limits(self) -> None:
        if self.max_batch_messages < 1:
            raise ConfigError(f"gateway.max_batch_messages must be at least 1 message, got {self.max_batch_messages}; "
                              "an FHS/BHS batch with more messages is refused (AR) and must be sent split")
        if not 0 <= self.reject_keep_kb <= self.max_message_mb * 1024:
            raise ConfigError(f"gateway.reject_keep_kb must be 0 (keep only the header) to gateway.max_message_mb in "
                              f"KiB ({self.max_message_mb * 1024}), got {self.reject_keep_kb}")
        if self.rejects_max_mb < 1:
            raise ConfigError(f"gateway.rejects_max_mb must be at least 1 MB, got {self.rejects_max_mb}; the oldest "
                              "sealed reject segments are deleted once landing/_rejects holds more")

    def _seconds(self, name: str) -> float:
        return parse_duration_ms(getattr(self, name), f"gateway.{name}") / 1000

    @property
    def group_commit_s(self) -> float:
        return self._seconds("group_commit")

    @property
    def segment_age_s(self) -> float:
        return self._seconds("segment_age")

    @property
    def idle_timeout_s(self) -> float:
        return self._seconds("idle_timeout")

    @property
    def ack_timeout_s(self) -> float:
        return self._seconds("ack_timeout")

    @property
    def header_timeout_s(self) -> float:
        return self._seconds("header_timeout")

    @property
    def body_timeout_s(self) -> float:
        return self._seconds("body_timeout")

    @property
    def frame_timeout_s(self) -> float:
        return self._seconds("frame_timeout")

    @property
    def shutdown_timeout_s(self) -> float:
        return self._seconds("shutdown_timeout")

    @property
    def rejects_max_age_s(self) -> float:
        return self._seconds("rejects_max_age")


SIMULATOR_FEEDS = ("hl7", "fhir", "devices", "dicom", "claims")
DETERIORATION_KINDS = ("sepsis", "respiratory_failure", "haemorrhage")
DIRT_KINDS = ("duplicate", "late", "missing_value", "unit_variant", "lf_terminator", "malformed")
FRAUD_PATTERNS = ("duplicate_billing", "upcoding", "unbundling", "phantom_services", "impossible_volume")


@dataclass(frozen=True)
class SimulatorConfig:
    patients: int
    hours: int
    seed: int
    start: str
    feeds: tuple[str, ...]
    partitions: int
    census_at_start: float
    icu_beds: int
    icu_bed_fraction: float
    icu_admission_fraction: float
    icu_cadence_min_s: int
    icu_cadence_max_s: int
    ward_cadence_min_h: float
    ward_cadence_max_h: float
    fhir_vitals_fraction: float
    imaging_fraction: float
    cancelled_admission_fraction: float
    duplicate_record_fraction: float
    demographic_update_fraction: float
    deterioration_fraction: float
    deterioration_mix: Mapping[str, float]
    recovery_fraction: float
    dirt: Mapping[str, float]
    fraud: Mapping[str, float]
    ed_imaging_per_day: int = 160  # emergency-department studies a day (walk-in patients, not in the census)
    outpatient_imaging_per_day: int = 120  # outpatient studies a day, booked 08:00-18:00

    def __post_init__(self) -> None:
        for name in ("ed_imaging_per_day", "outpatient_imaging_per_day"):
            if getattr(self, name) < 0:
                raise ConfigError(f"simulator.{name} must be 0 or more (studies a day), got {getattr(self, name)}")
        for name in ("patients", "hours", "partitions", "icu_cadence_min_s"):
            if getattr(self, name) < 1:
                raise ConfigError(f"simulator.{name} (or its flag) must be at least 1, got {getattr(self, name)}")
        if self.icu_beds < 0:
            raise ConfigError(f"simulator.icu_beds must be 0 (= patients x icu_bed_fraction) or more, "
                              f"got {self.icu_beds}")
        if not self.icu_cadence_min_s <= self.icu_cadence_max_s <= 3600:
            raise ConfigError("simulator.icu_cadence_min_s <= icu_cadence_max_s <= 3600 is required, got "
                              f"{self.icu_cadence_min_s} and {self.icu_cadence_max_s}; monitors report every 1-60 s")
        if not 0 < self.ward_cadence_min_h <= self.ward_cadence_max_h <= 24:
            raise ConfigError("simulator.ward_cadence_min_h <= ward_cadence_max_h (hours, above 0, at most 24) is "
                              f"required, got {self.ward_cadence_min_h} and {self.ward_cadence_max_h}")
        self._check_start()
        self._check_feeds()
        for name in ("census_at_start", "icu_bed_fraction", "icu_admission_fraction", "fhir_vitals_fraction",
                     "imaging_fraction", "cancelled_admission_fraction", "duplicate_record_fraction",
                     "demographic_update_fraction", "deterioration_fraction", "recovery_fraction"):
            _check_fraction(f"simulator.{name}", getattr(self, name))
        _check_rates("simulator.deterioration_mix", self.deterioration_mix, DETERIORATION_KINDS, weights=True)
        _check_rates("simulator.dirt", self.dirt, DIRT_KINDS)
        _check_rates("simulator.fraud", self.fraud, FRAUD_PATTERNS)

    def _check_start(self) -> None:
        from datetime import datetime

        try:
            parsed = datetime.fromisoformat(self.start.replace("Z", "+00:00"))
        except ValueError:
            parsed = None
        if parsed is None or parsed.utcoffset() is None:
            raise ConfigError(f"simulator.start (or --start) must be an ISO-8601 time with a zone, e.g. "
                              f"2026-01-05T00:00:00Z, got {self.start!r}")

    def _check_feeds(self) -> None:
        unknown = [f for f in self.feeds if f not in SIMULATOR_FEEDS]
        if unknown or not self.feeds:
            raise ConfigError(f"simulator.feeds (or --feeds) takes a comma-separated subset of "
                              f"{','.join(SIMULATOR_FEEDS)}; unknown: {','.join(unknown) or '(none given)'}")


def _check_fraction(key: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{key} must be a fraction between 0 and 1, got {value}")


def _check_rates(key: str, rates: Mapping[str, float], names: tuple[str, ...], *, weights: bool = False) -> None:
    missing = [n for n in names if n not in rates]
    if missing:
        raise ConfigError(f"{key} needs a value for each of {', '.join(names)} (missing: {', '.join(missing)})")
    for name, value in rates.items():
        if weights and value < 0:
            raise ConfigError(f"{key}.{name} must be a weight of 0 or more, got {value}")
        if not weights:
            _check_fraction(f"{key}.{name}", value)
    if weights and sum(rates.values()) <= 0:
        raise ConfigError(f"{key} needs at least one positive weight, e.g. {names[0]}: 1")


@dataclass(frozen=True)
class SilverConfig:
    timezone: str
    mrn_system: str
    system_aliases: Mapping[str, str]
    key_secret: str
    fhir_validation: str

    def __post_init__(self) -> None:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigError(f"silver.timezone: {self.timezone!r} is not an IANA time zone "
                              "(e.g. UTC, Europe/London, America/Chicago)") from None
        if not self.mrn_system.strip():
            raise ConfigError("silver.mrn_system must name the hospital's MRN assigning authority, e.g. CARELAKE")
        if self.fhir_validation not in ("fast", "full"):
            raise ConfigError(f"silver.fhir_validation must be fast or full, got {self.fhir_validation!r}")

    def canonical_system(self, system: str | None) -> str:
        """The canonical name of an identifier system (aliases resolved; none = the hospital's MRNs)."""
        if system is None or not system.strip():
            return self.mrn_system
        return self.system_aliases.get(system, system)


X12_VALIDATION = ("envelope", "implementation_guide")
FRAUD_RULES = ("duplicate", "unbundling", "impossible_volume", "upcoding", "after_death", "excluded_provider",
               "phantom_service")
_X12_VERSION = re.compile(r"^00[45]010X\d{3}(A\d)?$")
_ICD10_PREFIX = re.compile(r"^[A-TV-Z][0-9][0-9A-Z]?(\.[0-9A-Z]{0,4})?$")
_PROCEDURE = re.compile(r"^([0-9]{4}[0-9A-Z]|[A-V][0-9]{4})$")
CHART_CATEGORIES = ("inpatient_day", "critical_care", "imaging", "procedure")
_CODE = r"([0-9]{4}[0-9A-Z]|[A-V][0-9]{4})"
_CODE_RANGE = re.compile(rf"(rev:[0-9]{{4}}(-[0-9]{{4}})?|{_CODE}(-{_CODE})?)")
_TIMED = re.compile(r"([0-9]{4}[0-9A-Z]|[A-V][0-9]{4}):[1-9][0-9]{0,3}")


@dataclass(frozen=True)
class ClaimsConfig:
    x12_versions: tuple[str, ...]
    x12_validation: str
    part2_diagnosis_prefixes: tuple[str, ...]
    part2_procedure_codes: tuple[str, ...]
    part2_drgs: tuple[str, ...]
    part2_in_gold: bool = False
    fraud_weights: Mapping[str, int] = field(default_factory=dict)
    fraud_medium_from: int = 30
    fraud_high_from: int = 60
    unbundling_pairs: tuple[tuple[str, ...], ...] = ()
    timed_minutes: tuple[str, ...] = ()
    fraud_max_minutes_per_day: int = 1440
    em_families: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    upcoding_min_lines: int = 20
    upcoding_min_excess: float = 0.25
    exclusion_list: str = ""
    chart_codes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._check_codes()
        self._check_fraud()
        self._check_gold_rules()

    def _check_gold_rules(self) -> None:
        bad = {k: list(v) for k, v in self.em_families.items()
               if len(v) < 2 or not all(_PROCEDURE.match(c) for c in v)}
        if bad:
            raise ConfigError("claims.em_families maps a family name to its E/M codes, lowest level first, at least "
                              f"two (e.g. subsequent_hospital: [\"99231\", \"99232\", \"99233\"]); wrong: {bad}")
        if self.upcoding_min_lines < 1 or not 0 < self.upcoding_min_excess < 1:
            raise ConfigError("claims.upcoding_min_lines must be at least 1 and claims.upcoding_min_excess a share "
                              f"between 0 and 1 (e.g. 0.25), got {self.upcoding_min_lines} and "
                              f"{self.upcoding_min_excess}")
        unknown = sorted(set(self.chart_codes) - set(CHART_CATEGORIES))
        bad = [c for v in self.chart_codes.values() for c in v if not _CODE_RANGE.fullmatch(c)]
        if unknown or bad:
            raise ConfigError(f"claims.chart_codes maps {', '.join(CHART_CATEGORIES)} to CPT/HCPCS codes or ranges "
                              f"(\"70010-79999\") or revenue codes (\"rev:0200-0219\"); unknown categories {unknown}, "
                              f"wrong codes {bad}")

    def _check_codes(self) -> None:
        bad = [v for v in self.x12_versions if not _X12_VERSION.match(v)]
        if bad or not self.x12_versions:
            raise ConfigError(f"claims.x12_versions must list X12 implementation guide versions as GS08 writes them "
                              f"(e.g. 005010X222A1), got {list(bad or self.x12_versions) or '(none)'}")
        if self.x12_validation not in X12_VALIDATION:
            raise ConfigError(f"claims.x12_validation must be one of {', '.join(X12_VALIDATION)}, got "
                              f"{self.x12_validation!r}")
        bad = [c for c in self.part2_diagnosis_prefixes if not _ICD10_PREFIX.match(c)]
        if bad:
            raise ConfigError(f"claims.part2_diagnosis_prefixes must be ICD-10-CM codes or prefixes like F10 or "
                              f"O99.32, got {bad}")
        bad = [c for c in self.part2_procedure_codes if not _PROCEDURE.match(c)]
        if bad:
            raise ConfigError(f"claims.part2_procedure_codes must be CPT (5 characters, e.g. 99408) or HCPCS Level II "
                              f"(a letter and 4 digits, e.g. H0020) codes, got {bad}")
        bad = [d for d in self.part2_drgs if not (d.isdigit() and len(d) == 3)]
        if bad:
            raise ConfigError(f"claims.part2_drgs must be 3-digit MS-DRG codes written as text, e.g. \"894\", "
                              f"got {bad}")

    def _check_fraud(self) -> None:
        unknown = sorted(set(self.fraud_weights) ^ set(FRAUD_RULES))
        if unknown or any(not 0 <= w <= 100 for w in self.fraud_weights.values()):
            raise ConfigError(f"claims.fraud_weights needs a weight 0-100 for exactly {', '.join(FRAUD_RULES)}; got "
                              f"{dict(self.fraud_weights)}")
        if not 0 < self.fraud_medium_from < self.fraud_high_from <= 100:
            raise ConfigError("claims.fraud_medium_from and fraud_high_from must satisfy 0 < medium < high <= 100, got "
                              f"{self.fraud_medium_from} and {self.fraud_high_from}")
        bad = [row for row in self.unbundling_pairs if len(row) < 2 or not all(_PROCEDURE.match(c) for c in row)]
        if bad:
            raise ConfigError("claims.unbundling_pairs rows are a comprehensive CPT/HCPCS code, then the components "
                              f"it covers, e.g. [\"85025\", \"85027\"]; wrong: {[list(r) for r in bad]}")
        bad = [t for t in self.timed_minutes if not _TIMED.fullmatch(t)]
        if bad:
            raise ConfigError(f"claims.timed_minutes entries are CODE:MINUTES, e.g. \"99291:74\"; wrong: {bad}")
        if self.fraud_max_minutes_per_day < 1:
            raise ConfigError(f"claims.fraud_max_minutes_per_day must be at least 1 minute, got "
                              f"{self.fraud_max_minutes_per_day}")

    @property
    def minutes(self) -> dict[str, int]:
        """timed_minutes as {code: minutes per unit}."""
        return {code: int(m) for code, m in (t.split(":") for t in self.timed_minutes)}


@dataclass(frozen=True)
class QualityConfig:
    enabled: bool
    sample_rows: int
    report: bool

    def __post_init__(self) -> None:
        if self.sample_rows < 0:
            raise ConfigError(f"quality.sample_rows must be 0 (every row) or more, got {self.sample_rows}")


@dataclass(frozen=True)
class GoldConfig:
    lookback: str
    feature_windows: tuple[str, ...]
    spo2_scale2_codes: tuple[str, ...]
    history: str
    alert_resolve_after: str
    state_horizon: str
    news2: Mapping[str, Any]
    alert_levels: tuple[str, ...]
    qsofa_alert_from: int
    state_partitions: int
    state_idle: str = "24h"

    def __post_init__(self) -> None:
        if self.state_idle_ms < 0:
            raise ConfigError(f"gold.state_idle must be a duration like 24h (0s: keep every person's state in full), "
                              f"got {self.state_idle!r}")
        if self.state_partitions < 1:
            raise ConfigError(f"gold.state_partitions must be at least 1, got {self.state_partitions}")
        from gold.news2 import Charts

        try:
            Charts.of(self.news2)
        except ValueError as exc:
            raise ConfigError(f"gold.news2: {exc}; conf/base.yaml holds the RCP 2017 chart to start from") from None
        unknown = [lv for lv in self.alert_levels if lv not in ALERT_LEVELS]
        if unknown or not self.alert_levels:
            raise ConfigError(f"gold.alert_levels must list some of {list(ALERT_LEVELS)}, got "
                              f"{list(self.alert_levels)}")
        if self.qsofa_alert_from not in (1, 2, 3):
            raise ConfigError(f"gold.qsofa_alert_from must be 1, 2 or 3 (qSOFA points), got {self.qsofa_alert_from}")
        if self.state_horizon_ms < 0:
            raise ConfigError(f"gold.state_horizon must be a duration like 10m, got {self.state_horizon!r}")
        bad = [w for w in self.feature_windows if parse_duration_ms(w, "gold.feature_windows[]") % 12]
        if bad:
            raise ConfigError(f"gold.feature_windows: {bad} cannot be cut into 12 grid steps of whole milliseconds; "
                              "use durations like 1h, 4h, 12h")
        if self.alert_resolve_after_ms < 0:
            raise ConfigError(f"gold.alert_resolve_after must be a duration like 1h (0s: resolve at the first score "
                              f"out of the level), got {self.alert_resolve_after!r}")
        if self.lookback_ms <= 0:
            raise ConfigError(f"gold.lookback must be a positive duration like 4h, got {self.lookback!r}")
        if not self.feature_windows or any(parse_duration_ms(w, "gold.feature_windows[]") <= 0
                                           for w in self.feature_windows):
            raise ConfigError(f"gold.feature_windows must list positive durations like [1h, 4h, 12h], "
                              f"got {list(self.feature_windows)!r}")
        if self.history_ms < max(self.lookback_ms, *self.feature_windows_ms):
            raise ConfigError(f"gold.history ({self.history}) must be at least gold.lookback and the longest "
                              f"feature window ({max(self.lookback_ms, *self.feature_windows_ms) // 60000} min)")

    @property
    def lookback_ms(self) -> int:
        return parse_duration_ms(self.lookback, "gold.lookback")

    @property
    def history_ms(self) -> int:
        return parse_duration_ms(self.history, "gold.history")

    @property
    def charts(self):
        """The NEWS2 chart (gold.news2.Charts) this configuration scores with."""
        from gold.news2 import Charts

        return Charts.of(self.news2)

    @property
    def state_idle_ms(self) -> int:
        return parse_duration_ms(self.state_idle, "gold.state_idle")

    @property
    def state_horizon_ms(self) -> int:
        return parse_duration_ms(self.state_horizon, "gold.state_horizon")

    @property
    def alert_resolve_after_ms(self) -> int:
        return parse_duration_ms(self.alert_resolve_after, "gold.alert_resolve_after")

    @property
    def feature_windows_ms(self) -> tuple[int, ...]:
        return tuple(parse_duration_ms(w, "gold.feature_windows[]") for w in self.feature_windows)


# gold.deterioration_alerts' levels (its docstring has their conditions).
ALERT_LEVELS = ("news2_medium", "news2_high", "qsofa", "model")
LABEL_EVENTS = ("peak_time", "onset_time")  # truth/deteriorations.csv columns


@dataclass(frozen=True)
class ModelsConfig:
    tracking_uri: str
    horizon: str
    test_fraction: float
    seed: int
    alert_rate_per_100_patient_days: float
    label_event: str = "peak_time"

    def __post_init__(self) -> None:
        if self.label_event not in LABEL_EVENTS:
            raise ConfigError(f"models.label_event must be one of {list(LABEL_EVENTS)}, got {self.label_event!r}")
        if parse_duration_ms(self.horizon, "models.horizon") <= 0:
            raise ConfigError(f"models.horizon must be a positive duration like 12h, got {self.horizon!r}")
        if not 0.05 <= self.test_fraction <= 0.8:
            raise ConfigError(f"models.test_fraction must be between 0.05 and 0.8, got {self.test_fraction}")
        if self.alert_rate_per_100_patient_days < 0:
            raise ConfigError("models.alert_rate_per_100_patient_days must be 0 (match NEWS2 >= 5) or more, got "
                              f"{self.alert_rate_per_100_patient_days}")

    @property
    def horizon_ms(self) -> int:
        return parse_duration_ms(self.horizon, "models.horizon")


# gold.imaging_worklist: order priorities (silver.imaging_orders.priority), location classes, indication categories.
IMAGING_PRIORITIES = ("STAT", "ASAP", "ROUTINE")
IMAGING_LOCATIONS = ("ED", "ICU", "WARD", "OUTPATIENT")
INDICATION_CATEGORIES = ("stroke", "pe", "bleed", "trauma")
_EXAM = re.compile(r"^([A-Z]{2})/([A-Z][A-Z0-9_ ]*|\*)=(\d{1,3})$")


@dataclass(frozen=True)
class IndicationRule:
    points: int
    codes: tuple[str, ...]
    words: tuple[str, ...]


@dataclass(frozen=True)
class ImagingConfig:
    """The worklist's ranking (each factor's points), SLAs, and the reading room of the queue replay."""

    sla: Mapping[str, str]
    no_order_sla: str
    images_expected: Mapping[str, str]
    points_priority: Mapping[str, int]
    points_no_order: int
    points_location: Mapping[str, int]
    points_news2_band: Mapping[str, int]
    points_open_alert: int
    points_per_sla: int
    sla_cap: float
    points_model: int
    exam_points: tuple[str, ...]
    indication_stroke: IndicationRule
    indication_pe: IndicationRule
    indication_bleed: IndicationRule
    indication_trauma: IndicationRule
    replay_radiologists: int
    replay_read_minutes: Mapping[str, float]
    replay_utilisation: tuple[float, ...]
    replay_night_radiologists: int
    replay_night_hours: tuple[int, ...]
    match_window: str = "24h"
    news2_current_for: str = "24h"
    clock: str = "wall"
    # --continuous: the processing-time trigger of the imaging jobs (bronze.dicom_instances, gold.imaging_worklist).
    interval: str = "250ms"

    def __post_init__(self) -> None:
        from gold.news2 import BANDS

        for key, known in (("sla", IMAGING_PRIORITIES), ("images_expected", IMAGING_PRIORITIES),
                           ("points_priority", IMAGING_PRIORITIES), ("points_location", IMAGING_LOCATIONS),
                           ("points_news2_band", BANDS)):
            got = getattr(self, key)
            if set(got) != set(known):
                raise ConfigError(f"imaging.{key} must name exactly {list(known)}, got {sorted(got)}")
        for key, value in [*((f"sla.{k}", v) for k, v in self.sla.items()),
                           *((f"images_expected.{k}", v) for k, v in self.images_expected.items()),
                           ("no_order_sla", self.no_order_sla)]:
            if parse_duration_ms(value, f"imaging.{key}") <= 0:
                raise ConfigError(f"imaging.{key} must be a positive duration like 4h, got {value!r}")
        points = {"points_no_order": self.points_no_order, "points_open_alert": self.points_open_alert,
                  "points_per_sla": self.points_per_sla, "points_model": self.points_model,
                  **{f"points_priority.{k}": v for k, v in self.points_priority.items()},
                  **{f"points_location.{k}": v for k, v in self.points_location.items()},
                  **{f"points_news2_band.{k}": v for k, v in self.points_news2_band.items()},
                  **{f"indication_{c}.points": self.indication(c).points for c in INDICATION_CATEGORIES}}
        bad = {k: v for k, v in points.items() if not 0 <= v <= 1000}
        if bad:
            raise ConfigError(f"imaging: points must be whole numbers from 0 to 1000, got {bad}")
        if not 0 < self.sla_cap <= 100:
            raise ConfigError(f"imaging.sla_cap must be a number of SLAs above 0 (e.g. 3), got {self.sla_cap}")
        self._check_rooms_and_exams()

    def _check_rooms_and_exams(self) -> None:
        if parse_duration_ms(self.interval, "imaging.interval") < 1:
            raise ConfigError(f"imaging.interval must be a positive duration like 250ms, got {self.interval!r}")
        for key in ("match_window", "news2_current_for"):
            if parse_duration_ms(getattr(self, key), f"imaging.{key}") <= 0:
                raise ConfigError(f"imaging.{key} must be a positive duration like 24h, got {getattr(self, key)!r}")
        if self.clock not in ("wall", "data"):
            raise ConfigError(f"imaging.clock must be wall (the batch's time) or data (the newest event time in the "
                              f"imaging tables), got {self.clock!r}")
        bad = [e for e in self.exam_points if not _EXAM.match(e)]
        if bad:
            raise ConfigError(f"imaging.exam_points: {bad} must look like MODALITY/BODY_PART=points, e.g. CT/HEAD=15 "
                              "or CT/*=6 (upper case, whole points)")
        self._check_replay()
        for category in INDICATION_CATEGORIES:
            rule = self.indication(category)
            if not rule.codes and not rule.words:
                raise ConfigError(f"imaging.indication_{category} needs some codes or words (set points: 0 to "
                                  "switch the category off)")

    def _check_replay(self) -> None:
        if self.replay_radiologists < 1:
            raise ConfigError(f"imaging.replay_radiologists must be at least 1, got {self.replay_radiologists}")
        minutes = dict(self.replay_read_minutes)
        if "other" not in minutes or any(v <= 0 for v in minutes.values()):
            raise ConfigError("imaging.replay_read_minutes must give positive minutes per DICOM modality and for "
                              f"'other' (e.g. {{CT: 10, CR: 3, other: 8}}), got {minutes}")
        if not self.replay_utilisation or any(not 0 < u <= 2 for u in self.replay_utilisation):
            raise ConfigError("imaging.replay_utilisation must list shares of the radiologists' time above 0 and at "
                              f"most 2 (e.g. [0.8, 0.9, 1.0]), got {list(self.replay_utilisation)}")
        if not 1 <= self.replay_night_radiologists <= self.replay_radiologists:
            raise ConfigError("imaging.replay_night_radiologists must be from 1 to imaging.replay_radiologists "
                              f"({self.replay_radiologists}), got {self.replay_night_radiologists}")
        if len(self.replay_night_hours) != 2 or any(not 0 <= h <= 23 for h in self.replay_night_hours):
            raise ConfigError("imaging.replay_night_hours must be [from, to] hours of the day (UTC, 0-23), e.g. "
                              f"[20, 8], got {list(self.replay_night_hours)}")

    def indication(self, category: str) -> IndicationRule:
        return getattr(self, f"indication_{category}")

    def sla_ms(self, priority: str | None) -> int:
        """The time to read a study of this order priority (None: no order matched)."""
        value = self.sla[priority] if priority in self.sla else self.no_order_sla
        return parse_duration_ms(value, "imaging.sla")

    def seconds(self, key: str) -> int:
        """A duration setting (match_window, news2_current_for) in whole seconds."""
        return parse_duration_ms(getattr(self, key), f"imaging.{key}") // 1000

    def images_expected_s(self) -> dict[str, int]:
        return {p: parse_duration_ms(v, f"imaging.images_expected.{p}") // 1000
                for p, v in self.images_expected.items()}

    def exams(self) -> tuple[tuple[str, str, int], ...]:
        """exam_points as (modality, body part or *, points), in order."""
        return tuple((m[1], m[2], int(m[3])) for m in map(_EXAM.match, self.exam_points))


@dataclass(frozen=True)
class JobsConfig:
    modules: tuple[str, ...]


@dataclass(frozen=True)
class SqlServerConfig:
    """`carelake sql-server`: where it listens, who may log in, how the masked views coarsen dates."""

    host: str = "127.0.0.1"
    port: int = 10000
    users_file: str = ""  # "" = <root>/_secrets/sql_users
    mask_date_unit: str = "month"
    views_dir: str = ""  # "" = sql/views beside the conf/ folder
    max_connections: int = 64

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"sql_server.port must be 0 (a free port) to 65535, got {self.port}")
        if self.max_connections < 1:
            raise ConfigError(f"sql_server.max_connections must be at least 1, got {self.max_connections}")
        if self.mask_date_unit not in MASK_DATE_UNITS:
            raise ConfigError(f"sql_server.mask_date_unit must be one of {', '.join(MASK_DATE_UNITS)}, got "
                              f"{self.mask_date_unit!r}")


MASK_DATE_UNITS = ("year", "quarter", "month", "week", "day")


@dataclass(frozen=True)
class Config:
    root: Path
    spark: SparkConfig
    storage: StorageConfig
    streaming: StreamingConfig
    landing: LandingConfig
    gateway: GatewayConfig
    simulator: SimulatorConfig
    silver: SilverConfig
    claims: ClaimsConfig
    quality: QualityConfig
    gold: GoldConfig
    models: ModelsConfig
    jobs: JobsConfig
    imaging: ImagingConfig
    env: str = "local"
    conf_dir: Path = Path("conf")
    sql_server: SqlServerConfig = field(default_factory=SqlServerConfig)

    def path(self, *parts: str) -> Path:
        """A path below the lakehouse root."""
        return self.root.joinpath(*parts)

    @property
    def expectations_dir(self) -> Path:
        """The expectation suites: expectations/ beside the conf/ folder in use."""
        return self.conf_dir.parent / "expectations"


def find_conf_dir(explicit: str | os.PathLike | None, environ: Mapping[str, str]) -> Path:
    """The folder holding base.yaml: flag > CARELAKE_CONF_DIR > ./conf > the checkout's conf/."""
    if explicit or environ.get("CARELAKE_CONF_DIR"):
        chosen = Path(explicit or environ["CARELAKE_CONF_DIR"])
        if not (chosen / "base.yaml").is_file():
            raise ConfigError(f"configuration folder {chosen} has no base.yaml; point --conf-dir at carelake's conf/")
        return chosen.resolve()
    for candidate in (Path.cwd() / "conf", Path(__file__).resolve().parents[1] / "conf"):
        if (candidate / "base.yaml").is_file():
            return candidate
    raise ConfigError("conf/base.yaml not found: run carelake from its checkout or set CARELAKE_CONF_DIR")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of keys, got {type(data).__name__}")
    return data


def _merge(base: dict[str, Any], over: Mapping[str, Any], known: dict[str, Any], origin: str, prefix: str = "") -> None:
    """Deep-merge `over` into `base`, refusing keys `known` (the base file's shape) does not have."""
    for key, value in over.items():
        dotted = f"{prefix}{key}"
        if key not in known:
            choices = ", ".join(f"{prefix}{k}" for k in known)
            raise ConfigError(f"unknown configuration key {dotted!r} in {origin}; known keys here: {choices}")
        free_form = dotted in ("spark.conf", "silver.system_aliases")
        if isinstance(known[key], dict) and not free_form:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{dotted} in {origin} must be a mapping, got {value!r}")
            _merge(base[key], value, known[key], origin, prefix=f"{dotted}.")
        elif free_form:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{dotted} in {origin} must be a mapping of setting: value, got {value!r}")
            base[key] = {**base[key], **{str(k): str(v) for k, v in value.items()}}
        else:
            base[key] = value


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    node = out
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def _scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _env_overrides(environ: Mapping[str, str]) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for name in sorted(environ):
        if name.startswith(_ENV_PREFIX) and name not in _ENV_RESERVED:
            dotted = name[len(_ENV_PREFIX):].lower().replace("__", ".")
            found.append((f"environment variable {name}", _nest(dotted, _scalar(environ[name]))))
    return found


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check one value against its dataclass type hint, converting where the form is unambiguous."""
    origin = typing.get_origin(hint)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be a whole number, got {value!r}")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be text, got {value!r}")
    if hint is Path:
        return Path(str(value)).expanduser()
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return tuple(_coerce(v, typing.get_args(hint)[0], f"{key}[]") for v in value)
    if origin in (Mapping, dict) or hint is Mapping:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        value_hint = typing.get_args(hint)[1]
        return types.MappingProxyType({str(k): _coerce(v, value_hint, f"{key}.{k}") for k, v in value.items()})
    if hint is Any:  # free-form: the owning section checks it
        return value
    raise ConfigError(f"{key}: unsupported configuration type {hint!r}")


def _build(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if f.name not in data:
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
                continue
            raise ConfigError(f"configuration key {key!r} is missing; conf/base.yaml must define it")
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            kwargs[f.name] = _build(hint, data[f.name], prefix=f"{key}.")
        else:
            kwargs[f.name] = _coerce(data[f.name], hint, key)
    return cls(**kwargs)


def load_config(
    *,
    env: str | None = None,
    root: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    conf_dir: str | os.PathLike | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Resolve flag > environment > overlay file > base file into a validated Config."""
    environ = os.environ if environ is None else environ
    folder = find_conf_dir(conf_dir, environ)
    env_name = env or environ.get("CARELAKE_ENV") or "local"
    base = _read_yaml(folder / "base.yaml")
    shape = _read_yaml(folder / "base.yaml")
    overlay = folder / f"{env_name}.yaml"
    if not overlay.is_file():
        available = sorted(p.stem for p in folder.glob("*.yaml") if p.stem != "base")
        raise ConfigError(f"no overlay {env_name!r} in {folder}; choose one of: {', '.join(available)}")
    layers: list[tuple[str, Mapping[str, Any]]] = [(str(overlay), _read_yaml(overlay))]
    layers += _env_overrides(environ)
    for dotted, value in (overrides or {}).items():
        layers.append((f"flag --set {dotted}", _nest(dotted, _scalar(value) if isinstance(value, str) else value)))
    if root is not None:
        layers.append(("flag --root", {"root": str(root)}))
    for origin, data in layers:
        _merge(base, data, shape, origin)
    base["root"] = Path(str(base["root"])).expanduser().resolve()
    cfg = _build(Config, base)
    return dataclasses.replace(cfg, env=env_name, conf_dir=folder)
