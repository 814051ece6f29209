"""`carelake send`: replay simulator output or real files into a running gateway.

HL7 v2 files go over MLLP, one message per frame, each waiting for its ACK; FHIR JSON / NDJSON and
device JSON lines go over HTTP; DICOM files over C-STORE to a `dicom://` target (`pipelines.send_dicom`).
A message that is not answered (timeout, connection lost, gateway
restarting, or a negative ACK that says the gateway could not store it) is sent again with backoff, so
everything the gateway acknowledged is in its landing zone and the rest is retried; a resend may land
twice, which silver deduplicates. A negative answer about the content itself (AE/AR, HTTP 4xx) is not
retried: the gateway kept the bytes, and the report says why it refused them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from bronze.hl7_wire import HEADER_SEGMENTS, MLLP_END, Hl7HeaderError, frame, parse_header, segments, split_messages
from pipelines.config import Config, check_ae_title
from pipelines.errors import ConfigError, UsageError

log = logging.getLogger("carelake.send")

HL7_SUFFIXES = {".hl7", ".er7", ".msg", ".txt", ".hl7v2"}
SKIP_FOLDERS = {"truth"}
SKIP_NAMES = {"manifest.json"}
_BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 5.0)


@dataclass(frozen=True)
class Target:
    kind: str  # "mllp", "http" or "dicom"
    host: str
    port: int
    url: str = ""  # http base URL (no trailing slash)
    path: str = ""  # a fixed endpoint path when the URL names one (/fhir or /devices); dicom: the called AE title


def _dicom_target(to: str, default_called: str) -> Target:
    parts = urlsplit(to)
    called = parts.path.strip("/") or default_called
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None:
        raise UsageError(f"--to {to!r}: expected dicom://HOST:PORT or dicom://HOST:PORT/CALLED_AE_TITLE")
    try:
        check_ae_title(called, "the called AE title in --to")
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    return Target("dicom", parts.hostname, port, path=called.strip())


def parse_target(to: str, default_called: str = "CARELAKE") -> Target:
    """HOST:PORT or mllp://HOST:PORT -> MLLP; http(s)://HOST:PORT[/fhir|/devices] -> HTTP;
    dicom://HOST:PORT[/CALLED_AE] -> C-STORE."""
    if to.startswith("dicom://"):
        return _dicom_target(to, default_called)
    if to.startswith(("http://", "https://")):
        parts = urlsplit(to)
        path = parts.path.rstrip("/")
        if path not in ("", "/fhir", "/devices"):
            raise UsageError(f"--to {to}: the gateway serves /fhir and /devices; give the base URL or one of those")
        return Target("http", parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80),
                      f"{parts.scheme}://{parts.netloc}", path)
    rest = to.removeprefix("mllp://")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UsageError(f"--to {to!r}: expected HOST:PORT (MLLP, e.g. localhost:2575) or an http:// URL")
    return Target("mllp", host, int(port))


# -- what to send ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Item:
    """One unit to deliver: an HL7 message, or one HTTP body (a Bundle, or a batch of JSON lines)."""

    source: str  # file:offset, for the report and the ack log
    body: bytes
    kind: str  # hl7 | fhir | fhir-ndjson | devices
    count: int = 1  # readings/resources in the body (for rates and the report)
    control_id: str = ""


@dataclass
class Plan:
    items: list[Item] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)


def _files(paths: Iterable[str]) -> Iterator[Path]:
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                rel = f.relative_to(p).parts
                if f.is_file() and not any(part.startswith((".", "_")) or part in SKIP_FOLDERS for part in rel) \
                        and f.name not in SKIP_NAMES:
                    yield f
        elif p.is_file():
            yield p
        else:
            raise UsageError(f"{p} does not exist; nothing was sent")


def _looks_hl7(data: bytes) -> bool:
    return data.lstrip(b"\xef\xbb\xbf\r\n\t ")[:3] in HEADER_SEGMENTS


