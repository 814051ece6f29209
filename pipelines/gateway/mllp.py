"""HL7 v2 over MLLP: frames in, durable landing, then the acknowledgement.

Each frame (0x0B … 0x1C 0x0D) is landed byte for byte before anything is sent back. A message whose
header reads cleanly gets MSA `AA` echoing its MSH-10. One whose header is damaged still lands, with
its status, and gets `AE` (the header names the message but a required field is wrong) or `AR` (no
usable MSH at all) with an ERR segment saying what is wrong. FHS/BHS batches land as one record and
are answered with a batch of acknowledgements, one per message. A connection that closes mid-frame
is logged and counted; that message was never acknowledged, so its sender resends it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime

from bronze.hl7_wire import (
    DEFAULT_ENCODING,
    MLLP_END,
    MLLP_START,
    Header,
    Hl7HeaderError,
    frame,
    parse_header,
    split_messages,
)
from pipelines.gateway.landing import LandingZone
from pipelines.gateway.metrics import Metrics

log = logging.getLogger("carelake.gateway")

FEED = "hl7"
# Bytes with no MLLP start block before them: this many (or a whole segment) and they are answered and set aside.
UNFRAMED_LIMIT = 64 * 1024
# A frame at least this large is checked and answered on a worker thread, so that one sender's big batch never
# holds up the ACKs of the others (the event loop keeps serving while the thread parses).
OFFLOAD_BYTES = 64 * 1024
RECEIVER_APP = "CARELAKE"
RECEIVER_FACILITY = "LAKEHOUSE"
_TEXT = "iso-8859-1"


@dataclass(frozen=True)
class Verdict:
    """How one message is answered: AA/AE/AR, and for negatives the table-0357 code and the reason."""

    header: Header | None
    code: str
    error_code: str | None = None
    reason: str | None = None

    @property
    def status(self) -> str:
        return {"AA": "accepted", "AE": "error", "AR": "rejected"}[self.code]


def judge(message: bytes) -> Verdict:
    try:
        return Verdict(parse_header(message), "AA")
    except Hl7HeaderError as exc:
        # A header that names the message (MSH present) but lacks a required field is an application
        # error (AE); with no usable MSH there is nothing to acknowledge against, so it is rejected (AR).
        return Verdict(exc.header, "AE" if exc.header is not None else "AR", exc.code, exc.text)


def escape(text: str, field_sep: str, encoding: str) -> str:
    """HL7 escape sequences for our own text placed in a field (\\F\\ \\S\\ \\T\\ \\R\\ \\E\\)."""
    enc = (encoding + DEFAULT_ENCODING[len(encoding):])[:4]
    component, repetition, esc, sub = enc[0], enc[1], enc[2], enc[3]
    out = []
    for ch in text:
        if ch == esc:
            out.append(f"{esc}E{esc}")
        elif ch == field_sep:
            out.append(f"{esc}F{esc}")
        elif ch == component:
            out.append(f"{esc}S{esc}")
        elif ch == sub:
            out.append(f"{esc}T{esc}")
        elif ch == repetition:
            out.append(f"{esc}R{esc}")
        elif ch in "\r\n":
            out.append(" ")
        else:
            out.append(ch)
    return "".join(out)


_ACK_IDS = itertools.count(1)
_ACK_PREFIX = uuid.uuid4().hex[:8].upper()  # per process, so ids stay unique across gateway restarts


def _next_ack_id() -> str:
    return f"{_ACK_PREFIX}{next(_ACK_IDS)}"


_ts_cache: list = [-1, ""]


def _now_ts() -> str:
    """HL7 TS of now (ms, UTC); the formatted second is reused across the many ACKs sent within it."""
    now = time.time()
    second = int(now)
    if second != _ts_cache[0]:
        _ts_cache[:] = [second, datetime.fromtimestamp(second, tz=UTC).strftime("%Y%m%d%H%M%S")]
    return f"{_ts_cache[1]}.{int((now - second) * 1000):03d}+0000"


def build_ack(verdict: Verdict) -> bytes:
    """An ACK message for one verdict, in the sender's own delimiters when they are readable."""
    h = verdict.header
    sep = h.field_separator if h else "|"
    enc = h.encoding_characters if h else DEFAULT_ENCODING
    comp = enc[:1] or "^"
    trigger = h.trigger_event if h and h.segment == "MSH" else ""
    msh = sep.join([
        "MSH", enc, RECEIVER_APP, RECEIVER_FACILITY,
        h.sending_application if h else "", h.sending_facility if h else "",
        _now_ts(), "", comp.join(["ACK", trigger, "ACK"]) if trigger else "ACK",
        _next_ack_id(), (h.processing_id if h else "") or "P", (h.version if h else "") or "2.5",
    ])
    msa = [ "MSA", verdict.code, h.control_id if h else ""]
    segments = []
    if verdict.reason:
        text = escape(verdict.reason, sep, enc)
        msa.append(text)
        err = sep.join(["ERR", "", "", comp.join([verdict.error_code or "207", text[:80], "HL70357"]),
                        "E", "", "", "", text])
        segments.append(err)
    return ("\r".join([msh, sep.join(msa), *segments]) + "\r").encode(_TEXT, errors="replace")


