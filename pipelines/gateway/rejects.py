"""Keeping landing/_rejects within bounds: refused traffic must never fill the disk the accepted traffic needs.

Everything the gateway refuses (HTTP 4xx bodies, MLLP frames set aside) is kept in `landing/_rejects/<feed>/`
so an interface analyst can see what a sender sent. A hostile or broken sender can refuse-loop for hours, so
the area is bounded by total size (`gateway.rejects_max_mb`) and age (`gateway.rejects_max_age`): the oldest
sealed reject segments are deleted first. An open segment (still being written, hidden name) is never deleted,
nor anything outside `_rejects`: the accepted feeds belong to bronze. Each deletion is logged once and counted.

The bounds are applied after every sealed reject segment (so a burst of refusals is trimmed within one segment
age) and on a timer (so old segments go even when nothing is refused any more).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bronze.records import SEGMENT_SUFFIX
from pipelines.gateway.metrics import Metrics
from pipelines.gateway.segments import OPEN_PREFIX

log = logging.getLogger("carelake.gateway")


@dataclass(frozen=True)
class Segment:
    path: Path
    size: int
    mtime: float

    @property
    def sealed(self) -> bool:
        return not self.path.name.startswith(OPEN_PREFIX)


@dataclass(frozen=True)
class Deletion:
    segment: Segment
    reason: str  # "size" or "age"


def segments(area: Path) -> list[Segment]:
    """Every reject segment, open or sealed, in each feed's folder of `area`, oldest first."""
    found = []
    for path in area.glob(f"*/*{SEGMENT_SUFFIX}"):
        try:
            st = path.stat()
        except FileNotFoundError:  # sealed (renamed) or deleted since the listing
            continue
        found.append(Segment(path, st.st_size, st.st_mtime))
    return sorted(found, key=lambda s: (s.mtime, s.path.name))


def plan(found: list[Segment], *, max_bytes: int, max_age_s: float, now: float) -> list[Deletion]:
    """Which sealed segments to delete, oldest first: every one older than the age bound, then the oldest until
    the whole area (open segments included) is within the size bound."""
    total = sum(s.size for s in found)
    out = []
    for seg in found:
        if not seg.sealed:
            continue
        if now - seg.mtime > max_age_s:
            reason = "age"
        elif total > max_bytes:
            reason = "size"
        else:
            continue
        out.append(Deletion(seg, reason))
        total -= seg.size
    return out


class RejectsJanitor:
    """Applies `plan` to the rejects area; safe from any thread (the writer threads report each seal).

    A seal adds one known segment and applies the bounds without listing the area (a long refusal storm can leave
    tens of thousands of small segments: a listing per seal would cost more than the refusals); the timer lists
    the whole area, which also picks up what changed behind the janitor's back."""

    def __init__(self, area: Path, metrics: Metrics, *, max_bytes: int, max_age_s: float):
        self.area = area
        self.metrics = metrics
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self._sealed: dict[Path, Segment] = {}  # oldest first
        self._open: list[Segment] = []  # as of the last listing
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def rescan(self) -> list[Deletion]:
        """List the area and apply the bounds."""
        with self._lock:
            try:
                found = segments(self.area)
            except OSError as exc:
                log.error("rejects: cannot list %s to keep it within its bounds: %s", self.area, exc)
                return []
            self._sealed = {s.path: s for s in found if s.sealed}
            self._open = [s for s in found if not s.sealed]
            return self._apply()

    def sealed(self, path: Path) -> list[Deletion]:
        """A writer has just sealed `path`: count it in and apply the bounds."""
        with self._lock:
            try:
                st = path.stat()
            except OSError:
                return []
            self._sealed[path] = Segment(path, st.st_size, st.st_mtime)
            self._open = [s for s in self._open if s.path.name != f"{OPEN_PREFIX}{path.name}"]
            return self._apply()

    def _apply(self) -> list[Deletion]:
        done = []
        for d in plan([*self._sealed.values(), *self._open], max_bytes=self.max_bytes, max_age_s=self.max_age_s,
                      now=time.time()):
            try:
                os.unlink(d.segment.path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.error("rejects: cannot delete %s: %s", d.segment.path, exc)
                continue
            else:
                done.append(d)
                self._report(d)
            del self._sealed[d.segment.path]
        total = sum(s.size for s in self._sealed.values()) + sum(s.size for s in self._open)
        self.metrics.set("carelake_gateway_rejects_bytes", total)
        return done

    def _report(self, d: Deletion) -> None:
        seg = d.segment
        self.metrics.inc("carelake_gateway_rejects_deleted_total", reason=d.reason)
        self.metrics.inc("carelake_gateway_rejects_deleted_bytes_total", seg.size, reason=d.reason)
        bound = (f"gateway.rejects_max_mb ({self.max_bytes / (1 << 20):g} MB)" if d.reason == "size"
                 else f"gateway.rejects_max_age ({self.max_age_s:g} s)")
        log.warning("rejects: deleted %s/%s (%d bytes, sealed %.0f s ago) to keep landing/_rejects within %s",
                    seg.path.parent.name, seg.path.name, seg.size, time.time() - seg.mtime, bound)

    def start(self, every_s: float) -> RejectsJanitor:
        """Check now and then every `every_s` seconds on a thread of its own, until `close`."""
        self.rescan()

        def run() -> None:
            while not self._stop.wait(every_s):
                self.rescan()

        self._thread = threading.Thread(target=run, name="rejects-janitor", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
