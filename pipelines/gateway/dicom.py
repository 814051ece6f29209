"""DICOM C-STORE: a pynetdicom Storage SCP beside MLLP and HTTP, landing each instance before it says Success.

pynetdicom runs each association on its own thread; the C-STORE handler takes the data set exactly as the peer
sent it (the bytes in the negotiated transfer syntax, never decoded), puts the File Meta Information in front
of it (`part10_prefix`) to make a Part 10 file, and appends that to the `dicom` feed's landing segments. It
blocks until the segment's group commit has been fsynced, and only then answers 0x0000 Success. Anything else
(a write or fsync error, the gateway stopping, an instance over `gateway.dicom.max_instance_mb`) answers 0xA700
Out of Resources: the modality keeps the instance and sends it again. The handler never raises, and pynetdicom
keeps every association's errors to that association, so a bad peer never takes the gateway down. With
`gateway.dicom.workers` the SCP runs in acceptor processes behind the gateway's port (`dicom_workers.py`).

The SCP accepts every standard storage SOP class in the transfer syntaxes below; with `gateway.dicom.any_sop_class`
also private and unknown SOP classes (vendor raw data), in the first transfer syntax the sender proposes.
An allow-list of calling AE titles (`gateway.dicom.calling_ae_titles`) makes pynetdicom reject other peers'
associations (A-ASSOCIATE-RJ, "calling AE title not recognised"); an empty list accepts any calling AE title.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Protocol

from pynetdicom import (
    AE,
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    AllStoragePresentationContexts,
    _config,
    evt,
)
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from pipelines.gateway.metrics import Metrics
from pipelines.gateway.segments import Landed

log = logging.getLogger("carelake.gateway")

FEED = "dicom"
# The largest PDU we tell peers to send: a 512x512 CT slice in one, far fewer PDUs than pynetdicom's 16 KB default.
MAX_PDU_BYTES = 4 << 20
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
# The transfer syntaxes accepted for every storage SOP class: uncompressed (implicit/explicit little endian,
# explicit big endian, deflate) and the compressed ones modalities send (JPEG baseline/extended/lossless, JPEG-LS,
# JPEG 2000, RLE). Nothing is decoded on the way in, so accepting a syntax costs nothing.
TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2",        # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",      # Explicit VR Little Endian
    "1.2.840.10008.1.2.1.99",   # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",      # Explicit VR Big Endian (retired, still sent)
    "1.2.840.10008.1.2.4.50",   # JPEG Baseline (8 bit)
    "1.2.840.10008.1.2.4.51",   # JPEG Extended (12 bit)
    "1.2.840.10008.1.2.4.57",   # JPEG Lossless
    "1.2.840.10008.1.2.4.70",   # JPEG Lossless, first-order prediction (SV1)
    "1.2.840.10008.1.2.4.80",   # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",   # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",   # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",   # JPEG 2000
    "1.2.840.10008.1.2.5",      # RLE Lossless
)


@dataclass(frozen=True)
class DicomSettings:
    ae_title: str
    calling_ae_titles: tuple[str, ...]
    any_sop_class: bool  # also private/unknown SOP classes, in the first transfer syntax proposed
    max_instance_bytes: int
    max_associations: int
    store_timeout_s: float  # how long a C-STORE waits for its fsync before answering Out of Resources


def _element(group_element: int, vr: bytes, value: bytes) -> bytes:
    """One File Meta element in explicit VR little endian (PS3.5 7.1.2): UL/UI/SH take a 2-byte length, OB 4."""
    tag = struct.pack("<HH", group_element >> 16, group_element & 0xFFFF)
    if vr == b"OB":
        return tag + vr + b"\0\0" + struct.pack("<I", len(value)) + value
    return tag + vr + struct.pack("<H", len(value)) + value


def _even(value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


_META_TAIL = (_element(0x00020012, b"UI", _even(PYNETDICOM_IMPLEMENTATION_UID, b"\0"))
              + _element(0x00020013, b"SH", _even(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")))


def part10_prefix(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """Preamble, "DICM" and File Meta Information for an instance received over C-STORE: the bytes pynetdicom's
    `Event.encoded_dataset()` puts in front of the data set (held equal by a test), built without pydicom (that
    took ~10% of an acceptor's CPU per instance)."""
    body = (_element(0x00020001, b"OB", b"\0\1") + _element(0x00020002, b"UI", _even(sop_class, b"\0"))
            + _element(0x00020003, b"UI", _even(sop_instance, b"\0"))
            + _element(0x00020010, b"UI", _even(transfer_syntax, b"\0")) + _META_TAIL)
    return b"\0" * 128 + b"DICM" + _element(0x00020000, b"UL", struct.pack("<I", len(body))) + body


class Lander(Protocol):
    """Where the SCP lands an instance: the gateway's `LandingZone`, or an acceptor process's own segment log."""

    def land_from_thread(self, feed: str, header: Mapping[str, Any], body: bytes) -> Future[Landed]: ...


def _peer(event) -> tuple[str, str, str]:
    """(address:port, calling AE title, called AE title) of the association an event belongs to."""
    a = event.assoc
    return f"{a.requestor.address}:{a.requestor.port}", a.requestor.ae_title, a.acceptor.ae_title


class _HandedServer(ThreadedAssociationServer):
    """pynetdicom's server for connections another process accepted and handed over: it binds and listens on
    nothing (`take` gives it each connection); everything else (negotiation, the allow-list, the handlers) is
    pynetdicom's own."""

    def server_bind(self) -> None:
        """Nothing to bind: the gateway's process holds the port."""

    def server_activate(self) -> None:
        """Nothing to listen on."""


class DicomServer:
    """The Storage SCP; `start` binds (port 0 = a free one) and returns the port, `stop` ends it within a bound.
    In an acceptor process (`dicom_workers`), `serve_handed` replaces `start` and `take` serves each connection
    the gateway hands over; `on_close` is told when one ends."""

    def __init__(self, landing: Lander, metrics: Metrics, settings: DicomSettings,
                 on_close: Callable[[], None] | None = None):
        self.landing = landing
        self.metrics = metrics
        self.settings = settings
        self.on_close = on_close
        self.ae = self._application_entity()
        self._server = None
        self._handed = False
        self._in_flight = 0
        self._idle = threading.Condition()
        self._stopping = False

    @staticmethod
    def _route_pynetdicom_log() -> None:
        """pynetdicom's own warnings and errors (an association aborted, a PDU it cannot decode) into the gateway's
        log, where an operator looks; its per-message info lines stay out."""
        library = logging.getLogger("pynetdicom")
        library.setLevel(logging.WARNING)
        library.parent = log

    def _application_entity(self) -> AE:
        s = self.settings
        self._route_pynetdicom_log()
        _config.UNRESTRICTED_STORAGE_SERVICE = s.any_sop_class  # pynetdicom reads it per association (process-wide)
        # pynetdicom's "standard" handlers describe every PDU and DIMSE message for its debug log, a log the gateway
        # never shows (warnings and errors only): building those lines cost an acceptor ~5% of its CPU per instance.
        _config.LOG_HANDLER_LEVEL = "none"
        ae = AE(ae_title=s.ae_title)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, list(TRANSFER_SYNTAXES))
        ae.add_supported_context(Verification)  # C-ECHO: how a modality tests the connection
        ae.require_calling_aet = list(s.calling_ae_titles)
        ae.maximum_associations = s.max_associations
        ae.maximum_pdu_size = MAX_PDU_BYTES
        return ae

    def _handlers(self) -> list:
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_REJECTED, self._on_rejected),
                    (evt.EVT_ACCEPTED, self._count("accepted")), (evt.EVT_ABORTED, self._count("aborted"))]
        if self.on_close is not None:
            handlers.append((evt.EVT_CONN_CLOSE, lambda _event: self.on_close()))
        return handlers

    def start(self, host: str, port: int) -> int:
        self._server = self.ae.start_server((host, port), block=False, evt_handlers=self._handlers())
        return self._server.server_address[1]

    def serve_handed(self, address: tuple[str, int]) -> None:
        """Serve connections accepted elsewhere on `address` (the gateway's port), each given to `take`."""
        self._server = self.ae.make_server(address, evt_handlers=self._handlers(), server_class=_HandedServer)
        self._handed = True

    def take(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        """Serve one accepted connection (on its own association thread, as pynetdicom serves every one)."""
        self._server.process_request(sock, peer)

    def stop(self, deadline: float) -> None:
        """Stop accepting; let C-STOREs in progress land until `deadline` (time.monotonic), then abort the rest."""
        self._stopping = True
        if self._server is None:
            return
        if self._handed:  # never served forever: nothing to shut down but its unused socket
            self._server.server_close()
        else:
            self._server.shutdown()
        with self._idle:
            self._idle.wait_for(lambda: self._in_flight == 0, timeout=max(0.0, deadline - time.monotonic()))
        for assoc in list(self.ae.active_associations):
            assoc.abort()
        self._server = None

    # -- handlers (association threads) -------------------------------------------------------
    def _count(self, outcome: str):
        def count(_event) -> None:
            self.metrics.inc("carelake_gateway_dicom_associations_total", outcome=outcome)

        return count

    def _on_rejected(self, event) -> None:
        self.metrics.inc("carelake_gateway_dicom_associations_total", outcome="rejected")
        address, calling, _called = _peer(event)
        self.metrics.inc("carelake_gateway_rejected_total", feed=FEED, reason="association")
        log.info("dicom %s: association from calling AE %r rejected (not in gateway.dicom.calling_ae_titles)",
                 address, calling)

    def _on_store(self, event) -> int:
        with self._idle:
            self._in_flight += 1
        self.metrics.inc("carelake_gateway_in_flight", protocol="dimse")
        try:
            return self._store(event)
        except Exception:  # noqa: BLE001 - a bug here must cost one instance a retry, never the gateway
            log.exception("dicom: storing an instance failed unexpectedly; answered 0xA700 (the modality retries)")
            return OUT_OF_RESOURCES
        finally:
            self.metrics.inc("carelake_gateway_in_flight", -1, protocol="dimse")
            with self._idle:
                self._in_flight -= 1
                self._idle.notify_all()

    def _store(self, event) -> int:
        address, calling, called = _peer(event)
        request = event.request
        sop_class, sop_instance = str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID)
        transfer_syntax = str(event.context.transfer_syntax)
        # the data set as received, viewed in place (getvalue would copy its ~0.5 MB once more)
        body = part10_prefix(sop_class, sop_instance, transfer_syntax) + request.DataSet.getbuffer()
        self.metrics.inc("carelake_gateway_received_total", feed=FEED, protocol="dimse")
        self.metrics.inc("carelake_gateway_bytes_total", len(body), feed=FEED)
        if self._stopping:
            log.info("dicom %s (%s): the gateway is stopping; instance %s answered 0xA700 (resend)", address, calling,
                     sop_instance)
            return OUT_OF_RESOURCES
        if len(body) > self.settings.max_instance_bytes:
            self.metrics.inc("carelake_gateway_rejected_total", feed=FEED, reason="too-costly")
            log.error("dicom %s (%s): instance %s is %d bytes, over gateway.dicom.max_instance_mb (%d MB); answered "
                      "0xA700. Raise the limit to take it", address, calling, sop_instance, len(body),
                      self.settings.max_instance_bytes >> 20)
            return OUT_OF_RESOURCES
        header = {"peer": address, "protocol": "dimse", "calling_ae": calling, "called_ae": called,
                  "sop_class_uid": sop_class, "sop_instance_uid": sop_instance,
                  "transfer_syntax_uid": transfer_syntax, "status": "accepted"}
        try:
            self.landing.land_from_thread(FEED, header, body).result(timeout=self.settings.store_timeout_s)
        except (OSError, RuntimeError, FutureTimeout) as exc:
            self.metrics.inc("carelake_gateway_write_errors_total")
            log.error("dicom %s (%s): cannot land instance %s: %s; answered 0xA700 (the modality resends)", address,
                      calling, sop_instance, exc or type(exc).__name__)
            return OUT_OF_RESOURCES
        self.metrics.inc("carelake_gateway_landed_total", feed=FEED, status="accepted")
        return SUCCESS
