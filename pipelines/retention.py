"""Retention: how long each table's versions and each landing feed's files are kept, and `carelake vacuum --all`.

`storage.retention_days` names a time-travel window per layer (bronze, silver, gold, ops), how long landing files
are kept (`landing`), and the audit retention (`audit`). The audit retention is a floor for everything
`carelake audit explain` walks from an alert down to the bytes received — the alert and score tables, the silver
rows at the version a score read, the bronze records and the landing files of the clinical feeds — and it is how
long ops.audit_log is kept. Vacuum never removes what these keep:

- a table: files no version inside its window needs (delta-rs vacuum, full mode, with the window enforced);
- a landing feed: sealed files (segments, dropped files) last written before its window, and only those its bronze
  job's checkpoint shows committed (a file bronze has not read yet is never deleted, however old). The rejects
  area has its own bounds (gateway.rejects_max_mb / rejects_max_age).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:
    from pipelines.config import Config
    from pipelines.store import TableStore

log = logging.getLogger("carelake.retention")

AUDIT_LOG = "ops.audit_log"  # pipelines.audit_log.AUDIT_LOG, named here without importing pyarrow
# What `carelake audit explain` walks (pipelines/audit.py): kept at least the audit retention.
AUDITED_TABLES = frozenset({
    "gold.deterioration_alerts", "gold.early_warning_scores", "silver.observations",
    "bronze.hl7_messages", "bronze.fhir_resources", "bronze.device_readings",
})
AUDITED_FEEDS = frozenset({"hl7", "fhir", "devices"})


def table_retention_days(cfg: Config, name: str) -> int:
    """Days a table's versions stay readable: its layer's, at least the audit retention for what audits walk."""
    from pipelines.store.base import split_table_name

    days = cfg.storage.retention_days
    if name == AUDIT_LOG:
        return days["audit"]
    layer = split_table_name(name)[0]
    return max(days[layer], days["audit"]) if name in AUDITED_TABLES else days[layer]


def landing_retention_days(cfg: Config, feed: str) -> int:
    """Days a landing feed's files are kept: `landing`, at least the audit retention for the clinical feeds."""
    days = cfg.storage.retention_days
    return max(days["landing"], days["audit"]) if feed in AUDITED_FEEDS else days["landing"]


@dataclass(frozen=True)
class Swept:
    """What vacuum did (or would do) to one table or landing feed."""

    what: str
    kept_days: int
    removed: int


def vacuum_all(store: TableStore, cfg: Config, *, dry_run: bool = False) -> list[Swept]:
    """Vacuum every table within its retention, then delete the landing files past theirs that bronze holds."""
    out = []
    for name in store.list_tables():
        removed = store.vacuum(name, dry_run=dry_run)
        out.append(Swept(name, store.retention_days(name), len(removed)))
    for feed, folder in sorted(_landing_feeds(cfg).items()):
        days = landing_retention_days(cfg, feed)
        expired = expired_landing(cfg, feed, folder, datetime.now(UTC) - timedelta(days=days))
        for path in expired if not dry_run else ():
            path.unlink()
        if expired and not dry_run:
            from pipelines.gateway.segments import fsync_dir

            fsync_dir(folder)
        out.append(Swept(f"landing/{feed}", days, len(expired)))
    return out


def _landing_feeds(cfg: Config) -> dict[str, Path]:
    root = cfg.path("landing")
    return {p.name: p for p in root.iterdir() if p.is_dir() and not p.name.startswith("_")} if root.is_dir() else {}


def expired_landing(cfg: Config, feed: str, folder: Path, cutoff: datetime) -> list[Path]:
    """Sealed files of a feed last written before `cutoff` that a committed bronze batch has read."""
    old = [p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith((".", "_"))
           and datetime.fromtimestamp(p.stat().st_mtime, UTC) < cutoff]
    if not old:
        return []
    done = committed_files(cfg, _readers(cfg, feed))
    kept = [p for p in old if str(p.resolve()) not in done]
    if kept:
        log.warning("landing/%s: %d file(s) past retention kept because no committed bronze batch has read them "
                    "(first: %s); run its bronze job", feed, len(kept), kept[0].name)
    return [p for p in old if str(p.resolve()) in done]


def _readers(cfg: Config, feed: str) -> list[str]:
    """The jobs whose landing source reads this feed."""
    from pipelines.jobs import LandingSource, load_registry

    return [j.name for j in load_registry(cfg) if isinstance(j.source, LandingSource) and feed in j.source.feeds]


def committed_files(cfg: Config, jobs: Iterable[str]) -> set[str]:
    """Local paths of the files these jobs' streaming checkpoints (Spark's file-source log) list in a committed
    batch. Compacted log files (`N.compact`) hold every earlier entry; a batch counts once `commits/N` exists."""
    out: set[str] = set()
    for job in jobs:
        checkpoint = cfg.path("_checkpoints", job)
        commits = [int(p.name) for p in (checkpoint / "commits").glob("*") if p.name.isdigit()]
        if not commits:
            continue
        last = max(commits)
        for log_file in (checkpoint / "sources").glob("*/*"):
            if log_file.name.startswith(".") or not log_file.name.split(".")[0].isdigit():
                continue
            for line in log_file.read_text(encoding="utf-8").splitlines()[1:]:  # the first line is the version
                entry = json.loads(line)
                if entry.get("batchId", 0) <= last:
                    out.add(str(Path(unquote(urlsplit(entry["path"]).path)).resolve()))
    return out
