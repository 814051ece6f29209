"""Continuous mode restarts a failed job from its checkpoint with a backoff, and gives up after too many failures.

No Spark here: the runner's start/finish are replaced by fakes, so the policy is tested exactly and fast (the
restart itself, a query started again on its checkpoint, is what every continuous test already does).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from pipelines.jobs import Job
from pipelines.runner import JobFailed, JobSummary, Runner, StopSignal, Trigger, _Restarts, _Running
from tests.conftest import make_config


@dataclass
class FakeQuery:
    failed: bool
    stopped: bool = False

    @property
    def isActive(self) -> bool:  # noqa: N802 - Spark's name
        return not (self.failed or self.stopped)


@dataclass
class FakeRunner(Runner):
    """The job fails on each of its first `failures` starts (with `error`; each run commits 10 batches);
    `stop_after` starts in total end the run."""

    cfg: object
    failures: int
    stop_after: int
    error: BaseException = field(default_factory=lambda: RuntimeError("Python worker failed to connect back"))
    stop: StopSignal = field(default_factory=StopSignal)
    starts: list[str] = field(default_factory=list)

    def start(self, job, trigger):
        self.starts.append(job.name)
        if len(self.starts) >= self.stop_after:
            self.stop.event.set()
        failed = self.starts.count(job.name) <= self.failures
        return _Running(job, FakeQuery(failed), JobSummary(job.name, batches=10))

    def _skip_missing_upstream(self, job):
        return None

    def _finish(self, running, stopped):
        if running.query.failed:
            running.summary.status = "failed"
            running.summary.detail = "Python worker failed to connect back"
            raise JobFailed(running.job.name, running.summary, self.error)
        running.summary.status = "stopped" if stopped else "done"
        return running.summary

    def _stop_gracefully(self, running):
        running.query.stopped = True


JOB = Job(name="gold.early_warning_scores", source=None, transform=lambda df: df)


@pytest.fixture
def no_wait(monkeypatch):
    monkeypatch.setattr(_Restarts, "BACKOFF_S", (0.0,))


def run(runner: FakeRunner):
    return runner._run_together([JOB], Trigger(available_now=False, interval_ms=1000), runner.stop, None)


def test_a_job_that_fails_at_start_is_restarted_and_keeps_running(tmp_path, no_wait, caplog):
    runner = FakeRunner(make_config(tmp_path), failures=2, stop_after=3)
    summaries = run(runner)
    assert runner.starts == [JOB.name] * 3
    assert [(s.job, s.status) for s in summaries] == [(JOB.name, "stopped")]
    warnings = [r.getMessage() for r in caplog.records if "restarting it from its checkpoint" in r.getMessage()]
    assert len(warnings) == 2 and "restart 2 of at most 5" in warnings[1]
    assert "Python worker failed to connect back" in warnings[0]
    # The summary counts every run's batches and says the job was restarted.
    assert summaries[0].batches == 30
    assert summaries[0].detail == "restarted 2 time(s), last after: Python worker failed to connect back"


def test_an_error_without_a_message_is_restarted_and_named(tmp_path, no_wait, caplog):
    runner = FakeRunner(make_config(tmp_path), failures=1, stop_after=2, error=MemoryError())
    assert [s.status for s in run(runner)] == ["stopped"]
    assert any("failed (MemoryError())" in r.getMessage() for r in caplog.records)


def test_a_restart_that_cannot_start_counts_as_a_failure(tmp_path, no_wait):
    runner = FakeRunner(make_config(tmp_path, **{"streaming.max_restarts": "2"}), failures=1, stop_after=99)
    first_start = runner.start

    def start(job, trigger):
        if runner.starts:  # every restart fails before a query exists
            runner.starts.append(job.name)
            raise RuntimeError("unable to create native thread")
        return first_start(job, trigger)

    runner.start = start
    with pytest.raises(JobFailed, match="unable to create native thread"):
        run(runner)
    assert len(runner.starts) == 3  # the first start, then two restarts that could not start


def test_carelakes_own_errors_fail_the_run_at_once(tmp_path, no_wait):
    from pipelines.errors import SchemaEvolutionError

    runner = FakeRunner(make_config(tmp_path), failures=1, stop_after=99,
                        error=SchemaEvolutionError("gold.x: the transform produced columns [a], declared [b]"))
    with pytest.raises(JobFailed, match="the transform produced columns"):
        run(runner)
    assert runner.starts == [JOB.name]


def test_a_job_failing_more_than_max_restarts_times_in_a_row_fails_the_run(tmp_path, no_wait):
    runner = FakeRunner(make_config(tmp_path, **{"streaming.max_restarts": "2"}), failures=99, stop_after=99)
    with pytest.raises(JobFailed, match="Python worker failed to connect back"):
        run(runner)
    assert runner.starts == [JOB.name] * 3  # the first start and two restarts


def test_max_restarts_zero_fails_at_the_first_error(tmp_path, no_wait):
    runner = FakeRunner(make_config(tmp_path, **{"streaming.max_restarts": "0"}), failures=1, stop_after=99)
    with pytest.raises(JobFailed):
        run(runner)
    assert runner.starts == [JOB.name]


def test_a_healthy_run_between_failures_resets_the_count(tmp_path, no_wait, monkeypatch):
    monkeypatch.setattr(_Restarts, "HEALTHY_S", 0.0)  # every run counts as healthy: failures never add up
    runner = FakeRunner(make_config(tmp_path, **{"streaming.max_restarts": "1"}), failures=6, stop_after=6)
    summaries = run(runner)
    assert len(runner.starts) == 6
    assert summaries[0].status == "stopped"


def test_stopped_while_waiting_to_restart_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(_Restarts, "BACKOFF_S", (3600.0,))
    runner = FakeRunner(make_config(tmp_path), failures=1, stop_after=1)
    summaries = run(runner)
    assert [(s.status, s.batches, s.detail) for s in summaries] == [
        ("stopped", 10, "stopped while waiting to restart after: Python worker failed to connect back")]


def test_max_restarts_must_not_be_negative(tmp_path):
    from pipelines.errors import ConfigError

    with pytest.raises(ConfigError, match="streaming.max_restarts must be 0 or more"):
        make_config(tmp_path, **{"streaming.max_restarts": "-1"})