def answer(message: bytes) -> tuple[bytes, list[Verdict]]:
    """The reply to one MLLP frame (an ACK, or a batch of ACKs) and the verdict on each message in it."""
    verdict = judge(message)
    head = verdict.header
    if head is None or head.segment == "MSH":
        return build_ack(verdict), [verdict]
    # FHS/BHS batch: one ACK per message inside, wrapped in the batch's own envelope.
    verdicts = [judge(message[o:o + n]) for o, n in split_messages(message)]
    if not verdicts:
        verdicts = [Verdict(None, "AR", "100", f"{head.segment} batch holds no messages")]
    sep, enc = head.field_separator, head.encoding_characters
    envelope = sep.join([head.segment, enc, RECEIVER_APP, RECEIVER_FACILITY, head.sending_application,
                         head.sending_facility, _now_ts()])
    body = b"".join(build_ack(v) for v in verdicts)
    trailers = [f"BTS{sep}{len(verdicts)}"] + ([f"FTS{sep}1"] if head.segment == "FHS" else [])
    opening = [envelope] + ([envelope.replace("FHS", "BHS", 1)] if head.segment == "FHS" else [])
    reply = ("\r".join(opening) + "\r").encode(_TEXT) + body + ("\r".join(trailers) + "\r").encode(_TEXT)
    return reply, verdicts


def _record_status(verdicts: list[Verdict]) -> tuple[str, str | None]:
    worst = max(verdicts, key=lambda v: ("AA", "AE", "AR").index(v.code)) if verdicts else None
    if worst is None:
        return "rejected", "batch holds no messages"
    return worst.status, worst.reason


