"""Kill -9 the gateway under load, restart it: everything a client saw acknowledged is in landing, intact."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from bronze.hl7_wire import parse_header
from tests.conftest import REPO, carelake_cmd, carelake_env
from tests.gatewayproc import GatewayProcess, landed
from tests.test_gateway import oru

MESSAGES = 4000
READINGS = 20000
BATCH = 100


def _feeds(folder: Path) -> tuple[Path, Path]:
    hl7, devices = folder / "hl7", folder / "devices"
    hl7.mkdir(parents=True)
    devices.mkdir()
    for f in range(4):
        (hl7 / f"part-{f}.hl7").write_bytes(b"".join(oru(f"K{f}-{i}") for i in range(MESSAGES // 4)))
    lines = [f'{{"device_id":"bed-{n % 40}","time":"2026-11-21T03:00:00Z","seq":{n}}}\n' for n in range(READINGS)]
    (devices / "monitors.jsonl").write_text("".join(lines))
    return hl7, devices


def _acked(log: Path, ok: str) -> list[tuple[str, str]]:
    rows = [line.split("\t") for line in log.read_text().splitlines()] if log.exists() else []
    return [(control, source) for answer, control, source in rows if answer == ok]


@pytest.mark.slow
def test_kill_9_under_load_loses_nothing_acknowledged(tmp_path):
    hl7, devices = _feeds(tmp_path / "feeds")
    root = tmp_path / "lake"
    first = GatewayProcess(root).start()
    mllp_acks, http_acks = tmp_path / "mllp.tsv", tmp_path / "http.tsv"
    env = carelake_env(root, CARELAKE_GATEWAY__SEND_RETRIES="8")
    senders = [
        subprocess.Popen(carelake_cmd("send", "--to", "{}:{}".format(*first.mllp), "--connections", "4",
                                      "--rate", "1500", "--ack-log", str(mllp_acks), str(hl7)),
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO),
        subprocess.Popen(carelake_cmd("send", "--to", first.http, "--batch", str(BATCH), "--rate", "8000",
                                      "--ack-log", str(http_acks), str(devices)),
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO),
    ]
    deadline = time.monotonic() + 60
    while len(_acked(mllp_acks, "AA")) < MESSAGES // 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    first.stop(signal.SIGKILL)
    before = len(_acked(mllp_acks, "AA")), len(_acked(http_acks, "HTTP 202"))
    assert 0 < before[0] < MESSAGES, f"the kill must land mid-stream, acked {before}"
    assert all(p.poll() is None for p in senders), "senders must still be running when the gateway dies"

    time.sleep(0.5)  # the senders meet refused connections and back off
    _, mllp_port = first.mllp
    http_port = first.http.rsplit(":", 1)[1]
    second = GatewayProcess(root, "--mllp-port", str(mllp_port), "--http-port", http_port).start()
    for p in senders:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, f"{out}\n{err}"
    assert second.stop() == 0

    # Every message the client saw acknowledged is in landing (resends may appear twice).
    bodies = [r.body for _, r in landed(root, "hl7")]  # asserts every sealed segment reads cleanly
    landed_ids = {parse_header(b).control_id for b in bodies}
    acked_ids = {control for control, _ in _acked(mllp_acks, "AA")}
    assert len(acked_ids) == MESSAGES
    assert acked_ids <= landed_ids
    readings = b"".join(r.body for _, r in landed(root, "devices")).decode()
    landed_seqs = {int(line.rsplit(":", 1)[1].rstrip("}")) for line in readings.splitlines()}
    batch_at, offset = {}, 0  # byte offset of each POSTed batch in the source file -> its reading numbers
    lines = (devices / "monitors.jsonl").read_text().splitlines(keepends=True)
    for start in range(0, READINGS, BATCH):
        batch_at[offset] = set(range(start, start + BATCH))
        offset += sum(len(line) for line in lines[start:start + BATCH])
    acked_batches = {int(source.rsplit(":", 1)[1]) for _, source in _acked(http_acks, "HTTP 202")}
    assert acked_batches == set(batch_at)
    for at in acked_batches:
        assert batch_at[at] <= landed_seqs
    # Nothing in landing is corrupt: no segment left open, no record half-written into a sealed one.
    for feed in ("hl7", "devices"):
        assert not list((root / "landing" / feed).glob(".open-*"))
    torn = list((root / "landing").rglob("_torn/*.tail"))
    print(f"kill -9 after {before[0]} MLLP acks / {before[1]} HTTP batches; {len(bodies)} HL7 records landed for "
          f"{MESSAGES} messages ({len(bodies) - MESSAGES} resends); torn tails set aside: {len(torn)}")
