"""One gateway process: the MLLP listener and the HTTP server on one asyncio loop, one landing zone.

`Gateway` is usable from tests and benchmarks (start on port 0, read the chosen ports, stop); `serve`
is what `carelake gateway` runs: it prints the ports on its first line of output, runs until SIGINT
or SIGTERM, then stops accepting, lets in-flight messages finish landing, and seals open segments.

A stop is bounded by `gateway.shutdown_timeout` whatever the clients do: uploads and frames still
arriving get the first half of it, then are cut off unacknowledged (a slow sender cannot hold the
stop, as it held aiohttp's default 60 s); what arrived whole lands and is answered in the second half.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from dataclasses import dataclass

from aiohttp import web

from pipelines.config import Config, check_ae_title
from pipelines.errors import ConfigError, UsageError
from pipelines.gateway import http, mllp
from pipelines.gateway.landing import LandingZone
from pipelines.gateway.metrics import Metrics
from pipelines.gateway.security import Policy

log = logging.getLogger("carelake.gateway")

SWITCH_INTERVAL_S = 0.0002
# How a stop spends gateway.shutdown_timeout: uploads still arriving may finish in the first share; what arrived
# whole is landed and answered by the end of the second; aiohttp's own shutdown (idle connections) gets the rest.
SHUTDOWN_SHARES = (0.5, 0.4, 0.1)
# Connections the kernel may hold for each listener before the gateway accepts them (capped by net.core.somaxconn).
# With asyncio's 100 and aiohttp's 128, a burst of a few hundred connects (slow clients arriving together) filled the
# queue, and a well-behaved client's connect was dropped and retried by TCP a second later.
LISTEN_BACKLOG = 1024
FEEDS = (mllp.FEED, http.FHIR_FEED, http.DEVICE_FEED, http.DICOM_FEED, http.X12_FEED)


# Feeds served only when landing.feeds lists them (a lakehouse without imaging or claims keeps its gateway).
OPTIONAL_FEEDS = (http.DICOM_FEED, http.X12_FEED)


def served_feeds(cfg: Config, dicom_on: bool) -> tuple[str, ...]:
    """The feeds this gateway lands: DICOM (STOW-RS, and C-STORE when on) and X12 (POST /x12) when landing.feeds
    lists them; C-STORE asked for without the dicom feed is a configuration error."""
    if dicom_on and http.DICOM_FEED not in cfg.landing.feeds:
        raise UsageError("--dicom-port needs the dicom feed in landing.feeds (conf/base.yaml lists it by default)")
    return tuple(f for f in FEEDS if f not in OPTIONAL_FEEDS or f in cfg.landing.feeds)


@dataclass(frozen=True)
class Addresses:
    host: str
    mllp_port: int
    http_port: int
    dicom_port: int | None = None  # None: the Storage SCP is off
    tls: bool = False  # MLLP over TLS and HTTPS

    def line(self, landing: str) -> str:
        served = "off" if self.dicom_port is None else f"{self.host}:{self.dicom_port}"
        scheme = "https" if self.tls else "http"
        return (f"carelake gateway: mllp={self.host}:{self.mllp_port} http={scheme}://{self.host}:{self.http_port} "
                f"dicom={served} landing={landing}{' tls=on' if self.tls else ''}")


def _dicom_server(cfg: Config, ae_title: str | None, landing: LandingZone, metrics: Metrics):
    """The Storage SCP (pynetdicom and pydicom are imported only by a gateway that serves C-STORE)."""
    from pipelines.gateway import dicom

    d = cfg.gateway.dicom
    try:
        title = check_ae_title(d.ae_title if ae_title is None else ae_title, "--ae-title")
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    settings = dicom.DicomSettings(ae_title=title, calling_ae_titles=d.calling_ae_titles,
                                   any_sop_class=d.any_sop_class, max_instance_bytes=d.max_instance_mb << 20,
                                   max_associations=d.max_associations, store_timeout_s=d.store_timeout_s)
    if d.workers:
        from pipelines.gateway.dicom_workers import DicomWorkers

        return DicomWorkers(landing, metrics, settings, d.workers)
    return dicom.DicomServer(landing, metrics, settings)


class Gateway:
    def __init__(self, cfg: Config, *, host: str | None = None, mllp_port: int | None = None,
                 http_port: int | None = None, dicom_port: int | None = None, ae_title: str | None = None):
        g = cfg.gateway
        self.cfg = cfg
        self.host = host or g.host
        self.mllp_port = g.mllp_port if mllp_port is None else mllp_port
        self.http_port = g.http_port if http_port is None else http_port
        # --dicom-port turns the Storage SCP on; without it, gateway.dicom.enabled decides.
        self.dicom_port = dicom_port if dicom_port is not None else g.dicom.port if g.dicom.enabled else None
        ports = [("--mllp-port", self.mllp_port), ("--http-port", self.http_port)]
        for name, port in ports + ([("--dicom-port", self.dicom_port)] if self.dicom_port is not None else []):
            if not 0 <= port <= 65535:
                raise UsageError(f"{name} must be a TCP port 0-65535 (0 = pick a free one), got {port}")
        self.metrics = Metrics()
        self.policy = Policy.of(g.security, self.host)
        self.feeds = served_feeds(cfg, self.dicom_port is not None)
        self.landing = LandingZone(cfg, self.feeds, self.metrics)
        max_bytes, keep_bytes = g.max_message_mb << 20, g.reject_keep_kb << 10
        self.mllp = mllp.MllpServer(self.landing, self.metrics, max_bytes=max_bytes, idle_timeout_s=g.idle_timeout_s,
                                    frame_timeout_s=g.frame_timeout_s, max_batch=g.max_batch_messages,
                                    keep_bytes=keep_bytes, policy=self.policy)
        self.http = http.HttpGateway(self.landing, self.metrics, max_bytes=max_bytes, body_timeout_s=g.body_timeout_s,
                                     keep_bytes=keep_bytes, stow=http.DICOM_FEED in self.feeds,
                                     x12=http.X12_FEED in self.feeds,
                                     max_parts=g.max_batch_messages, policy=self.policy)
        self.dicom = None if self.dicom_port is None else _dicom_server(cfg, ae_title, self.landing, self.metrics)
        self._mllp_server: asyncio.Server | None = None
        self._runner: web.AppRunner | None = None

    async def start(self) -> Addresses:
        self.landing.open()
        for r in self.landing.recovered:
            log.warning("recovered landing segment %s (%d record(s), %d torn byte(s))", r.segment, r.records,
                        r.torn_bytes)
        try:
            g = self.cfg.gateway
            tls = self.policy.context("mllp", self.metrics)
            self._mllp_server = await asyncio.start_server(
                self.mllp.handle, self.host, self.mllp_port, limit=1 << 20, backlog=LISTEN_BACKLOG, ssl=tls,
                ssl_handshake_timeout=g.header_timeout_s if tls else None)
            self._runner = web.AppRunner(
                self.http.app(), access_log=None, handle_signals=False, logger=http.ServerLog(self.metrics),
                # aiohttp's keep-alive timer runs from a connection's opening (or its last answer) until a request
                # head is whole, bytes arriving or not: the header timeout (and the idle keep-alive bound).
                keepalive_timeout=g.header_timeout_s,
                # Never "linger" reading and dropping the rest of a refused body (aiohttp's default: 10 s of it).
                lingering_time=0,
                # By the time aiohttp shuts down (stop, below), every request in progress has been answered.
                shutdown_timeout=g.shutdown_timeout_s * SHUTDOWN_SHARES[2])
            await self._runner.setup()
            site = web.TCPSite(self._runner, self.host, self.http_port, backlog=LISTEN_BACKLOG,
                               ssl_context=self.policy.context("http", self.metrics))
            await site.start()
            dicom_port = None if self.dicom is None else self.dicom.start(self.host, self.dicom_port)
        except OSError as exc:
            await self.stop()
            dicom_part = "" if self.dicom is None else f", dicom {self.dicom_port}"
            raise UsageError(f"cannot listen on {self.host} (mllp {self.mllp_port}, http {self.http_port}"
                             f"{dicom_part}): {exc.strerror or exc}; choose free ports with --mllp-port/--http-port"
                             f"{'/--dicom-port' if dicom_part else ''} (0 picks one)") from None
        self.policy.warn(self.host)
        mllp_port = self._mllp_server.sockets[0].getsockname()[1]
        http_port = self._runner.addresses[0][1]
        return Addresses(self.host, mllp_port, http_port, dicom_port, tls=self.policy.tls)

    async def stop(self) -> None:
        """Stop accepting, answer what arrived whole, cut off what is still arriving, seal: within shutdown_timeout."""
        loop = asyncio.get_running_loop()
        bound = self.cfg.gateway.shutdown_timeout_s
        began = loop.time()
        cut_at, answered_by = began + bound * SHUTDOWN_SHARES[0], began + bound * sum(SHUTDOWN_SHARES[:2])
        if self._mllp_server is not None:
            self._mllp_server.close()
        if self._runner is not None:
            for site in list(self._runner.sites):
                await site.stop()
        self.http.cut_reads(cut_at)
        self.mllp.cut_reads(cut_at)
        # The SCP's association threads land through this loop: it keeps running while they finish.
        dicom_stop = None if self.dicom is None else loop.run_in_executor(
            None, self.dicom.stop, time.monotonic() + (answered_by - loop.time()))
        await asyncio.gather(self.http.drain(answered_by), self.mllp.drain(answered_by))
        if dicom_stop is not None:
            await dicom_stop
        if self._runner is not None:
            await self._runner.cleanup()  # closes the idle keep-alive connections
            self._runner = None
        if self._mllp_server is not None:
            await self._mllp_server.wait_closed()
            self._mllp_server = None
        await loop.run_in_executor(None, self.landing.close)


def serve(cfg: Config, *, host: str | None = None, mllp_port: int | None = None,
          http_port: int | None = None, dicom_port: int | None = None, ae_title: str | None = None) -> int:
    """Run the gateway until SIGINT/SIGTERM; print the chosen ports on the first output line."""

    # The landing writer threads hand each fsync result back through the GIL; Python's default 5 ms
    # switch interval would add up to 5 ms to every acknowledgement while the event loop is busy.
    sys.setswitchinterval(SWITCH_INTERVAL_S)

    async def main() -> None:
        gateway = Gateway(cfg, host=host, mllp_port=mllp_port, http_port=http_port, dicom_port=dicom_port,
                          ae_title=ae_title)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        addresses = await gateway.start()
        print(addresses.line(str(gateway.landing.root)), flush=True)
        try:
            await stop.wait()
        finally:
            log.info("stopping: no new connections; landing what is in flight and sealing segments")
            began = loop.time()
            await gateway.stop()
            log.info("stopped in %.2f s (gateway.shutdown_timeout %s)", loop.time() - began,
                     cfg.gateway.shutdown_timeout)
        m = gateway.metrics
        received = sum(m.get("carelake_gateway_received_total", feed=f, protocol=p)
                       for f in gateway.feeds for p in ("mllp", "http", "dimse"))
        print(f"carelake gateway stopped: {received:,.0f} message(s)/bodies received", flush=True)

    asyncio.run(main())
    return 0
