"""One gateway process: the MLLP listener and the HTTP server on one asyncio loop, one landing zone.

`Gateway` is usable from tests and benchmarks (start on port 0, read the chosen ports, stop); `serve`
is what `carelake gateway` runs: it prints the ports on its first line of output, runs until SIGINT
or SIGTERM, then stops accepting, lets in-flight messages finish landing, and seals open segments.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from dataclasses import dataclass

from aiohttp import web

from pipelines.config import Config
from pipelines.errors import UsageError
from pipelines.gateway import http, mllp
from pipelines.gateway.landing import LandingZone
from pipelines.gateway.metrics import Metrics

log = logging.getLogger("carelake.gateway")

SWITCH_INTERVAL_S = 0.0002
FEEDS = (mllp.FEED, http.FHIR_FEED, http.DEVICE_FEED)


@dataclass(frozen=True)
class Addresses:
    host: str
    mllp_port: int
    http_port: int

    def line(self, landing: str) -> str:
        return (f"carelake gateway: mllp={self.host}:{self.mllp_port} http=http://{self.host}:{self.http_port} "
                f"landing={landing}")


class Gateway:
    def __init__(self, cfg: Config, *, host: str | None = None, mllp_port: int | None = None,
                 http_port: int | None = None):
        g = cfg.gateway
        self.cfg = cfg
        self.host = host or g.host
        self.mllp_port = g.mllp_port if mllp_port is None else mllp_port
        self.http_port = g.http_port if http_port is None else http_port
        for name, port in (("--mllp-port", self.mllp_port), ("--http-port", self.http_port)):
            if not 0 <= port <= 65535:
                raise UsageError(f"{name} must be a TCP port 0-65535 (0 = pick a free one), got {port}")
        self.metrics = Metrics()
        self.landing = LandingZone(cfg, FEEDS, self.metrics)
        max_bytes = g.max_message_mb << 20
        self.mllp = mllp.MllpServer(self.landing, self.metrics, max_bytes=max_bytes,
                                    idle_timeout_s=g.idle_timeout_s)
        self.http = http.HttpGateway(self.landing, self.metrics, max_bytes=max_bytes)
        self._mllp_server: asyncio.Server | None = None
        self._runner: web.AppRunner | None = None

    async def start(self) -> Addresses:
        self.landing.open()
        for r in self.landing.recovered:
            log.warning("recovered landing segment %s (%d record(s), %d torn byte(s))", r.segment, r.records,
                        r.torn_bytes)
        try:
            self._mllp_server = await asyncio.start_server(self.mllp.handle, self.host, self.mllp_port,
                                                           limit=1 << 20)
            self._runner = web.AppRunner(self.http.app(), access_log=None, handle_signals=False)
            await self._runner.setup()
            site = web.TCPSite(self._runner, self.host, self.http_port)
            await site.start()
        except OSError as exc:
            await self.stop()
            raise UsageError(f"cannot listen on {self.host} (mllp {self.mllp_port}, http {self.http_port}): "
                             f"{exc.strerror or exc}; choose free ports with --mllp-port/--http-port "
                             "(0 picks one)") from None
        mllp_port = self._mllp_server.sockets[0].getsockname()[1]
        http_port = self._runner.addresses[0][1]
        return Addresses(self.host, mllp_port, http_port)

    async def stop(self) -> None:
        if self._mllp_server is not None:
            self._mllp_server.close()
            await self._mllp_server.wait_closed()
            self._mllp_server = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await asyncio.get_running_loop().run_in_executor(None, self.landing.close)
        await self.mllp.close_connections()


def serve(cfg: Config, *, host: str | None = None, mllp_port: int | None = None,
          http_port: int | None = None) -> int:
    """Run the gateway until SIGINT/SIGTERM; print the chosen ports on the first output line."""

    # The landing writer threads hand each fsync result back through the GIL; Python's default 5 ms
    # switch interval would add up to 5 ms to every acknowledgement while the event loop is busy.
    sys.setswitchinterval(SWITCH_INTERVAL_S)

    async def main() -> None:
        gateway = Gateway(cfg, host=host, mllp_port=mllp_port, http_port=http_port)
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
            await gateway.stop()
        m = gateway.metrics
        received = sum(m.get("carelake_gateway_received_total", feed=f, protocol=p)
                       for f in FEEDS for p in ("mllp", "http"))
        print(f"carelake gateway stopped: {received:,.0f} message(s)/bodies received", flush=True)

    asyncio.run(main())
    return 0