def _json_kind(first_line: bytes) -> str | None:
    try:
        doc = json.loads(first_line)
    except ValueError:
        return None
    if isinstance(doc, dict) and "resourceType" in doc:
        return "fhir"
    if isinstance(doc, dict) and "device_id" in doc:
        return "devices"
    return None


def _line_batches(path: Path, data: bytes, kind: str, batch: int) -> Iterator[Item]:
    lines = data.splitlines(keepends=True)
    offset = 0
    for start in range(0, len(lines), batch):
        chunk = lines[start:start + batch]
        body = b"".join(chunk)
        count = sum(1 for line in chunk if line.strip())
        if count:
            yield Item(f"{path}:{offset}", body, kind, count)
        offset += len(body)


def plan(paths: Iterable[str], target: Target, batch: int) -> Plan:
    """Split files into deliverable items for the target's protocol; say what is skipped and why."""
    out = Plan()
    for path in _files(paths):
        suffix = path.suffix.lower()
        if suffix in (".dcm", ".dicom") or "dicom" in path.parent.parts:
            out.skipped["DICOM (send to the gateway's C-STORE port: --to dicom://HOST:PORT)"] += 1
            continue
        if "claims" in path.parent.parts:
            out.skipped["claims files (carelake ingest --feed claims)"] += 1
            continue
        data = path.read_bytes()
        if suffix in HL7_SUFFIXES or _looks_hl7(data):
            if target.kind != "mllp":
                out.skipped["HL7 v2 (send to the MLLP port: --to HOST:PORT)"] += 1
                continue
            for offset, length in split_messages(data):
                message = data[offset:offset + length]
                try:
                    control = parse_header(message).control_id
                except Hl7HeaderError:
                    control = ""
                out.items.append(Item(f"{path}:{offset}", message, "hl7", control_id=control))
            continue
        if suffix in (".json", ".ndjson", ".jsonl"):
            first = next((line for line in data.splitlines() if line.strip()), b"")
            kind = _json_kind(first) if suffix != ".json" else "fhir"
            if target.kind != "http":
                out.skipped["JSON (send to the HTTP port: --to http://HOST:PORT)"] += 1
                continue
            if suffix == ".json":
                out.items.append(Item(f"{path}:0", data, "fhir"))
            elif kind == "fhir":
                out.items.extend(_line_batches(path, data, "fhir-ndjson", batch))
            elif kind == "devices":
                out.items.extend(_line_batches(path, data, "devices", batch))
            else:
                out.skipped["JSON lines that are neither FHIR resources nor device readings"] += 1
            continue
        if suffix in (".csv", ".dat"):
            out.skipped["claims/flat files (carelake ingest --feed claims)"] += 1
        else:
            out.skipped[f"unrecognised file type {suffix or '(no suffix)'}"] += 1
    return out


