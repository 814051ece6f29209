"""The gateway's view of the landing zone: one durable segment log per feed, and one per feed's rejects.

Accepted traffic (and HL7 messages answered AE/AR, which bronze keeps and silver quarantines) goes
to `<root>/landing/<feed>/`. HTTP bodies refused with 4xx go to `<root>/landing/_rejects/<feed>/`,
outside what bronze reads, so nothing malformed reaches a table unannounced; that area is bounded by size
and age (`rejects.py`), the accepted feeds never are. Opening the zone takes an exclusive lock on the root,
recovers segments a crashed gateway left open, and starts the writer threads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import fcntl
import os
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipelines.config import Config
from pipelines.errors import UsageError
from pipelines.gateway.metrics import Metrics
from pipelines.gateway.rejects import RejectsJanitor
from pipelines.gateway.segments import Landed, Recovered, SegmentLog, recover

REJECTS = "_rejects"
LOCK_NAME = ".gateway.lock"


_second_cache: list = [-1, ""]


def received_now() -> str:
    """ISO-8601 UTC with microseconds; the formatted second is reused for every record within it."""
    now = time.time()
    second = int(now)
    if second != _second_cache[0]:
        _second_cache[:] = [second, datetime.fromtimestamp(second, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")]
    return f"{_second_cache[1]}.{int((now - second) * 1_000_000):06d}Z"


def full_header(feed: str, header: Mapping[str, Any]) -> dict[str, Any]:
    """A landing record's header: when and on which feed it arrived, then what the protocol says about it."""
    return {"received_at": received_now(), "feed": feed, **header}


class LandingZone:
    def __init__(self, cfg: Config, feeds: tuple[str, ...], metrics: Metrics):
        missing = [f for f in feeds if f not in cfg.landing.feeds]
        if missing:
            raise UsageError(f"the gateway needs feeds {', '.join(missing)} in landing.feeds (conf/base.yaml)")
        self.cfg = cfg
        self.feeds = feeds
        self.metrics = metrics
        self.root = cfg.path("landing")
        self._logs: dict[tuple[str, bool], SegmentLog] = {}
        self._lock_fd: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.recovered: list[Recovered] = []
        g = cfg.gateway
        self.janitor = RejectsJanitor(self.root / REJECTS, metrics, max_bytes=g.rejects_max_mb << 20,
                                      max_age_s=g.rejects_max_age_s)

    def folder(self, feed: str, *, rejected: bool = False) -> Path:
        return self.root / REJECTS / feed if rejected else self.root / feed

    def _deliver(self, thunks: list) -> None:
        """From a writer thread: run a group commit's completions on the event loop, in one hop."""
        def run() -> None:
            for thunk in thunks:
                thunk()

        self._loop.call_soon_threadsafe(run)

    def open(self) -> LandingZone:
        """Lock the root, recover, start the writers; call from the event loop that will await landings."""
        self._loop = asyncio.get_running_loop()
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock()
        g = self.cfg.gateway
        for feed in self.feeds:
            for rejected in (False, True):
                folder = self.folder(feed, rejected=rejected)
                self.recovered += recover(folder, fsync=self.cfg.landing.fsync)
                self._logs[(feed, rejected)] = SegmentLog(
                    folder, feed, fsync=self.cfg.landing.fsync, segment_bytes=g.segment_mb << 20,
                    segment_age_s=g.segment_age_s, group_commit_s=g.group_commit_s,
                    on_fsync=lambda s, _n, _b, feed=feed: self.metrics.observe_fsync(feed, s),
                    deliver=self._deliver,
                    on_seal=self.janitor.sealed if rejected else None,
                ).start()
        # Old rejects go by age even when nothing is refused any more: check a few times per age bound (<= 1/min).
        self.janitor.start(every_s=min(60.0, max(0.05, g.rejects_max_age_s / 10)))
        return self

    def close(self) -> None:
        for log in self._logs.values():
            log.close()
        self._logs.clear()
        self.janitor.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _lock(self) -> None:
        path = self.root / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UsageError(f"another gateway (pid {holder}) is already serving {self.root}; stop it first, "
                             "or give this one its own lakehouse with --root") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    @property
    def lock_fd(self) -> int | None:
        """The descriptor holding the root's lock: processes the gateway starts keep it open, so another gateway
        cannot take the root (and recover its open segments) while any of them still writes."""
        return self._lock_fd

    @property
    def failed(self) -> list[str]:
        return [f"{feed}{' rejects' if rej else ''}: {log.failed}" for (feed, rej), log in self._logs.items()
                if log.failed is not None]

    def _append(self, feed: str, rejected: bool, header: Mapping[str, Any], body: bytes) -> asyncio.Future[Landed]:
        full = full_header(feed, header)
        future = self._loop.create_future()

        def done(place: Landed | None, exc: BaseException | None) -> None:
            if future.cancelled():
                return
            if exc is not None:
                future.set_exception(exc)
            else:
                future.set_result(place)

        self._logs[(feed, rejected)].append(full, body, done)
        return future

    def land(self, feed: str, header: Mapping[str, Any], body: bytes) -> asyncio.Future[Landed]:
        """Durably append to the feed's landing folder; await before acknowledging."""
        return self._append(feed, False, header, body)

    def land_from_thread(self, feed: str, header: Mapping[str, Any], body: bytes
                         ) -> concurrent.futures.Future[Landed]:
        """`land` for a thread other than the event loop's (the DICOM SCP's association threads): the future
        resolves once the record is fsynced, or fails with the write error."""
        return self._logs[(feed, False)].append(full_header(feed, header), body)

    def reject(self, feed: str, header: Mapping[str, Any], body: bytes) -> asyncio.Future[Landed]:
        """Durably keep a refused body in the rejects area; it never reaches bronze."""
        return self._append(feed, True, {**header, "status": "rejected"}, body)
