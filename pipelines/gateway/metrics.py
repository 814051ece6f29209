"""Gateway counters and the fsync latency histogram, rendered as Prometheus text (GET /metrics)."""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

# fsync seconds: from well under a millisecond (SSD, page cache) to "the disk is in trouble".
FSYNC_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

_HELP = {
    "carelake_gateway_received_total": ("counter", "Messages or request bodies received, by feed and protocol."),
    "carelake_gateway_landed_total": ("counter", "Records fsynced into the landing zone, by feed and status."),
    "carelake_gateway_rejected_total": ("counter", "Bodies refused (negative ACK or HTTP 4xx), by feed and reason."),
    "carelake_gateway_bytes_total": ("counter", "Bytes received, by feed."),
    "carelake_gateway_partly_bad_total": ("counter", "HTTP bodies landed with some unreadable lines or entries."),
    "carelake_gateway_acks_total": ("counter", "MLLP acknowledgements sent, by code (AA, AE, AR)."),
    "carelake_gateway_http_responses_total": ("counter", "HTTP responses, by path and status."),
    "carelake_gateway_incomplete_frames_total": ("counter", "MLLP frames left unfinished: the connection closed or a "
                                                 "new start block began mid-frame (never acked)."),
    "carelake_gateway_unframed_total": ("counter", "Bytes received outside an MLLP frame (set aside, never acked)."),
    "carelake_gateway_write_errors_total": ("counter", "Landing writes that failed (nothing acknowledged)."),
    "carelake_gateway_timeouts_total": ("counter", "Uploads cut off unacknowledged, by protocol and stage: an HTTP "
                                        "body or MLLP frame not whole within its timeout (body, frame), or still "
                                        "arriving when a stop's grace ran out (shutdown)."),
    "carelake_gateway_bad_requests_total": ("counter", "HTTP requests that could not be parsed (a broken chunked "
                                            "body, an oversized header line, not HTTP): answered 400, one log line."),
    "carelake_gateway_disconnects_total": ("counter", "HTTP clients that closed the connection mid-body (nothing "
                                           "acknowledged)."),
    "carelake_gateway_rejects_deleted_total": ("counter", "Sealed reject segments deleted to keep landing/_rejects "
                                               "within gateway.rejects_max_mb (reason=size) or rejects_max_age "
                                               "(reason=age)."),
    "carelake_gateway_rejects_deleted_bytes_total": ("counter", "Bytes of the reject segments deleted, by reason."),
    "carelake_gateway_rejects_bytes": ("gauge", "Bytes in landing/_rejects (open and sealed segments) at the last "
                                       "check."),
    "carelake_gateway_open_connections": ("gauge", "Open MLLP connections."),
    "carelake_gateway_auth_failures_total": ("counter", "Senders refused before anything of theirs landed, by "
                                             "protocol and reason: tls_handshake (MLLP), unauthenticated (HTTP: no "
                                             "known token or verified certificate), facility_not_allowed (MLLP "
                                             "MSH-4)."),
    "carelake_gateway_dicom_associations_total": ("counter", "DICOM associations by outcome: accepted, rejected "
                                                  "(calling AE title not allowed, too many at once), aborted."),
    "carelake_gateway_receiving": ("gauge", "Uploads under way: HTTP bodies being read, MLLP frames begun and not "
                                   "ended yet, by protocol (slow senders show here)."),
    "carelake_gateway_in_flight": ("gauge", "Whole messages or bodies received and not answered yet (being checked "
                                   "or landed), by protocol."),
}


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                     for k, v in labels)
    return "{" + inner + "}"


@dataclass
class Snapshot:
    """Every counter and the fsync histogram at one moment: what another process sends the gateway (picklable)."""

    values: dict[str, dict[tuple[tuple[str, str], ...], float]] = field(default_factory=dict)
    fsync: dict[str, list[int]] = field(default_factory=dict)
    fsync_sum: dict[str, float] = field(default_factory=dict)
    fsync_count: dict[str, int] = field(default_factory=dict)

    def counters(self) -> Snapshot:
        """Without the gauges: what stays true of a process after it has ended (its counts, not its in-flight)."""
        return Snapshot({name: series for name, series in self.values.items() if _HELP.get(name, ("counter",))[0]
                         == "counter"}, self.fsync, self.fsync_sum, self.fsync_count)


