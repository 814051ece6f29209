"""Soak: the gateway for minutes under steady traffic with hostile clients beside it (issue 22's "must show").

A real `carelake gateway` (its own process, fsync on) receives, for `--minutes`:
- well-behaved traffic, from this process: `--readings` device readings/s over HTTP (`--posts` POSTs/s on
  keep-alive connections, each reading numbered) and `--hl7` ORU^R01 messages/s over MLLP (5 connections,
  each message waiting for its ACK, unique control ids). Each send is scheduled; its ACK latency counts from
  the scheduled moment, so a stalled gateway shows as latency, not as fewer sends;
- hostile traffic, from a second process: slow headers and slow bodies trickling a byte a second, bodies
  declared 200 MB, endless chunked bodies, invalid JSON (refused and kept), disconnects mid-body, garbage
  MLLP frames, half frames (closed, or trickling), HL7 without framing, FHS batches over max_batch_messages.

Reported (one JSON line): p50/p99/max ACK latency of the well-behaved clients per protocol and together, the
gateway's RSS (sampled every second: start, max, end), the size of landing/_rejects at the end (bounded by
`--rejects-max-mb`), what the hostile clients got, the gateway's timeout/disconnect/reject counters, the time
SIGTERM took, and the check that everything acknowledged is in landing (acked vs landed, missing = 0).
`--pipeline` also runs `carelake run bronze.device_readings bronze.hl7_messages --continuous` beside it and
reports each bronze row's lag (received at the gateway -> its bronze commit) and the runner's memory; the JVM
then shares the two cores with the gateway, so run the latency figures without it.

Goal: p99 ACK <= 200 ms for the well-behaved clients; memory flat; rejects within their bound; missing = 0.
Run: .venv/bin/python benchmarks/gateway_soak.py [--minutes 10] [--readings 1000] [--posts 20] [--hl7 50]
                                                 [--rejects-max-mb 16] [--pipeline] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import multiprocessing
import os
import random
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path

from _common import emit, percentile, temp_config
from gold_latency import Proc, epoch, first_inserts, table_path

from bronze.hl7_wire import MLLP_END, frame, parse_header
from tests.conftest import carelake_env
from tests.gatewayproc import landed
from tests.test_gateway import oru

GOAL_P99_MS = 200
MLLP_CONNECTIONS = 5


# -- well-behaved clients ------------------------------------------------------------------------------------
class Http:
    """Device readings on schedule: `posts` POSTs a second, each `readings / posts` numbered readings."""

    def __init__(self, url: str, readings: int, posts: int):
        self.url, self.per_post, self.posts = url, max(1, readings // posts), posts
        self.seq = itertools.count()
        self.latency_ms: list[float] = []
        self.acked: set[int] = set()
        self.failed = 0

    def body(self) -> tuple[bytes, list[int]]:
        seqs = [next(self.seq) for _ in range(self.per_post)]
        lines = [f'{{"device_id":"icu-bed-{n % 100:03d}","patient_mrn":"MRN{100000 + n % 100}",'
                 f'"time":"2026-11-21T03:00:00.000Z","code":"8867-4","value":{60 + n % 40},"unit":"/min",'
                 f'"seq":{n}}}\n' for n in seqs]
        return "".join(lines).encode(), seqs

    async def run(self, seconds: float) -> None:
        import aiohttp

        tasks = set()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            t0 = time.monotonic()
            for i in range(int(seconds * self.posts)):
                due = t0 + i / self.posts
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                task = asyncio.create_task(self.post(session, due))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.gather(*tasks)

    async def post(self, session, due: float) -> None:
        body, seqs = self.body()
        try:
            async with session.post(self.url, data=body, headers={"Content-Type": "application/x-ndjson"}) as r:
                await r.read()
                ok = r.status == 202
        except Exception:  # noqa: BLE001 - counted and reported
            ok = False
        if ok:
            self.latency_ms.append((time.monotonic() - due) * 1000)
            self.acked.update(seqs)
        else:
            self.failed += 1


class Mllp:
    """ORU^R01 messages on schedule over a few connections, each waiting for its ACK."""

    def __init__(self, address: tuple[str, int], rate: float):
        self.address, self.rate = address, rate
        self.latency_ms: list[float] = []
        self.acked: set[str] = set()
        self.failed = 0

    async def run(self, seconds: float) -> None:
        await asyncio.gather(*(self.connection(c, seconds) for c in range(MLLP_CONNECTIONS)))

    async def connection(self, c: int, seconds: float) -> None:
        per_s = self.rate / MLLP_CONNECTIONS
        reader, writer = await asyncio.open_connection(*self.address)
        t0 = time.monotonic() + c / self.rate  # the connections take turns
        for i in range(int(seconds * per_s)):
            due = t0 + i / per_s
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            control = f"SOAK-{c}-{i}"
            try:
                writer.write(frame(oru(control)))
                reply = await asyncio.wait_for(reader.readuntil(MLLP_END), 30)
            except (OSError, asyncio.IncompleteReadError, TimeoutError):
                self.failed += 1
                writer.close()
                reader, writer = await asyncio.open_connection(*self.address)
                continue
            if b"MSA|AA|" + control.encode() + b"\r" in reply:
                self.latency_ms.append((time.monotonic() - due) * 1000)
                self.acked.add(control)
            else:
                self.failed += 1
        writer.close()


# -- hostile clients (their own process) ---------------------------------------------------------------------
async def _open(address):
    return await asyncio.wait_for(asyncio.open_connection(*address), 10)


async def _until_closed(reader, limit_s: float) -> bytes:
    data = b""
    try:
        async with asyncio.timeout(limit_s):
            while chunk := await reader.read(65536):
                data += chunk
    except (OSError, TimeoutError):
        pass
    return data


def _status(answer: bytes) -> str:
    return answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/1.1 ") else ("closed" if not answer
                                                                                     else "other")


async def _trickle(address, first: bytes, drip: bytes, limit_s: float) -> str:
    """Send `first`, then a byte a second until the gateway answers or closes."""
    reader, writer = await _open(address)
    writer.write(first)
    reading = asyncio.ensure_future(_until_closed(reader, limit_s))
    for i in range(int(limit_s)):
        if reading.done():
            break
        try:
            writer.write(drip[i % len(drip):][:1])
        except OSError:
            break
        await asyncio.wait([reading], timeout=1)
    answer = await reading
    writer.close()
    return _status(answer)


def _head(**headers: str) -> bytes:
    fields = {"Host": "soak", "Content-Type": "application/x-ndjson", **headers}
    return ("POST /devices HTTP/1.1\r\n" + "".join(f"{k.replace('_', '-')}: {v}\r\n" for k, v in fields.items())
            + "\r\n").encode()


async def slow_headers(http, mllp) -> str:
    return await _trickle(http, b"", b"POST /devices HTTP/1.1\r\nHost: soak\r\nX-Slow: " + b"a" * 200, 120)


async def slow_body(http, mllp) -> str:
    return await _trickle(http, _head(Content_Length="100000"), b'{"device_id":"x","time":"t"}\n', 120)


async def declared_huge(http, mllp) -> str:
    reader, writer = await _open(http)
    writer.write(_head(Content_Length="200000000"))
    answer = await _until_closed(reader, 30)
    writer.close()
    return _status(answer)


async def endless_chunked(http, mllp) -> str:
    reader, writer = await _open(http)
    writer.write(_head(Transfer_Encoding="chunked"))
    chunk = b"10000\r\n" + b"x" * 0x10000 + b"\r\n"
    reading = asyncio.ensure_future(_until_closed(reader, 60))
    try:
        while not reading.done():
            writer.write(chunk)
            await writer.drain()
    except OSError:
        pass
    answer = await reading
    writer.close()
    return _status(answer)


async def invalid_json(http, mllp) -> str:
    body = b"{not json at all\n" * 1200  # ~20 KB, refused with 400 and kept whole
    reader, writer = await _open(http)
    writer.write(_head(Content_Length=str(len(body)), Connection="close") + body)
    answer = await _until_closed(reader, 30)
    writer.close()
    return _status(answer)


async def disconnect_mid_body(http, mllp) -> str:
    _reader, writer = await _open(http)
    writer.write(_head(Content_Length="5000") + b'{"device_id":"x"')
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.close()
    return "left"


async def garbage_frame(http, mllp) -> str:
    reader, writer = await _open(mllp)
    writer.write(frame(b"this is not HL7 " + bytes(random.randrange(32, 127) for _ in range(200))))
    answer = await _until_closed_ack(reader)
    writer.close()
    return "AR" if b"MSA|AR|" in answer else "other"


async def _until_closed_ack(reader) -> bytes:
    try:
        return await asyncio.wait_for(reader.readuntil(MLLP_END), 30)
    except (OSError, asyncio.IncompleteReadError, TimeoutError):
        return b""


async def half_frame_closed(http, mllp) -> str:
    _reader, writer = await _open(mllp)
    writer.write(b"\x0b" + oru("HALF")[:40])
    await writer.drain()
    writer.close()
    return "left"


async def half_frame_trickled(http, mllp) -> str:
    message = oru("TRICKLE")
    status = await _trickle(mllp, b"\x0b" + message[:20], message[20:] * 20, 180)
    return "closed" if status == "closed" else "answered"


async def unframed(http, mllp) -> str:
    reader, writer = await _open(mllp)
    writer.write(oru("BARE"))
    answer = await _until_closed(reader, 30)
    writer.close()
    return "AR" if b"MSA|AR|" in answer else "other"


_TINY = b"".join(b"MSH|^~\\&|A|B|||||ORU^R01|%d|P|2.5\r" % i for i in range(110_000))


async def batch_over_bound(http, mllp) -> str:
    reader, writer = await _open(mllp)
    writer.write(frame(b"FHS|^~\\&|A|B\rBHS|^~\\&|A|B\r" + _TINY + b"BTS|110000\rFTS|1\r"))
    answer = await _until_closed_ack(reader)
    writer.close()
    return "AR" if b"MSA|AR|" in answer else "other"


# (client, one started every this many seconds)
HOSTILE = ((slow_headers, 0.5), (slow_body, 1.0), (declared_huge, 1.0), (endless_chunked, 10.0),
           (invalid_json, 0.5), (disconnect_mid_body, 1.0), (garbage_frame, 0.5), (half_frame_closed, 1.0),
           (half_frame_trickled, 2.0), (unframed, 2.0), (batch_over_bound, 20.0))


async def _hostile(http, mllp, seconds: float) -> dict:
    outcomes: dict[str, dict[str, int]] = {fn.__name__: {} for fn, _ in HOSTILE}
    tasks: set[asyncio.Task] = set()

    async def one(fn) -> None:
        try:
            result = await fn(http, mllp)
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            result = type(exc).__name__
        counts = outcomes[fn.__name__]
        counts[result] = counts.get(result, 0) + 1

    async def every(fn, period: float) -> None:
        await asyncio.sleep(random.uniform(0, period))
        t0 = time.monotonic()
        for i in itertools.count():
            if time.monotonic() - t0 >= seconds:
                return
            task = asyncio.create_task(one(fn))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            await asyncio.sleep(max(0.0, t0 + (i + 1) * period - time.monotonic()))

    await asyncio.gather(*(every(fn, period) for fn, period in HOSTILE))
    if tasks:  # the slow ones still under way when the time is up are left to the gateway's stop
        await asyncio.wait(tasks, timeout=5)
    return outcomes


def hostile_process(http, mllp, seconds: float, out) -> None:
    out.put(asyncio.run(_hostile(http, mllp, seconds)))


# -- measuring -----------------------------------------------------------------------------------------------
def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def group_pids(pgid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if os.getpgid(int(d.name)) == pgid:
                    out.append(int(d.name))
            except OSError:
                pass
    return out


async def sample_rss(pid: int, samples: list[float], done: asyncio.Event, runner_pgid: int | None,
                     runner_samples: list[float]) -> None:
    while not done.is_set():
        samples.append(rss_mb([pid]))
        if runner_pgid is not None:
            runner_samples.append(rss_mb(group_pids(runner_pgid)))
        try:
            await asyncio.wait_for(done.wait(), 1)
        except TimeoutError:
            pass


def scrape(http: str) -> dict[str, float]:
    """The gateway's counters that tell what the hostile clients cost it."""
    text = urllib.request.urlopen(f"{http}/metrics", timeout=10).read().decode()
    wanted = ("carelake_gateway_timeouts_total", "carelake_gateway_disconnects_total",
              "carelake_gateway_rejects_deleted_total", "carelake_gateway_rejected_total",
              "carelake_gateway_incomplete_frames_total", "carelake_gateway_unframed_total")
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith(wanted)}


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / (1 << 20)


