"""The job registry: every table carelake writes, with its source, transform, keys and trigger.

The CLI, spark-submit, notebooks and the tests all read this one registry. A job is named after the
table it writes. Extra jobs come from modules listed in `jobs.modules` (each exposes JOBS = [...]).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pipelines.config import Config
from pipelines.errors import ConfigError, SchemaEvolutionError, UsageError
from pipelines.store.base import MergeSpec, split_table_name

if TYPE_CHECKING:
    from pyspark.sql import DataFrame
    from pyspark.sql.types import StructType

# A transform with side outputs may return one DataFrame whose rows name their table in this column.
ROUTE_COLUMN = "_output"
# Keyword arguments the runner offers a transform; a transform takes those it names. `read_table(name)` gives
# the current snapshot of a table as a DataFrame (the history a gold job scores new rows against; with
# `since=(column, time)` only the rows, and files, from that time on; `(column, time, until)` a slice), and
# `table_version(name)` its version,
# for provenance; `batch_facts` what a job's StateStage prepared for the batch; `via_driver` whether the runner
# writes the batch from the driver (small: a transform may then compute it there too and return Arrow tables).
BATCH_PARAMETERS = ("batch_id", "ingest_batch_id", "processed_at", "read_table", "table_version", "batch_facts",
                    "via_driver", "carried_rows")


class Deferred:
    """An option computed on first use, not when the registry loads (e.g. a secret kept under the root)."""

    def __init__(self, compute: Callable[[], Any]):
        self._compute = compute
        self._done = False
        self._value: Any = None

    def value(self) -> Any:
        if not self._done:
            self._value, self._done = self._compute(), True
        return self._value


@dataclass(frozen=True)
class LandingSource:
    """Files under <root>/landing/<feed>/, read once each by Spark's file source.

    `more` feeds are read as one stream with the first (bronze.claim_files keeps the x12 and claims feeds); each
    landing file's path names its feed.

    content=False: Spark lists the files but does not read them (no `content` column); the transform reads each
    file on the executors itself (`bronze.landed` maps it), so a batch of large files (DICOM instances of hundreds
    of MB) never passes through the JVM or a cached batch whole.
    """

    feed: str
    glob: str = "*"
    more: tuple[str, ...] = ()
    content: bool = True

    @property
    def feeds(self) -> tuple[str, ...]:
        return (self.feed, *self.more)

    def describe(self) -> str:
        return " + ".join(f"landing/{f}" for f in self.feeds)


@dataclass(frozen=True)
class TableSource:
    """The rows new versions of upstream Delta tables changed (their change feeds).

    Several tables (`TableSource("bronze.a", "bronze.b")`) are read as one stream: their columns are
    united by name (a column one table lacks is null in its rows), so one transform sees every feed.
    """

    table: str
    more: tuple[str, ...] = ()

    def __init__(self, table: str, *more: str):
        object.__setattr__(self, "table", table)
        object.__setattr__(self, "more", tuple(more))

    @property
    def tables(self) -> tuple[str, ...]:
        return (self.table, *self.more)

    def describe(self) -> str:
        return " + ".join(self.tables)


class StateStage(Protocol):
    """A keyed, stateful step between a job's source and its batches (e.g. the score job's per-person state).

    `plan(stream, folder)` builds it into the streaming query (Spark keeps its state in the query's checkpoint).
    Before each batch runs, the runner calls `prepare(folder, batch)` on the driver: the stage writes under
    `folder` what its code on the executors needs of this batch (kept for a replay), and returns the facts the
    transform gets as `batch_facts`.
    """

    partitions: int  # the state's partitions (shuffle partitions of the query), fixed by its first checkpoint
    layout: str  # the state's shape in the checkpoint: a checkpoint of another layout is set aside, and replayed

    def plan(self, stream: DataFrame, folder: str) -> DataFrame: ...

    def prepare(self, folder: str, batch: Mapping[str, Any]) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Output:
    """A side table a job also writes from each of its batches (e.g. silver.quarantine).

    The transform then returns a mapping {table name: DataFrame} holding the job's own table and each
    side output; every table is committed with the same batch transaction id, so a replay skips all.
    """

    table: str
    write: Literal["append", "merge"] = "append"
    merge: MergeSpec | None = None
    schema: StructType | None = None
    # The side table's own expectation suite (expectations/<name>.json), run on its rows of every batch like the
    # job's; its quarantine rows go to silver.quarantine, named by `quarantine_item` (the columns that say which row).
    expectation_suite: str | None = None
    quarantine_item: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        split_table_name(self.table)
        if (self.write == "merge") != (self.merge is not None):
            raise ConfigError(f"side output {self.table}: a merge output needs a MergeSpec, and only it takes one")


@dataclass(frozen=True)
class Job:
    """One output table: where its input comes from, the pure transform, and how it is written."""

    name: str
    source: LandingSource | TableSource
    transform: Callable[..., DataFrame]
    write: Literal["append", "merge"] = "append"
    merge: MergeSpec | None = None
    schema: StructType | None = None
    expectation_suite: str | None = None
    interval: str | None = None
    description: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)
    side_outputs: tuple[Output, ...] = ()
    # Tables the transform looks up with read_table (not streamed): their jobs run first in available-now order.
    reads: tuple[str, ...] = ()
    state: StateStage | None = None
    # Jobs whose transform runs on this job's own rows inside its batches (streaming.fuse, see `fuse`); their
    # tables commit with the batch's transaction, before this job's own table.
    fused: tuple[Job, ...] = ()
    # The columns naming a row its suite quarantines (silver.quarantine `item`); empty: `source_id`.
    quarantine_item: tuple[str, ...] = ()
    # streaming.fuse fused every table this job reads: it runs only inside its carriers' batches, never as a query.
    carried_only: bool = False

    def __post_init__(self) -> None:
        split_table_name(self.name)
        if self.write not in ("append", "merge"):
            raise ConfigError(f"job {self.name}: write must be 'append' or 'merge', got {self.write!r}")
        if (self.write == "merge") != (self.merge is not None):
            raise ConfigError(f"job {self.name}: a merge job needs a MergeSpec, and only a merge job takes one")
        accepted = set(inspect.signature(self.transform).parameters)
        unknown = [p for p, v in inspect.signature(self.transform).parameters.items()
                   if v.kind == v.KEYWORD_ONLY and p not in BATCH_PARAMETERS and p not in self.options]
        if unknown:
            raise ConfigError(f"job {self.name}: transform asks for {unknown}; offer them in options= or"
                              f" use the batch parameters {BATCH_PARAMETERS}")
        object.__setattr__(self, "_accepted", accepted)

    @property
    def upstream(self) -> tuple[str, ...]:
        return self.source.tables if isinstance(self.source, TableSource) else ()

    @property
    def fused_tables(self) -> tuple[str, ...]:
        """The tables the fused jobs write in this job's batches."""
        return tuple(o.table for down in self.fused for o in down.outputs)

    @property
    def outputs(self) -> tuple[Output, ...]:
        """Every table a batch writes: the side outputs, then the job's own table (committed last)."""
        own = Output(self.name, self.write, self.merge, self.schema, self.expectation_suite, self.quarantine_item)
        return (*self.side_outputs, own)

    @property
    def validated_outputs(self) -> tuple[Output, ...]:
        """The outputs with an expectation suite: the job's own table first, then side tables that have one."""
        own = self.outputs[-1]
        return tuple(o for o in (own, *self.side_outputs) if o.expectation_suite)

    def apply(self, df: DataFrame, batch: Mapping[str, Any]) -> dict[str, DataFrame] | DataFrame:
        """Run the transform with the batch parameters and options it declares.

        Returns {table: DataFrame}, or, for a job with side outputs, may return one routed DataFrame
        whose ROUTE_COLUMN names each row's table (computed once, split by the runner).
        """
        options = {k: v.value() if isinstance(v, Deferred) else v for k, v in self.options.items()}
        offered = {**{k: v for k, v in batch.items() if k in BATCH_PARAMETERS}, **options}
        out = self.transform(df, **{k: v for k, v in offered.items() if k in self._accepted})
        want = {o.table for o in self.outputs}
        if not isinstance(out, Mapping):
            if not self.side_outputs:
                return {self.name: out}
            if ROUTE_COLUMN in out.columns:
                return out
        if not isinstance(out, Mapping) or set(out) != want:
            got = sorted(out) if isinstance(out, Mapping) else type(out).__name__
            raise SchemaEvolutionError(f"job {self.name}: its transform must return {{table: DataFrame}} for "
                                       f"{sorted(want)} or one DataFrame routed by {ROUTE_COLUMN}, got {got}")
        return dict(out)


class Registry:
    """Jobs by name, with dependency order."""

    def __init__(self, jobs: Iterable[Job]):
        self._jobs: dict[str, Job] = {}
        for job in jobs:
            if job.name in self._jobs:
                raise ConfigError(f"two jobs write {job.name}; a table has exactly one job")
            self._jobs[job.name] = job
        self.order()  # fail early on cycles

    def __iter__(self):
        return iter(self.order())

    def names(self) -> list[str]:
        return [j.name for j in self.order()]

    def _fusers(self, name: str) -> list[str]:
        """The jobs whose batches carry job `name` (streaming.fuse)."""
        return sorted(j.name for j in self._jobs.values() if any(d.name == name for d in j.fused))

    def _writers(self, table: str) -> list[str]:
        """The jobs that write `table`: its own job, else every job that has it as a side output."""
        if table in self._jobs:
            return [table]
        return sorted(j.name for j in self._jobs.values() if any(o.table == table for o in j.side_outputs))

    def get(self, name: str) -> Job:
        """The job that writes `name`: its own table, or a side output only it writes (gold.deterioration_alerts
        is written by the gold.early_warning_scores job)."""
        writers = self._writers(name)
        if len(writers) == 1:
            return self._jobs[writers[0]]
        if writers:
            raise UsageError(f"{name} is written by the jobs {', '.join(writers)} as a side output; run one of "
                             "them by name, or `all`")
        known = ", ".join(sorted(self._jobs)) or "(none)"
        raise UsageError(f"no job writes {name!r}; jobs: {known}")

    def runnable(self, names: Iterable[str] | None = None) -> list[Job]:
        """The queries that run `names` (all jobs: None), in dependency order: a job that runs only inside its
        carriers' batches (carried_only) is run by its carriers."""
        wanted = None if names is None else list(names)
        if wanted is not None:
            wanted += [c for n in wanted if self.get(n).carried_only for c in self._fusers(self.get(n).name)]
        return [job for job in self.order(wanted) if not job.carried_only]

    def order(self, names: Iterable[str] | None = None) -> list[Job]:
        """Jobs (all, or `names` and nothing else) with every upstream job before its dependents."""
        wanted = set(self._jobs) if names is None else {self.get(n).name for n in names}
        done: dict[str, Job] = {}
        visiting: list[str] = []

        def visit(name: str) -> None:
            if name in done or name not in self._jobs:
                return
            if name in visiting:
                cycle = " -> ".join([*visiting[visiting.index(name):], name])
                raise ConfigError(f"jobs form a cycle: {cycle}")
            visiting.append(name)
            for up in (*self._jobs[name].upstream, *self._jobs[name].reads):
                for writer in self._writers(up):
                    visit(writer)
                    for carrier in self._fusers(writer):  # a fused job's rows also come from its carriers' batches
                        visit(carrier)
            visiting.pop()
            done[name] = self._jobs[name]

        for name in sorted(self._jobs):
            visit(name)
        return [job for job in done.values() if job.name in wanted]


def silver_options(cfg: Config) -> dict[str, Any]:
    """What the silver parsers need from configuration (the key secret is read or created on first use)."""
    from pipelines.secrets import key_secret

    s = cfg.silver
    return {"secret": Deferred(lambda: key_secret(cfg)), "timezone": s.timezone, "mrn_system": s.mrn_system,
            "system_aliases": tuple(sorted(s.system_aliases.items())), "fhir_validation": s.fhir_validation}


def builtin_jobs(cfg: Config) -> list[Job]:
    """carelake's own jobs."""
    from bronze import device_readings, dicom_instances, fhir_resources, hl7_messages
    from silver import encounters, imaging_studies, observations, patients, quarantine

    def bronze_job(module, description: str) -> Job:
        source = LandingSource(module.FEED, content=getattr(module, "READ_CONTENT", True))
        return Job(name=module.TABLE, source=source, transform=module.TRANSFORM,
                   schema=module.SCHEMA, description=description,
                   interval=cfg.imaging.interval if module is dicom_instances else None)

    quarantine_output = Output(quarantine.QUARANTINE, "merge",
                               MergeSpec(keys=("quarantine_id",), update=None, latest_by=("quarantined_at",)),
                               quarantine.QUARANTINE_SCHEMA)

    def silver_job(name: str, source: TableSource, transform, merge: MergeSpec, schema, description: str,
                   **options: Any) -> Job:
        return Job(name=name, source=source, transform=transform, write="merge", merge=merge, schema=schema,
                   side_outputs=(quarantine_output,), expectation_suite=name,
                   options={**silver_options(cfg), **options}, description=description)

    clinical = TableSource("bronze.hl7_messages", "bronze.fhir_resources")
    return [*claims_jobs(cfg, quarantine_output),
        bronze_job(hl7_messages, "HL7 v2 messages exactly as received (MLLP or file drop), with header keys"),
        bronze_job(fhir_resources, "FHIR R4 resources exactly as received (HTTP or file drop), Bundles exploded"),
        bronze_job(device_readings, "Bedside-device JSON lines exactly as received, with lineage and cheap keys"),
        bronze_job(dicom_instances, "DICOM instances (C-STORE, STOW-RS or file drop): header as DICOM JSON, UIDs, "
                                    "the stored file's URI and sha256, parse status"),
        silver_job(observations.OBSERVATIONS, TableSource(*clinical.tables, "bronze.device_readings"),
                   observations.observations,
                   MergeSpec(keys=("observation_id",), update=_observation_update(observations.SCHEMA),
                             latest_by=("source_version", "received_at"),
                             update_when="s.source_version > t.source_version",
                             insert_when=f"s.status <> '{observations.DELETED}'",
                             prune_by=("effective_at",), prune_if=("source_feed", observations.ID_HAS_TIME)),
                   observations.SCHEMA,
                   "Every measured value (HL7 OBX, FHIR Observation, device reading), normalized and deduplicated"),
        silver_job(patients.PATIENTS, clinical, patients.patients,
                   MergeSpec(keys=("patient_key",), update=patients.UPDATE, update_when=patients.UPDATE_WHEN),
                   patients.SCHEMA,
                   "One row per patient identity (MRN, FHIR id, fullUrl): demographics and merges (A40, links)"),
        silver_job(encounters.ENCOUNTERS, clinical, encounters.encounters,
                   MergeSpec(keys=("encounter_key",), update=encounters.UPDATE, update_when=encounters.UPDATE_WHEN),
                   encounters.SCHEMA,
                   "One row per encounter identity: ADT lifecycle and FHIR Encounter versions by event time"),
        replace(silver_job(imaging_studies.STUDIES, TableSource(imaging_studies.BRONZE),
                           imaging_studies.imaging_studies,
                           MergeSpec(keys=("study_instance_uid",), latest_by=("last_received_at",)),
                           imaging_studies.SCHEMA,
                           "One row per DICOM study: series and instance counts, modality, body part, study time "
                           "(UTC), accession, referring physician, patient key; unreadable instances quarantined",
                           read_rows=_rows_reader(cfg)),
                interval=cfg.imaging.interval),
        *imaging_silver_jobs(silver_job, clinical),
    ]


def imaging_silver_jobs(silver_job: Callable[..., Job], clinical: TableSource) -> list[Job]:
    """silver.imaging_orders and silver.imaging_reports: current state of each order and report (HL7 and FHIR)."""
    from silver import imaging_orders, imaging_reports

    return [
        silver_job(imaging_orders.ORDERS, clinical, imaging_orders.imaging_orders,
                   MergeSpec(keys=("order_key",), update=imaging_orders.UPDATE,
                             update_when=imaging_orders.UPDATE_WHEN), imaging_orders.SCHEMA,
                   "One row per imaging order (HL7 ORM/OMI, FHIR ServiceRequest): procedure, modality, body part, "
                   "priority, indication, ordering location, status; cancellations applied"),
        silver_job(imaging_reports.REPORTS, clinical, imaging_reports.imaging_reports,
                   MergeSpec(keys=("report_key",), update=imaging_reports.UPDATE,
                             update_when=imaging_reports.UPDATE_WHEN), imaging_reports.SCHEMA,
                   "One row per imaging report (HL7 ORU radiology OBR, FHIR DiagnosticReport): status, read time, "
                   "reader, critical result and when it was communicated, conclusion"),
    ]


def claims_jobs(cfg: Config, quarantine_output: Output) -> list[Job]:
    """bronze.claim_files (the x12 and claims feeds) and the silver claims model, written by one job per batch."""
    from bronze import claim_files
    from gold import claims_fraud, provider_risk
    from pipelines.exclusions import read_exclusions
    from silver import claim_codes
    from silver import claims as c

    def merge(schema, keys: tuple[str, ...], version: str, **more) -> MergeSpec:
        return MergeSpec(keys=keys, update=c.newest_fills(schema, keys, version), latest_by=(version,),
                         update_when=c.changed(schema, keys, version), **more)

    line_keys = ("claim_key", "line_number")
    lines = Output(c.CLAIM_LINES, "merge", merge(c.LINES_SCHEMA, line_keys, "claim_version"), c.LINES_SCHEMA,
                   c.CLAIM_LINES, line_keys)
    providers = Output(c.PROVIDERS, "merge", merge(c.PROVIDERS_SCHEMA, ("provider_key",), "source_version"),
                       c.PROVIDERS_SCHEMA, c.PROVIDERS, ("provider_key",))
    members = Output(c.MEMBERS, "merge", merge(c.MEMBERS_SCHEMA, ("member_key",), "source_version"),
                     c.MEMBERS_SCHEMA, c.MEMBERS, ("member_key",))
    k = cfg.claims
    part2 = claim_codes.Part2Codes.of(k.part2_diagnosis_prefixes, k.part2_procedure_codes, k.part2_drgs)
    scores = Job(name=claims_fraud.SCORES, source=TableSource(c.CLAIMS), transform=claims_fraud.claims_fraud_scores,
                 write="merge", merge=MergeSpec(keys=("claim_key",), delete_when=f"s.band = '{claims_fraud.WITHDRAWN}'",
                                                insert_when=f"s.band <> '{claims_fraud.WITHDRAWN}'"),
                 schema=claims_fraud.SCHEMA, reads=(c.CLAIM_LINES, *claims_fraud.CONTEXT),
                 options={"rules": Deferred(lambda: claims_fraud.Rules.of(k, read_exclusions(k.exclusion_list,
                                                                                              cfg.conf_dir))),
                          "model": _champion_loader(cfg, "models.claims_fraud")},
                 description="Claims fraud rules and model: one row per current claim with a score, a band, reason "
                             "codes (duplicate, unbundling, impossible volume, upcoding, after death, excluded "
                             "provider, phantom service), the model's probability and version; void and Part 2 "
                             "claims have none")
    risk = Job(name=provider_risk.RISK, source=TableSource(claims_fraud.SCORES), transform=provider_risk.provider_risk,
               write="merge", merge=MergeSpec(keys=("provider_npi", "month"),
                                              delete_when=f"s.claims = {provider_risk.WITHDRAWN}",
                                              insert_when=f"s.claims <> {provider_risk.WITHDRAWN}"),
               schema=provider_risk.SCHEMA, reads=(c.PROVIDERS,),
               description="Per provider and month: claims vs specialty peers, the share flagged by the fraud rules "
                           "and the model, the trend against the previous month, the reasons found")
    return [
        Job(name=claim_files.TABLE, source=LandingSource(claim_files.FEEDS[0], more=claim_files.FEEDS[1:]),
            transform=claim_files.TRANSFORM, schema=claim_files.SCHEMA,
            description="Claims files exactly as received (X12 837/835, FHIR Claim/EOB/Coverage, CMS RIF, CSV), "
                        "one row per file, with the sniffed format"),
        Job(name=c.CLAIMS, source=TableSource(claim_files.TABLE), transform=c.claims, write="merge",
            merge=merge(c.SCHEMA, ("claim_key",), "claim_version"), schema=c.SCHEMA,
            side_outputs=(lines, providers, members, quarantine_output), expectation_suite=c.CLAIMS,
            quarantine_item=("claim_key",),
            options={**silver_options(cfg), "x12_versions": k.x12_versions, "x12_validation": k.x12_validation,
                     "part2": part2},
            description="One row per claim (originals, replacements and voids resolved, remittances applied), with "
                        "its lines (silver.claim_lines), providers (silver.providers) and members (silver.members)"),
        scores,
        risk,
    ]


def gold_jobs(cfg: Config) -> list[Job]:
    """Early-warning scores (+ model risk), with deterioration alerts and vitals features as side outputs of the same
    batch, computed per person from the state the job keeps (gold.scoring)."""
    from gold import deterioration_alerts, early_warning_scores, scoring

    g = cfg.gold
    score_key = MergeSpec(keys=("patient_key", "scored_at"), latest_by=("computed_at",), prune_by=("scored_at",),
                          delete_when=early_warning_scores.WITHDRAWAL,
                          insert_when=f"NOT ({early_warning_scores.WITHDRAWAL})")
    features = Output(early_warning_scores.FEATURES, "merge", score_key,
                      early_warning_scores.features_schema(g.feature_windows_ms))
    alerts = Output(deterioration_alerts.ALERTS, "merge",
                    MergeSpec(keys=("alert_id",), latest_by=("computed_at",), prune_by=("opened_at",)),
                    deterioration_alerts.SCHEMA)
    stage = early_warning_scores.ScoreStage(scoring.Settings.of(g), g.feature_windows_ms, _champion_loader(cfg),
                                            partitions=g.state_partitions, idle_ms=g.state_idle_ms)
    return [
        Job(name=early_warning_scores.SCORES, source=TableSource("silver.observations"),
            transform=early_warning_scores.early_warning_scores, write="merge", merge=score_key,
            schema=early_warning_scores.SCHEMA, side_outputs=(alerts, features), state=stage,
            reads=(early_warning_scores.PATIENTS, early_warning_scores.ENCOUNTERS),
            options={"windows_ms": g.feature_windows_ms},
            description="NEWS2 (components, band, partial), qSOFA, SIRS and model risk each time a vital sign "
                        "arrives, from each person's state; in the same batch the deterioration alerts "
                        "(gold.deterioration_alerts: one per patient, level and episode, opened, escalated, "
                        "resolved) and the vitals features (gold.vitals_features)"),
    ]


def _champion_loader(cfg: Config, model: str = "models.deterioration") -> Callable[[], Any]:
    """Each batch asks the model registry for the current champion (a cached model when it has not changed)."""
    uri = Deferred(lambda: _tracking_uri(cfg))

    def champion() -> Any:
        import importlib

        return importlib.import_module(model).load_champion(uri.value())

    return champion


def _tracking_uri(cfg: Config) -> str:
    from models.deterioration import default_tracking_uri

    return default_tracking_uri(cfg)


def imaging_jobs(cfg: Config) -> list[Job]:
    """gold.imaging_worklist with gold.imaging_sla_breaches as a side output: the open set again per batch (a small
    batch by key on the driver, gold.imaging_keyed), whenever studies, orders, reports or vitals (scores, with their
    alerts) change."""
    from datetime import timedelta

    from gold import imaging_rank
    from gold import imaging_worklist as w

    c = cfg.imaging
    breaches = Output(w.BREACHES, "merge", MergeSpec(
        keys=("breach_id",), update_when=" OR ".join(f"NOT (s.`{k}` <=> t.`{k}`)" for k in w.BREACH_CONTENT)),
        w.BREACH_SCHEMA)
    uri = Deferred(lambda: _tracking_uri(cfg))

    def critical_model() -> Any:
        from models.critical_finding import load_champion

        return load_champion(uri.value())

    return [Job(name=w.WORKLIST, source=TableSource(w.STUDIES, w.ORDERS, w.REPORTS, w.SCORES),
                transform=w.imaging_worklist, write="merge",
                merge=MergeSpec(keys=("worklist_key",), delete_when=f"s.status = '{w.LEFT}'",
                                insert_when=f"s.status <> '{w.LEFT}'"),
                schema=w.SCHEMA, side_outputs=(breaches,), reads=(w.ALERTS,), interval=c.interval,
                options={"ranking": imaging_rank.Ranking.of(c), "images_expected_s": c.images_expected_s(),
                         "match": _match_orders_to_studies,
                         "match_window": timedelta(seconds=c.seconds("match_window")),
                         "news2_current_s": c.seconds("news2_current_for"), "clock": c.clock,
                         "critical_model": critical_model, "read_rows": _rows_reader(cfg)},
                description="Imaging worklist: one row per unread study, ranked, with the factors behind its rank "
                            "(order priority, exam, indication, location, NEWS2 band, open alerts, time against the "
                            "SLA, critical-finding model); orders whose images are overdue; and the SLA breaches "
                            "(gold.imaging_sla_breaches), opened and closed like alerts")]


def _rows_reader(cfg: Config) -> Callable[..., Any]:
    """(table, version, where, columns, since=None, keys=None) -> that version's matching rows as Arrow, read by
    delta-rs (pipelines.store.deltars.read_where; the imaging driver paths read silver and bronze by key)."""

    def read_rows(table: str, version: int, where: Any, columns: list[str], since: Any = None, keys: Any = None
                  ) -> Any:
        from pipelines.store.base import TableRef
        from pipelines.store.deltars import read_where

        path = str(TableRef.parse(table, cfg.root).path)
        return read_where(path, version, where, columns, since=since, keys=keys)

    return read_rows


def _match_orders_to_studies(orders: DataFrame, studies: DataFrame, *, window) -> DataFrame:
    """silver.imaging_match's rule (accession, else patient + exam + time window), imported when first used."""
    from silver.imaging_match import match_orders_to_studies

    return match_orders_to_studies(orders, studies, window=window)


def _observation_update(schema: StructType) -> dict[str, str]:
    """A correction replaces every column; a deletion changes only status, version and lineage."""
    keep_on_delete = {"status", "source_version", "source_record", "received_at", "ingested_at"}
    return {f.name: f"s.`{f.name}`" if f.name in keep_on_delete
            else f"CASE WHEN s.status = 'deleted' THEN t.`{f.name}` ELSE s.`{f.name}` END"
            for f in schema.fields if f.name != "observation_id"}


def fuse(jobs: list[Job], pairs: Iterable[tuple[str, str]]) -> list[Job]:
    """Apply streaming.fuse: for each (upstream, downstream) pair, the downstream job's transform runs on the
    upstream bronze job's rows inside its batches, and the downstream's own stream leaves the upstream table out
    (with every table it reads fused, it has no stream of its own: carried_only).

    Only a job that reads a landing feed can carry one, and only a stateless job that reads its table can be
    carried: a keyed state lives in one query's checkpoint.
    """
    by_name = {j.name: j for j in jobs}
    carried: dict[str, list[str]] = {}
    for up, down in pairs:
        for name in (up, down):
            if name not in by_name:
                raise ConfigError(f"streaming.fuse: no job writes {name!r}; jobs: {', '.join(sorted(by_name))}")
        if not isinstance(by_name[up].source, LandingSource):
            raise ConfigError(f"streaming.fuse: {up} reads {by_name[up].source.describe()}; only a job that reads a "
                              "landing feed (a bronze job) can carry another job in its batches")
        if up not in by_name[down].upstream or by_name[down].state is not None:
            why = "keeps keyed state, which lives in its own query" if by_name[down].state else f"does not read {up}"
            raise ConfigError(f"streaming.fuse: {down} {why}, so it cannot run inside {up}'s batches")
        carried.setdefault(down, []).append(up)
    replaced: dict[str, Job] = {}
    for down, ups in carried.items():
        rest = [t for t in by_name[down].upstream if t not in ups]
        # Every table it reads fused: no query of its own (`carelake run` of it runs its carriers).
        replaced[down] = replace(by_name[down], source=TableSource(*rest)) if rest \
            else replace(by_name[down], carried_only=True)
    carriers = {up: replace(by_name[up], fused=(*by_name[up].fused, replaced[down])) for up, down in pairs}
    return [carriers.get(j.name) or replaced.get(j.name) or j for j in jobs]


def load_registry(cfg: Config) -> Registry:
    """Built-in jobs plus those of every module in jobs.modules, with streaming.fuse applied."""
    jobs = [*builtin_jobs(cfg), *gold_jobs(cfg), *imaging_jobs(cfg)]
    for module_name in cfg.jobs.modules:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigError(
                f"jobs.modules: cannot import {module_name!r} ({exc}); check the name and PYTHONPATH"
            ) from exc
        extra = getattr(module, "JOBS", None)
        if not isinstance(extra, list | tuple) or not all(isinstance(j, Job) for j in extra):
            raise ConfigError(f"jobs.modules: {module_name} must define JOBS as a list of pipelines.jobs.Job")
        jobs.extend(extra)
    for job in jobs:
        missing = [f for f in job.source.feeds if f not in cfg.landing.feeds] \
            if isinstance(job.source, LandingSource) else []
        if missing:
            raise ConfigError(f"job {job.name} reads feed(s) {missing}, which landing.feeds does not list; add them "
                              "to landing.feeds in conf/")
    return Registry(fuse(jobs, cfg.streaming.fused))