class Metrics:
    """Thread-safe: the event loop counts requests, the landing writer threads record fsyncs. Other processes'
    counters (the DICOM acceptor processes) join through `sources`: each is asked for a `Snapshot` when rendering."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(dict)
        self._fsync: dict[str, list[int]] = {}
        self._fsync_sum: dict[str, float] = defaultdict(float)
        self._fsync_count: dict[str, int] = defaultdict(int)
        self.sources: list[Callable[[], list[Snapshot]]] = []

    def snapshot(self) -> Snapshot:
        with self._lock:
            return Snapshot({name: dict(series) for name, series in self._values.items()},
                            {feed: list(counts) for feed, counts in self._fsync.items()},
                            dict(self._fsync_sum), dict(self._fsync_count))

    def absorb(self, snap: Snapshot) -> None:
        """Add another process's counters and fsync observations to these (its gauges add up too)."""
        with self._lock:
            for name, series in snap.values.items():
                mine = self._values[name]
                for labels, value in series.items():
                    mine[labels] = mine.get(labels, 0) + value
            for feed, counts in snap.fsync.items():
                mine = self._fsync.setdefault(feed, [0] * (len(FSYNC_BUCKETS) + 1))
                mine[:] = [a + b for a, b in zip(mine, counts, strict=True)]
                self._fsync_sum[feed] += snap.fsync_sum.get(feed, 0.0)
                self._fsync_count[feed] += snap.fsync_count.get(feed, 0)

    def merged(self) -> Metrics:
        """These counters plus every source's, as one `Metrics` (a copy; this one is unchanged)."""
        out = Metrics()
        out.absorb(self.snapshot())
        for source in list(self.sources):
            for snap in source():
                out.absorb(snap)
        return out

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._values[name]
            series[key] = series.get(key, 0) + amount

    def add(self, counts: Mapping[tuple[str, tuple[tuple[str, str], ...]], float]) -> None:
        """Many increments under one lock: {(name, sorted label pairs): amount}."""
        with self._lock:
            for (name, labels), amount in counts.items():
                series = self._values[name]
                series[labels] = series.get(labels, 0) + amount

    def set(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            self._values[name][tuple(sorted(labels.items()))] = value

    def get(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._values.get(name, {}).get(tuple(sorted(labels.items())), 0)

    def observe_fsync(self, feed: str, seconds: float) -> None:
        with self._lock:
            counts = self._fsync.setdefault(feed, [0] * (len(FSYNC_BUCKETS) + 1))
            counts[bisect.bisect_left(FSYNC_BUCKETS, seconds)] += 1
            self._fsync_sum[feed] += seconds
            self._fsync_count[feed] += 1

    def render(self) -> str:
        """Prometheus text of these counters and every source's."""
        return (self.merged() if self.sources else self)._render()

    def _render(self) -> str:
        lines: list[str] = []
        with self._lock:
            for name, (kind, text) in _HELP.items():
                lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
                for labels, value in sorted(self._values.get(name, {}).items()):
                    shown = int(value) if float(value).is_integer() else value
                    lines.append(f"{name}{_labels(labels)} {shown}")
            name = "carelake_gateway_fsync_seconds"
            lines += [f"# HELP {name} Time to fsync one group commit into the landing zone, by feed.",
                      f"# TYPE {name} histogram"]
            for feed, counts in sorted(self._fsync.items()):
                running = 0
                for bound, count in zip((*FSYNC_BUCKETS, float("inf")), counts, strict=True):
                    running += count
                    le = "+Inf" if bound == float("inf") else f"{bound:g}"
                    lines.append(f'{name}_bucket{{feed="{feed}",le="{le}"}} {running}')
                lines.append(f'{name}_sum{{feed="{feed}"}} {self._fsync_sum[feed]:.6f}')
                lines.append(f'{name}_count{{feed="{feed}"}} {self._fsync_count[feed]}')
        return "\n".join(lines) + "\n"
