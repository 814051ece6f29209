"""FHIR, device readings and X12 over HTTP: POST /fhir, POST /devices, POST /x12, GET /health, GET /metrics; and
DICOM instances over DICOMweb STOW-RS, POST /dicomweb/studies (one record per part: `pipelines.gateway.stow`).

A body is checked just enough to know it is what the endpoint takes (well-formed JSON with a
resourceType; JSON lines of readings with a device id and a time), then landed byte for byte and
answered 202 only after the fsync. A body holding nothing usable (wrong content type, not JSON, no
resource or reading at all) is answered 4xx with a FHIR OperationOutcome naming each problem, and
kept in the rejects area, so nothing sent is lost. A batch with some bad lines or entries is landed
whole and answered 202 with a warning issue per bad part: one garbled reading never holds back the
vital signs sent with it, and bronze marks the bad part so silver quarantines it with its reason.
Deeper validation (FHIR structure, units, plausibility) is silver's job: one row, not a batch.

A sender cannot make the gateway read or hold more than it will take: a declared Content-Length over
the limit is refused (413) before any of the body is read, a chunked body is read only until it passes
the limit, and the whole body must arrive within `gateway.body_timeout` (408). Each of these answers
closes the connection, so nothing more of that body is read, and only a prefix of it is kept. A client
gone mid-body is one log line and a count, never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from pipelines.gateway.landing import LandingZone
from pipelines.gateway.metrics import Metrics
from pipelines.gateway.security import OPEN, Policy, certificate_sender

log = logging.getLogger("carelake.gateway")

FHIR_FEED = "fhir"
DEVICE_FEED = "devices"
DICOM_FEED = "dicom"
MAX_WARNINGS = 20  # STOW-RS: Warning header lines, one per part not stored
X12_FEED = "x12"
_X12_TYPES = ("application/edi-x12", "application/x12", "text/plain", "application/octet-stream", "")
_ISA_LENGTH = 106
_JSON_TYPES = ("application/fhir+json", "application/json", "application/json+fhir")
_NDJSON_TYPES = ("application/fhir+ndjson", "application/ndjson", "application/x-ndjson", "application/jsonl",
                 "application/jsonlines", "application/x-jsonlines")
_DEVICE_TYPES = (*_NDJSON_TYPES, "application/json", "text/plain", "")
MAX_ISSUES = 20  # problems listed in one OperationOutcome; the count says how many there were in all


class BadBody(Exception):
    """A body the endpoint cannot take: HTTP status, OperationOutcome issue code, and each problem."""

    def __init__(self, status: int, code: str, problems: list[str]):
        super().__init__("; ".join(problems[:3]))
        self.status = status
        self.code = code
        self.problems = problems


def outcome(severity: str, code: str, problems: list[str], total: int | None = None) -> dict:
    issues = [{"severity": severity, "code": code, "diagnostics": p} for p in problems[:MAX_ISSUES]]
    total = len(problems) if total is None else total
    if total > len(issues):
        issues.append({"severity": severity, "code": code,
                       "diagnostics": f"... and {total - len(issues)} more problem(s) of the same kind"})
    return {"resourceType": "OperationOutcome", "issue": issues}


def _text(body: bytes) -> str:
    try:
        return body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BadBody(400, "invalid", [f"body is not UTF-8 (byte {exc.start}): FHIR and device JSON must be UTF-8"]
                      ) from None


# A body at least this large is checked on a worker thread (see receive).
OFFLOAD_BYTES = 64 * 1024


@dataclass(frozen=True)
class Checked:
    """What a body holds: the units it delivers, and a warning for each part bronze will mark as bad."""

    count: int
    warnings: list[str]


def _loads(text: str | bytes) -> object:
    """json.loads, with JSON nested deeper than the parser can follow refused as invalid (a ValueError), not a
    RecursionError that would end the request with a 500 and lose the body."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply (more than about a thousand levels): no FHIR resource or reading "
                         "is shaped like that") from None


