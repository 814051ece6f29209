"""DICOM C-STORE with durable Success (fsync before 0x0000), 4 associations: instances/s and response latency;
then the landed instances' headers -> bronze.dicom_instances: instances/s (goal >= 500 C-STOREs/s of 512x512 CT).

The gateway runs as its own process (`carelake gateway --dicom-port 0`, production settings, fsync on); each
association is its own client process (spawn), storing 512x512 16-bit CT slices (~513 KB each) one after another,
each waiting for its response. The bronze half runs `bronze.dicom_instances` available-now through the runner over
the instances one C-STORE run landed (hard-linked into a fresh lakehouse per run), in a warm SparkSession.

Run: .venv/bin/python benchmarks/dicom_cstore.py [--instances 2000] [--associations 4] [--runs 3]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _common import emit, median, percentile, temp_config

from tests.gatewayproc import GatewayProcess, landed

UID_DIGITS = 20  # the instance UID's counter: this many digits (no leading zero), so every UID has the same length


class SliceFile:
    """A 512x512 CT slice as a Part 10 file whose SOP Instance UID is rewritten in place before each send: the
    client sends the file's bytes (pynetdicom's chunked send) and never encodes a data set, so the client costs
    the gateway's two cores as little as a modality would."""

    def __init__(self, folder: Path, prefix: str, size: int = 512):
        from tests.test_gateway_dicom import ct_slice

        self.prefix = prefix
        ds = ct_slice(size, size)
        ds.PixelData = os.urandom(size * size * 2)  # incompressible, as real noise is
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = self.uid(0)
        self.path = folder / f"{prefix}.dcm"
        ds.save_as(self.path, enforce_file_format=True)
        data = self.path.read_bytes()
        first = data.find(self.uid(0).encode())
        self.offsets = (first, data.find(self.uid(0).encode(), first + 1))
        assert -1 not in self.offsets, "the template UID must appear in the file meta and the data set"

    def uid(self, n: int) -> str:
        return f"{self.prefix}.{10 ** (UID_DIGITS - 1) + n}"

    def next(self, n: int) -> str:
        uid = self.uid(n)
        with open(self.path, "r+b") as f:
            for offset in self.offsets:
                os.pwrite(f.fileno(), uid.encode(), offset)
        return uid


def association(address: tuple[str, int], count: int, start_at: float, folder: str, out) -> None:
    """One modality: `count` C-STOREs on one association; puts (latencies ms, failures, end time) on `out`."""
    import logging

    from pynetdicom import _config

    library = logging.getLogger("pynetdicom")  # why an association ends, if it does, on this process's stderr
    library.setLevel(logging.WARNING)
    library.addHandler(logging.StreamHandler())
    _config.STORE_SEND_CHUNKED_DATASET = True  # the file's bytes on the wire, as `carelake send` does

    from tests.test_gateway_dicom import scu

    template = SliceFile(Path(folder), f"2.25.{os.getpid()}{time.time_ns() % 10**9}")
    latencies, failures, lost = [], 0, 0
    ae = scu(f"BENCH_{os.getpid() % 10000}")
    ae.dimse_timeout = 5  # a lost response costs this long (and counts in responses_lost_by_the_client)
    try:
        assoc = _associate(ae, address)
        time.sleep(max(0.0, start_at - time.time()))
        for n in range(1, count + 1):
            template.next(n)
            t0 = time.perf_counter()
            status = getattr(assoc.send_c_store(template.path), "Status", None)
            if status is None:  # no response: pynetdicom's requestor can lose one under load (see README); resend
                lost += 1
                assoc = _associate(ae, address)
                status = getattr(assoc.send_c_store(template.path), "Status", None)
            latencies.append((time.perf_counter() - t0) * 1000)
            failures += status != 0
        assoc.release()
    except Exception as exc:  # noqa: BLE001 - report it to the parent, which fails the run naming it
        out.put((latencies, f"{type(exc).__name__}: {exc}", lost, time.time()))
        return
    out.put((latencies, failures, lost, time.time()))


def _associate(ae, address):
    assoc = ae.associate(*address, ae_title="CARELAKE")
    if not assoc.is_established:
        raise RuntimeError(f"no association: rejected={assoc.is_rejected} aborted={assoc.is_aborted}")
    return assoc