class MllpServer:
    """asyncio protocol handler: many concurrent connections, one landing log."""

    def __init__(self, landing: LandingZone, metrics: Metrics, *, max_bytes: int, idle_timeout_s: float):
        self.landing = landing
        self.metrics = metrics
        self.max_bytes = max_bytes
        self.idle_timeout_s = idle_timeout_s
        self.connections = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task] = set()

    async def close_connections(self, timeout_s: float = 10) -> None:
        """On shutdown, after everything received has landed and been answered: close, let handlers end."""
        for writer in list(self._writers):
            writer.close()
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=timeout_s)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer_addr = writer.get_extra_info("peername")
        peer = f"{peer_addr[0]}:{peer_addr[1]}" if peer_addr else "unknown"
        self.connections += 1
        self._writers.add(writer)
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        self.metrics.set("carelake_gateway_open_connections", self.connections)
        buf = bytearray()
        try:
            while True:
                try:
                    async with asyncio.timeout(self.idle_timeout_s):
                        data = await reader.read(1 << 16)
                except TimeoutError:
                    log.info("mllp %s: idle for %.0f s, closing", peer, self.idle_timeout_s)
                    break
                if not data:
                    if bytes(buf).strip(b"\r\n\t \x00"):
                        self.metrics.inc("carelake_gateway_incomplete_frames_total")
                        log.warning("mllp %s: connection closed mid-frame; %d byte(s) never acknowledged "
                                    "(the sender must resend)", peer, len(buf))
                    break
                buf += data
                frames, aside, overflow, unframed = self._frames(buf)
                if aside:
                    await self._set_aside(aside, peer, unframed=unframed)
                if frames:
                    await self._answer(frames, peer, writer)
                if unframed:
                    await self._refuse_unframed(aside[-1], peer, writer)
                    break
                if overflow is not None:
                    await self._refuse_oversized(overflow, peer, writer)
                    break
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            log.info("mllp %s: connection lost: %s", peer, exc)
        finally:
            self._writers.discard(writer)
            self._handlers.discard(task)
            self.connections -= 1
            self.metrics.set("carelake_gateway_open_connections", self.connections)
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass

    def _frames(self, buf: bytearray) -> tuple[list[bytes], list[bytes], bytes | None, bool]:
        """Cut every complete frame out of `buf`.

        Returns (frames, set_aside, oversized, unframed): `set_aside` are parts that can never be a message: a frame
        cut off by a new start block (the block MLLP forbids inside a message ends the unfinished frame) and bytes
        before a start block; `oversized` an oversized partial frame; `unframed` whether the last of set_aside is a
        message sent without MLLP framing (no start block at all, a whole segment or 64 KiB of it received): the
        sender is waiting for an answer that framing would have given."""
        frames: list[bytes] = []
        aside: list[bytes] = []
        while True:
            start = buf.find(MLLP_START)
            if start < 0:
                if len(buf) > self.max_bytes:  # no frame start in a flood of bytes: not MLLP at all
                    return frames, aside, bytes(buf[:self.max_bytes]), False
                junk = bytes(buf).strip(b"\r\n\t \x00")
                if junk and (b"\r" in junk or b"\n" in junk or len(junk) >= UNFRAMED_LIMIT):
                    aside.append(bytes(buf))
                    del buf[:]
                    return frames, aside, None, True
                return frames, aside, None, False
            if start and bytes(buf[:start]).strip(b"\r\n\t \x00"):
                aside.append(bytes(buf[:start]))
            end = buf.find(MLLP_END, start + 1)
            restart = buf.find(MLLP_START, start + 1, end if end >= 0 else len(buf))
            if restart >= 0:  # a new frame began before this one ended: this one is incomplete
                aside.append(bytes(buf[start:restart]))
                del buf[:restart]
                continue
            if (end if end >= 0 else len(buf)) - start - 1 > self.max_bytes:
                return frames, aside, bytes(buf[start + 1:start + 1 + self.max_bytes]), False
            if end < 0:
                if start:
                    del buf[:start]
                return frames, aside, None, False
            frames.append(bytes(buf[start + 1:end]))
            del buf[:end + len(MLLP_END)]

    async def _set_aside(self, parts: list[bytes], peer: str, *, unframed: bool) -> None:
        """Keep what can never be a message in landing/_rejects, count it and say so once per part; never ACK it."""
        for i, part in enumerate(parts):
            last_unframed = unframed and i == len(parts) - 1
            if last_unframed:
                reason = ("bytes outside an MLLP frame (no start block 0x0B before them); frame each message as"
                          " 0x0B <message> 0x1C 0x0D")
                kind = "unframed"
            elif part.startswith(MLLP_START):
                reason = ("incomplete MLLP frame: a new start block (0x0B) arrived before its end block"
                          " (0x1C 0x0D); never acknowledged, the sender must resend it")
                kind = "incomplete"
            else:
                reason = "bytes outside an MLLP frame (before a start block 0x0B); never acknowledged"
                kind = "unframed"
            self.metrics.inc("carelake_gateway_incomplete_frames_total" if kind == "incomplete"
                             else "carelake_gateway_unframed_total")
            kept = part[:self.max_bytes]
            try:
                await self.landing.reject(FEED, {"peer": peer, "protocol": "mllp", "reason": reason}, kept)
            except (OSError, RuntimeError) as exc:
                log.error("mllp %s: %s; it could not be kept: %s", peer, reason, exc)
                continue
            log.warning("mllp %s: %s (%d byte(s) kept in landing/_rejects/%s)", peer, reason, len(kept), FEED)

    async def _refuse_unframed(self, part: bytes, peer: str, writer: asyncio.StreamWriter) -> None:
        """Answer a message sent without MLLP framing with a framed AR (so a waiting sender learns why), then close."""
        try:
            header = parse_header(part.strip(b"\r\n\t \x00"))
        except Hl7HeaderError as exc:
            header = exc.header
        self.metrics.inc("carelake_gateway_acks_total", code="AR")
        writer.write(frame(build_ack(Verdict(header, "AR", "207", "message not framed as MLLP (0x0B <message>"
                                                                   " 0x1C 0x0D); closing the connection"))))
        await writer.drain()

    async def _answer(self, frames: list[bytes], peer: str, writer: asyncio.StreamWriter) -> None:
        # Land every frame that arrived together first (one group commit), then acknowledge in order.
        pending = []
        counts: Counter[tuple[str, tuple[tuple[str, str], ...]]] = Counter()
        for message in frames:
            reply, verdicts = await asyncio.to_thread(answer, message) if len(message) >= OFFLOAD_BYTES else \
                answer(message)
            status, reason = _record_status(verdicts)
            header = {"peer": peer, "protocol": "mllp", "status": status}
            if reason:
                header["reason"] = reason
            pending.append((reply, verdicts, status, self.landing.land(FEED, header, message)))
        counts["carelake_gateway_received_total", (("feed", FEED), ("protocol", "mllp"))] += len(frames)
        counts["carelake_gateway_bytes_total", (("feed", FEED),)] += sum(len(m) for m in frames)
        for reply, verdicts, status, landing in pending:
            try:
                await landing
            except (OSError, RuntimeError) as exc:
                # Not on disk (a write error, or the gateway is shutting down): never acknowledge positively.
                # AE with 207 "cannot store" tells the sender to resend later.
                counts["carelake_gateway_write_errors_total", ()] += 1
                reply = b"".join(build_ack(Verdict(v.header, "AE", "207", f"gateway cannot store the message: {exc}"))
                                 for v in verdicts)
                verdicts = [Verdict(v.header, "AE") for v in verdicts]
            else:
                counts["carelake_gateway_landed_total", (("feed", FEED), ("status", status))] += 1
                if status != "accepted":
                    counts["carelake_gateway_rejected_total", (("feed", FEED), ("reason", status))] += 1
            for v in verdicts:
                counts["carelake_gateway_acks_total", (("code", v.code),)] += 1
            writer.write(frame(reply))
        self.metrics.add(counts)
        await writer.drain()

    async def _refuse_oversized(self, partial: bytes, peer: str, writer: asyncio.StreamWriter) -> None:
        limit_mb = self.max_bytes / (1 << 20)
        reason = f"frame exceeds gateway.max_message_mb ({limit_mb:g} MB); first {len(partial):,} bytes kept"
        try:
            header = parse_header(partial)
        except Hl7HeaderError as exc:
            header = exc.header
        verdict = Verdict(header, "AR", "207", reason)
        try:
            await self.landing.reject(FEED, {"peer": peer, "protocol": "mllp", "reason": reason}, partial)
        except OSError as exc:
            log.error("mllp %s: oversized frame could not be kept: %s", peer, exc)
        self.metrics.inc("carelake_gateway_rejected_total", feed=FEED, reason="too_large")
        self.metrics.inc("carelake_gateway_acks_total", code="AR")
        log.warning("mllp %s: %s; closing the connection", peer, reason)
        writer.write(frame(build_ack(verdict)))
        await writer.drain()
