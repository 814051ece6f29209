"""The table-store contract: one suite, run against every engine this machine has."""

from __future__ import annotations

import time
from datetime import timedelta

import pyarrow as pa
import pytest

from pipelines.errors import SchemaEvolutionError, TableNotFound, UsageError, VersionNotFound
from pipelines.store import MergeSpec, Txn, open_store

T = "silver.patients_test"


def rows(*pairs, extra=None) -> pa.Table:
    data = {"id": pa.array([p[0] for p in pairs], pa.int64()), "name": pa.array([p[1] for p in pairs], pa.string())}
    if extra:
        data.update(extra)
    return pa.table(data)


def content(table: pa.Table, cols=("id", "name")) -> list[tuple]:
    return sorted(tuple(r[c] for c in cols) for r in table.select(list(cols)).to_pylist())


class FramesIn:
    """The delta-rs store with every write handed to it as a Spark DataFrame: the executors write the files and
    the driver commits them (pipelines.store.executors), the path the streaming jobs take."""

    def __init__(self, store, spark):
        self.store, self.spark = store, spark

    def __getattr__(self, name):
        return getattr(self.store, name)

    def _frame(self, data):
        return self.spark.createDataFrame(data) if isinstance(data, pa.Table) else data

    def append(self, name, data, **kw):
        return self.store.append(name, self._frame(data), **kw)

    def overwrite(self, name, data, **kw):
        return self.store.overwrite(name, self._frame(data), **kw)

    def merge(self, name, data, spec, **kw):
        return self.store.merge(name, self._frame(data), spec, **kw)


@pytest.fixture(params=["delta-rs", "delta-rs-executors", "delta-spark"])
def engine_store(request, cfg):
    if request.param == "delta-rs":
        from pipelines.store.deltars import DeltaRsStore

        return DeltaRsStore(cfg)
    if request.param == "delta-rs-executors":
        from pipelines.store.deltars import DeltaRsStore

        spark = request.getfixturevalue("spark")
        return FramesIn(DeltaRsStore(cfg, spark), spark)
    spark = request.getfixturevalue("spark")
    from pipelines.spark import jvm_has_class

    if not jvm_has_class(spark, "io.delta.tables.DeltaTable"):
        pytest.skip("delta-spark engine: the JVM has no Delta classes (Maven is unreachable here)")
    import dataclasses

    return open_store(dataclasses.replace(cfg, storage=dataclasses.replace(cfg.storage, engine="delta-spark")), spark)


def test_append_creates_table_and_counts_rows(engine_store):
    s = engine_store
    assert not s.exists(T)
    r1 = s.append(T, rows((1, "ann"), (2, "bob")))
    r2 = s.append(T, rows((3, "cy")))
    assert (r1.version, r2.version) == (0, 1)
    assert s.version(T) == 1 and s.row_count(T) == 3
    assert content(s.read_arrow(T)) == [(1, "ann"), (2, "bob"), (3, "cy")]
    assert T in s.list_tables()


def test_idempotent_append_replay_is_skipped(engine_store):
    s = engine_store
    first = s.append(T, rows((1, "a")), txn=Txn("job-x", 0))
    replay = s.append(T, rows((1, "a")), txn=Txn("job-x", 0))
    older = s.append(T, rows((9, "old")), txn=Txn("job-x", 0))
    nxt = s.append(T, rows((2, "b")), txn=Txn("job-x", 1))
    other_app = s.append(T, rows((3, "c")), txn=Txn("job-y", 0))
    assert not first.skipped and replay.skipped and older.skipped
    assert not nxt.skipped and not other_app.skipped
    assert content(s.read_arrow(T)) == [(1, "a"), (2, "b"), (3, "c")]
    assert s.txn_version(T, "job-x") == 1 and s.txn_version(T, "job-y") == 0
    assert s.txn_version(T, "never") is None