def cstore_run(total: int, associations: int) -> dict:
    root = Path(tempfile.mkdtemp(prefix="carelake-bench-dicom-"))
    per = total // associations
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    with GatewayProcess(root, "--dicom-port", "0") as gw:
        start_at = time.time() + 4  # every client connected and its template built before the clock starts
        work = tempfile.mkdtemp(prefix="carelake-bench-dicom-client-")
        procs = [ctx.Process(target=association, args=(gw.dicom, per, start_at, work, out))
                 for _ in range(associations)]
        for p in procs:
            p.start()
        results = [out.get(timeout=600) for _ in procs]
        for p in procs:
            p.join()
        seconds = max(end for *_, end in results) - start_at
        gw.stop()
        shutil.rmtree(work, ignore_errors=True)
    if any(isinstance(f, str) for _, f, *_ in results):
        print(gw.stderr[-3000:], file=sys.stderr)
    errors = [f for _, f, *_ in results if isinstance(f, str)]
    assert not errors, f"an association failed: {errors}"
    latencies = [x for lat, *_ in results for x in lat]
    failures = sum(f for _, f, *_ in results)
    lost = sum(n for _, _, n, _ in results)
    landed_count = len(landed(root, "dicom"))
    # a lost response's instance landed (Success was sent) and was sent again: it may be there twice
    assert failures == 0 and per * associations <= landed_count <= per * associations + lost, (failures, landed_count)
    return {"root": root, "instances": landed_count, "lost": lost, "seconds": seconds,
            "per_s": per * associations / seconds, "p50_ms": percentile(latencies, 0.5),
            "p99_ms": percentile(latencies, 0.99)}


def bronze_run(spark, landing: Path, instances: int) -> float:
    """bronze.dicom_instances available-now over a copy (hard links) of `landing`: instances/s."""
    from pipelines.jobs import load_registry
    from pipelines.runner import Runner, Trigger
    from pipelines.store import open_store

    cfg = temp_config(Path(tempfile.mkdtemp(prefix="carelake-bench-dicom-bronze-")))
    shutil.copytree(landing, cfg.path("landing", "dicom"), copy_function=os.link)
    store = open_store(cfg, spark)
    runner = Runner(cfg, spark, store, load_registry(cfg))
    t0 = time.perf_counter()
    runner.run(["bronze.dicom_instances"], Trigger(available_now=True))
    seconds = time.perf_counter() - t0
    rows = store.read_arrow("bronze.dicom_instances")
    assert len(rows) == instances and set(rows.column("parse_status").to_pylist()) == {"ok"}
    shutil.rmtree(cfg.root)
    return instances / seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--instances", type=int, default=2000)
    ap.add_argument("--associations", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-bronze", action="store_true", help="only the C-STORE half")
    a = ap.parse_args()
    runs = [cstore_run(a.instances, a.associations) for _ in range(a.runs)]
    figures = {
        "benchmark": "dicom_cstore", "associations": a.associations, "fsync": True, "runs": a.runs,
        "cores": os.cpu_count(), "instances_per_run": runs[0]["instances"], "instance_kb": 513,
        "cstore_per_s_median": round(median([r["per_s"] for r in runs])),
        "response_p50_ms_median": round(median([r["p50_ms"] for r in runs]), 2),
        "response_p99_ms_median": round(median([r["p99_ms"] for r in runs]), 2),
        "cstore_per_s_runs": [round(r["per_s"]) for r in runs], "goal_cstore_per_s": 500,
        "responses_lost_by_the_client": sum(r["lost"] for r in runs),
    }
    if not a.no_bronze:
        from pipelines.spark import create_spark

        spark = create_spark(temp_config().spark)
        landing = runs[-1]["root"] / "landing" / "dicom"
        bronze_run(spark, landing, runs[-1]["instances"])  # warm the JVM and Python workers outside the figures
        bronze = [bronze_run(spark, landing, runs[-1]["instances"]) for _ in range(a.runs)]
        figures.update(bronze_instances_per_s_median=round(median(bronze)), bronze_runs=[round(x) for x in bronze])
        spark.stop()
    for r in runs:
        shutil.rmtree(r["root"], ignore_errors=True)
    emit(figures)


if __name__ == "__main__":
    main()
