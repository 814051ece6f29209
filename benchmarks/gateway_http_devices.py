"""HTTP device ingest, batched POSTs of JSON-lines readings, durable 202: readings/s (goal >= 50,000).

The gateway runs as its own process (`carelake gateway`, production settings, fsync on); this process
posts batches of monitor readings over `--concurrency` keep-alive connections, as `carelake send` does.

Run: .venv/bin/python benchmarks/gateway_http_devices.py [--readings 500000] [--batch 1000] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

from _common import emit, median, percentile

from tests.gatewayproc import GatewayProcess, landed


def body(batch: int, start: int) -> bytes:
    return "".join(
        f'{{"device_id":"icu-bed-{(start + i) % 64:02d}","patient_mrn":"MRN{1000 + (start + i) % 64}",'
        f'"time":"2026-11-21T03:{(i // 60) % 60:02d}:{i % 60:02d}.000Z","code":"8867-4","value":{60 + i % 50}.0,'
        f'"unit":"/min"}}\n' for i in range(batch)).encode()


async def post_all(url: str, bodies: list[bytes], concurrency: int, latencies: list[float]) -> None:
    import aiohttp

    queue = list(reversed(bodies))
    async with aiohttp.ClientSession() as session:
        async def worker() -> None:
            while queue:
                data = queue.pop()
                t0 = time.perf_counter()
                async with session.post(url, data=data, headers={"Content-Type": "application/x-ndjson"}) as r:
                    await r.read()
                    if r.status != 202:
                        raise SystemExit(f"HTTP {r.status}")
                latencies.append((time.perf_counter() - t0) * 1000)

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def one_run(readings: int, batch: int, concurrency: int) -> dict:
    root = Path(tempfile.mkdtemp(prefix="carelake-bench-http-"))
    bodies = [body(batch, n) for n in range(0, readings, batch)]
    latencies: list[float] = []
    with GatewayProcess(root, CARELAKE_GATEWAY__SEGMENT_AGE="1s") as gw:
        t0 = time.perf_counter()
        asyncio.run(post_all(f"{gw.http}/devices", bodies, concurrency, latencies))
        seconds = time.perf_counter() - t0
        gw.stop()
    assert len(landed(root, "devices")) == len(bodies)
    return {"readings": len(bodies) * batch, "seconds": seconds, "readings_per_s": len(bodies) * batch / seconds,
            "post_p50_ms": percentile(latencies, 0.5), "post_p99_ms": percentile(latencies, 0.99)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--readings", type=int, default=500_000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    runs = [one_run(a.readings, a.batch, a.concurrency) for _ in range(a.runs)]
    emit({
        "benchmark": "gateway_http_devices", "batch": a.batch, "concurrency": a.concurrency, "fsync": True,
        "runs": a.runs, "cores": os.cpu_count(), "readings_per_run": runs[0]["readings"],
        "readings_per_s_median": round(median([r["readings_per_s"] for r in runs])),
        "post_p50_ms_median": round(median([r["post_p50_ms"] for r in runs]), 2),
        "post_p99_ms_median": round(median([r["post_p99_ms"] for r in runs]), 2),
        "readings_per_s_runs": [round(r["readings_per_s"]) for r in runs],
        "goal_readings_per_s": 50_000,
    })


if __name__ == "__main__":
    main()