def test_time_travel_by_version_and_timestamp(engine_store):
    s = engine_store
    s.append(T, rows((1, "a")))
    time.sleep(0.05)
    s.append(T, rows((2, "b")))
    time.sleep(0.05)
    s.append(T, rows((3, "c")))
    assert content(s.read_arrow(T, version=0)) == [(1, "a")]
    assert content(s.read_arrow(T, version=1)) == [(1, "a"), (2, "b")]
    by_version = {c.version: c.timestamp for c in s.history(T)}
    assert content(s.read_arrow(T, timestamp=by_version[1])) == [(1, "a"), (2, "b")]
    assert content(s.read_arrow(T, timestamp=by_version[1].isoformat())) == [(1, "a"), (2, "b")]
    with pytest.raises(VersionNotFound, match="versions 0..2"):
        s.read_arrow(T, version=7)
    with pytest.raises(VersionNotFound, match="earliest"):
        s.read_arrow(T, timestamp="2001-01-01T00:00:00Z")


def test_delta_rs_time_travel_follows_the_commit_times_history_shows(store):
    """A log file written after its commit timestamp (a loaded machine) must not move "as of" a version back."""
    import os

    for i in range(3):
        store.append(T, rows((i, str(i))))
    log = store.ref(T).path / "_delta_log"
    for v in (1, 2):
        f = log / f"{v:020d}.json"
        st = os.stat(f)
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 40_000_000))
    at = {c.version: c.timestamp for c in store.history(T)}
    assert content(store.read_arrow(T, timestamp=at[1])) == [(0, "0"), (1, "1")]
    assert content(store.read_arrow(T, timestamp=at[2])) == [(0, "0"), (1, "1"), (2, "2")]
    assert content(store.read_arrow(T, timestamp=at[1] - timedelta(milliseconds=1))) == [(0, "0")]


def test_changes_between_versions(engine_store):
    s = engine_store
    s.append(T, rows((1, "a"), (2, "b")))                                   # v0
    s.append(T, rows((3, "c")))                                             # v1
    s.merge(T, rows((2, "B"), (4, "d")), MergeSpec(keys=("id",)))           # v2
    ch = s.changes_arrow(T, 1, 2) if hasattr(s, "changes_arrow") else s.changes(T, 1, 2).toArrow()
    got = sorted((r["_commit_version"], r["_change_type"], r["id"], r["name"]) for r in ch.to_pylist())
    assert got == [
        (1, "insert", 3, "c"),
        (2, "insert", 4, "d"),
        (2, "update_postimage", 2, "B"),
        (2, "update_preimage", 2, "b"),
    ]
    with pytest.raises(VersionNotFound):
        s.changes_arrow(T, 2, 5) if hasattr(s, "changes_arrow") else s.changes(T, 2, 5)


def test_merge_update_insert_delete_clauses(engine_store):
    s = engine_store
    s.append(T, rows((1, "a"), (2, "b"), (3, "c"), extra={"deleted": pa.array([False] * 3)}))
    src = rows((1, "A"), (2, "gone"), (5, "e"), extra={"deleted": pa.array([False, True, False])})
    s.merge(T, src, MergeSpec(keys=("id",), delete_when="s.deleted"))
    assert content(s.read_arrow(T)) == [(1, "A"), (3, "c"), (5, "e")]
    # update only some columns, only when the condition holds; no inserts
    s.merge(T, rows((1, "zzz"), (3, "C"), (7, "new")),
            MergeSpec(keys=("id",), update={"name": "upper(s.name)"}, update_when="s.name <> 'zzz'", insert=False))
    assert content(s.read_arrow(T)) == [(1, "A"), (3, "C"), (5, "e")]
    # rows the source no longer has are deleted when asked
    s.merge(T, rows((1, "A"), (5, "e")), MergeSpec(keys=("id",), delete_not_matched_by_source=True))
    assert content(s.read_arrow(T)) == [(1, "A"), (5, "e")]


def test_merge_into_missing_table_creates_it_and_rejects_duplicate_keys(engine_store):
    s = engine_store
    s.merge(T, rows((1, "a")), MergeSpec(keys=("id",)))
    assert content(s.read_arrow(T)) == [(1, "a")]
    with pytest.raises(UsageError, match="several rows for one key"):
        s.merge(T, rows((2, "x"), (2, "y")), MergeSpec(keys=("id",)))
    assert content(s.read_arrow(T)) == [(1, "a")]


