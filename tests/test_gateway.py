"""The gateway as a real process on loopback: MLLP clients, HTTP requests, landing on disk."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest

from bronze.hl7_wire import frame, segments, split_messages
from pipelines.send import read_ack
from tests.conftest import REPO, carelake_cmd, carelake_env
from tests.gatewayproc import GatewayProcess, landed, mllp_exchange


def oru(control_id: str, terminator: bytes = b"\r", sep: bytes = b"|") -> bytes:
    segs = [b"MSH" + sep + b"^~\\&" + sep + b"MONITOR" + sep + b"ICU" + sep + b"" + sep + b"" + sep
            + b"20261121030000+0100" + sep + sep + b"ORU^R01^ORU_R01" + sep + control_id.encode() + sep + b"P"
            + sep + b"2.5",
            b"PID" + sep + b"1" + sep + sep + b"MRN1001^^^HOSP^MR",
            b"OBX" + sep + b"1" + sep + b"NM" + sep + b"8867-4^Heart rate^LN" + sep + sep + b"92" + sep + b"/min"]
    return terminator.join(segs) + terminator


def msa(reply: bytes) -> list[str]:
    seg = next(s for s in segments(reply) if s.startswith(b"MSA"))
    return seg.decode("latin-1").split(seg.decode("latin-1")[3])


@pytest.fixture
def gateway(tmp_path):
    with GatewayProcess(tmp_path / "lake") as gw:
        yield gw


def test_mllp_acks_after_landing_whatever_the_segment_terminator(gateway):
    messages = [oru("CR-1"), oru("LF-1", b"\n"), oru("CRLF-1", b"\r\n"), b"\xef\xbb\xbf" + oru("BOM-1"),
                oru("HASH-1", sep=b"#")]
    replies = mllp_exchange(gateway.mllp, *messages)
    assert [msa(r)[1:3] for r in replies] == [["AA", c] for c in ("CR-1", "LF-1", "CRLF-1", "BOM-1", "HASH-1")]
    first = segments(replies[0])[0].decode()
    assert first.startswith("MSH|^~\\&|CARELAKE|LAKEHOUSE|MONITOR|ICU|") and "|ACK^R01^ACK|" in first
    assert "#ACK^R01^ACK#" in segments(replies[4])[0].decode()  # answered in the sender's delimiters
    idle = socket.create_connection(gateway.mllp)  # a connection still open at shutdown is closed cleanly
    assert gateway.stop() == 0
    assert idle.recv(10) == b"" and "Traceback" not in gateway.stderr
    idle.close()
    records = [r for _, r in landed(gateway.root, "hl7")]
    assert [r.body for r in records] == messages  # byte for byte, BOM and LF included
    assert {r.header["status"] for r in records} == {"accepted"}
    assert all(r.header["peer"].startswith("127.0.0.1:") and r.header["protocol"] == "mllp" for r in records)
    assert all(r.header["received_at"].endswith("Z") for r in records)
    # Stopping sealed every segment: nothing is left under a hidden name.
    assert not list((gateway.root / "landing" / "hl7").glob(".open-*"))


def test_unreadable_messages_still_land_and_get_a_negative_ack_saying_why(gateway):
    garbage = b"this is not HL7 at all\r"
    no_control_id = oru("").replace(b"|P|2.5", b"|P|2.5")
    no_type = oru("NT-1").replace(b"ORU^R01^ORU_R01", b"")
    replies = mllp_exchange(gateway.mllp, garbage, no_control_id, no_type, b"")
    codes = [msa(r)[1] for r in replies]
    assert codes == ["AR", "AE", "AE", "AR"]
    errs = [next(s for s in segments(r) if s.startswith(b"ERR")).decode() for r in replies]
    assert "does not start with an MSH segment" in errs[0] and "^HL70357|E|" in errs[0]
    assert "MSH-10 message control id is empty" in errs[1] and "|101^" in errs[1]
    assert "MSH-9 message type is empty" in errs[2] and msa(replies[2])[2] == "NT-1"
    gateway.stop()
    records = [r for _, r in landed(gateway.root, "hl7")]
    assert [r.body for r in records] == [garbage, no_control_id, no_type, b""]
    assert [r.header["status"] for r in records] == ["rejected", "error", "error", "rejected"]
    assert "MSH-10" in records[1].header["reason"]


def test_batches_get_one_ack_per_message_and_land_as_one_record(gateway):
    batch = (b"FHS|^~\\&|LAB|HOSP\rBHS|^~\\&|LAB|HOSP\r" + oru("B-1") + oru("B-2") + b"MSH|^~\\&|LAB\r"
             + b"BTS|3\rFTS|1\r")
    (reply,) = mllp_exchange(gateway.mllp, batch)
    segs = [s.decode() for s in segments(reply)]
    assert segs[0].startswith("FHS|") and segs[1].startswith("BHS|")
    assert [s.split("|")[1:3] for s in segs if s.startswith("MSA")] == [["AA", "B-1"], ["AA", "B-2"], ["AE", ""]]
    assert segs[-2:] == ["BTS|3", "FTS|1"]
    gateway.stop()
    (record,) = [r for _, r in landed(gateway.root, "hl7")]
    assert record.body == batch and record.header["status"] == "error"


def test_a_client_that_disconnects_mid_frame_is_not_acked_and_does_not_hurt_others(gateway):
    with socket.create_connection(gateway.mllp) as sock:
        sock.sendall(b"\x0b" + oru("HALF-1")[:30])
    replies = mllp_exchange(gateway.mllp, oru("AFTER-1"))
    assert msa(replies[0])[1:3] == ["AA", "AFTER-1"]
    metrics = urllib.request.urlopen(f"{gateway.http}/metrics", timeout=10).read().decode()
    assert "carelake_gateway_incomplete_frames_total 1" in metrics
    gateway.stop()
    assert [r.body for _, r in landed(gateway.root, "hl7")] == [oru("AFTER-1")]


def test_a_frame_cut_off_by_a_new_start_block_is_set_aside_and_the_next_acked_under_its_own_id(gateway):
    """A start block, part of an MSH, then a whole frame on the same connection: the broken part never gets an AA
    (nor lends its control id to the next message's ACK); it is kept in the rejects, and the whole one is acked."""
    broken = b"\x0b" + b"MSH|^~\\&|MONITOR|FAC"
    with socket.create_connection(gateway.mllp, timeout=10) as sock:
        sock.sendall(broken + frame(oru("GOOD-2")))
        data = b""
        while not data.endswith(b"\x1c\r"):
            data += sock.recv(65536)
        sock.settimeout(1)
        with pytest.raises(TimeoutError):
            sock.recv(65536)  # one answer only: none for the broken part
    assert msa(data[1:-2])[1:3] == ["AA", "GOOD-2"]
    metrics = urllib.request.urlopen(f"{gateway.http}/metrics", timeout=10).read().decode()
    assert "carelake_gateway_incomplete_frames_total 1" in metrics
    gateway.stop()
    assert [r.body for _, r in landed(gateway.root, "hl7")] == [oru("GOOD-2")]
    (kept,) = [r for _, r in landed(gateway.root, "hl7", rejected=True)]
    assert kept.body == broken and "new start block" in kept.header["reason"]


def test_hl7_without_mllp_framing_is_answered_kept_and_counted(gateway):
    """A message sent bare (no start block) gets a framed AR naming the problem, is kept, and the connection is
    closed; junk before a real frame is set aside and the frame is acked."""
    with socket.create_connection(gateway.mllp, timeout=10) as sock:
        sock.sendall(oru("BARE-1"))
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    code, control, text = read_ack(reply[1:-2])
    assert (code, control) == ("AR", "BARE-1") and "not framed as MLLP" in text
    with socket.create_connection(gateway.mllp, timeout=10) as sock:
        sock.sendall(b"hello\r\n" + frame(oru("AFTER-JUNK")))
        data = b""
        while not data.endswith(b"\x1c\r"):
            data += sock.recv(65536)
    assert msa(data[1:-2])[1:3] == ["AA", "AFTER-JUNK"]
    metrics = urllib.request.urlopen(f"{gateway.http}/metrics", timeout=10).read().decode()
    assert "carelake_gateway_unframed_total 2" in metrics
    gateway.stop()
    assert [r.body for _, r in landed(gateway.root, "hl7")] == [oru("AFTER-JUNK")]
    assert sorted(r.body for _, r in landed(gateway.root, "hl7", rejected=True)) == sorted([oru("BARE-1"),
                                                                                          b"hello\r\n"])


def test_a_big_batch_on_one_connection_does_not_hold_up_another_senders_ack(gateway):
    """The batch's messages are checked on a worker thread: an ACK on another connection comes back while the
    batch is still being parsed (a fraction of the batch's own time), not after it."""
    msgs = b"".join(oru(f"B{i}") for i in range(30_000))
    batch = b"FHS|^~\\&|MONITOR|ICU\rBHS|^~\\&|MONITOR|ICU\r" + msgs + b"BTS|30000\rFTS|1\r"

    def read_frame(sock) -> bytes:
        data = b""
        while not data.endswith(b"\x1c\r"):
            chunk = sock.recv(1 << 20)
            assert chunk, "connection closed"
            data += chunk
        return data

    with socket.create_connection(gateway.mllp, timeout=60) as big, \
            socket.create_connection(gateway.mllp, timeout=60) as small:
        t0 = time.monotonic()
        big.sendall(frame(batch))
        time.sleep(0.2)  # the batch is read whole (3 MB on loopback) and being checked when the small one comes
        small.sendall(frame(oru("SMALL-1")))
        small_reply = read_frame(small)
        small_s = time.monotonic() - t0
        big_reply = read_frame(big)
        big_s = time.monotonic() - t0
    assert msa(small_reply[1:-2])[1:3] == ["AA", "SMALL-1"]
    assert big_reply.count(b"MSA|AA|") == 30_000
    assert small_s - 0.2 < (big_s - 0.2) / 3, (small_s, big_s)


def test_many_concurrent_connections_each_message_landed_once(gateway):
    per_conn, conns = 25, 16
    results: dict[int, list[bytes]] = {}

    def client(n: int) -> None:
        results[n] = mllp_exchange(gateway.mllp, *(oru(f"C{n}-{i}") for i in range(per_conn)))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    acked = {msa(r)[2] for replies in results.values() for r in replies if msa(r)[1] == "AA"}
    assert len(acked) == per_conn * conns
    gateway.stop()
    ids = [r.header.get("status") and segments(r.body)[0].split(b"|")[9].decode()
           for _, r in landed(gateway.root, "hl7")]
    assert sorted(ids) == sorted(acked)


def test_oversized_frame_is_refused_kept_in_rejects_and_the_connection_closed(tmp_path):
    with GatewayProcess(tmp_path / "lake", CARELAKE_GATEWAY__MAX_MESSAGE_MB="1") as gw:
        big = oru("BIG-1").replace(b"|92|", b"|" + b"9" * (1 << 20) + b"|")
        with socket.create_connection(gw.mllp, timeout=10) as sock:
            sock.sendall(frame(big))
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        code, control, text = read_ack(reply[1:-2])
        assert (code, control) == ("AR", "BIG-1") and "exceeds gateway.max_message_mb (1 MB)" in text
        gw.stop()
        (record,) = [r for _, r in landed(gw.root, "hl7", rejected=True)]
        assert big.startswith(record.body) and len(record.body) == 64 << 10  # gateway.reject_keep_kb of it
        assert landed(gw.root, "hl7") == []


def _post(url: str, body: bytes, content_type: str | None) -> tuple[int, dict]:
    headers = {"Content-Type": content_type} if content_type else {}
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_http_fhir_and_devices_land_after_fsync_and_bad_bodies_are_kept_as_rejects(gateway):
    bundle = json.dumps({"resourceType": "Bundle", "type": "collection", "entry": [
        {"resource": {"resourceType": "Patient", "id": "p1"}},
        {"resource": {"resourceType": "Observation", "id": "o1", "status": "final"}}]}).encode()
    ndjson = b'{"resourceType":"Observation","id":"o2"}\n{"resourceType":"Observation","id":"o3"}\n'
    readings = b'{"device_id":"bed-1","time":"2026-11-21T03:00:00Z","code":"8867-4","value":80}\n' * 3
    ok = [
        _post(f"{gateway.http}/fhir", bundle, "application/fhir+json"),
        _post(f"{gateway.http}/fhir", ndjson, "application/fhir+ndjson"),
        _post(f"{gateway.http}/fhir", b'{"resourceType":"Patient","id":"p9"}', "application/json"),
        _post(f"{gateway.http}/devices", readings, "application/x-ndjson"),
    ]
    assert [s for s, _ in ok] == [202, 202, 202, 202]
    assert "landed 2 resource(s)" in ok[0][1]["issue"][0]["diagnostics"]
    assert "landed 3 reading(s)" in ok[3][1]["issue"][0]["diagnostics"]
    bad = [
        _post(f"{gateway.http}/fhir", b'{"resourceType": "Bundle", "entry": [{"resource": {"id": 1}}',
              "application/fhir+json"),
        _post(f"{gateway.http}/fhir", b'{"id": "x"}', "application/fhir+json"),
        _post(f"{gateway.http}/fhir", b"<Patient/>", "application/fhir+xml"),
        _post(f"{gateway.http}/devices", b"{broken\n" + b'{"time": "t"}\n', "application/x-ndjson"),
        _post(f"{gateway.http}/devices", b"", "application/x-ndjson"),
    ]
    assert [s for s, _ in bad] == [400, 400, 415, 400, 400]
    # Some bad lines among good ones: the batch lands whole (bronze marks the bad lines), with a warning each.
    partly = _post(f"{gateway.http}/devices", readings + b"{broken\n" + b'{"time": "t"}\n', "application/x-ndjson")
    assert partly[0] == 202
    assert [i["severity"] for i in partly[1]["issue"]] == ["information", "warning", "warning"]
    assert "landed 3 reading(s)" in partly[1]["issue"][0]["diagnostics"]
    assert [i["diagnostics"].split(":")[0] for i in partly[1]["issue"][1:]] == ["line 4", "line 5"]
    assert all(doc["resourceType"] == "OperationOutcome" for _, doc in bad)
    assert "not valid JSON" in bad[0][1]["issue"][0]["diagnostics"]
    assert "no resourceType" in bad[1][1]["issue"][0]["diagnostics"]
    assert "application/fhir+json" in bad[2][1]["issue"][0]["diagnostics"]
    assert [i["diagnostics"] for i in bad[3][1]["issue"]] == ["line 1: not valid JSON (Expecting property name "
                                                             "enclosed in double quotes: line 1 column 2 (char 1))",
                                                             "line 2: no device_id"]
    health = json.loads(urllib.request.urlopen(f"{gateway.http}/health", timeout=10).read())
    assert health["status"] == "ok"
    metrics = urllib.request.urlopen(f"{gateway.http}/metrics", timeout=10).read().decode()
    assert 'carelake_gateway_landed_total{feed="fhir",status="accepted"} 3' in metrics
    assert 'carelake_gateway_rejected_total{feed="devices",reason="invalid"} 1' in metrics
    assert 'carelake_gateway_fsync_seconds_count{feed="fhir"}' in metrics
    gateway.stop()
    assert [r.body for _, r in landed(gateway.root, "fhir")] == [bundle, ndjson,
                                                                 b'{"resourceType":"Patient","id":"p9"}']
    assert [r.body for _, r in landed(gateway.root, "devices")] == [readings, readings + b"{broken\n"
                                                                    + b'{"time": "t"}\n']
    rejects = [r for _, r in landed(gateway.root, "fhir", rejected=True)]
    assert [r.header["http_status"] for r in rejects] == [400, 400, 415] and rejects[2].body == b"<Patient/>"
    assert [r.header["http_status"] for _, r in landed(gateway.root, "devices", rejected=True)] == [400, 400]


def test_json_nested_a_hundred_thousand_levels_is_a_400_and_kept(gateway):
    deep = b"[" * 100_000 + b"]" * 100_000
    for path, content_type in (("/fhir", "application/fhir+json"), ("/devices", "application/x-ndjson")):
        status, doc = _post(f"{gateway.http}{path}", deep, content_type)
        assert status == 400 and doc["resourceType"] == "OperationOutcome", (path, status, doc)
        assert "nested too deeply" in json.dumps(doc)
    gateway.stop()
    assert [r.body for _, r in landed(gateway.root, "fhir", rejected=True)] == [deep]
    assert [r.body for _, r in landed(gateway.root, "devices", rejected=True)] == [deep]


def test_a_second_gateway_on_the_same_lakehouse_is_refused(gateway):
    proc = subprocess.run(carelake_cmd("gateway"), env=carelake_env(gateway.root), capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert proc.returncode != 0
    assert "another gateway (pid" in proc.stderr and "is already serving" in proc.stderr


def test_send_replays_files_and_logs_every_ack(gateway, tmp_path):
    src = tmp_path / "feeds"
    (src / "hl7").mkdir(parents=True)
    (src / "devices").mkdir()
    (src / "truth").mkdir()
    (src / "hl7" / "a.hl7").write_bytes(b"garbage line\r" + oru("S-1") + oru("S-2", b"\n") + oru("S-3"))
    (src / "devices" / "d.jsonl").write_bytes(b'{"device_id":"bed-1","time":"t"}\n' * 5)
    (src / "truth" / "labels.csv").write_text("not to be sent\n")
    (src / "scan.dcm").write_bytes(b"DICM")
    (src / "claims").mkdir()
    (src / "claims" / "claims.json").write_text('{"resourceType": "Bundle"}')
    acks = tmp_path / "acks.tsv"
    host, port = gateway.mllp
    env = carelake_env(gateway.root)
    mllp = subprocess.run(carelake_cmd("send", "--to", f"{host}:{port}", "--ack-log", str(acks), str(src)), env=env,
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert mllp.returncode == 0, mllp.stderr
    assert "answers: AA 3, AR 1" in mllp.stdout and "skipped 1 file(s): DICOM" in mllp.stdout
    assert "skipped 1 file(s): JSON (send to the HTTP port" in mllp.stdout
    assert "skipped 1 file(s): claims files (carelake ingest --feed claims)" in mllp.stdout
    lines = [line.split("\t") for line in acks.read_text().splitlines()]
    assert sorted((a, c) for a, c, _ in lines) == [("AA", "S-1"), ("AA", "S-2"), ("AA", "S-3"), ("AR", "")]
    http = subprocess.run(carelake_cmd("send", "--to", gateway.http, "--batch", "2", str(src / "devices")), env=env,
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert http.returncode == 0, http.stderr
    assert "sent 3 item(s) (5 message(s)/reading(s)/resource(s))" in http.stdout
    gateway.stop()
    assert len(landed(gateway.root, "devices")) == 3


def test_send_reports_an_unreachable_gateway_after_its_retries(tmp_path):
    src = tmp_path / "a.hl7"
    src.write_bytes(oru("X-1"))
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    proc = subprocess.run(carelake_cmd("send", "--to", f"127.0.0.1:{port}", str(src)),
                          env=carelake_env(tmp_path, CARELAKE_GATEWAY__SEND_RETRIES="2"), capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 1
    assert "NOT DELIVERED after every retry: 1 item(s)" in proc.stdout and "ConnectionRefusedError" in proc.stdout
    assert "resends: 2" in proc.stdout and time.monotonic() - started < 30


@pytest.mark.realdata
def test_every_real_hl7_file_gets_an_ack_and_lands(gateway, realdata):
    """Each real message on its own frame, and each whole file as one frame: always answered, always kept."""
    files = sorted(p for p in (realdata / "hl7v2").rglob("*") if p.is_file())
    assert files
    sent: list[bytes] = []
    codes: dict[str, int] = {}
    for path in files:
        data = path.read_bytes()
        frames = [data[o:o + n] for o, n in split_messages(data)] or [data]
        if len(frames) > 1:
            frames.append(data)
        for reply in mllp_exchange(gateway.mllp, *frames, timeout=30):
            code, _control, text = read_ack(reply)
            assert code in ("AA", "AE", "AR"), f"{path.name}: answered {code} {text}"
            codes[code] = codes.get(code, 0) + 1
        sent += frames
    print(f"real HL7: {len(files)} files, {len(sent)} frames, answers {codes}")
    health = json.loads(urllib.request.urlopen(f"{gateway.http}/health", timeout=10).read())
    assert health["status"] == "ok"
    assert gateway.stop() == 0
    assert sorted(r.body for _, r in landed(gateway.root, "hl7")) == sorted(sent)


def test_gateway_flag_and_port_errors_are_one_clear_line(gateway, tmp_path):
    busy = subprocess.run(carelake_cmd("gateway", "--mllp-port", str(gateway.mllp[1])),
                          env=carelake_env(tmp_path / "other"), capture_output=True, text=True, timeout=60, cwd=REPO)
    assert busy.returncode != 0 and "cannot listen on 127.0.0.1" in busy.stderr and "--mllp-port" in busy.stderr
    bad = subprocess.run(carelake_cmd("gateway", "--http-port", "70000"), env=carelake_env(tmp_path / "third"),
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert bad.returncode != 0 and "--http-port must be a TCP port 0-65535" in bad.stderr
    to = subprocess.run(carelake_cmd("send", "--to", "nowhere", str(tmp_path)), env=carelake_env(tmp_path),
                        capture_output=True, text=True, timeout=60, cwd=REPO)
    assert to.returncode != 0 and "expected HOST:PORT (MLLP" in to.stderr
    for err in (busy.stderr, bad.stderr, to.stderr):
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_open_segments_are_sealed_by_age_while_the_gateway_runs(gateway):
    """Bronze only reads sealed segments, so segment_age (200 ms in tests) bounds landing latency."""
    mllp_exchange(gateway.mllp, oru("AGE-1"))
    folder = gateway.root / "landing" / "hl7"
    deadline = time.monotonic() + 10
    while not list(folder.glob("2*.clrec")) and time.monotonic() < deadline:
        time.sleep(0.05)
    (sealed,) = list(folder.glob("2*.clrec"))
    assert not list(folder.glob(".open-*"))
    assert gateway.proc.poll() is None  # sealed by age, not by stopping
    assert [r.body for _, r in landed(gateway.root, "hl7")] == [oru("AGE-1")] and sealed.stat().st_size > 0