def lat(values: list[float], prefix: str) -> dict:
    if not values:
        return {f"{prefix}_n": 0}
    return {f"{prefix}_p50_ms": round(percentile(values, 0.5), 1),
            f"{prefix}_p99_ms": round(percentile(values, 0.99), 1),
            f"{prefix}_max_ms": round(max(values), 1), f"{prefix}_n": len(values)}


def check_landing(root: Path, http: Http, mllp: Mllp) -> dict:
    seqs = set()
    for _, record in landed(root, "devices"):
        for line in record.body.splitlines():
            seqs.add(json.loads(line)["seq"])
    controls = {parse_header(r.body).control_id for _, r in landed(root, "hl7") if r.header["status"] == "accepted"}
    return {"readings_acked": len(http.acked), "readings_landed": len(seqs),
            "hl7_acked": len(mllp.acked), "hl7_landed_accepted": len(controls),
            "acked_missing_from_landing": len(http.acked - seqs) + len(mllp.acked - controls)}


def bronze_lag(root: Path, readings: int, timeout: float, runner: Proc) -> dict:
    """Wait for bronze to hold every landed reading, then each row's lag: received -> its first bronze commit."""
    from deltalake import DeltaTable

    cfg = temp_config(root)
    path = table_path(cfg, "bronze.device_readings")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and runner.proc.poll() is None:
        try:
            if DeltaTable(str(path)).to_pyarrow_dataset().count_rows() >= readings:
                break
        except Exception:  # noqa: BLE001 - the table may not exist yet
            pass
        time.sleep(2)
    rows = first_inserts(path, ["landing_file", "landing_position"], ["landing_file", "landing_position",
                                                                       "received_at"])
    lags = (rows["committed"] - epoch(rows["received_at"])).tolist()
    return {"bronze_rows": len(lags), "bronze_lag_p50_s": round(percentile(lags, 0.5), 2),
            "bronze_lag_p95_s": round(percentile(lags, 0.95), 2), "bronze_lag_max_s": round(max(lags), 2)}


