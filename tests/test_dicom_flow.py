"""Every real DICOM file sent over C-STORE (`carelake send`) and dropped (`carelake ingest`), then
`carelake run bronze.dicom_instances`: each file is stored or says why not, each landed instance is one bronze row
with a parse status, and nothing crashes the gateway or the job. Plus kill -9 of the gateway in a C-STORE burst."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
from pynetdicom.dsutils import split_dataset

from tests.gatewayproc import GatewayProcess, landed
from tests.test_cli import run_cli
from tests.test_gateway_dicom import ct_slice, scu, store

pytestmark = pytest.mark.slow
STATUSES = {"ok", "no_file_meta", "bad_file_meta", "missing_uids", "truncated", "unreadable", "not_dicom"}


def _real_files(realdata):
    return sorted(p for p in (realdata / "dicom").rglob("*") if p.is_file())


@pytest.mark.realdata
def test_every_real_dicom_file_is_stored_or_says_why_and_lands_in_bronze(tmp_path, realdata):
    files = _real_files(realdata)
    acks = tmp_path / "acks.tsv"
    with GatewayProcess(tmp_path / "lake", "--dicom-port", "0") as gw:
        host, port = gw.dicom
        sent = run_cli(gw.root, "send", "--to", f"dicom://{host}:{port}", "--connections", "2", "--ack-log",
                       str(acks), str(realdata / "dicom"))
        answers = {line.split("\t")[2]: line.split("\t")[0] for line in acks.read_text().splitlines()}
        not_sendable = [p for p in files if str(p) not in answers]
        for path in not_sendable:  # every file the SCU could not carry is named in the report, with the reason
            assert f"{path}: " in sent.stdout, path
        assert set(answers.values()) <= {"0x0000 Success", "not sent"}
        assert "Issue1097" in next(p for p, a in answers.items() if a == "not sent")  # a private SOP class
        assert len([a for a in answers.values() if a == "0x0000 Success"]) == 24
        assert store(gw.dicom, ct_slice()) == [0]  # the gateway is still well after all of it
        assert gw.stop() == 0
    run_cli(gw.root, "ingest", str(realdata / "dicom"), "--feed", "dicom")
    run_cli(gw.root, "run", "bronze.dicom_instances", "--available-now")

    from pipelines.store.deltars import DeltaRsStore
    from tests.conftest import make_config

    rows = DeltaRsStore(make_config(gw.root)).read_arrow("bronze.dicom_instances").to_pylist()
    records = {(name, r.body_offset): r.body for name, r in landed(gw.root, "dicom")}
    assert len(rows) == len(records) + len(files)  # every instance that got Success, and every dropped file
    assert {r["parse_status"] for r in rows} <= STATUSES
    for r in rows:
        assert r["parse_status"] == "ok" or r["parse_detail"], r
    for r in (r for r in rows if r["source"] == "dimse"):  # each row's digest is of the instance it points at
        body = records[(r["landing_file"].rsplit("/", 1)[1], r["landing_position"])]
        assert r["sha256"] == hashlib.sha256(body).hexdigest() and r["stored_bytes"] == len(body)
    for path in files:
        if answers.get(str(path)) == "0x0000 Success":
            _meta, offset = split_dataset(path)
            dataset = path.read_bytes()[offset:]
            assert any(b.endswith(dataset) for b in records.values()), path  # the data set exactly as on disk
    dropped = {r["stored_uri"].rsplit("/", 1)[1].split("-", 2)[2]: r["parse_status"]  # <stamp>-<id>-<name>
               for r in rows if r["source"] == "file"}
    assert dropped["MR_truncated.dcm"] == "truncated" and dropped["CR-MONO1-10-chest"] == "no_file_meta"
    assert dropped["test1.json"] == "not_dicom"
    again = run_cli(gw.root, "run", "bronze.dicom_instances", "--available-now")
    assert again.returncode == 0
    assert len(DeltaRsStore(make_config(gw.root)).read_arrow("bronze.dicom_instances")) == len(rows)

    # silver: every unusable instance quarantined with its reason, every study of the usable ones a row
    run_cli(gw.root, "run", "silver.imaging_studies", "--available-now")
    tables = DeltaRsStore(make_config(gw.root))
    quarantined = {(q["landing_file"], q["landing_position"]): q["reason"]
                   for q in tables.read_arrow("silver.quarantine").to_pylist() if q["job"] == "silver.imaging_studies"}
    assert quarantined == {(r["landing_file"], r["landing_position"]): f"dicom_{r['parse_status']}"
                           for r in rows if r["parse_status"] != "ok"}
    studies = {s["study_instance_uid"]: s for s in tables.read_arrow("silver.imaging_studies").to_pylist()}
    assert set(studies) == {r["study_instance_uid"] for r in rows if r["parse_status"] == "ok"}
    ct = studies[next(r["study_instance_uid"] for r in rows if r["stored_uri"].endswith("-CT_small.dcm"))]
    assert ct["modality"] == "CT" and ct["series_count"] == 1 and ct["instance_count"] == 1  # sent and dropped: once
    assert ct["patient_key"] and ct["study_time_utc"] is not None
    run_cli(gw.root, "run", "silver.imaging_studies", "--available-now")  # nothing new: nothing changes
    assert len(DeltaRsStore(make_config(gw.root)).read_arrow("silver.imaging_studies")) == len(studies)
    out = run_cli(gw.root, "sql", "select modality, count(*) as n from silver.imaging_studies group by modality "
                  "order by modality", "--format", "json").stdout
    by_modality = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert sum(r["n"] for r in by_modality) == len(studies) and {"modality": "CT", "n": 4} in by_modality


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _burst(root: Path, until: int, end) -> tuple[GatewayProcess, list[int], list[str]]:
    """Four associations store as fast as they can through a gateway with two acceptor processes until `until`
    instances got Success, then `end(gateway)`; (the gateway, its acceptors' pids, the instances answered Success)."""
    succeeded: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def modality(n: int, address) -> None:
        ae = scu(f"CT_{n}")
        ae.dimse_timeout = 5  # a send cut short by the stop waits this long for its (never coming) response
        assoc = ae.associate(*address, ae_title="CARELAKE")
        while assoc.is_established and not stop.is_set():
            ds = ct_slice(128, 128)
            try:
                answer = assoc.send_c_store(ds)
            except RuntimeError:  # the gateway ended the association between the check and the send
                break
            if getattr(answer, "Status", None) == 0:
                with lock:
                    succeeded.append(ds.SOPInstanceUID)
        if assoc.is_established:
            assoc.abort()

    gw = GatewayProcess(root, "--dicom-port", "0", CARELAKE_GATEWAY__DICOM__WORKERS="2").start()
    acceptors = gw.children()
    assert len(acceptors) == 2, acceptors
    threads = [threading.Thread(target=modality, args=(n, gw.dicom)) for n in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(succeeded) < until and time.monotonic() < deadline:
        time.sleep(0.05)
    end(gw)
    stop.set()
    for t in threads:
        t.join(30)
    with lock:
        acked = list(succeeded)
    assert len(acked) >= until
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in acceptors) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in acceptors if _alive(pid)], "an acceptor outlived the gateway"
    with pytest.raises(ConnectionRefusedError):  # nothing holds the port any more
        socket.create_connection(gw.dicom, timeout=5).close()
    on_disk = {r.header["sop_instance_uid"] for _, r in landed(root, "dicom")}
    missing = [uid for uid in acked if uid not in on_disk]
    assert not missing, f"{len(missing)} of {len(acked)} instances answered Success are not in landing"
    writers = {name.split("-dicom-")[1].split("-")[0] for name, _ in landed(root, "dicom")}
    assert writers == {"scp1", "scp2"}  # the associations were shared out: both acceptors stored
    return gw, acceptors, acked