# -- delivery -------------------------------------------------------------------------------------
@dataclass
class Report:
    target: str
    items: int = 0
    units: int = 0  # messages, readings or resources
    answers: Counter = field(default_factory=Counter)  # AA/AE/AR or HTTP status
    retries: int = 0
    failed: list[str] = field(default_factory=list)  # items never answered after every retry
    problems: list[str] = field(default_factory=list)  # why the gateway refused content (first few)
    skipped: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def complete(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        rate = self.units / self.seconds if self.seconds else 0.0
        answers = ", ".join(f"{k} {v:,}" for k, v in sorted(self.answers.items())) or "none"
        lines = [f"sent {self.items:,} item(s) ({self.units:,} message(s)/reading(s)/resource(s)) to {self.target} "
                 f"in {self.seconds:.1f} s ({rate:,.0f}/s); answers: {answers}; resends: {self.retries:,}"]
        for reason, n in sorted(self.skipped.items()):
            lines.append(f"  skipped {n} file(s): {reason}")
        for p in self.problems[:10]:
            lines.append(f"  refused: {p}")
        if self.failed:
            lines.append(f"  NOT DELIVERED after every retry: {len(self.failed)} item(s), first: {self.failed[0]}")
        return "\n".join(lines)


class _Pacer:
    """At most `rate` units a second across all workers (None = as fast as answers come back)."""

    def __init__(self, rate: float | None):
        self.rate = rate
        self.next = time.monotonic()

    async def wait(self, units: int) -> None:
        if not self.rate:
            return
        now = time.monotonic()
        self.next = max(self.next, now) + units / self.rate
        delay = self.next - units / self.rate - now
        if delay > 0:
            await asyncio.sleep(delay)


def read_ack(reply: bytes) -> tuple[str, str, str]:
    """(MSA-1 code, MSA-2 control id, MSA-3 text) of an ACK; a batch ACK reports its worst code."""
    codes, control, text = [], "", ""
    try:
        sep = parse_header(reply).field_separator
    except Hl7HeaderError:
        sep = "|"
    for seg in segments(reply):
        if seg.startswith(b"MSA"):
            fields = seg.decode("iso-8859-1").split(sep)
            codes.append(fields[1] if len(fields) > 1 else "")
            control = control or (fields[2] if len(fields) > 2 else "")
            text = text or (fields[3] if len(fields) > 3 else "")
    if not codes:
        return "??", "", "reply holds no MSA segment"
    worst = max(codes, key=lambda c: ("AA", "CA", "AE", "CE", "AR", "CR").index(c) if c in
                ("AA", "CA", "AE", "CE", "AR", "CR") else 9)
    return worst, control, text


class _MllpConnection:
    def __init__(self, target: Target, timeout_s: float, tls=None):
        self.target = target
        self.timeout_s = timeout_s
        self.tls = tls  # an ssl.SSLContext: MLLP over TLS
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def exchange(self, message: bytes) -> bytes:
        if self.writer is None:
            self.reader, self.writer = await asyncio.wait_for(
                asyncio.open_connection(self.target.host, self.target.port, ssl=self.tls), self.timeout_s)
        self.writer.write(frame(message))
        await self.writer.drain()
        data = await asyncio.wait_for(self.reader.readuntil(MLLP_END), self.timeout_s)
        return data[data.find(b"\x0b") + 1:-len(MLLP_END)]

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except (ConnectionError, OSError):
                pass
        self.reader = self.writer = None


OnAnswer = Callable[[Item, str], None]


@dataclass(frozen=True)
class Credentials:
    """What `carelake send` proves itself with: TLS (trusting --tls-ca, presenting --tls-cert) and a bearer token."""

    tls: object | None = None  # ssl.SSLContext
    token: str | None = None

    @classmethod
    def of(cls, target: Target, ca: str | None, cert: str | None, key: str | None,
           token_file: str | None) -> Credentials:
        from pipelines.gateway.security import client_context, read_token

        if token_file and target.kind != "http":
            raise UsageError("--token-file authenticates HTTP senders; an MLLP sender authenticates with "
                             "--tls-cert/--tls-key (mutual TLS)")
        tls_on = bool(ca or cert) or target.url.startswith("https://")
        return cls(client_context(ca, cert, key) if tls_on else None, read_token(token_file) if token_file else None)


async def _deliver(items: list[Item], target: Target, cfg: Config, *, rate: float | None, connections: int,
                   report: Report, on_answer: OnAnswer | None, on_progress: Callable[[str], None] | None,
                   creds: Credentials = Credentials()) -> None:
    queue: asyncio.Queue[Item] = asyncio.Queue()
    for it in items:
        queue.put_nowait(it)
    pacer = _Pacer(rate)
    retries_allowed = cfg.gateway.send_retries
    timeout_s = cfg.gateway.ack_timeout_s
    started = time.monotonic()

    retryable: tuple[type[BaseException], ...] = (OSError, TimeoutError, asyncio.IncompleteReadError,
                                                   asyncio.LimitOverrunError)
    if target.kind == "http":
        import aiohttp

        retryable += (aiohttp.ClientError,)

    async def attempt(send_once: Callable[[Item], object], item: Item) -> None:
        for tries in range(retries_allowed + 1):
            try:
                answer, retry = await send_once(item)
            except retryable as exc:
                answer, retry = f"no answer ({type(exc).__name__}: {exc})", True
            if not retry:
                report.answers[answer] += 1
                if on_answer is not None:
                    on_answer(item, answer)
                return
            if tries < retries_allowed:
                report.retries += 1
                await asyncio.sleep(_BACKOFF_S[min(tries, len(_BACKOFF_S) - 1)])
        report.failed.append(f"{item.source}: {answer}")

    async def mllp_worker() -> None:
        conn = _MllpConnection(target, timeout_s, creds.tls)

        async def once(item: Item) -> tuple[str, bool]:
            try:
                reply = await conn.exchange(item.body)
            except BaseException:
                await conn.close()
                raise
            code, control, text = read_ack(reply)
            if item.control_id and control and control != item.control_id:
                await conn.close()  # out of step with the gateway: start clean and resend
                return f"ACK for {control!r}, expected {item.control_id!r}", True
            if code in ("AE", "CE") and "cannot store" in text:
                return code, True  # the gateway could not land it: resend
            if code not in ("AA", "CA"):
                report.problems.append(f"{item.source} ({item.control_id or 'no MSH-10'}): {code} {text}")
            return code, False

        try:
            while not queue.empty():
                item = queue.get_nowait()
                await pacer.wait(1)
                await attempt(once, item)
                report.items += 1
                report.units += item.count
        finally:
            await conn.close()

    async def http_worker(session) -> None:
        import aiohttp

        content_types = {"fhir": "application/fhir+json", "fhir-ndjson": "application/fhir+ndjson",
                         "devices": "application/x-ndjson"}

        async def once(item: Item) -> tuple[str, bool]:
            path = target.path or ("/devices" if item.kind == "devices" else "/fhir")
            headers = {"Content-Type": content_types[item.kind]}
            if creds.token:
                headers["Authorization"] = f"Bearer {creds.token}"
            async with session.post(target.url + path, data=item.body, headers=headers, ssl=creds.tls or True,
                                    timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
                text = await resp.text()
                if resp.status >= 500:
                    return f"HTTP {resp.status}", True
                if resp.status >= 400:
                    try:
                        issues = json.loads(text).get("issue", [])
                        why = "; ".join(i.get("diagnostics", "") for i in issues[:3])
                    except (ValueError, AttributeError):
                        why = text[:200]
                    report.problems.append(f"{item.source}: HTTP {resp.status} {why}")
                return f"HTTP {resp.status}", False

        while not queue.empty():
            item = queue.get_nowait()
            await pacer.wait(item.count)
            await attempt(once, item)
            report.items += 1
            report.units += item.count

    async def progress() -> None:
        while True:
            await asyncio.sleep(2)
            if on_progress is not None:
                elapsed = time.monotonic() - started
                on_progress(f"sent {report.items:,}/{len(items):,} item(s), {report.units / elapsed:,.0f}/s, "
                            f"resends {report.retries}")

    ticker = asyncio.create_task(progress())
    try:
        if target.kind == "mllp":
            await asyncio.gather(*(mllp_worker() for _ in range(connections)))
        else:
            import aiohttp

            async with aiohttp.ClientSession() as session:
                await asyncio.gather(*(http_worker(session) for _ in range(connections)))
    finally:
        ticker.cancel()
        report.seconds = time.monotonic() - started


def _send_dicom(cfg: Config, target: Target, to: str, paths: Iterable[str], *, connections: int, calling: str,
                on_answer: OnAnswer | None) -> Report:
    """Every file under `paths` over C-STORE; one outcome per file (its status, or why it was not sent)."""
    from pipelines.send_dicom import deliver_dicom, plan_dicom

    try:
        calling = check_ae_title(calling, "--ae-title")
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    work = plan_dicom(_files(paths))
    report = Report(to)
    report.problems.extend(work.unsendable)
    if work.unsendable:
        report.skipped["not DICOM Part 10 files with a usable file meta (carelake ingest --feed dicom)"] = \
            len(work.unsendable)
    if not work.items:
        raise UsageError(f"nothing to send to {to}: {len(work.unsendable)} file(s), none a DICOM Part 10 file with a "
                         "usable file meta" + (f" (first: {work.unsendable[0]})" if work.unsendable else ""))

    def answered(item, answer: str) -> None:
        report.answers[answer] += 1
        report.items += 1
        report.units += 1
        if on_answer is not None:
            on_answer(Item(str(item.path), b"", "dicom", control_id=item.sop_instance_uid), answer)

    def retried() -> None:
        report.retries += 1

    started = time.monotonic()
    report.failed = deliver_dicom(cfg, work.items, host=target.host, port=target.port, called=target.path,
                                  calling=calling, connections=connections, on_answer=answered,
                                  on_problem=report.problems.append, on_retry=retried)
    report.seconds = time.monotonic() - started
    return report


def send(cfg: Config, to: str, paths: Iterable[str], *, rate: float | None = None, connections: int = 1,
         batch: int = 1000, on_answer: OnAnswer | None = None, ack_log: str | Path | None = None,
         on_progress: Callable[[str], None] | None = None, ae_title: str = "CARELAKE_SEND",
         tls_ca: str | None = None, tls_cert: str | None = None, tls_key: str | None = None,
         token_file: str | None = None) -> Report:
    """Deliver every sendable file under `paths` to the gateway at `to`; the report says what happened.

    `ack_log`, when given, receives one line per answered item (answer, MSH-10, file:offset), written
    as answers arrive, so a run that is interrupted still says what the gateway acknowledged.
    """
    if connections < 1:
        raise UsageError(f"--connections must be at least 1, got {connections}")
    if batch < 1:
        raise UsageError(f"--batch must be at least 1, got {batch}")
    if rate is not None and rate <= 0:
        raise UsageError(f"--rate must be positive, got {rate}")
    target = parse_target(to, cfg.gateway.dicom.ae_title)
    if target.kind == "dicom" and (tls_ca or tls_cert or token_file):
        raise UsageError("--tls-ca, --tls-cert and --token-file apply to MLLP and HTTP; DICOM senders are allowed by "
                         "their calling AE title (gateway.dicom.calling_ae_titles)")
    creds = Credentials.of(target, tls_ca, tls_cert, tls_key, token_file) if target.kind != "dicom" else None
    work = plan(paths, target, batch) if target.kind != "dicom" else None
    if work is not None and not work.items:
        reasons = "; ".join(f"{n} {r}" for r, n in work.skipped.items()) or "no files"
        raise UsageError(f"nothing to send to {to}: {reasons}")
    if target.kind == "dicom" and rate is not None:
        raise UsageError("--rate is not supported for dicom:// targets; use --connections to bound the load")
    log_file = open(ack_log, "a", encoding="utf-8", buffering=1) if ack_log else None  # noqa: SIM115
    callback = on_answer
    if log_file is not None:
        def callback(item: Item, answer: str) -> None:
            log_file.write(f"{answer}\t{item.control_id}\t{item.source}\n")
            if on_answer is not None:
                on_answer(item, answer)
    try:
        if work is None:
            return _send_dicom(cfg, target, to, paths, connections=connections, calling=ae_title, on_answer=callback)
        report = Report(to, skipped=work.skipped)
        asyncio.run(_deliver(work.items, target, cfg, rate=rate, connections=connections, report=report,
                             on_answer=callback, on_progress=on_progress, creds=creds))
    finally:
        if log_file is not None:
            log_file.close()
    return report