def _json_lines(body: bytes) -> Iterator[tuple[int, object]]:
    """(line number, parsed JSON or the error) for each non-blank line, decoded line by line."""
    for n, raw in enumerate(body.removeprefix(b"\xef\xbb\xbf").split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            yield n, _loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            yield n, ValueError(f"not UTF-8 at byte {exc.start}")
        except ValueError as exc:
            yield n, exc


def _resource_problem(item: object, where: str) -> str | None:
    if isinstance(item, ValueError):
        return f"{where}: not valid JSON ({item})"
    if not isinstance(item, dict):
        return f"{where}: expected a JSON object (a FHIR resource), got {type(item).__name__}"
    kind = item.get("resourceType")
    if not isinstance(kind, str) or not kind:
        return f"{where}: no resourceType; every FHIR resource names its type"
    return None


def _reading_problem(item: object, where: str) -> str | None:
    if isinstance(item, ValueError):
        return f"{where}: not valid JSON ({item})"
    if isinstance(item, list):
        return f"{where}: a JSON array; send one reading object per line (JSON lines)"
    if not isinstance(item, dict):
        return f"{where}: expected a reading object, got {type(item).__name__}"
    if not isinstance(item.get("device_id"), str) or not item["device_id"].strip():
        return f"{where}: no device_id"
    if not item.get("time"):
        return f"{where}: no time"
    return None


def _check_lines(body: bytes, problem: Callable[[object, str], str | None], noun: str) -> Checked:
    """JSON lines: the good lines are delivered, each bad one is a warning; nothing good at all is a 400."""
    count, warnings = 0, []
    for n, item in _json_lines(body):
        if p := problem(item, f"line {n}"):
            warnings.append(p)
        else:
            count += 1
    if not count:
        raise BadBody(400, "invalid" if warnings else "required", warnings or [f"body holds no {noun}"])
    return Checked(count, warnings)


def check_fhir(body: bytes, content_type: str) -> Checked:
    """Resources in a Bundle, resource or NDJSON body; BadBody when the body holds none at all."""
    if content_type in _NDJSON_TYPES:
        return _check_lines(body, _resource_problem, "resources")
    if content_type not in _JSON_TYPES:
        raise BadBody(415, "not-supported", [
            f"content type {content_type or '(none)'!r} is not accepted here: send application/fhir+json "
            "(a Bundle or one resource) or application/fhir+ndjson (one resource per line)"])
    try:
        doc = _loads(_text(body))
    except ValueError as exc:
        doc = exc
    if problem := _resource_problem(doc, "body"):
        raise BadBody(400, "structure", [problem])
    if doc["resourceType"] != "Bundle":
        return Checked(1, [])
    entries = doc.get("entry") or []
    if not isinstance(entries, list):
        raise BadBody(400, "structure", ["Bundle.entry must be a list"])
    warnings = []
    for i, entry in enumerate(entries):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if resource is None and isinstance(entry, dict) and "request" in entry:
            continue  # a transaction DELETE entry carries a request and no resource
        if problem := _resource_problem(resource, f"Bundle.entry[{i}].resource"):
            warnings.append(problem)
    return Checked(len(entries) - len(warnings), warnings)


def check_readings(body: bytes, content_type: str) -> Checked:
    """Readings in a JSON-lines body; BadBody when the body holds none at all."""
    if content_type not in _DEVICE_TYPES:
        raise BadBody(415, "not-supported", [
            f"content type {content_type!r} is not accepted here: send application/x-ndjson, one reading "
            "object per line"])
    return _check_lines(body, _reading_problem, "readings")


def check_x12(body: bytes, content_type: str) -> Checked:
    """Interchanges in an X12 body (837/835 and the rest: silver decides what it takes); BadBody when the body is
    not X12 at all. Delimiters come from the first ISA segment; an interchange without its IEA trailer is a warning
    (landed whole: silver quarantines that interchange with pyx12's finding)."""
    if content_type not in _X12_TYPES:
        raise BadBody(415, "not-supported", [f"content type {content_type!r} is not accepted here: send "
                                             "application/edi-x12 (one or more interchanges, ISA..IEA)"])
    data = body.lstrip(b"\xef\xbb\xbf \t\r\n")
    if not data.startswith(b"ISA") or len(data) < _ISA_LENGTH:
        raise BadBody(400, "structure", ["body is not X12: an interchange starts with a 106-character ISA segment"])
    if not data.isascii():
        raise BadBody(400, "invalid", ["body is not ASCII: X12 uses the basic and extended character sets"])
    sep, term = data[3:4], data[_ISA_LENGTH - 1:_ISA_LENGTH]
    segments = [s.strip() for s in data.split(term)]
    starts = sum(1 for s in segments if s.startswith(b"ISA" + sep))
    ends = sum(1 for s in segments if s.startswith(b"IEA" + sep))
    warnings = [f"{starts - ends} interchange(s) lack their IEA trailer (ISA16/segment terminator "
                f"{term.decode()!r}); silver quarantines them"] if ends < starts else []
    return Checked(starts, warnings)


@dataclass(frozen=True)
class Endpoint:
    feed: str
    check: Callable[[bytes, str], Checked] | None
    noun: str
    # Lands a whole body itself and answers (STOW-RS: one record per part); None = check, land whole, answer 202.
    take: Callable[[web.Request, dict, bytes], Awaitable[web.Response]] | None = None


@dataclass(frozen=True)
class Body:
    """What a request's body read came to: its bytes (only a prefix when it is not taken) and how it ended."""

    data: bytes
    size: int  # bytes received
    ending: str  # whole, too_big, timeout, shutdown, disconnected, malformed
    detail: str = ""


class ServerLog(logging.LoggerAdapter):
    """aiohttp's server log. A request aiohttp cannot parse (a broken chunked body, a header line too long, not HTTP
    at all) is the sender's doing: one line and a count, not aiohttp's traceback. Any other exception keeps its
    traceback, because that one is a bug here."""

    def __init__(self, metrics: Metrics):
        super().__init__(logging.getLogger("aiohttp.server"), {})
        self.metrics = metrics

    def exception(self, msg, *args, exc_info=True, **kwargs) -> None:
        exc = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1]
        if isinstance(exc, HttpProcessingError):
            self.metrics.inc("carelake_gateway_bad_requests_total")
            log.info("http: %s: answered %d, %s", msg % args, exc.code, " ".join(str(exc.message).split()))
            return
        self.logger.exception(msg, *args, exc_info=exc_info, **kwargs)

    def debug(self, msg, *args, **kwargs) -> None:
        if isinstance(kwargs.get("exc_info"), HttpProcessingError):  # not HTTP at all (TLS, a port scan): no line
            self.metrics.inc("carelake_gateway_bad_requests_total")
        self.logger.debug(msg, *args, **kwargs)