def _timed(ids, minutes, names):
    from datetime import UTC, datetime, timedelta

    t0 = datetime(2026, 1, 5, tzinfo=UTC)
    return pa.table({"id": pa.array(ids, pa.int64()), "name": pa.array(names, pa.string()),
                     "at": pa.array([None if m is None else t0 + timedelta(minutes=m) for m in minutes],
                                    pa.timestamp("us", tz="UTC"))})


def test_merge_prune_by_reads_only_the_files_the_source_range_overlaps(engine_store):
    s = engine_store
    spec = MergeSpec(keys=("id",), prune_by=("at",))  # each id keeps its time: the key determines `at`
    for f in range(5):  # five files, an hour apart
        s.append(T, _timed([f * 10, f * 10 + 1], [f * 60, f * 60 + 1], [f"v{f}", f"v{f}"]))
    # an update in the last file, a new row after it: the range 241..250 min overlaps one file
    r = s.merge(T, _timed([41, 99], [241, 250], ["updated", "new"]), spec)
    got = content(s.read_arrow(T), ("id", "name"))
    assert got == sorted([(0, "v0"), (1, "v0"), (10, "v1"), (11, "v1"), (20, "v2"), (21, "v2"), (30, "v3"),
                          (31, "v3"), (40, "v4"), (41, "updated"), (99, "new")])
    if s.engine == "delta-rs":
        assert r.metrics["num_target_files_scanned"] == 1, r.metrics
        assert r.metrics["num_target_rows_updated"] == 1 and r.metrics["num_target_rows_inserted"] == 1
    # a null in the pruning column leaves the range unknown: the whole table is read, the null row still matches
    s.append(T, _timed([7], [None], ["null time"]))
    r = s.merge(T, _timed([7, 0], [None, 0], ["null time, updated", "v0, updated"]), spec)
    by_id = dict(content(s.read_arrow(T), ("id", "name")))
    assert by_id[7] == "null time, updated" and by_id[0] == "v0, updated" and len(by_id) == 12
    assert s.row_count(T) == 12
    if s.engine == "delta-rs":
        assert r.metrics["num_target_files_scanned"] >= 5, r.metrics


def test_merge_prune_if_prunes_only_batches_whose_rows_all_qualify(engine_store):
    s = engine_store
    spec = MergeSpec(keys=("id",), prune_by=("at",), prune_if=("feed", ("hl7", "devices")))

    def timed(ids, minutes, names, feeds):
        t = _timed(ids, minutes, names)
        return t.append_column("feed", pa.array(feeds, pa.string()))

    for f in range(4):
        s.append(T, timed([f], [f * 60], [f"v{f}"], ["fhir" if f == 0 else "hl7"]))
    qualified = s.merge(T, timed([3], [180], ["hl7 again"], ["hl7"]), spec)
    # a FHIR row's id does not fix its time: its new version moved from minute 0 to 200, and still matches
    moved = s.merge(T, timed([0, 5], [200, 200], ["fhir v2", "devices"], ["fhir", "devices"]), spec)
    assert content(s.read_arrow(T)) == [(0, "fhir v2"), (1, "v1"), (2, "v2"), (3, "hl7 again"), (5, "devices")]
    if s.engine == "delta-rs":
        assert qualified.metrics["num_target_files_scanned"] == 1, qualified.metrics
        assert moved.metrics["num_target_rows_updated"] == 1, moved.metrics


def test_merge_prune_by_refuses_what_it_cannot_bound(engine_store):
    s = engine_store
    with pytest.raises(UsageError, match="whole target"):
        MergeSpec(keys=("id",), prune_by=("id",), delete_not_matched_by_source=True)
    s.append(T, rows((1, "a")))
    with pytest.raises(UsageError, match="prune by a time, a date or a number"):
        s.merge(T, rows((1, "b")), MergeSpec(keys=("id",), prune_by=("name",)))
    with pytest.raises(UsageError, match="not in the merge source"):
        s.merge(T, rows((1, "b")), MergeSpec(keys=("id",), prune_by=("nope",)))
    assert content(s.read_arrow(T)) == [(1, "a")]


