"""HL7 v2 over MLLP: frames in, durable landing, then the acknowledgement.

Each frame (0x0B … 0x1C 0x0D) is landed byte for byte before anything is sent back. A message whose
header reads cleanly gets MSA `AA` echoing its MSH-10. One whose header is damaged still lands, with
its status, and gets `AE` (the header names the message but a required field is wrong) or `AR` (no
usable MSH at all) with an ERR segment saying what is wrong. FHS/BHS batches land as one record and
are answered with a batch of acknowledgements, one per message. A connection that closes mid-frame
is logged and counted; that message was never acknowledged, so its sender resends it.

No sender holds up the others: a big frame is checked and answered on a worker thread (what stays on
the event loop is constant per frame, and a partial frame is searched only in the bytes that arrived
since the last read), a batch of more than `gateway.max_batch_messages` is refused whole (AR under its
batch envelope, kept in the rejects), and a frame must end within `gateway.frame_timeout` of its start
block or it is set aside unacknowledged and the connection closed.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from bronze.hl7_wire import (
    DEFAULT_ENCODING,
    MLLP_END,
    MLLP_START,
    Header,
    Hl7HeaderError,
    count_messages,
    frame,
    parse_header,
    split_messages,
)
from pipelines.gateway.landing import LandingZone
from pipelines.gateway.metrics import Metrics
from pipelines.gateway.security import OPEN, Policy, certificate_sender

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


@dataclass(frozen=True)
class Reply:
    """The answer to one frame and what becomes of the frame. Counts rather than per-message verdicts: a batch of
    100,000 messages must not leave 100,000 objects for the event loop to walk (or the garbage collector to scan)."""

    data: bytes  # an ACK, or a batch of ACKs
    codes: dict[str, int]  # how many ACKs of each code (AA, AE, AR) it holds
    status: str  # the landed record's status: accepted, error or rejected (the worst message's)
    reason: str | None = None
    refused: bool = False  # kept in landing/_rejects instead of landed (a batch over gateway.max_batch_messages)
    refusal: str = "too_many_messages"  # why it was refused (the rejected_total reason)


def _batch_reply(head: Header, acks: list[bytes]) -> bytes:
    """ACK messages wrapped in the batch's own envelope (FHS/BHS ... BTS/FTS)."""
    sep, enc = head.field_separator, head.encoding_characters
    envelope = sep.join([head.segment, enc, RECEIVER_APP, RECEIVER_FACILITY, head.sending_application,
                         head.sending_facility, _now_ts()])
    trailers = [f"BTS{sep}{len(acks)}"] + ([f"FTS{sep}1"] if head.segment == "FHS" else [])
    opening = [envelope] + ([envelope.replace("FHS", "BHS", 1)] if head.segment == "FHS" else [])
    head, tail = ("\r".join(opening) + "\r").encode(_TEXT), ("\r".join(trailers) + "\r").encode(_TEXT)
    return b"".join([head, *acks, tail])


_SEVERITY = {"AA": 0, "AE": 1, "AR": 2}


NOT_ALLOWED = "sender_not_allowed"


def _facility(h: Header | None) -> str:
    """MSH-4's namespace id (its first component, in the sender's own delimiters)."""
    if h is None:
        return ""
    return h.sending_facility.split((h.encoding_characters or "^")[0])[0].strip()


def refuse_facility(message: bytes, policy: Policy) -> Reply | None:
    """An AR refusal when the frame's sending facility (each message's, and a batch header's) is not allowed."""
    if not policy.facilities:
        return None
    verdict = judge(message)
    head = verdict.header
    headers = [head]
    if head is not None and head.segment != "MSH":
        headers += [judge(message[o:o + n]).header for o, n in split_messages(message)]
    bad = next((h for h in headers if not policy.facility_allowed(_facility(h))), None)
    if bad is None and head is not None:
        return None
    named = _facility(bad) or "none (no readable MSH-4)"
    reason = (f"sending facility {named} is not allowed to send here (gateway.security.sending_facilities); "
              "nothing of this message was accepted")
    refusal = build_ack(Verdict(head if head is not None and head.segment == "MSH" else None, "AR", "207", reason))
    data = refusal if head is None or head.segment == "MSH" else _batch_reply(head, [refusal])
    return Reply(data, {"AR": 1}, "rejected", reason, refused=True, refusal=NOT_ALLOWED)