# -- the run -------------------------------------------------------------------------------------------------
def start(base: list[str], env: dict[str, str], logs: Path) -> tuple[Proc, str, tuple[str, int]]:
    """The gateway on free ports, its log under `logs`: (process, HTTP base URL, MLLP address)."""
    gw = Proc([*base, "gateway", "--mllp-port", "0", "--http-port", "0"], env, logs / "gateway.log",
              stdout_pipe=True)
    line = gw.proc.stdout.readline()
    if not line.startswith("carelake gateway:"):
        gw.stop(5)
        raise SystemExit(f"gateway did not start: {line!r}; see {gw.log}")
    fields = dict(part.split("=", 1) for part in line.split()[2:])
    host, port = fields["mllp"].rsplit(":", 1)
    return gw, fields["http"], (host, int(port))


async def drive(a, gw: Proc, http_url: str, mllp_address, runner: Proc | None) -> dict:
    seconds = a.minutes * 60
    host, port = http_url.removeprefix("http://").rsplit(":", 1)
    out = multiprocessing.get_context("spawn").Queue()
    hostile = multiprocessing.get_context("spawn").Process(
        target=hostile_process, args=((host, int(port)), mllp_address, seconds, out), daemon=True)
    hostile.start()
    http, mllp = Http(f"{http_url}/devices", a.readings, a.posts), Mllp(mllp_address, a.hl7)
    rss: list[float] = []
    runner_rss: list[float] = []
    done = asyncio.Event()
    sampler = asyncio.create_task(sample_rss(gw.proc.pid, rss, done, runner.proc.pid if runner else None,
                                             runner_rss))
    load_start = os.getloadavg()[0]
    await asyncio.gather(http.run(seconds), mllp.run(seconds))
    hostile_outcomes = await asyncio.to_thread(out.get, True, 120)
    counters = await asyncio.to_thread(scrape, http_url)
    load_end = os.getloadavg()[0]
    done.set()
    await sampler
    hostile.join(10)
    return {"http": http, "mllp": mllp, "rss": rss, "runner_rss": runner_rss, "counters": counters,
            "hostile": hostile_outcomes, "load": (load_start, load_end)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--readings", type=int, default=1000, help="device readings/s over HTTP (default 1000)")
    ap.add_argument("--posts", type=int, default=20, help="POSTs/s carrying them (default 20)")
    ap.add_argument("--hl7", type=float, default=50, help="HL7 ORU messages/s over MLLP (default 50)")
    ap.add_argument("--rejects-max-mb", type=int, default=16, help="gateway.rejects_max_mb (default 16, so the "
                    "bound is reached within minutes)")
    ap.add_argument("--pipeline", action="store_true", help="run the bronze jobs continuously beside it")
    ap.add_argument("--keep", action="store_true", help="keep the lakehouse root (logs in <root>/_bench)")
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="carelake-bench-soak-"))
    logs = root / "_bench"
    logs.mkdir()
    sets = ["gateway.segment_age=1s", f"gateway.rejects_max_mb={a.rejects_max_mb}"]
    base = [x for s in sets for x in ("--set", s)]
    env = carelake_env(root, short_lived=False)
    gw = runner = None
    try:
        gw, http_url, mllp_address = start(base, env, logs)
        if a.pipeline:
            runner = Proc([*base, "run", "bronze.device_readings", "bronze.hl7_messages", "--continuous",
                           "--interval", "1s"], env, logs / "runner.log")
        d = asyncio.run(drive(a, gw, http_url, mllp_address, runner))
        started = time.monotonic()
        gw_rc = gw.stop(60)
        stop_s = time.monotonic() - started
        http, mllp = d["http"], d["mllp"]
        figures = {
            "benchmark": "gateway_soak", "minutes": a.minutes, "cores": os.cpu_count(),
            "load_avg_start": round(d["load"][0], 2), "load_avg_end": round(d["load"][1], 2),
            "readings_per_s": a.readings, "posts_per_s": a.posts, "hl7_per_s": a.hl7,
            **lat(http.latency_ms, "http_ack"), "http_failed": http.failed,
            **lat(mllp.latency_ms, "mllp_ack"), "mllp_failed": mllp.failed,
            **lat(http.latency_ms + mllp.latency_ms, "ack"), "goal_ack_p99_ms": GOAL_P99_MS,
            "gateway_rss_start_mb": round(d["rss"][0], 1), "gateway_rss_max_mb": round(max(d["rss"]), 1),
            "gateway_rss_end_mb": round(d["rss"][-1], 1),
            "rejects_mb_end": round(folder_mb(root / "landing" / "_rejects"), 1), "rejects_max_mb": a.rejects_max_mb,
            "gateway_stop_s": round(stop_s, 2), "gateway_exit": gw_rc,
            "gateway_counters": d["counters"], "hostile": d["hostile"],
            **check_landing(root, http, mllp), "root": str(root) if a.keep else None,
        }
        if runner is not None:
            figures |= bronze_lag(root, figures["readings_landed"], 600, runner)
            figures["runner_rss_max_mb"] = round(max(d["runner_rss"]), 1)
            figures["runner_exit"] = runner.stop(90)
    finally:
        for p in (runner, gw):
            if p is not None:
                p.stop(10)
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)
    emit(figures)


if __name__ == "__main__":
    main()
