"""DICOM C-STORE with durable Success (fsync before 0x0000), 4 associations: instances/s and response latency;
then the landed instances' headers -> bronze.dicom_instances: instances/s (goal >= 500 C-STOREs/s of 512x512 CT).

The gateway runs as its own process (`carelake gateway --dicom-port 0`, production settings, fsync on, with
`--workers N` acceptor processes: gateway.dicom.workers); each association is its own client process (spawn),
storing 512x512 16-bit CT slices (~513 KB each) one after another, each waiting for its response. The clients share
the machine's cores with the gateway: `--client pynetdicom` sends with pynetdicom's SCU (as `carelake send` does;
~2 ms of CPU per instance), `--client wire` sends the same bytes from a buffer (`WireModality`: what a modality on
its own machine costs this one, almost nothing), so the figures show the gateway's own limit. Each run reports the
CPU the gateway's processes and the clients spent per instance. The bronze half runs `bronze.dicom_instances`
available-now through the runner over the instances one C-STORE run landed (hard-linked into a fresh lakehouse per
run), in a warm SparkSession.

Run: .venv/bin/python benchmarks/dicom_cstore.py [--instances 2000] [--associations 4] [--runs 3] [--workers 2]
     [--client pynetdicom|wire] [--no-bronze]    (--workers 0,2 alternates the two settings run by run)
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import socket
import struct
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


def _item(kind: int, data: bytes) -> bytes:
    """A PS3.8 9.3 PDU item: type, reserved, 2-byte big-endian length."""
    return bytes([kind, 0]) + struct.pack(">H", len(data)) + data


def _implicit(element: int, value: bytes) -> bytes:
    """A command set element in implicit VR little endian (group 0000)."""
    return struct.pack("<HHI", 0, element, len(value)) + value


def _uid(value: str) -> bytes:
    raw = value.encode()
    return raw + b"\0" if len(raw) % 2 else raw


class WireModality:
    """One association that sends C-STORE-RQs from a prepared buffer (PS3.8 PDUs, PS3.7 command set), patching the
    instance UID and message id in place per send: the bytes a modality sends, at almost no CPU."""

    CONTEXT = 1

    def __init__(self, address: tuple[str, int], calling: str, template: SliceFile):
        from pydicom import dcmread
        from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID
        from pynetdicom.dsutils import encode

        self.sock = socket.create_connection(address, timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ds = dcmread(template.path)
        context = _item(0x20, bytes([self.CONTEXT, 0, 0, 0]) + _item(0x30, ds.SOPClassUID.encode())
                        + _item(0x40, ds.file_meta.TransferSyntaxUID.encode()))
        user = _item(0x50, _item(0x51, struct.pack(">I", 0)) + _item(0x52, PYNETDICOM_IMPLEMENTATION_UID.encode()))
        fixed = struct.pack(">HH", 1, 0) + b"CARELAKE".ljust(16) + calling.encode().ljust(16) + b"\0" * 32
        body = fixed + _item(0x10, b"1.2.840.10008.3.1.1.1") + context + user
        self.sock.sendall(b"\x01\x00" + struct.pack(">I", len(body)) + body)
        kind, answer = self._pdu()
        if kind != 0x02:
            raise RuntimeError(f"association not accepted: PDU type {kind:#04x} {answer[:10].hex()}")
        max_pdu = self._accepted(answer)
        uid = ds.SOPInstanceUID
        data = encode(ds, False, True)  # explicit VR little endian, as the file holds it
        command = (_implicit(0x0002, _uid(ds.SOPClassUID)) + _implicit(0x0100, struct.pack("<H", 1))
                   + _implicit(0x0110, struct.pack("<H", 1)) + _implicit(0x0700, struct.pack("<H", 0))
                   + _implicit(0x0800, struct.pack("<H", 1)) + _implicit(0x1000, _uid(uid)))
        command = _implicit(0x0000, struct.pack("<I", len(command))) + command
        wire = self._pdata(command, 0x03)
        self.uid_at = [wire.find(_uid(uid))]
        self.message_id_at = wire.find(struct.pack("<HHI", 0, 0x0110, 2)) + 8
        step = (max_pdu or 1 << 30) - 6  # a PDU's variable field: one PDV item header (6 bytes) + its data
        for at in range(0, len(data), step):
            piece = data[at:at + step]
            if uid.encode() in piece:
                self.uid_at.append(len(wire) + 12 + piece.find(uid.encode()))
            wire += self._pdata(piece, 0x02 if at + step >= len(data) else 0x00)
        self.wire = bytearray(wire)

    @classmethod
    def _pdata(cls, data: bytes, control: int) -> bytes:
        pdv = struct.pack(">I", len(data) + 2) + bytes([cls.CONTEXT, control]) + data
        return b"\x04\x00" + struct.pack(">I", len(pdv)) + pdv

    @classmethod
    def _accepted(cls, answer: bytes) -> int:
        """The acceptor's maximum PDU length, once our one presentation context is accepted."""
        at, max_pdu, accepted = 68, 0, False
        while at < len(answer):
            kind, length = answer[at], struct.unpack(">H", answer[at + 2:at + 4])[0]
            item = answer[at + 4:at + 4 + length]
            if kind == 0x21:
                accepted = item[0] == cls.CONTEXT and item[2] == 0
            elif kind == 0x50 and item[:1] == b"\x51":
                max_pdu = struct.unpack(">I", item[4:8])[0]
            at += 4 + length
        if not accepted:
            raise RuntimeError("the CT storage context was not accepted")
        return max_pdu

    def _read(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("the gateway closed the connection")
            buf += chunk
        return bytes(buf)

    def _pdu(self) -> tuple[int, bytes]:
        kind, _, length = struct.unpack(">BBI", self._read(6))
        return kind, self._read(length)

    def store(self, uid: str, message_id: int) -> int:
        """Send one C-STORE-RQ; its response's Status."""
        raw = uid.encode()
        for at in self.uid_at:
            self.wire[at:at + len(raw)] = raw
        self.wire[self.message_id_at:self.message_id_at + 2] = struct.pack("<H", message_id & 0xFFFF)
        self.sock.sendall(self.wire)
        command = b""
        while True:
            kind, pdu = self._pdu()
            if kind != 0x04:
                raise ConnectionError(f"PDU type {kind:#04x} instead of the C-STORE response")
            at = 0
            while at < len(pdu):
                length, control = struct.unpack(">I", pdu[at:at + 4])[0], pdu[at + 5]
                command += pdu[at + 6:at + 4 + length]
                at += 4 + length
                if control & 0x03 == 0x03:
                    return self._status(command, message_id & 0xFFFF, raw)

    @staticmethod
    def _status(command: bytes, message_id: int, uid: bytes) -> int:
        """The response's Status, once it answers this request (message id and instance UID)."""
        fields, at = {}, 0
        while at < len(command):
            _group, element, length = struct.unpack("<HHI", command[at:at + 8])
            fields[element] = command[at + 8:at + 8 + length]
            at += 8 + length
        answered = struct.unpack("<H", fields.get(0x0120, b"\xff\xff"))[0]
        if answered != message_id or fields.get(0x1000, b"").rstrip(b"\0") != uid:
            raise RuntimeError(f"a response to another request: message {answered}, instance {fields.get(0x1000)}")
        return struct.unpack("<H", fields[0x0900])[0]

    def release(self) -> None:
        self.sock.sendall(b"\x05\x00" + struct.pack(">I", 4) + b"\0" * 4)
        kind, _ = self._pdu()
        if kind != 0x06:
            raise RuntimeError(f"PDU type {kind:#04x} instead of A-RELEASE-RP (a response too many?)")
        self.sock.close()


def association(address: tuple[str, int], count: int, start_at: float, folder: str, client: str, out) -> None:
    """One modality: `count` C-STOREs on one association; puts (latencies ms, failures, lost, end time, CPU s) on
    `out`."""
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
        assoc = WireModality(address, ae.ae_title, template) if client == "wire" else _associate(ae, address)
        time.sleep(max(0.0, start_at - time.time()))
        cpu = os.times()
        for n in range(1, count + 1):
            t0 = time.perf_counter()
            if client == "wire":
                status = assoc.store(template.uid(n), n)
            else:
                template.next(n)
                t0 = time.perf_counter()
                status = getattr(assoc.send_c_store(template.path), "Status", None)
                if status is None:  # no response: pynetdicom's requestor can lose one under load (README); resend
                    lost += 1
                    assoc = _associate(ae, address)
                    status = getattr(assoc.send_c_store(template.path), "Status", None)
            latencies.append((time.perf_counter() - t0) * 1000)
            failures += status != 0
        end, spent = time.time(), os.times()
        assoc.release()
    except Exception as exc:  # noqa: BLE001 - report it to the parent, which fails the run naming it
        out.put((latencies, f"{type(exc).__name__}: {exc}", lost, time.time(), 0.0))
        return
    out.put((latencies, failures, lost, end, spent.user + spent.system - cpu.user - cpu.system))


def _associate(ae, address):
    assoc = ae.associate(*address, ae_title="CARELAKE")
    if not assoc.is_established:
        raise RuntimeError(f"no association: rejected={assoc.is_rejected} aborted={assoc.is_aborted}")
    return assoc


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of these processes so far (those that ended count nothing)."""
    total = 0
    for pid in pids:
        try:
            total += sum(int(x) for x in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[11:13])
        except OSError:
            pass
    return total / os.sysconf("SC_CLK_TCK")


def cstore_run(total: int, associations: int, workers: int, client: str) -> dict:
    root = Path(tempfile.mkdtemp(prefix="carelake-bench-dicom-"))
    per = total // associations
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    # segments sealed at the production age (conf/base.yaml; the test overlay's 200 ms seals 5x as often)
    with GatewayProcess(root, "--dicom-port", "0", CARELAKE_GATEWAY__DICOM__WORKERS=str(workers),
                        CARELAKE_GATEWAY__SEGMENT_AGE="1s") as gw:
        pids = [gw.proc.pid, *gw.children()]
        start_at = time.time() + 4  # every client connected and its template built before the clock starts
        work = tempfile.mkdtemp(prefix="carelake-bench-dicom-client-")
        procs = [ctx.Process(target=association, args=(gw.dicom, per, start_at, work, client, out))
                 for _ in range(associations)]
        for p in procs:
            p.start()
        time.sleep(max(0.0, start_at - time.time()))
        gateway_cpu = _cpu_seconds(pids)
        results = [out.get(timeout=600) for _ in procs]
        gateway_cpu = _cpu_seconds(pids) - gateway_cpu
        for p in procs:
            p.join()
        seconds = max(r[3] for r in results) - start_at
        gw.stop()
        shutil.rmtree(work, ignore_errors=True)
    if any(isinstance(f, str) for _, f, *_ in results):
        print(gw.stderr[-3000:], file=sys.stderr)
    errors = [f for _, f, *_ in results if isinstance(f, str)]
    assert not errors, f"an association failed: {errors}"
    latencies = [x for lat, *_ in results for x in lat]
    failures = sum(r[1] for r in results)
    lost = sum(r[2] for r in results)
    landed_count = len(landed(root, "dicom"))
    # a lost response's instance landed (Success was sent) and was sent again: it may be there twice
    assert failures == 0 and per * associations <= landed_count <= per * associations + lost, (failures, landed_count)
    sent = per * associations
    return {"root": root, "instances": landed_count, "lost": lost, "seconds": seconds,
            "per_s": sent / seconds, "p50_ms": percentile(latencies, 0.5), "p99_ms": percentile(latencies, 0.99),
            "gateway_cpu_ms": gateway_cpu / sent * 1000, "client_cpu_ms": sum(r[4] for r in results) / sent * 1000,
            "load": os.getloadavg()[0]}


def _figures(runs: list[dict]) -> dict:
    return {
        "cstore_per_s_median": round(median([r["per_s"] for r in runs])),
        "response_p50_ms_median": round(median([r["p50_ms"] for r in runs]), 2),
        "response_p99_ms_median": round(median([r["p99_ms"] for r in runs]), 2),
        "cstore_per_s_runs": [round(r["per_s"]) for r in runs],
        # CPU per instance: the gateway's processes (its own and the acceptors) and the clients, over the timed part
        "gateway_cpu_ms_per_instance_median": round(median([r["gateway_cpu_ms"] for r in runs]), 2),
        "client_cpu_ms_per_instance_median": round(median([r["client_cpu_ms"] for r in runs]), 2),
        "load_average_1m": [round(r["load"], 1) for r in runs],
        "responses_lost_by_the_client": sum(r["lost"] for r in runs),
    }


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
    ap.add_argument("--workers", default="2", help="gateway.dicom.workers; a list (0,2) alternates them run by run")
    ap.add_argument("--client", choices=("pynetdicom", "wire"), default="pynetdicom")
    ap.add_argument("--no-bronze", action="store_true", help="only the C-STORE half")
    a = ap.parse_args()
    settings = [int(w) for w in a.workers.split(",")]
    by = {w: [] for w in settings}
    for _ in range(a.runs):
        for w in settings:
            by[w].append(cstore_run(a.instances, a.associations, w, a.client))
    runs = by[settings[-1]]
    figures = {
        "benchmark": "dicom_cstore", "associations": a.associations, "fsync": True, "runs": a.runs,
        "client": a.client, "cores": os.cpu_count(), "instances_per_run": runs[0]["instances"], "instance_kb": 513,
        "goal_cstore_per_s": 500,
    }
    if len(settings) == 1:
        figures.update(workers=settings[0], **_figures(runs))
    else:
        figures["by_workers"] = {str(w): _figures(by[w]) for w in settings}
    if not a.no_bronze:
        from pipelines.spark import create_spark

        spark = create_spark(temp_config().spark)
        landing = runs[-1]["root"] / "landing" / "dicom"
        bronze_run(spark, landing, runs[-1]["instances"])  # warm the JVM and Python workers outside the figures
        bronze = [bronze_run(spark, landing, runs[-1]["instances"]) for _ in range(a.runs)]
        figures.update(bronze_instances_per_s_median=round(median(bronze)), bronze_runs=[round(x) for x in bronze])
        spark.stop()
    for r in (r for rs in by.values() for r in rs):
        shutil.rmtree(r["root"], ignore_errors=True)
    emit(figures)


if __name__ == "__main__":
    main()
