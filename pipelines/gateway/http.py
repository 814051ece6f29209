"""FHIR and device readings over HTTP: POST /fhir, POST /devices, GET /health, GET /metrics.

A body is checked just enough to know it is what the endpoint takes (well-formed JSON with a
resourceType; JSON lines of readings with a device id and a time), then landed byte for byte and
answered 202 only after the fsync. A body holding nothing usable (wrong content type, not JSON, no
resource or reading at all) is answered 4xx with a FHIR OperationOutcome naming each problem, and
kept in the rejects area, so nothing sent is lost. A batch with some bad lines or entries is landed
whole and answered 202 with a warning issue per bad part: one garbled reading never holds back the
vital signs sent with it, and bronze marks the bad part so silver quarantines it with its reason.
Deeper validation (FHIR structure, units, plausibility) is silver's job: one row, not a batch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from aiohttp import web

from pipelines.gateway.landing import LandingZone
from pipelines.gateway.metrics import Metrics

log = logging.getLogger("carelake.gateway")

FHIR_FEED = "fhir"
DEVICE_FEED = "devices"
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


@dataclass(frozen=True)
class Endpoint:
    feed: str
    check: Callable[[bytes, str], Checked]
    noun: str


class HttpGateway:
    def __init__(self, landing: LandingZone, metrics: Metrics, *, max_bytes: int):
        self.landing = landing
        self.metrics = metrics
        self.max_bytes = max_bytes
        self.started = time.monotonic()

    def app(self) -> web.Application:
        # The size limit is enforced while streaming the body (below), so the prefix can still be kept.
        app = web.Application(client_max_size=self.max_bytes + 1)
        fhir = Endpoint(FHIR_FEED, check_fhir, "resource(s)")
        devices = Endpoint(DEVICE_FEED, check_readings, "reading(s)")
        app.router.add_post("/fhir", lambda r: self.receive(r, fhir))
        app.router.add_post("/devices", lambda r: self.receive(r, devices))
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics_text)
        return app

    def _reply(self, path: str, status: int, doc: dict) -> web.Response:
        self.metrics.inc("carelake_gateway_http_responses_total", path=path, status=str(status))
        return web.json_response(doc, status=status, content_type="application/fhir+json")

    async def _read(self, request: web.Request) -> tuple[bytes, bool]:
        """The body, up to the limit; True when it was longer (the rest is read and dropped)."""
        chunks, size, too_big = [], 0, False
        async for chunk in request.content.iter_chunked(1 << 16):
            if too_big:
                continue
            size += len(chunk)
            if size > self.max_bytes:
                chunks.append(chunk[: len(chunk) - (size - self.max_bytes)])
                too_big = True
            else:
                chunks.append(chunk)
        return b"".join(chunks), too_big

    async def receive(self, request: web.Request, ep: Endpoint) -> web.Response:
        peer = f"{request.remote}"
        content_type = request.content_type.lower() if request.headers.get("Content-Type") else ""
        body, too_big = await self._read(request)
        self.metrics.inc("carelake_gateway_received_total", feed=ep.feed, protocol="http")
        self.metrics.inc("carelake_gateway_bytes_total", len(body), feed=ep.feed)
        header = {"peer": peer, "protocol": "http", "content_type": content_type, "path": request.path}
        try:
            if too_big:
                limit = self.max_bytes / (1 << 20)
                raise BadBody(413, "too-costly", [f"body exceeds gateway.max_message_mb ({limit:g} MB); "
                                                  f"split it (the first {len(body):,} bytes were kept)"])
            # Checking a big body parses all of it: on a worker thread, so the other connections are served.
            checked = await asyncio.to_thread(ep.check, body, content_type) if len(body) >= OFFLOAD_BYTES else \
                ep.check(body, content_type)
        except BadBody as bad:
            return await self._refuse(request.path, ep, header, body, bad)
        try:
            place = await self.landing.land(ep.feed, {**header, "status": "accepted"}, body)
        except OSError as exc:
            self.metrics.inc("carelake_gateway_write_errors_total")
            log.error("http %s: cannot land %s body: %s", peer, ep.feed, exc)
            return self._reply(request.path, 503, outcome("error", "transient", [
                f"the gateway cannot store the body ({exc}); nothing was accepted, send it again later"]))
        self.metrics.inc("carelake_gateway_landed_total", feed=ep.feed, status="accepted")
        doc = outcome("information", "informational", [
            f"landed {checked.count} {ep.noun} in {place.segment} at byte {place.offset}"
            + (f"; {len(checked.warnings)} part(s) could not be read and are kept for quarantine"
               if checked.warnings else "")])
        if checked.warnings:
            self.metrics.inc("carelake_gateway_partly_bad_total", feed=ep.feed)
            doc["issue"] += outcome("warning", "invalid", checked.warnings)["issue"]
        return self._reply(request.path, 202, doc)

    async def _refuse(self, path: str, ep: Endpoint, header: dict, body: bytes, bad: BadBody) -> web.Response:
        reason = "; ".join(bad.problems[:3]) + (f" (+{len(bad.problems) - 3} more)" if len(bad.problems) > 3 else "")
        self.metrics.inc("carelake_gateway_rejected_total", feed=ep.feed, reason=bad.code)
        try:
            await self.landing.reject(ep.feed, {**header, "http_status": bad.status, "reason": reason}, body)
        except OSError as exc:
            log.error("http: refused %s body could not be kept in the rejects area: %s", ep.feed, exc)
        log.info("http %s %s: %d %s", header["peer"], path, bad.status, reason)
        return self._reply(path, bad.status, outcome("error", bad.code, bad.problems))

    async def health(self, request: web.Request) -> web.Response:
        failed = self.landing.failed
        doc = {"status": "failing" if failed else "ok", "landing": str(self.landing.root),
               "uptime_s": round(time.monotonic() - self.started, 1), "problems": failed}
        status = 503 if failed else 200
        self.metrics.inc("carelake_gateway_http_responses_total", path="/health", status=str(status))
        return web.json_response(doc, status=status)

    async def metrics_text(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render().encode(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