def answer(message: bytes, max_batch: int, policy: Policy = OPEN) -> Reply:
    """The reply to one MLLP frame: an ACK, or for an FHS/BHS batch one ACK per message in the batch's envelope.
    A batch of more than `max_batch` messages is refused whole, with one AR saying so; so is a frame from a sending
    facility the policy does not allow."""
    refused = refuse_facility(message, policy)
    if refused is not None:
        return refused
    verdict = judge(message)
    head = verdict.header
    if head is None or head.segment == "MSH":
        return Reply(build_ack(verdict), {verdict.code: 1}, verdict.status, verdict.reason)
    if (count := count_messages(message)) > max_batch:  # counted without splitting: a refusal costs next to nothing
        reason = (f"{head.segment} batch holds {count:,} messages, more than gateway.max_batch_messages "
                  f"({max_batch:,}); send it split into smaller batches")
        refusal = build_ack(Verdict(None, "AR", "207", reason))
        return Reply(_batch_reply(head, [refusal]), {"AR": 1}, "rejected", reason, refused=True)
    parts = split_messages(message)
    codes: Counter[str] = Counter()
    worst: Verdict | None = None
    acks = []
    for o, n in parts:
        v = judge(message[o:o + n])
        if worst is None or _SEVERITY[v.code] > _SEVERITY[worst.code]:
            worst = v
        codes[v.code] += 1
        acks.append(build_ack(v))
    if worst is None:
        worst = Verdict(None, "AR", "100", f"{head.segment} batch holds no messages")
        codes[worst.code] += 1
        acks.append(build_ack(worst))
    return Reply(_batch_reply(head, acks), dict(codes), worst.status, worst.reason)


def cannot_store(message: bytes, reason: str) -> Reply:
    """AE for every message of a frame that could not be landed: the sender must resend it later."""
    verdict = judge(message)
    head = verdict.header
    verdicts = [verdict]
    if head is not None and head.segment != "MSH":
        verdicts = [judge(message[o:o + n]) for o, n in split_messages(message)] or [Verdict(None, "AR")]
    data = b"".join(build_ack(Verdict(v.header, "AE", "207", reason)) for v in verdicts)
    return Reply(data, {"AE": len(verdicts)}, "error", reason)


async def _off_loop(fn: Callable[..., Reply], message: bytes, *args: object) -> Reply:
    """fn(message, *args), on a worker thread when the message is big enough for the parse to be felt."""
    return await asyncio.to_thread(fn, message, *args) if len(message) >= OFFLOAD_BYTES else fn(message, *args)


class _Connection:
    """One MLLP connection's receive state between reads."""

    def __init__(self, peer: str, writer: asyncio.StreamWriter):
        self.peer = peer
        self.writer = writer
        self.buf = bytearray()
        self.consumed = 0  # bytes cut off the front of buf so far: buf[0] sits at this offset of the stream
        self.searched = 0  # of a partial frame at buf[0], the bytes already searched for its end
        self.frame_at: int | None = None  # stream offset of the open (unfinished) frame's start block
        self.frame_since = 0.0  # loop time its start block arrived
        self.timer: asyncio.Timeout | None = None  # the deadline of the read in progress

    def note_partial(self, now: float) -> None:
        """After cutting frames: remember when the frame now left unfinished at buf[0] began."""
        if not self.buf.startswith(MLLP_START):
            self.frame_at = None
        elif self.frame_at != self.consumed:
            self.frame_at, self.frame_since = self.consumed, now


