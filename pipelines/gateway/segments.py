"""Durable, append-only landing segments with group commit.

One `SegmentLog` per landing folder. Callers hand it records; a writer thread appends every record
that is waiting, fsyncs once for all of them (group commit), and only then reports them done,
so an acknowledgement always follows the fsync of its message. The open segment has a hidden name
(`.open-…clrec`), which Spark's file source never lists; once it reaches its size or age limit it is
sealed — renamed to its final name and the folder fsynced — and bronze picks it up.

After a crash, `recover()` seals what the previous process left open: the intact records are kept,
a torn tail (a record that was being written, so never acknowledged) is cut off and saved beside the
folder under `_torn/` for inspection, and an open segment with no whole record is removed.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bronze.records import FILE_MAGIC, SEGMENT_SUFFIX, encode_record, scan

log = logging.getLogger("carelake.gateway")

OPEN_PREFIX = ".open-"
TORN_FOLDER = "_torn"


@dataclass(frozen=True)
class Landed:
    """Where a record now lives on disk (reported back to the sender)."""

    segment: str  # final segment name (the open name without its hidden prefix)
    offset: int


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(file, data: bytes) -> None:
    """An unbuffered write may take fewer bytes than offered: keep going until all are written."""
    view = memoryview(data)
    while view:
        view = view[file.write(view):]


def _segment_name(feed: str, writer: str = "") -> str:
    """`<UTC stamp>-<feed>[-<writer>]-<random>.clrec`: unique whichever process writes it; `writer` names the
    process when several write one folder (the DICOM acceptor processes: scp1, scp2, ...)."""
    stamp = datetime.now(tz=UTC).strftime("%Y%m%dT%H%M%S%fZ")
    return f"{stamp}-{feed}{f'-{writer}' if writer else ''}-{uuid.uuid4().hex[:12]}{SEGMENT_SUFFIX}"


# Told once per record, after its group commit: (where it landed, None) or (None, why it did not).
Done = Callable[["Landed | None", "BaseException | None"], None]


@dataclass
class _Pending:
    header: Mapping[str, Any]
    body: bytes
    done: Done
    data: bytes = b""  # the encoded record: made on the writer thread, so a 16 MB body's copy and CRC never run on
                       # the caller's (the gateway's event loop)


def _future_done(future: Future) -> Done:
    def done(place: Landed | None, exc: BaseException | None) -> None:
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(place)

    return done


def _run_now(thunks: list[Callable[[], None]]) -> None:
    for thunk in thunks:
        thunk()


class _OpenSegment:
    def __init__(self, folder: Path, feed: str, writer: str = ""):
        self.name = _segment_name(feed, writer)
        self.path = folder / f"{OPEN_PREFIX}{self.name}"
        self.file = open(self.path, "xb", buffering=0)  # noqa: SIM115 - lives until sealed
        self.file.write(FILE_MAGIC)
        self.size = len(FILE_MAGIC)
        self.records = 0
        self.opened = time.monotonic()


class SegmentLog:
    """Append records durably to `<folder>/*.clrec`; futures resolve to `Landed` after fsync."""

    def __init__(
        self,
        folder: Path,
        feed: str,
        *,
        fsync: bool = True,
        segment_bytes: int = 64 << 20,
        segment_age_s: float = 1.0,
        group_commit_s: float = 0.0,
        on_fsync: Callable[[float, int, int], None] | None = None,
        deliver: Callable[[list[Callable[[], None]]], None] = _run_now,
        on_seal: Callable[[Path], None] | None = None,
        writer: str = "",
    ):
        self.folder = folder
        self.feed = feed
        self.writer = writer  # in each segment's name when several processes write one folder
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        self.segment_age_s = segment_age_s
        self.group_commit_s = group_commit_s
        self.on_fsync = on_fsync  # (seconds, records, bytes) per group commit, for metrics
        # Runs each group commit's completions; an event loop passes one call_soon_threadsafe for them all.
        self.deliver = deliver
        self.on_seal = on_seal  # told each sealed segment's path, on the writer thread (the rejects bound uses it)
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._segment: _OpenSegment | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self.failed: BaseException | None = None  # the last write error (cleared by the next success)
        self.sealed = 0

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> SegmentLog:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name=f"landing-{self.feed}", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Write what is queued, seal the open segment, stop the writer thread."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join()

    # -- the caller's side -------------------------------------------------------------------
    def append(self, header: Mapping[str, Any], body: bytes, done: Done | None = None) -> Future | None:
        """Queue one record (the header is encoded later, on the writer thread: do not change it after).
        Without `done`, return a future of its `Landed` place once it is on disk; with `done`, call it
        instead (through `deliver`, once the record's group commit is over)."""
        future: Future | None = None
        if done is None:
            future = Future()
            done = _future_done(future)
        if self._closed:
            done(None, RuntimeError("landing log is closed (the gateway is shutting down)"))
            return future
        self._queue.put(_Pending(header, body, done))
        return future

    # -- the writer thread -------------------------------------------------------------------
    def _take(self, timeout: float | None) -> list[_Pending | None]:
        try:
            first = self._queue.get(timeout=timeout)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + self.group_commit_s
        while True:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except queue.Empty:
                pass
            left = deadline - time.monotonic()
            if left <= 0 or None in batch:
                return batch
            try:
                batch.append(self._queue.get(timeout=left))
            except queue.Empty:
                return batch

    def _run(self) -> None:
        stopping = False
        while not stopping:
            seg = self._segment
            timeout = None if seg is None else max(0.0, seg.opened + self.segment_age_s - time.monotonic())
            batch = self._take(timeout)
            stopping = None in batch
            items = self._encode([p for p in batch if p is not None])
            while items:  # fill the open segment up to its size limit, seal it, go on in a new one
                room = self.segment_bytes - (self._segment.size if self._segment else len(FILE_MAGIC))
                n, size = 1, len(items[0].data)
                while n < len(items) and size + len(items[n].data) <= room:
                    size += len(items[n].data)
                    n += 1
                self._write(items[:n])
                items = items[n:]
                if self._segment is not None and self._segment.size >= self.segment_bytes:
                    self._seal()
            seg = self._segment
            if seg is not None and (stopping or seg.size >= self.segment_bytes
                                    or time.monotonic() - seg.opened >= self.segment_age_s):
                self._seal()

    def _encode(self, items: list[_Pending]) -> list[_Pending]:
        """Encode each record; one that cannot be (a header JSON cannot hold) fails alone, the rest go on."""
        ready, failed = [], []
        for item in items:
            try:
                item.data = encode_record(item.header, item.body)
            except (TypeError, ValueError) as exc:
                failed.append(functools.partial(item.done, None, exc))
                continue
            ready.append(item)
        if failed:
            self.deliver(failed)
        return ready

    def _write(self, items: list[_Pending]) -> None:
        try:
            if self._segment is None:
                self._segment = _OpenSegment(self.folder, self.feed, self.writer)
                if self.fsync:  # the new name itself must survive a power cut before anything in it is acked
                    fsync_dir(self.folder)
            seg = self._segment
            places, offset = [], seg.size
            for item in items:
                places.append(Landed(seg.name, offset))
                offset += len(item.data)
            _write_all(seg.file, b"".join(item.data for item in items))  # one write per group commit
            seg.size = offset
            started = time.perf_counter()
            if self.fsync:
                os.fsync(seg.file.fileno())
            if self.on_fsync is not None:
                self.on_fsync(time.perf_counter() - started, len(items), sum(len(i.data) for i in items))
            seg.records += len(items)
            self.failed = None
        except OSError as exc:
            # After a failed write or fsync the file's content is unknown: acknowledge nothing in it,
            # keep it for inspection under its hidden name, and start a fresh segment next time.
            log.error("landing %s: cannot write %s: %s", self.feed, self.folder, exc)
            self.failed = exc
            self._abandon()
            self.deliver([functools.partial(item.done, None, exc) for item in items])
            return
        self.deliver([functools.partial(item.done, place, None) for item, place in zip(items, places, strict=True)])

    def _abandon(self) -> None:
        seg, self._segment = self._segment, None
        if seg is not None:
            try:
                seg.file.close()
            except OSError:
                pass

    def _seal(self) -> None:
        seg, self._segment = self._segment, None
        if seg is None:
            return
        try:
            seg.file.close()
            os.rename(seg.path, self.folder / seg.name)
            if self.fsync:
                fsync_dir(self.folder)
            self.sealed += 1
        except OSError as exc:  # the records are durable under the open name; recover() seals them later
            log.error("landing %s: cannot seal %s: %s", self.feed, seg.path.name, exc)
            self.failed = exc
            return
        if self.on_seal is not None:
            self.on_seal(self.folder / seg.name)


@dataclass(frozen=True)
class Recovered:
    segment: str
    records: int
    torn_bytes: int
    problem: str | None


def recover(folder: Path, *, fsync: bool = True) -> list[Recovered]:
    """Seal the segments a crashed gateway left open in `folder`; cut and keep any torn tail."""
    out: list[Recovered] = []
    if not folder.is_dir():
        return out
    for path in sorted(folder.glob(f"{OPEN_PREFIX}*{SEGMENT_SUFFIX}")):
        data = path.read_bytes()
        if data.startswith(FILE_MAGIC):
            result = scan(data)
            records, end, problem = len(result.records), result.valid_end, result.problem
        else:  # the crash came before the file magic was on disk, or the file is not ours
            records, end = 0, 0
            problem = None if not data else (
                "segment ended inside its file magic" if FILE_MAGIC.startswith(data)
                else "segment does not start with the CLREC01 file magic")
        torn = data[end:]
        final = path.name[len(OPEN_PREFIX):]
        if torn:
            keep = folder / TORN_FOLDER
            keep.mkdir(exist_ok=True)
            (keep / f"{final}.tail").write_bytes(torn)
        if records:
            with open(path, "r+b") as f:
                f.truncate(end)
                if fsync:
                    os.fsync(f.fileno())
            os.rename(path, folder / final)
        else:
            path.unlink()
        if fsync:
            fsync_dir(folder)
        out.append(Recovered(final, records, len(torn), problem))
        log.warning("landing: recovered %s: %d whole record(s) sealed, %d torn byte(s) set aside%s",
                    final, records, len(torn), f" ({problem})" if problem else "")
    return out