def test_idempotent_merge_replay(engine_store):
    s = engine_store
    s.append(T, rows((1, "a")))
    r1 = s.merge(T, rows((1, "b"), (2, "c")), MergeSpec(keys=("id",)), txn=Txn("m", 4))
    r2 = s.merge(T, rows((1, "WRONG"), (2, "WRONG")), MergeSpec(keys=("id",)), txn=Txn("m", 4))
    assert not r1.skipped and r2.skipped
    assert content(s.read_arrow(T)) == [(1, "b"), (2, "c")]


def test_overwrite_whole_and_by_predicate(engine_store):
    s = engine_store
    s.append(T, rows((1, "a"), (2, "b"), (3, "c")))
    s.overwrite(T, rows((2, "B")), predicate="id = 2")
    assert content(s.read_arrow(T)) == [(1, "a"), (2, "B"), (3, "c")]
    s.overwrite(T, rows((9, "z")))
    assert content(s.read_arrow(T)) == [(9, "z")]
    assert content(s.read_arrow(T, version=0)) == [(1, "a"), (2, "b"), (3, "c")]


def test_additive_schema_evolves_and_incompatible_change_names_the_column(engine_store):
    s = engine_store
    s.append(T, rows((1, "a")))
    s.append(T, rows((2, "b"), extra={"ward": pa.array(["ICU"])}))
    got = sorted(s.read_arrow(T).to_pylist(), key=lambda r: r["id"])
    assert got == [{"id": 1, "name": "a", "ward": None}, {"id": 2, "name": "b", "ward": "ICU"}]
    bad = pa.table({"id": pa.array(["not-a-number"]), "name": ["x"]})
    with pytest.raises(SchemaEvolutionError, match="'id' is int64 in the table but string"):
        s.append(T, bad)
    assert s.row_count(T) == 2


def test_narrower_integer_is_widened_not_rejected(engine_store):
    s = engine_store
    s.append(T, rows((1, "a")))
    s.append(T, pa.table({"id": pa.array([2], pa.int32()), "name": ["b"]}))
    assert content(s.read_arrow(T)) == [(1, "a"), (2, "b")]


def test_table_properties_carry_layer_retention(engine_store, cfg):
    s = engine_store
    s.append(T, rows((1, "a")))
    s.append("ops.metrics_test", rows((1, "a")))
    days = cfg.storage.retention_days
    assert s.table_properties(T)["delta.logRetentionDuration"] == f"interval {days['silver']} days"
    ops_props = s.table_properties("ops.metrics_test")
    assert ops_props["delta.deletedFileRetentionDuration"] == f"interval {days['ops']} days"
    assert (cfg.root / "_metrics_test" / "_delta_log").is_dir()


def test_vacuum_never_removes_what_retention_keeps(engine_store):
    s = engine_store
    s.append(T, rows((1, "a")))
    s.overwrite(T, rows((2, "b")))
    with pytest.raises(UsageError, match="at least"):
        s.vacuum(T, retention_hours=1)
    removed = s.vacuum(T)
    assert removed == []
    assert content(s.read_arrow(T, version=0)) == [(1, "a")]


def test_optimize_compacts_small_files_and_keeps_data(engine_store):
    s = engine_store
    for i in range(6):
        s.append(T, rows((i, f"n{i}")))
    before = content(s.read_arrow(T))
    s.optimize(T)
    assert content(s.read_arrow(T)) == before
    assert s.history(T, limit=1)[0].operation == "OPTIMIZE"
    assert content(s.read_arrow(T, version=2)) == [(0, "n0"), (1, "n1"), (2, "n2")]


