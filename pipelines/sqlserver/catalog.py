"""Lakehouse tables and the repository's views as Spark views, at the versions a statement reads.

Each statement's table references (`gold.x`, `silver.x VERSION AS OF 3`, `TIMESTAMP AS OF '...'`) are resolved when
the statement arrives: the latest version is read from the table's Delta log then (delta-rs catches up with the
commits since the last look), so a commit is visible to the next statement, with no polling delay and no restart.
Each (table, version) becomes one global temporary view `global_temp.<layer>__<table>__v<version>` over exactly that
version's data files, shared by every session of the server. It is registered on first use, or, for the tables read
in the last ten minutes, by a background refresh soon after the version is committed; it is dropped after ten
minutes unused, or one minute once a newer version exists. A repository view (sql/views/<name>.sql) becomes one
global view per combination of its tables' versions.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipelines.errors import ConfigError, VersionNotFound
from pipelines.sqlrefs import TableReference, rewrite
from pipelines.store.base import split_table_name

log = logging.getLogger("carelake.sqlserver")
SCHEMA = "global_temp"
UNUSED_SECONDS = 600
SUPERSEDED_SECONDS = 60
_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")


@dataclass(frozen=True)
class ViewDef:
    """A view from the repository: its name (gold.x) and SQL text over lakehouse names (placeholders filled)."""

    name: str
    sql: str


def load_views(folder: Path, values: Mapping[str, str]) -> dict[str, ViewDef]:
    """The views in `folder` (<layer>.<name>.sql each), placeholders {{key}} replaced by `values`."""
    views = {}
    for path in sorted(folder.glob("*.sql")):
        name = path.stem
        split_table_name(name)  # a view is named like a table: gold.alerts_by_ward_day
        text = path.read_text(encoding="utf-8").strip().rstrip(";")

        def fill(m: re.Match, path: Path = path) -> str:
            if m[1] not in values:
                raise ConfigError(f"{path}: unknown placeholder {{{{{m[1]}}}}}; known: {', '.join(sorted(values))}")
            return values[m[1]]

        views[name] = ViewDef(name, _PLACEHOLDER.sub(fill, text))
    return views


@dataclass(frozen=True)
class Resolved:
    """A statement rewritten onto the server's views, and what it reads."""

    sql: str
    views: tuple[str, ...]  # global view names the statement may read
    names: tuple[tuple[str, str], ...]  # (global view name, the lakehouse name it stands for)
    reads: tuple[tuple[str, int | None], ...]  # (table or view, version) read; a view's version is None


