"""C-STORE in several acceptor processes behind the gateway's one DICOM port (`gateway.dicom.workers`).

pynetdicom serves an association with three threads that poll through one GIL, so one process stores about
as fast as one core runs Python, whatever the disk does. The gateway therefore accepts DICOM connections
itself, on one listening socket, and hands each accepted connection (its file descriptor, over a Unix socket)
to the acceptor process serving the fewest associations. Each acceptor runs the same Storage SCP
(`dicom.DicomServer`: allow-list, transfer syntaxes, fsync before Success) with its own GIL and its own
landing segment log in `landing/dicom/`, its segments named `...-dicom-scp<N>-...` so two processes never
write one file; bronze reads every sealed segment of the folder, whoever wrote it.

Lifetimes. Acceptors are started fresh (`python -m`, nothing inherited: no delta-rs state, no locks held by
threads that do not exist in the child) by one supervisor thread that lives as long as the SCP; they die with
the gateway: on Linux the kernel kills them when that thread's process dies (PR_SET_PDEATHSIG, even after
kill -9), elsewhere they exit when their channel to the gateway closes. Each keeps the landing root's lock
open, so no new gateway can take the root and recover open segments while an old acceptor still writes one.
A stop tells every acceptor to answer new C-STOREs 0xA700, land what is in flight by the deadline, seal its
segment and exit. An acceptor that dies otherwise is logged and replaced at the next connection; what it
answered Success is on disk, the rest its modalities resend.

The channel carries pickled tuples, one per SOCK_SEQPACKET message. Gateway -> acceptor: ("spec", WorkerSpec)
first, ("conn", peer) with the connection's descriptor, ("metrics", n), ("stop", seconds). Acceptor ->
gateway: ("ready",), ("closed",) per ended connection, ("metrics", n, Snapshot), ("stopped", Snapshot).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from pipelines.errors import UsageError
from pipelines.gateway.landing import LandingZone, full_header
from pipelines.gateway.metrics import Metrics, Snapshot

log = logging.getLogger("carelake.gateway")

FEED = "dicom"
MAX_MESSAGE = 1 << 20  # a channel message (a metrics snapshot is a few KB)
READY_TIMEOUT_S = 120.0  # an acceptor's start: a fresh interpreter importing pydicom and pynetdicom on busy cores
METRICS_TIMEOUT_S = 2.0  # /metrics waits this long for an acceptor's counters, then shows its last ones
PR_SET_PDEATHSIG = 1
LISTEN_BACKLOG = 1024


@dataclass(frozen=True)
class WorkerSpec:
    """What an acceptor process needs: its number, the SCP settings, where and how to land."""

    index: int
    settings: object  # dicom.DicomSettings (kept untyped here: this module imports no pynetdicom in the gateway)
    address: tuple[str, int]  # the gateway's DICOM address, as the SCP reports it
    folder: str
    fsync: bool
    segment_bytes: int
    segment_age_s: float
    group_commit_s: float
    log_level: int


def _send(chan: socket.socket, message: tuple, fds: tuple[int, ...] = ()) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    if fds:
        socket.send_fds(chan, [data], list(fds))
    else:
        chan.sendall(data)


def _receive(chan: socket.socket) -> tuple[tuple | None, list[int]]:
    """The next message and the descriptors sent with it; (None, []) once the other side has closed."""
    data, fds, _flags, _addr = socket.recv_fds(chan, MAX_MESSAGE, 1)
    if not data:
        return None, fds
    return pickle.loads(data), fds  # noqa: S301 - our own process on the other end of a socketpair


# -- the gateway's side -------------------------------------------------------------------------------------------
@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen
    chan: socket.socket
    active: int = 0  # connections handed over and not reported closed
    ready: bool = False
    alive: bool = True
    last: Snapshot = field(default_factory=Snapshot)  # its counters as last reported
    final: Snapshot | None = None  # sent as it stopped
    replies: dict[int, Snapshot] = field(default_factory=dict)
    send_lock: threading.Lock = field(default_factory=threading.Lock)


class DicomWorkers:
    """The DICOM port of a gateway whose C-STOREs are served by `workers` acceptor processes; the same interface
    as `dicom.DicomServer` (start, stop)."""

    def __init__(self, landing: LandingZone, metrics: Metrics, settings, workers: int):
        self.landing = landing
        self.metrics = metrics
        # gateway.dicom.max_associations holds for the gateway: the fewest-first hand-over fills every acceptor
        # evenly, so each takes its share (rounded up).
        self.settings = dataclasses.replace(settings, max_associations=math.ceil(settings.max_associations / workers))
        self.count = workers
        self._workers: list[_Worker] = []
        self._changed = threading.Condition()  # guards _workers' counts, replies and liveness
        self._listener: socket.socket | None = None
        self._address: tuple[str, int] = ("", 0)
        self._supervisor: threading.Thread | None = None
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._stop_deadline: float | None = None
        self._asked = 0
        metrics.sources.append(self._snapshots)

    # -- lifecycle (the gateway's event loop thread) ------------------------------------------------------------
    def start(self, host: str, port: int) -> int:
        """Listen on host:port (0 = a free port), start the acceptors; return the port once all are ready."""
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        self._listener = socket.create_server((host, port), family=family, backlog=LISTEN_BACKLOG)
        self._address = (host, self._listener.getsockname()[1])
        # Every acceptor is started, and replaced, from this one thread: PR_SET_PDEATHSIG fires when the thread
        # that started a process ends, so it must live as long as the SCP.
        self._supervisor = threading.Thread(target=self._supervise, name="dicom-acceptors", daemon=True)
        self._supervisor.start()
        self._started.wait()
        if self._start_error is not None:
            self._supervisor.join()
            self._listener.close()
            raise self._start_error
        return self._address[1]

    def stop(self, deadline: float) -> None:
        """Stop accepting; each acceptor lands what is in flight until `deadline` (time.monotonic), then exits."""
        self._stop_deadline = deadline
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes the supervisor's accept()
            except OSError:
                pass
            self._listener.close()
        if self._supervisor is not None:
            self._supervisor.join()
        if self._snapshots in self.metrics.sources:
            self.metrics.sources.remove(self._snapshots)

    # -- the supervisor thread ------------------------------------------------------------------------------
    def _supervise(self) -> None:
        try:
            for index in range(1, self.count + 1):
                self._workers.append(self._spawn(index))
            for worker in self._workers:
                self._await_ready(worker)
        except BaseException as exc:  # noqa: BLE001 - handed to start(), which raises it in the gateway
            self._start_error = exc
            self._halt(time.monotonic() + 5)
            self._started.set()
            return
        self._started.set()
        self._accept_loop()
        self._halt(self._stop_deadline or time.monotonic())

    def _spawn(self, index: int) -> _Worker:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        g = self.landing.cfg.gateway
        lock_fd = self.landing.lock_fd
        # the root's lock descriptor is inherited and never closed: the lock lasts as long as the acceptor
        keep = (theirs.fileno(),) + (() if lock_fd is None else (lock_fd,))
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipelines.gateway.dicom_workers", str(theirs.fileno()), str(os.getpid())],
            pass_fds=keep, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        theirs.close()
        spec = WorkerSpec(index=index, settings=self.settings, address=self._address,
                          folder=str(self.landing.folder(FEED)), fsync=self.landing.cfg.landing.fsync,
                          segment_bytes=g.segment_mb << 20, segment_age_s=g.segment_age_s,
                          group_commit_s=g.group_commit_s,
                          log_level=logging.getLogger("carelake").getEffectiveLevel())
        _send(mine, ("spec", spec))
        worker = _Worker(index, proc, mine)
        threading.Thread(target=self._listen, args=(worker,), name=f"dicom-scp{index}-channel", daemon=True).start()
        return worker

    def _await_ready(self, worker: _Worker) -> None:
        with self._changed:
            ok = self._changed.wait_for(lambda: worker.ready or not worker.alive, timeout=READY_TIMEOUT_S)
        if not ok or not worker.alive:
            raise UsageError(f"the DICOM acceptor process scp{worker.index} did not start (see the log above); "
                             f"check the Python environment, or set gateway.dicom.workers: 0 to store in the "
                             f"gateway's own process")

    def _listen(self, worker: _Worker) -> None:
        """One acceptor's messages, on its own thread, until its channel closes."""
        while True:
            try:
                message, fds = _receive(worker.chan)
            except OSError:
                message, fds = None, []
            for fd in fds:
                os.close(fd)
            if message is None:
                break
            with self._changed:
                kind = message[0]
                if kind == "ready":
                    worker.ready = True
                elif kind == "closed":
                    worker.active -= 1
                elif kind == "metrics":
                    worker.replies[message[1]] = worker.last = message[2]
                elif kind == "stopped":
                    worker.final = message[1]
                self._changed.notify_all()
        code = worker.proc.wait()
        worker.chan.close()
        with self._changed:
            worker.alive = False
            self._changed.notify_all()
        self.metrics.absorb((worker.final or worker.last).counters())
        if worker.final is None and self._stop_deadline is None:
            log.error("dicom: acceptor process scp%d (pid %d) ended unexpectedly (exit %s); what it answered Success "
                      "is landed, its open associations' modalities resend; a new one takes its place",
                      worker.index, worker.proc.pid, code)

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, peer = self._listener.accept()
            except OSError as exc:
                if self._stop_deadline is not None:
                    return
                log.error("dicom: cannot accept a connection: %s", exc)
                time.sleep(0.1)  # out of descriptors: let some close
                continue
            try:
                self._hand(conn, peer[:2])
            finally:
                conn.close()  # the acceptor holds its own copy now

    def _hand(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        """Give one connection to the live acceptor with the fewest; replace dead ones first."""
        self._replace_dead()
        for _attempt in range(len(self._workers)):
            with self._changed:
                live = [w for w in self._workers if w.alive]
                if not live:
                    break
                worker = min(live, key=lambda w: w.active)
                worker.active += 1
            try:
                with worker.send_lock:
                    _send(worker.chan, ("conn", peer), (conn.fileno(),))
                return
            except OSError as exc:  # it died an instant ago: its channel thread is about to say so; try another
                with self._changed:
                    worker.active -= 1
                    worker.alive = False
                log.error("dicom: cannot hand a connection from %s:%s to acceptor scp%d: %s", *peer, worker.index,
                          exc)
        log.error("dicom: no acceptor process is running; connection from %s:%s closed unanswered", *peer)

    def _replace_dead(self) -> None:
        for n, worker in enumerate(self._workers):
            if worker.alive:
                continue
            try:
                replacement = self._spawn(worker.index)
                self._await_ready(replacement)
            except (OSError, UsageError) as exc:
                log.error("dicom: cannot replace acceptor scp%d: %s", worker.index, exc)
                continue
            self._workers[n] = replacement

    def _halt(self, deadline: float) -> None:
        """Ask every acceptor to stop by `deadline`; kill any still running a moment after it."""
        for worker in self._workers:
            try:
                with worker.send_lock:
                    _send(worker.chan, ("stop", max(0.0, deadline - time.monotonic())))
            except OSError:
                pass
        for worker in self._workers:
            try:
                worker.proc.wait(timeout=max(0.0, deadline - time.monotonic()) + 5)
            except subprocess.TimeoutExpired:
                log.error("dicom: acceptor scp%d did not stop in time; killed (nothing it did not answer is lost: "
                          "its modalities resend)", worker.index)
                worker.proc.kill()
                worker.proc.wait()
        with self._changed:  # each channel thread has taken its acceptor's last counters
            self._changed.wait_for(lambda: not any(w.alive for w in self._workers), timeout=5)

    # -- metrics (any thread) -------------------------------------------------------------------------------
    def _snapshots(self) -> list[Snapshot]:
        """Every live acceptor's counters now (its last reported ones if it does not answer in time)."""
        with self._changed:
            self._asked += 1
            asked, live = self._asked, [w for w in self._workers if w.alive]
        for worker in live:
            try:
                with worker.send_lock:
                    _send(worker.chan, ("metrics", asked))
            except OSError:
                pass
        deadline = time.monotonic() + METRICS_TIMEOUT_S
        with self._changed:
            self._changed.wait_for(lambda: all(asked in w.replies or not w.alive for w in live),
                                   timeout=max(0.0, deadline - time.monotonic()))
            out = [w.replies.pop(asked, w.last) for w in live if w.alive]
            for w in live:  # answers that came too late for an earlier scrape
                w.replies = {k: v for k, v in w.replies.items() if k > asked}
        return out


# -- the acceptor's side ------------------------------------------------------------------------------------------
def _die_with(parent: int) -> None:
    """Linux: the kernel kills this process when the gateway's supervisor thread's process dies (even by kill -9)."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            log.warning("dicom: prctl(PR_SET_PDEATHSIG) failed (errno %d); this acceptor exits when its channel to "
                        "the gateway closes instead", ctypes.get_errno())
    if os.getppid() != parent:  # the gateway died before the line above took effect
        os._exit(1)


class _OwnLanding:
    """An acceptor's landing: its own segment log in landing/dicom (no other process writes its files)."""

    def __init__(self, spec: WorkerSpec, metrics: Metrics):
        from pathlib import Path

        from pipelines.gateway.segments import SegmentLog

        self.log = SegmentLog(Path(spec.folder), FEED, fsync=spec.fsync, segment_bytes=spec.segment_bytes,
                              segment_age_s=spec.segment_age_s, group_commit_s=spec.group_commit_s,
                              on_fsync=lambda s, _n, _b: metrics.observe_fsync(FEED, s),
                              writer=f"scp{spec.index}").start()

    def land_from_thread(self, feed: str, header, body: bytes):
        return self.log.append(full_header(feed, header), body)


def _configure_logging(level: int) -> None:
    from pipelines.cli import _configure_logging as configure

    configure(verbose=level <= logging.DEBUG, quiet=level >= logging.WARNING)


def serve_acceptor(chan: socket.socket) -> int:
    """An acceptor process's life: serve the connections handed over until told to stop (or the gateway is gone)."""
    from pipelines.gateway import dicom

    message, _ = _receive(chan)
    if message is None or message[0] != "spec":
        return 1
    spec: WorkerSpec = message[1]
    _configure_logging(spec.log_level)
    sys.setswitchinterval(0.0002)  # as the gateway: the landing writer hands each fsync back through the GIL
    metrics = Metrics()
    landing = _OwnLanding(spec, metrics)
    sending = threading.Lock()

    def tell(*msg) -> None:
        try:
            with sending:
                _send(chan, msg)
        except OSError:  # the gateway is gone: nothing to tell
            pass

    server = dicom.DicomServer(landing, metrics, spec.settings, on_close=lambda: tell("closed"))
    server.serve_handed(spec.address)
    tell("ready")
    stop_in = 0.0
    while True:
        try:
            message, fds = _receive(chan)
        except OSError:
            message, fds = None, []
        if message is None:  # the gateway is gone without a stop (kill -9 where PDEATHSIG is not available)
            os._exit(1)
        if message[0] == "conn":
            sock = socket.socket(fileno=fds[0])
            sock.setblocking(True)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a C-STORE-RSP goes out at once
            server.take(sock, tuple(message[1]))
        elif message[0] == "metrics":
            tell("metrics", message[1], metrics.snapshot())
        elif message[0] == "stop":
            stop_in = message[1]
            break
    server.stop(time.monotonic() + stop_in)
    landing.log.close()  # writes what is queued, seals the open segment
    tell("stopped", metrics.snapshot())
    return 0


def main(argv: list[str]) -> int:
    chan_fd, parent = int(argv[0]), int(argv[1])
    _die_with(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C reaches the gateway, which stops us in order
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # likewise a process-group SIGTERM
    return serve_acceptor(socket.socket(fileno=chan_fd))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