class MllpServer:
    """asyncio protocol handler: many concurrent connections, one landing log."""

    def __init__(self, landing: LandingZone, metrics: Metrics, *, max_bytes: int, idle_timeout_s: float,
                 frame_timeout_s: float, max_batch: int, keep_bytes: int, policy: Policy = OPEN):
        self.policy = policy
        self.landing = landing
        self.metrics = metrics
        self.max_bytes = max_bytes
        self.idle_timeout_s = idle_timeout_s
        self.frame_timeout_s = frame_timeout_s
        self.max_batch = max_batch
        self.keep_bytes = keep_bytes  # of a frame refused as too large or cut off, this prefix is kept in the rejects
        self.connections = 0
        self._conns: set[_Connection] = set()
        self._handlers: set[asyncio.Task] = set()
        self._cut_at: float | None = None  # loop time at which frames still arriving are cut off (set by stop)

    # -- stopping ------------------------------------------------------------------------------
    def cut_reads(self, at: float) -> None:
        """Stop: a connection between frames ends now; a frame still arriving at loop time `at` is cut off."""
        self._cut_at = at
        now = asyncio.get_running_loop().time()
        for conn in self._conns:
            if conn.timer is not None:
                conn.timer.reschedule(now if conn.frame_at is None else min(at, conn.timer.when() or at))

    async def drain(self, until: float) -> None:
        """Wait until every connection has answered what it received and closed, or loop time `until`; then close
        the rest and end their handlers (what they had not answered yet is never acknowledged)."""
        pending = [t for t in self._handlers if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=max(0.0, until - asyncio.get_running_loop().time()))
        for conn in list(self._conns):
            conn.writer.close()
        late = [t for t in self._handlers if not t.done()]
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)

    # -- one connection ------------------------------------------------------------------------
    def _deadline(self, conn: _Connection, now: float) -> float:
        """When the next read gives up: idle too long, the open frame too slow, or the gateway stopping."""
        at = now + self.idle_timeout_s
        if conn.frame_at is not None:
            at = min(at, conn.frame_since + self.frame_timeout_s)
        if self._cut_at is not None:
            at = min(at, self._cut_at if conn.frame_at is not None else now)
        return at

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer_addr = writer.get_extra_info("peername")
        conn = _Connection(f"{peer_addr[0]}:{peer_addr[1]}" if peer_addr else "unknown", writer)
        loop = asyncio.get_running_loop()
        self.connections += 1
        self._conns.add(conn)
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        self.metrics.set("carelake_gateway_open_connections", self.connections)
        try:
            while True:
                try:
                    async with asyncio.timeout_at(self._deadline(conn, loop.time())) as conn.timer:
                        data = await reader.read(1 << 16)
                except TimeoutError:
                    await self._timed_out(conn)
                    break
                finally:
                    conn.timer = None
                if not data:
                    if bytes(conn.buf).strip(b"\r\n\t \x00"):
                        self.metrics.inc("carelake_gateway_incomplete_frames_total")
                        log.warning("mllp %s: connection closed mid-frame; %d byte(s) never acknowledged "
                                    "(the sender must resend)", conn.peer, len(conn.buf))
                    break
                if not await self._received(conn, data, loop.time()):
                    break
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            log.info("mllp %s: connection lost: %s", conn.peer, exc)
        finally:
            if conn.frame_at is not None:
                self.metrics.inc("carelake_gateway_receiving", -1, protocol="mllp")
            self._conns.discard(conn)
            self._handlers.discard(task)
            self.connections -= 1
            self.metrics.set("carelake_gateway_open_connections", self.connections)
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass

    async def _received(self, conn: _Connection, data: bytes, now: float) -> bool:
        """Take in one read: set aside what can never be a message, answer every whole frame. False: close."""
        conn.buf += data
        before = len(conn.buf)
        frames, aside, overflow, unframed = self._frames(conn)
        conn.consumed += before - len(conn.buf)
        was_open = conn.frame_at is not None
        conn.note_partial(now)
        if (conn.frame_at is not None) != was_open:
            self.metrics.inc("carelake_gateway_receiving", -1 if was_open else 1, protocol="mllp")
        if aside:
            await self._set_aside(aside, conn.peer, unframed=unframed)
        if frames:
            await self._answer(frames, conn.peer, conn.writer)
        if unframed:
            await self._refuse_unframed(aside[-1], conn.peer, conn.writer)
            return False
        if overflow is not None:
            await self._refuse_oversized(overflow, conn.peer, conn.writer)
            return False
        return True

    async def _timed_out(self, conn: _Connection) -> None:
        """A read gave up: close an idle connection; set aside a frame that did not end in time (never acked)."""
        if conn.frame_at is None:
            if self._cut_at is None:
                log.info("mllp %s: idle for %.0f s, closing", conn.peer, self.idle_timeout_s)
            return
        size = len(conn.buf)
        if self._cut_at is not None and conn.frame_since + self.frame_timeout_s > self._cut_at:
            self.metrics.inc("carelake_gateway_timeouts_total", protocol="mllp", stage="shutdown")
            log.warning("mllp %s: the gateway is stopping; cut off a frame still arriving after %d byte(s), never "
                        "acknowledged (the sender must resend it)", conn.peer, size)
            return
        self.metrics.inc("carelake_gateway_timeouts_total", protocol="mllp", stage="frame")
        self.metrics.inc("carelake_gateway_incomplete_frames_total")
        reason = (f"incomplete MLLP frame: not ended within gateway.frame_timeout ({self.frame_timeout_s:g} s) of its "
                  f"start block ({size:,} bytes arrived); never acknowledged, the sender must resend it")
        kept = bytes(conn.buf[:self.keep_bytes])
        try:
            await self.landing.reject(FEED, {"peer": conn.peer, "protocol": "mllp", "reason": reason}, kept)
        except (OSError, RuntimeError) as exc:
            log.error("mllp %s: %s; it could not be kept: %s", conn.peer, reason, exc)
            return
        log.warning("mllp %s: %s (%d byte(s) kept in landing/_rejects/%s); closing the connection", conn.peer,
                    reason, len(kept), FEED)

    def _frames(self, conn: _Connection) -> tuple[list[bytes], list[bytes], bytes | None, bool]:
        """Cut every complete frame out of `conn.buf`.

        Returns (frames, set_aside, oversized, unframed): `set_aside` are parts that can never be a message: a frame
        cut off by a new start block (the block MLLP forbids inside a message ends the unfinished frame) and bytes
        before a start block; `oversized` an oversized partial frame; `unframed` whether the last of set_aside is a
        message sent without MLLP framing (no start block at all, a whole segment or 64 KiB of it received): the
        sender is waiting for an answer that framing would have given. A partial frame left at buf[0] is searched
        again only in the bytes that arrived since (`conn.searched`): a big frame costs its length once, not per read.
        """
        buf = conn.buf
        frames: list[bytes] = []
        aside: list[bytes] = []
        searched, conn.searched = conn.searched, 0
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
            if start:
                searched = 0
                if bytes(buf[:start]).strip(b"\r\n\t \x00"):
                    aside.append(bytes(buf[:start]))
            end = buf.find(MLLP_END, max(start + 1, searched - len(MLLP_END) + 1))
            restart = buf.find(MLLP_START, max(start + 1, searched), end if end >= 0 else len(buf))
            searched = 0
            if restart >= 0:  # a new frame began before this one ended: this one is incomplete
                aside.append(bytes(buf[start:restart]))
                del buf[:restart]
                continue
            if (end if end >= 0 else len(buf)) - start - 1 > self.max_bytes:
                return frames, aside, bytes(buf[start + 1:start + 1 + self.max_bytes]), False
            if end < 0:
                if start:
                    del buf[:start]
                conn.searched = len(buf)
                return frames, aside, None, False
            with memoryview(buf) as view:  # one copy of a big frame, not two
                frames.append(bytes(view[start + 1:end]))
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
        self.metrics.inc("carelake_gateway_in_flight", len(frames), protocol="mllp")
        try:
            await self._land_and_ack(frames, peer, writer)
        finally:
            self.metrics.inc("carelake_gateway_in_flight", -len(frames), protocol="mllp")

    async def _land_and_ack(self, frames: list[bytes], peer: str, writer: asyncio.StreamWriter) -> None:
        # Land every frame that arrived together first (one group commit), then acknowledge in order.
        pending = []
        counts: Counter[tuple[str, tuple[tuple[str, str], ...]]] = Counter()
        sender = certificate_sender(writer.get_extra_info("peercert")) if self.policy.client_certs else None
        for message in frames:
            reply = await _off_loop(answer, message, self.max_batch, self.policy)
            header = {"peer": peer, "protocol": "mllp", "status": reply.status}
            if sender:
                header["sender"] = sender  # the CN of the sender's verified certificate (mutual TLS)
            if reply.reason:
                header["reason"] = reply.reason
            if reply.refused:  # refused whole: only its prefix is kept, in the rejects area
                header["size"] = len(message)
                stored = self.landing.reject(FEED, header, message[:self.keep_bytes])
            else:
                stored = self.landing.land(FEED, header, message)
            pending.append((reply, message, stored))
        counts["carelake_gateway_received_total", (("feed", FEED), ("protocol", "mllp"))] += len(frames)
        counts["carelake_gateway_bytes_total", (("feed", FEED),)] += sum(len(m) for m in frames)
        for reply, message, stored in pending:
            try:
                await stored
            except (OSError, RuntimeError) as exc:
                if reply.refused:
                    log.error("mllp %s: refused batch could not be kept in the rejects area: %s", peer, exc)
                else:
                    # Not on disk (a write error, or the gateway is shutting down): never acknowledge positively.
                    # AE with 207 "cannot store" tells the sender to resend later.
                    counts["carelake_gateway_write_errors_total", ()] += 1
                    reply = await _off_loop(cannot_store, message, f"gateway cannot store the message: {exc}")
            else:
                if reply.refused:
                    counts["carelake_gateway_rejected_total", (("feed", FEED), ("reason", reply.refusal))] += 1
                    if reply.refusal == NOT_ALLOWED:
                        counts["carelake_gateway_auth_failures_total", (("protocol", "mllp"),
                                                                        ("reason", "facility_not_allowed"))] += 1
                    log.warning("mllp %s: %s; refused (AR), first %d byte(s) kept in landing/_rejects/%s", peer,
                                reply.reason, min(len(message), self.keep_bytes), FEED)
                else:
                    counts["carelake_gateway_landed_total", (("feed", FEED), ("status", reply.status))] += 1
                    if reply.status != "accepted":
                        counts["carelake_gateway_rejected_total", (("feed", FEED), ("reason", reply.status))] += 1
            for code, n in reply.codes.items():
                counts["carelake_gateway_acks_total", (("code", code),)] += n
            writer.write(frame(reply.data))
        self.metrics.add(counts)
        await writer.drain()

    async def _refuse_oversized(self, partial: bytes, peer: str, writer: asyncio.StreamWriter) -> None:
        limit_mb = self.max_bytes / (1 << 20)
        kept = partial[:self.keep_bytes]
        reason = (f"frame exceeds gateway.max_message_mb ({limit_mb:g} MB); reading stopped there, first "
                  f"{len(kept):,} bytes kept")
        try:
            header = parse_header(partial)
        except Hl7HeaderError as exc:
            header = exc.header
        verdict = Verdict(header, "AR", "207", reason)
        try:
            await self.landing.reject(FEED, {"peer": peer, "protocol": "mllp", "reason": reason}, kept)
        except (OSError, RuntimeError) as exc:
            log.error("mllp %s: oversized frame could not be kept: %s", peer, exc)
        self.metrics.inc("carelake_gateway_rejected_total", feed=FEED, reason="too_large")
        self.metrics.inc("carelake_gateway_acks_total", code="AR")
        log.warning("mllp %s: %s; closing the connection", peer, reason)
        writer.write(frame(build_ack(verdict)))
        await writer.drain()