class Catalog:
    """Registers global views for table versions and repository views; thread-safe."""

    def __init__(self, spark, store, views: Mapping[str, ViewDef]):
        self.spark = spark
        self.store = store
        self.views = dict(views)
        clash = sorted(n for n in self.views if store.exists(n))
        if clash:
            raise ConfigError(f"views {', '.join(clash)} have the names of lakehouse tables: rename the .sql files")
        self._lock = threading.RLock()
        self._latest: dict[str, object] = {}
        self._used: dict[str, float] = {}  # global view name -> when a statement last read it
        self._read_at: dict[str, float] = {}  # table -> when a statement last read it
        self._versions: dict[str, tuple[str, int]] = {}  # global view name -> (table, version) of a table's view

    def latest_version(self, table: str) -> int:
        """The table's newest committed version, read from its Delta log now."""
        from deltalake import DeltaTable

        with self._lock:
            dt = self._latest.get(table)
            if dt is None:
                self.store.version(table)  # TableNotFound, with the fix, when it does not exist
                dt = self._latest[table] = DeltaTable(str(self.store.ref(table).path))
            else:
                dt.update_incremental()
            return dt.version()

    def version_of(self, ref: TableReference) -> int:
        """The version `ref` reads: its VERSION AS OF, the one current at its TIMESTAMP AS OF, or the latest."""
        if ref.timestamp is not None:
            return self.store._open(ref.table, timestamp=ref.timestamp).version()  # noqa: SLF001 - same rule as reads
        latest = self.latest_version(ref.table)
        if ref.version is not None and not 0 <= ref.version <= latest:
            raise VersionNotFound(f"{ref.table} has versions 0..{latest}; version {ref.version} does not exist")
        return latest if ref.version is None else ref.version

    def resolve(self, sql: str) -> Resolved:
        """`sql` with each lakehouse name replaced by the global view of the version it reads."""
        text, refs = rewrite(sql)
        views, names, reads = [], [], []
        for ref in refs:
            if ref.table in self.views:
                inner = self.resolve(self.views[ref.table].sql)
                name = self._register_view(ref.table, inner)
                reads += [(ref.table, None), *inner.reads]
            else:
                version = self.version_of(ref)
                name = self._register_table(ref.table, version)
                reads.append((ref.table, version))
            views.append(name)
            names.append((name, ref.table))
            text = text.replace(f"`{ref.view}`", f"{SCHEMA}.`{name}`")
        return Resolved(text, tuple(views), tuple(names), tuple(dict.fromkeys(reads)))

    def _register_table(self, table: str, version: int, touch: bool = True) -> str:
        name = f"{table.replace('.', '__')}__v{version}"
        with self._lock:
            if name not in self._used:
                self.store.read(table, version=version).createOrReplaceGlobalTempView(name)
                self._used[name] = time.monotonic()
                self._versions[name] = (table, version)
            if touch:
                self._read_at[table] = time.monotonic()
                self._touch(name)
        return name

    def _register_view(self, view: str, inner: Resolved) -> str:
        digest = hashlib.sha256(repr(inner.reads).encode()).hexdigest()[:12]
        name = f"{view.replace('.', '__')}__{digest}"
        with self._lock:
            if name not in self._used:
                self.spark.sql(f"CREATE OR REPLACE GLOBAL TEMPORARY VIEW `{name}` AS {inner.sql}")
            self._touch(name)
        return name

    def refresh(self) -> list[str]:
        """Register the newest version of each table a statement read in the last UNUSED_SECONDS, so the first
        statement after a commit finds its view ready; the views registered."""
        with self._lock:
            recent = {t for t, at in self._read_at.items() if time.monotonic() - at < UNUSED_SECONDS}
        added = []
        for table in sorted(recent):
            version = self.latest_version(table)
            if f"{table.replace('.', '__')}__v{version}" not in self._used:
                added.append(self._register_table(table, version, touch=False))
        return added

    def warm(self, stop: threading.Event, interval_s: float = 0.2) -> threading.Thread:
        """refresh() every interval_s until `stop` is set, on a daemon thread."""

        def loop() -> None:
            while not stop.wait(interval_s):
                try:
                    self.refresh()
                except Exception:  # a table mid-rewrite or gone: the next statement resolves it and says why
                    log.debug("refreshing the catalog failed", exc_info=True)

        thread = threading.Thread(target=loop, name="carelake-sql-catalog", daemon=True)
        thread.start()
        return thread

    def _touch(self, name: str) -> None:
        """Mark a view read now; drop views unused for UNUSED_SECONDS, and a table's older versions unused for
        SUPERSEDED_SECONDS (each holds its version's file list: a table committing every second must not pile them
        up). A statement already running keeps its plan; a later one registers the version again."""
        now = time.monotonic()
        self._used[name] = now
        for old, at in list(self._used.items()):
            table, version = self._versions.get(old, (None, None))
            superseded = table in self._latest and version < self._latest[table].version()
            if now - at > UNUSED_SECONDS or (superseded and now - at > SUPERSEDED_SECONDS):
                self.spark.catalog.dropGlobalTempView(old)
                del self._used[old]
                self._versions.pop(old, None)

    def schema(self, name: str):
        """A table's or view's columns as a Spark StructType (a table's from its Delta log, a view's analyzed)."""
        if name in self.views:
            view = self.resolve(f"SELECT * FROM {name}").views[0]
            return self.spark.table(f"{SCHEMA}.`{view}`").schema
        import pyarrow as pa
        from deltalake import DeltaTable
        from pyspark.sql.pandas.types import from_arrow_schema

        from pipelines.store.schema import canonical_schema

        self.store.version(name)  # TableNotFound, with the fix
        return from_arrow_schema(canonical_schema(pa.schema(DeltaTable(str(self.store.ref(name).path)).schema()
                                                            .to_arrow())))

    def names(self) -> Sequence[str]:
        """Every table and view a statement may name, sorted."""
        return sorted({*self.store.list_tables(), *self.views})