class HttpGateway:
    def __init__(self, landing: LandingZone, metrics: Metrics, *, max_bytes: int, body_timeout_s: float,
                 keep_bytes: int, stow: bool = True, x12: bool = True, max_parts: int = 100_000,
                 policy: Policy = OPEN):
        self.policy = policy
        self.landing = landing
        self.stow = stow  # serve POST /dicomweb/studies (the zone lands the dicom feed)
        self.x12 = x12  # serve POST /x12 (the zone lands the x12 feed)
        self.max_parts = max_parts  # STOW-RS parts in one body (gateway.max_batch_messages)
        self.metrics = metrics
        self.max_bytes = max_bytes
        self.body_timeout_s = body_timeout_s
        self.keep_bytes = keep_bytes  # of a body refused as too large or cut off, this prefix is kept
        self.started = time.monotonic()
        self._reads: set[asyncio.Timeout] = set()  # the deadline of each body being read
        self._cut_at: float | None = None  # loop time at which bodies still arriving are cut off (set by stop)
        self._busy: set[asyncio.Task] = set()  # receive() calls in progress

    def app(self) -> web.Application:
        # The size limit is enforced while streaming the body (below), so the prefix can still be kept.
        app = web.Application(client_max_size=self.max_bytes + 1, middlewares=[self._authenticate])
        fhir = Endpoint(FHIR_FEED, check_fhir, "resource(s)")
        devices = Endpoint(DEVICE_FEED, check_readings, "reading(s)")
        app.router.add_post("/fhir", lambda r: self.receive(r, fhir), expect_handler=self._expect_continue)
        app.router.add_post("/devices", lambda r: self.receive(r, devices), expect_handler=self._expect_continue)
        if self.stow:
            stow = Endpoint(DICOM_FEED, None, "instance(s)", self._stow)
            for route in ("/dicomweb/studies", "/dicomweb/studies/{study}"):
                app.router.add_post(route, lambda r: self.receive(r, stow), expect_handler=self._expect_continue)
        if self.x12:
            x12 = Endpoint(X12_FEED, check_x12, "interchange(s)")
            app.router.add_post("/x12", lambda r: self.receive(r, x12), expect_handler=self._expect_continue)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics_text)
        return app

    def declared_too_big(self, request: web.BaseRequest) -> bool:
        return request.content_length is not None and request.content_length > self.max_bytes

    def sender(self, request: web.BaseRequest) -> str | None:
        """Who sent a request: the name of its bearer token, or the CN of its verified client certificate."""
        found = self.policy.tokens.sender(request.headers.get("Authorization"))
        if found is None and self.policy.client_certs and request.transport is not None:
            found = certificate_sender(request.transport.get_extra_info("peercert"))
        return found

    @web.middleware
    async def _authenticate(self, request: web.Request, handler) -> web.StreamResponse:
        """With tokens or a client CA configured, a POST from an unknown sender is answered 401 before its body is
        read: nothing of it lands, and it is counted."""
        if request.method != "POST" or not self.policy.http_auth:
            return await handler(request)
        sender = self.sender(request)
        if sender is None:
            self.metrics.inc("carelake_gateway_auth_failures_total", protocol="http", reason="unauthenticated")
            log.warning("http %s %s: refused, no known bearer token or verified client certificate (401)",
                        request.remote, request.path)
            resp = self._reply(request.path, 401, outcome("error", "login", [
                "authentication required: send Authorization: Bearer <token> (gateway.security.tokens_file) or a "
                "client certificate signed by gateway.security.client_ca; nothing was accepted"]), close=True)
            resp.headers["WWW-Authenticate"] = 'Bearer realm="carelake"'
            return resp
        request["sender"] = sender
        return await handler(request)

    async def _expect_continue(self, request: web.Request) -> None:
        """Answer `Expect: 100-continue` as aiohttp does, except for a body declared too large or from an unknown
        sender: no 100 Continue, so the client sends none of it and reads the 413 or 401 answered next."""
        if self.declared_too_big(request) or (self.policy.http_auth and self.sender(request) is None):
            return
        expect = request.headers.get("Expect", "")
        if expect.lower() != "100-continue":
            raise web.HTTPExpectationFailed(text=f"unknown Expect: {expect}; only 100-continue is understood")
        if request.version >= (1, 1):
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    # -- stopping ------------------------------------------------------------------------------
    def cut_reads(self, at: float) -> None:
        """Bodies still arriving at loop time `at` are cut off (503, nothing landed); complete ones go on."""
        self._cut_at = at
        for timer in self._reads:
            if timer.when() is None or timer.when() > at:
                timer.reschedule(at)

    async def drain(self, until: float) -> None:
        """Wait until every request being received has been answered, or loop time `until`; then cancel the rest."""
        pending = [t for t in self._busy if not t.done()]
        if pending:
            _done, late = await asyncio.wait(pending, timeout=max(0.0, until - asyncio.get_running_loop().time()))
            for task in late:
                task.cancel()

    # -- receiving -----------------------------------------------------------------------------
    def _reply(self, path: str, status: int, doc: dict, *, close: bool = False) -> web.Response:
        self.metrics.inc("carelake_gateway_http_responses_total", path=path, status=str(status))
        resp = web.json_response(doc, status=status, content_type="application/fhir+json")
        if close:  # the rest of the body is never read: the connection cannot carry another request
            resp.force_close()
        return resp

    def _prefix(self, chunks: list[bytes]) -> bytes:
        out, size = [], 0
        for chunk in chunks:
            if size >= self.keep_bytes:
                break
            out.append(chunk[: self.keep_bytes - size])
            size += len(out[-1])
        return b"".join(out)

    async def _read(self, request: web.Request) -> Body:
        """The body if it is whole within the size limit and the body timeout; else how far it got."""
        loop = asyncio.get_running_loop()
        limit = loop.time() + self.body_timeout_s
        chunks: list[bytes] = []
        size = 0
        self.metrics.inc("carelake_gateway_receiving", protocol="http")
        try:
            async with asyncio.timeout_at(limit if self._cut_at is None else min(limit, self._cut_at)) as timer:
                self._reads.add(timer)
                try:
                    async for chunk in request.content.iter_chunked(1 << 16):
                        size += len(chunk)
                        chunks.append(chunk)
                        if size > self.max_bytes:  # stop here: nothing more of this body is read
                            return Body(self._prefix(chunks), size, "too_big")
                finally:
                    self._reads.discard(timer)
        except TimeoutError:
            ending = "shutdown" if self._cut_at is not None and loop.time() < limit else "timeout"
            return Body(self._prefix(chunks), size, ending)
        except ConnectionError as exc:
            return Body(b"", size, "disconnected", str(exc) or type(exc).__name__)
        except web.RequestPayloadError as exc:  # e.g. a broken chunked encoding
            return Body(self._prefix(chunks), size, "malformed", str(exc))
        finally:
            self.metrics.inc("carelake_gateway_receiving", -1, protocol="http")
        return Body(b"".join(chunks), size, "whole")

    def _not_whole(self, body: Body, request: web.Request) -> BadBody:
        """Why a body that did not arrive whole is refused."""
        limit = f"gateway.max_message_mb ({self.max_bytes / (1 << 20):g} MB)"
        kept = f"the first {len(body.data):,} bytes are kept" if body.data else "none of it is kept"
        if body.detail == "declared":
            return BadBody(413, "too-costly", [f"Content-Length {request.content_length:,} exceeds {limit}; split "
                                               f"the body (refused before reading it; {kept})"])
        if body.ending == "too_big":
            return BadBody(413, "too-costly", [f"body exceeds {limit}; split it (reading stopped at "
                                               f"{body.size:,} bytes; {kept})"])
        if body.ending == "timeout":
            return BadBody(408, "timeout", [f"body not complete within gateway.body_timeout ({self.body_timeout_s:g} "
                                            f"s): {body.size:,} bytes arrived; send it faster or in smaller parts "
                                            f"({kept})"])
        return BadBody(400, "structure", [f"body framing is broken ({body.detail}); nothing was accepted ({kept})"])

    async def receive(self, request: web.Request, ep: Endpoint) -> web.Response:
        task = asyncio.current_task()
        self._busy.add(task)
        try:
            return await self._receive(request, ep)
        finally:
            self._busy.discard(task)

    async def _receive(self, request: web.Request, ep: Endpoint) -> web.Response:
        peer = f"{request.remote}"
        content_type = request.content_type.lower() if request.headers.get("Content-Type") else ""
        header = {"peer": peer, "protocol": "http", "content_type": content_type, "path": request.path}
        if request.get("sender"):
            header["sender"] = request["sender"]
        if self.declared_too_big(request):
            # Refused before reading: keep only what already sits in the buffer (usually nothing).
            header["content_length"] = request.content_length
            try:
                early = request.content.read_nowait(self.keep_bytes) if self.keep_bytes else b""
            except (ConnectionError, web.RequestPayloadError):
                early = b""
            body = Body(early, len(early), "too_big", "declared")
        else:
            body = await self._read(request)
        if body.ending == "disconnected":
            self.metrics.inc("carelake_gateway_disconnects_total", protocol="http")
            log.info("http %s %s: client closed the connection after %d byte(s) of the body (%s); nothing "
                     "acknowledged", peer, request.path, body.size, body.detail)
            return web.Response(status=400)  # nobody is there to read it
        self.metrics.inc("carelake_gateway_received_total", feed=ep.feed, protocol="http")
        self.metrics.inc("carelake_gateway_bytes_total", body.size, feed=ep.feed)
        if body.ending == "shutdown":
            self.metrics.inc("carelake_gateway_timeouts_total", protocol="http", stage="shutdown")
            log.info("http %s %s: the gateway is stopping; cut off a body still arriving after %d byte(s)",
                     peer, request.path, body.size)
            return self._reply(request.path, 503, outcome("error", "transient", [
                "the gateway is stopping: this body was still arriving; nothing was accepted, send it again"]),
                close=True)
        if body.ending != "whole":
            if body.ending == "timeout":
                self.metrics.inc("carelake_gateway_timeouts_total", protocol="http", stage="body")
            return await self._refuse(request.path, ep, header, body.data, self._not_whole(body, request), close=True)
        self.metrics.inc("carelake_gateway_in_flight", protocol="http")
        try:
            if ep.take is not None:
                return await ep.take(request, header, body.data)
            return await self._take(request.path, ep, header, body.data)
        finally:
            self.metrics.inc("carelake_gateway_in_flight", -1, protocol="http")

    async def _take(self, path: str, ep: Endpoint, header: dict, body: bytes) -> web.Response:
        """Check a whole body, land it, answer 202 (or refuse it: 4xx, kept in the rejects)."""
        try:
            # Checking a big body parses all of it: on a worker thread, so the other connections are served.
            checked = await asyncio.to_thread(ep.check, body, header["content_type"]) if len(body) >= OFFLOAD_BYTES \
                else ep.check(body, header["content_type"])
        except BadBody as bad:
            return await self._refuse(path, ep, header, body, bad)
        try:
            place = await self.landing.land(ep.feed, {**header, "status": "accepted"}, body)
        except (OSError, RuntimeError) as exc:  # a write error, or the gateway is past its stop deadline
            self.metrics.inc("carelake_gateway_write_errors_total")
            log.error("http %s: cannot land %s body: %s", header["peer"], ep.feed, exc)
            return self._reply(path, 503, outcome("error", "transient", [
                f"the gateway cannot store the body ({exc}); nothing was accepted, send it again later"]))
        self.metrics.inc("carelake_gateway_landed_total", feed=ep.feed, status="accepted")
        doc = outcome("information", "informational", [
            f"landed {checked.count} {ep.noun} in {place.segment} at byte {place.offset}"
            + (f"; {len(checked.warnings)} part(s) could not be read and are kept for quarantine"
               if checked.warnings else "")])
        if checked.warnings:
            self.metrics.inc("carelake_gateway_partly_bad_total", feed=ep.feed)
            doc["issue"] += outcome("warning", "invalid", checked.warnings)["issue"]
        return self._reply(path, 202, doc)

    async def _stow(self, request: web.Request, header: dict, body: bytes) -> web.Response:
        """STOW-RS: each Part 10 part landed (fsync) before the answer, each bad part kept in the rejects; the answer
        lists both (pipelines.gateway.stow)."""
        from pipelines.gateway import stow  # pydicom is imported on the first STOW request, not at gateway start

        ep = Endpoint(DICOM_FEED, None, "instance(s)")
        try:
            boundary, part_type = stow.boundary_of(request.headers.get("Content-Type", ""))
            parts = stow.split_parts(body, boundary, part_type)
            if len(parts) > self.max_parts:
                raise BadBody(413, "too-costly", [
                    f"{len(parts):,} parts in one body, more than gateway.max_batch_messages ({self.max_parts:,}); "
                    "send the instances in several requests (nothing of this body was stored)"])
        except BadBody as bad:
            return await self._refuse(request.path, ep, header, body, bad)
        study = request.match_info.get("study")
        verdicts = await asyncio.to_thread(lambda: [stow.judge(p, study) for p in parts]) \
            if len(body) >= OFFLOAD_BYTES else [stow.judge(p, study) for p in parts]
        verdicts = await self._land_parts(header, verdicts)
        status, doc = stow.response(verdicts)
        self.metrics.inc("carelake_gateway_http_responses_total", path="/dicomweb/studies", status=str(status))
        resp = web.json_response(doc, status=status, content_type="application/dicom+json")
        for v in [v for v in verdicts if v.failure is not None][:MAX_WARNINGS]:
            resp.headers.add("Warning", '299 carelake "{}"'.format(v.why.replace('"', "'")))
        return resp

    async def _land_parts(self, header: dict, verdicts: list) -> list:
        """Land the parts that may be stored (one group commit), keep the others in the rejects; the final verdicts."""
        from dataclasses import replace

        from pipelines.gateway.stow import OUT_OF_RESOURCES

        good = [v for v in verdicts if v.failure is None]
        def record(v) -> dict:
            return {**header, "protocol": "dicomweb", "status": "accepted", "part": v.part.number,
                    "sop_class_uid": v.sop_class_uid, "sop_instance_uid": v.sop_instance_uid,
                    "transfer_syntax_uid": v.transfer_syntax_uid}

        landed = await asyncio.gather(*(self.landing.land(DICOM_FEED, record(v), v.part.data) for v in good),
                                      return_exceptions=True)
        outcome_of = {}
        for v, result in zip(good, landed, strict=True):
            if isinstance(result, BaseException):
                self.metrics.inc("carelake_gateway_write_errors_total")
                log.error("http %s: cannot land STOW part %d: %s", header["peer"], v.part.number, result)
                why = f"part {v.part.number}: the gateway cannot store it ({result}); send it again later"
                outcome_of[v.part.number] = replace(v, failure=OUT_OF_RESOURCES, why=why)
            else:
                self.metrics.inc("carelake_gateway_landed_total", feed=DICOM_FEED, status="accepted")
        final = [outcome_of.get(v.part.number, v) for v in verdicts]
        for v in final:
            if v.failure is not None and v.failure != OUT_OF_RESOURCES:
                self.metrics.inc("carelake_gateway_rejected_total", feed=DICOM_FEED, reason=f"0x{v.failure:04X}")
                log.info("http %s %s: STOW %s", header["peer"], header["path"], v.why)
                try:
                    await self.landing.reject(DICOM_FEED, {**header, "part": v.part.number, "reason": v.why},
                                              v.part.data)
                except (OSError, RuntimeError) as exc:
                    log.error("http: a refused STOW part could not be kept in the rejects area: %s", exc)
        return final

    async def _refuse(self, path: str, ep: Endpoint, header: dict, body: bytes, bad: BadBody, *,
                      close: bool = False) -> web.Response:
        reason = "; ".join(bad.problems[:3]) + (f" (+{len(bad.problems) - 3} more)" if len(bad.problems) > 3 else "")
        self.metrics.inc("carelake_gateway_rejected_total", feed=ep.feed, reason=bad.code)
        try:
            await self.landing.reject(ep.feed, {**header, "http_status": bad.status, "reason": reason}, body)
        except (OSError, RuntimeError) as exc:
            log.error("http: refused %s body could not be kept in the rejects area: %s", ep.feed, exc)
        log.info("http %s %s: %d %s", header["peer"], path, bad.status, reason)
        return self._reply(path, bad.status, outcome("error", bad.code, bad.problems), close=close)

    async def health(self, request: web.Request) -> web.Response:
        failed = self.landing.failed
        doc = {"status": "failing" if failed else "ok", "landing": str(self.landing.root),
               "uptime_s": round(time.monotonic() - self.started, 1), "problems": failed}
        status = 503 if failed else 200
        self.metrics.inc("carelake_gateway_http_responses_total", path="/health", status=str(status))
        return web.json_response(doc, status=status)

    async def metrics_text(self, request: web.Request) -> web.Response:
        # Rendering asks the DICOM acceptor processes for their counters: off the event loop.
        text = await asyncio.get_running_loop().run_in_executor(None, self.metrics.render)
        return web.Response(body=text.encode(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
