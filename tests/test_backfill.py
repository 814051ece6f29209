"""Bounded micro-batches for table-fed jobs: a backlog of upstream versions is read in batches of at most about
streaming.max_rows_per_batch change rows (pipelines/deltasource.py admission control), also in available-now
(pipelines/runner.py runs such a job on a processing-time trigger up to each source's version at the run's start).

The reader's offsets are driven here the way Spark drives them (latestOffset, then partitions(start, end) for the
batch it plans; a restarted query's reader first gets partitions(X, X) from setLatestSeenOffset); the runner tests
score a backlog in several gold batches and compare the result with one recompute of the same silver rows.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from gold.early_warning_scores import SCORES
from pipelines.store.base import MergeSpec
from silver.observations import OBSERVATIONS
from tests.test_gold_scores import _assert_stream_equals_recompute, _stay_rows, make_lake, obs


def _table(store, sizes: list[int]) -> str:
    """silver.observations with one appended version per size (version k holds sizes[k] rows)."""
    from pyspark.sql.pandas.types import to_arrow_schema

    from silver.observations import SCHEMA

    schema = to_arrow_schema(SCHEMA)
    n = 0
    for size in sizes:
        rows = [obs("p1", "hr", 70, minutes) for minutes in range(n, n + size)]
        store.append(OBSERVATIONS, pa.Table.from_pylist(rows, schema=schema))
        n += size
    return str(store.ref(OBSERVATIONS).path)


def _reader(path: str, **options):
    from pipelines.deltasource import DeltaChangesSource

    source = DeltaChangesSource({"path": path, **{k: str(v) for k, v in options.items()}})
    return source.streamReader(source.schema())


def _batches(reader, *, restart_at: int | None = None) -> list[tuple[int, int]]:
    """The (start, end) version ranges Spark would plan with this reader until it offers nothing new."""
    if restart_at is not None:
        reader.partitions({"version": restart_at}, {"version": restart_at})  # setLatestSeenOffset
    start = reader.initialOffset()["version"] if restart_at is None else restart_at
    out = []
    while (end := reader.latestOffset()["version"]) != start:
        assert end > start, f"offset {end} behind the position {start}"
        reader.partitions({"version": start}, {"version": end})
        out.append((start + 1, end))
        start = end
    return out


def test_a_backlog_is_offered_in_batches_within_the_row_bound_and_one_huge_version_alone(store):
    path = _table(store, [3, 3, 3, 10, 3, 4, 1])
    assert _batches(_reader(path, maxRowsPerBatch=7)) == [(0, 1), (2, 2), (3, 3), (4, 5), (6, 6)]
    assert _batches(_reader(path, maxRowsPerBatch=100)) == [(0, 6)]
    assert _batches(_reader(path)) == [(0, 6)]  # no bound: everything at once, as before


def test_ending_version_caps_the_batches_and_a_restart_resumes_where_spark_says(store):
    path = _table(store, [2, 2, 2, 2, 2, 2])
    assert _batches(_reader(path, maxRowsPerBatch=4, endingVersion=4)) == [(0, 1), (2, 3), (4, 4)]
    # A restarted query's reader learns its position from Spark before it is asked for an offset.
    assert _batches(_reader(path, maxRowsPerBatch=4), restart_at=2) == [(3, 4), (5, 5)]
    assert _batches(_reader(path, maxRowsPerBatch=4, endingVersion=3), restart_at=3) == []
    assert _batches(_reader(path, startingVersion=4, maxRowsPerBatch=2)) == [(4, 4), (5, 5)]


def test_an_offset_is_never_behind_the_position(store):
    """Behind the position would make Spark replay versions a stateful job has already folded into its state."""
    path = _table(store, [5, 5, 5])
    reader = _reader(path, maxRowsPerBatch=5, endingVersion=1)
    reader.partitions({"version": 1}, {"version": 2})  # the checkpoint is past the target (ending 1)
    assert reader.latestOffset() == {"version": 2}
    ahead = _reader(path, maxRowsPerBatch=5)
    ahead.partitions({"version": 7}, {"version": 7})  # the table is behind the checkpoint (recreated)
    assert ahead.latestOffset() == {"version": 7}
    replay = _reader(path, maxRowsPerBatch=5)
    replay.partitions({"version": 2}, {"version": 2})
    replay.partitions({"version": 0}, {"version": 2})  # the replay of the interrupted batch: position stays
    assert replay.latestOffset() == {"version": 2}


def test_change_rows_counts_what_the_change_feed_reads(store):
    from pipelines.store.deltars import change_rows, load_changes

    path = _table(store, [4, 6])
    first = store.read_arrow(OBSERVATIONS).to_pylist()[:2]
    store.merge(OBSERVATIONS, pa.Table.from_pylist([{**first[0], "value": 99.0}, {**first[1], "value": 98.0},
                                                    obs("p2", "hr", 80, 0)], schema=store.read_arrow(
        OBSERVATIONS).schema), MergeSpec(keys=("observation_id",)))
    counts = [change_rows(path, v) for v in range(3)]
    assert counts == [load_changes(path, v, v).num_rows for v in range(3)] == [4, 6, 5]
    assert change_rows(path, 9) == 0  # not in the log: counts nothing


@pytest.mark.parametrize("option, value", [("maxRowsPerBatch", "0"), ("maxRowsPerBatch", "many"),
                                           ("endingVersion", "-2"), ("startingVersion", "1.5")])
def test_a_bad_reader_option_is_refused_by_name(store, option, value):
    path = _table(store, [1])
    with pytest.raises(ValueError, match=f"carelake_delta option {option} must be an integer"):
        _reader(path, **{option: value})


def _backlog(lake, versions: int) -> None:
    """Three patients' stays, added to silver as `versions` appends, with a correction merged in the middle."""
    rows = sorted(_stay_rows("pa", 1, 3) + _stay_rows("pb", 2, 3) + _stay_rows("pc", 3, 2),
                  key=lambda r: r["effective_at"])
    for k in range(versions):
        lake.add(rows[k * len(rows) // versions:(k + 1) * len(rows) // versions])
        if k == versions // 2:
            fixed = next(r for r in rows[:len(rows) // versions] if r["concept"] == "hr")
            lake.store.merge(OBSERVATIONS, pa.Table.from_pylist([{**fixed, "value": fixed["value"] + 40,
                                                                  "source_version": "2"}], schema=lake.arrow_schema),
                             MergeSpec(keys=("observation_id",)))


def _metrics(store, job: str) -> list[dict]:
    return sorted((r for r in store.read_arrow("ops.metrics").to_pylist() if r["job"] == job),
                  key=lambda r: (r["started_at"], r["batch_id"]))


@pytest.mark.slow
def test_available_now_scores_a_backlog_in_bounded_batches_equal_to_one_recompute(tmp_path, spark):
    from pipelines.jobs import load_registry
    from pipelines.runner import Runner, Trigger

    bound = 250
    lake = make_lake(tmp_path, spark, **{"streaming.max_rows_per_batch": str(bound)})
    _backlog(lake, 8)
    [summary] = Runner(lake.cfg, spark, lake.store, load_registry(lake.cfg)).run([SCORES], Trigger(available_now=True))
    batches = _metrics(lake.store, SCORES)
    assert [b["batch_id"] for b in batches] == list(range(len(batches))) and len(batches) >= 3
    _assert_bounded(lake, bound, len(batches))
    assert summary.line().startswith(f"{SCORES}: done - {len(batches)} batch(es)")
    _assert_stream_equals_recompute(lake, tmp_path, spark)
    # Nothing new: the query is not even started (a query stopped at once leaves Spark's Python source runner
    # to time out and print a traceback), and the run still ends.
    [again] = Runner(lake.cfg, spark, lake.store, load_registry(lake.cfg)).run([SCORES], Trigger(available_now=True))
    assert again.line() == (f"{SCORES}: done - 0 batch(es), 0 input records, 0 rows written in 0.0 s"
                            " (nothing new upstream)")
    assert len(_metrics(lake.store, SCORES)) == len(batches) and spark.streams.active == []


@pytest.mark.slow
def test_a_run_that_dies_mid_backlog_resumes_from_its_checkpoint_in_bounded_batches(tmp_path, spark, monkeypatch):
    from pipelines.runner import JobFailed, Runner

    bound = 250
    lake = make_lake(tmp_path, spark, **{"streaming.max_rows_per_batch": str(bound)})
    _backlog(lake, 6)
    real, seen = Runner._handle, []

    def dies_in_batch_1(self, job, summary, batch_df, batch_id):
        seen.append(batch_id)
        if batch_id == 1:
            raise RuntimeError("killed in batch 1")
        return real(self, job, summary, batch_df, batch_id)

    monkeypatch.setattr(Runner, "_handle", dies_in_batch_1)
    with pytest.raises(JobFailed, match="killed in batch 1"):
        lake.run()
    assert seen == [0, 1]
    monkeypatch.setattr(Runner, "_handle", real)
    lake.add(_stay_rows("pd", 4, 1))  # committed while carelake was down
    lake.run()
    batches = _metrics(lake.store, SCORES)
    assert [b["batch_id"] for b in batches] == list(range(len(batches))) and len(batches) >= 3
    _assert_bounded(lake, bound, len(batches))
    _assert_stream_equals_recompute(lake, tmp_path, spark)


def _assert_bounded(lake, bound: int, batches: int) -> None:
    """The checkpoint's planned batches cover every silver version once, in order, each within the row bound
    (or a single version), and there are as many as ops.metrics recorded."""
    from pipelines.store.deltars import change_rows

    folder = lake.cfg.path("_checkpoints", SCORES, "offsets")
    ends = [json.loads((folder / str(b)).read_text().splitlines()[2])["version"] for b in range(batches)]
    assert not (folder / str(batches)).exists() and ends[-1] == lake.store.version(OBSERVATIONS)
    path = str(lake.store.ref(OBSERVATIONS).path)
    for start, end in zip([-1, *ends[:-1]], ends, strict=True):
        rows = sum(change_rows(path, v) for v in range(start + 1, end + 1))
        assert end > start and (rows <= bound or end == start + 1), (start, end, rows)