def test_kill_9_during_a_c_store_burst_keeps_every_instance_that_got_success(tmp_path):
    """The gateway's own process (only it) is killed mid-burst: its acceptors die with it and free the port, and a
    restart recovers what they left open."""
    root = tmp_path / "lake"

    def kill_9(gw: GatewayProcess) -> None:
        os.kill(gw.proc.pid, signal.SIGKILL)  # the gateway's process only: its acceptors must not outlive it
        gw.proc.wait(30)

    _gw, _acceptors, acked = _burst(root, 200, kill_9)
    with GatewayProcess(root, "--dicom-port", "0") as again:  # recovery seals what the killed gateway left open
        assert store(again.dicom, ct_slice()) == [0]
    assert list((root / "landing" / "dicom").glob(".open-*")) == []
    sealed = {r.header["sop_instance_uid"] for _, r in landed(root, "dicom")}
    assert set(acked) <= sealed


def test_sigterm_during_a_c_store_burst_drains_every_acceptor(tmp_path):
    """SIGTERM to the whole process group (as systemd sends it): the acceptors ignore it, the gateway stops them in
    order: what got Success is landed and sealed, nothing is left open, the gateway exits 0."""
    root = tmp_path / "lake"
    gw, _acceptors, acked = _burst(root, 100, lambda gw: gw.stop())
    assert gw.proc.returncode == 0, gw.stderr[-2000:]
    received = int(gw.stdout.split("carelake gateway stopped: ")[1].split()[0].replace(",", ""))
    assert received >= len(acked)  # the acceptors' counters reached the gateway's summary
    assert list((root / "landing" / "dicom").glob(".open-*")) == []
