"""MLLP with durable ACK (fsync before AA), 8 connections: messages/s and ACK latency (goal >= 5,000 msg/s).

The gateway runs as its own process (`carelake gateway`, production settings, fsync on); the client is
this process, on the same 2 cores, each connection sending one ORU^R01 and waiting for its ACK.

Run: .venv/bin/python benchmarks/gateway_mllp.py [--messages 20000] [--connections 8] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

from _common import emit, median, percentile

from bronze.hl7_wire import MLLP_END, frame
from tests.gatewayproc import GatewayProcess, landed
from tests.test_gateway import oru


async def client(address: tuple[str, int], messages: list[bytes], latencies: list[float]) -> None:
    reader, writer = await asyncio.open_connection(*address)
    for m in messages:
        t0 = time.perf_counter()
        writer.write(frame(m))
        await writer.drain()
        reply = await reader.readuntil(MLLP_END)
        latencies.append((time.perf_counter() - t0) * 1000)
        if b"MSA|AA|" not in reply:
            raise SystemExit(f"unexpected ACK: {reply!r}")
    writer.close()
    await writer.wait_closed()


EXTRA_ENV: dict[str, str] = {}


def one_run(total: int, connections: int) -> dict:
    root = Path(tempfile.mkdtemp(prefix="carelake-bench-mllp-"))
    per = total // connections
    work = [[oru(f"B{c}-{i}") for i in range(per)] for c in range(connections)]
    latencies: list[float] = []
    with GatewayProcess(root, CARELAKE_GATEWAY__SEGMENT_AGE="1s", **EXTRA_ENV) as gw:
        async def go() -> float:
            t0 = time.perf_counter()
            await asyncio.gather(*(client(gw.mllp, w, latencies) for w in work))
            return time.perf_counter() - t0

        seconds = asyncio.run(go())
        gw.stop()
    assert len(landed(root, "hl7")) == per * connections
    return {"messages": per * connections, "seconds": seconds, "msg_per_s": per * connections / seconds,
            "ack_p50_ms": percentile(latencies, 0.5), "ack_p99_ms": percentile(latencies, 0.99)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    runs = [one_run(a.messages, a.connections) for _ in range(a.runs)]
    emit({
        "benchmark": "gateway_mllp", "connections": a.connections, "fsync": True, "runs": a.runs,
        "cores": os.cpu_count(), "messages_per_run": runs[0]["messages"],
        "msg_per_s_median": round(median([r["msg_per_s"] for r in runs])),
        "ack_p50_ms_median": round(median([r["ack_p50_ms"] for r in runs]), 2),
        "ack_p99_ms_median": round(median([r["ack_p99_ms"] for r in runs]), 2),
        "msg_per_s_runs": [round(r["msg_per_s"]) for r in runs],
        "goal_msg_per_s": 5000,
    })


if __name__ == "__main__":
    main()