def test_restore_to_version(engine_store):
    s = engine_store
    s.append(T, rows((1, "a")))
    s.append(T, rows((2, "b")))
    s.overwrite(T, rows((3, "oops")))
    out = s.restore(T, version=1)
    assert out["changed"] is True
    assert content(s.read_arrow(T)) == [(1, "a"), (2, "b")]
    assert s.history(T, limit=1)[0].operation == "RESTORE"
    with pytest.raises(VersionNotFound):
        s.restore(T, version=42)


def test_history_newest_first_with_job_metadata(engine_store):
    s = engine_store
    s.append(T, rows((1, "a")), metadata={"carelake.job": "silver.patients_test", "carelake.batch": "0"})
    s.append(T, rows((2, "b")), metadata={"carelake.job": "silver.patients_test", "carelake.batch": "1"})
    h = s.history(T)
    assert [c.version for c in h] == [1, 0]
    assert h[0].metadata.get("carelake.batch") == "1"
    assert h[0].operation == "WRITE"
    info = s.info(T)
    assert (info.version, info.rows) == (1, 2)


def test_missing_table_and_bad_names_are_clear(engine_store):
    s = engine_store
    with pytest.raises(TableNotFound, match="carelake run silver.nothing"):
        s.read_arrow("silver.nothing")
    with pytest.raises(UsageError, match="<layer>.<entity>"):
        s.read_arrow("platinum.x")


def test_delta_rs_changes_as_a_spark_dataframe(cfg, spark):
    """The contract's `changes` (Spark DataFrame) on the embedded engine: view types and the unsigned commit
    version of delta-rs become types Spark takes."""
    s = open_store(cfg, spark)
    s.append(T, rows((1, "a")))
    s.merge(T, rows((1, "A")), MergeSpec(keys=("id",)))
    got = sorted((r["_commit_version"], r["_change_type"], r["name"]) for r in s.changes(T, 0).collect())
    assert got == [(0, "insert", "a"), (1, "update_postimage", "A"), (1, "update_preimage", "a")]


def test_delta_rs_read_since_skips_the_files_that_end_before_it(cfg, spark):
    """`read(since=(column, t))` keeps the rows from t on and reads only the files whose statistics allow them."""
    from datetime import UTC, datetime, timedelta

    s = open_store(cfg, spark)
    day = datetime(2026, 11, 1, tzinfo=UTC)
    for d in range(3):  # one file a day: ids 10d, 10d + 1 at day d, d + 12 h
        at = pa.array([day + timedelta(days=d), day + timedelta(days=d, hours=12)], pa.timestamp("us", tz="UTC"))
        s.append(T, rows((10 * d, "x"), (10 * d + 1, "y"), extra={"at": at}))
    s.append(T, rows((99, "no time"), extra={"at": pa.array([None], pa.timestamp("us", tz="UTC"))}))

    floor = day + timedelta(days=1, hours=6)
    df = s.read(T, since=("at", floor))
    assert sorted(r["id"] for r in df.collect()) == [11, 20, 21]  # 10 is before the floor, 99 has no time
    assert len(df.inputFiles()) == 3  # day 0's file is not read; the all-null file has no max: kept
    naive_local = floor.astimezone().replace(tzinfo=None)  # what Spark's collect gives back
    assert sorted(r["id"] for r in s.read(T, since=("at", naive_local)).collect()) == [11, 20, 21]
    assert s.read(T, since=("at", day + timedelta(days=9))).count() == 0
    # A slice: from day 0, 12 h up to (not including) day 2: day 2's file is not read either.
    sliced = s.read(T, since=("at", day + timedelta(hours=12), day + timedelta(days=2)))
    assert sorted(r["id"] for r in sliced.collect()) == [1, 10, 11]
    assert len(sliced.inputFiles()) == 3  # days 0 and 1, and the all-null file (no statistics: kept)
    assert sorted(r["id"] for r in s.read(T, since=("at", floor, day + timedelta(days=1, hours=12))).collect()) == []
    with pytest.raises(UsageError, match="not a timestamp"):
        s.read(T, since=("name", floor))
