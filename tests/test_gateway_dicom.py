"""DICOM into the gateway: C-STORE (Success only after fsync, 0xA700 when the store fails, AE allow-list), and
`carelake send` over C-STORE, checked on disk."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from bronze.records import SEGMENT_SUFFIX, scan
from tests.conftest import make_config
from tests.gatewayproc import GatewayProcess, landed


def ct_slice(rows: int = 64, cols: int = 64) -> Dataset:
    """A small CT image, uncompressed, with fresh UIDs."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = "Test^Patient", "MRN-1", "CT"
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = rows, cols, 16, 12, 11
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
    ds.PixelData = bytes(rows * cols * 2)
    return ds


def scu(calling: str = "CT_SCANNER_1") -> AE:
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    return ae


def store(address: tuple[str, int], *datasets: Dataset, calling: str = "CT_SCANNER_1") -> list[int]:
    assoc = scu(calling).associate(*address, ae_title="CARELAKE")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def landed_instances(root: Path) -> dict[str, bytes]:
    """SOP instance UID -> landed Part 10 bytes, from every whole record in landing/dicom."""
    return {r.header["sop_instance_uid"]: r.body for _, r in landed(root, "dicom")}


def dataset_bytes(ds: Dataset) -> bytes:
    """The data set as it goes on the wire in explicit VR little endian (no preamble, no file meta)."""
    from pynetdicom.dsutils import encode

    return encode(ds, False, True)


# -- an in-process gateway, for faults injected into its own process ------------------------------------------
@contextlib.contextmanager
def gateway_in_process(root: Path, **overrides):
    """The SCP in the test's own process (gateway.dicom.workers 0), where a fault can be injected into it."""
    from pipelines.gateway.server import Gateway

    cfg = make_config(root, **{"gateway.dicom.workers": 0, **overrides})
    loop = asyncio.new_event_loop()
    ready: dict = {}
    stop = asyncio.Event()

    async def main() -> None:
        gw = Gateway(cfg, mllp_port=0, http_port=0, dicom_port=0)
        ready["addresses"] = await gw.start()
        ready["gateway"] = gw
        started.set()
        await stop.wait()
        await gw.stop()

    started = threading.Event()
    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(30), "gateway did not start"
    try:
        yield ready["gateway"], ready["addresses"]
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)


def test_a_failed_fsync_answers_out_of_resources_and_nothing_half_written_is_visible(tmp_path, monkeypatch):
    real_fsync = os.fsync
    failing = threading.Event()

    def fsync(fd: int) -> None:
        if failing.is_set() and "/landing/dicom" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(5, "Input/output error (injected)")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    root = tmp_path / "lake"
    first, second = ct_slice(), ct_slice()
    with gateway_in_process(root) as (gw, addresses):
        address = (addresses.host, addresses.dicom_port)
        failing.set()
        assert store(address, first) == [0xA700]  # Out of Resources: the modality keeps it and resends
        assert gw.metrics.get("carelake_gateway_write_errors_total") == 1
        # Nothing visible to bronze: no sealed segment, only the abandoned hidden one
        assert list((root / "landing" / "dicom").glob(f"[!.]*{SEGMENT_SUFFIX}")) == []
        failing.clear()
        assert store(address, first, second) == [0x0000, 0x0000]  # the resend and the next one land
        seen = landed_instances(root)
        assert set(seen) >= {first.SOPInstanceUID, second.SOPInstanceUID}
    sealed = sorted((root / "landing" / "dicom").glob(f"[!.]*{SEGMENT_SUFFIX}"))
    bodies = [r.body for p in sealed for r in scan(p.read_bytes()).records]
    assert any(b.endswith(dataset_bytes(second)) for b in bodies)


def test_success_only_after_the_instance_is_on_disk(tmp_path, monkeypatch):
    """Every Success answer comes after an fsync of the segment that holds the instance."""
    real_fsync = os.fsync
    synced: list[int] = []  # bytes of the dicom segment known durable, in fsync order

    def fsync(fd: int) -> None:
        real_fsync(fd)
        if "/landing/dicom/" in os.readlink(f"/proc/self/fd/{fd}"):
            synced.append(os.fstat(fd).st_size)

    monkeypatch.setattr(os, "fsync", fsync)
    root = tmp_path / "lake"
    with gateway_in_process(root) as (_gw, addresses):
        assoc = scu().associate(addresses.host, addresses.dicom_port, ae_title="CARELAKE")
        for _ in range(5):
            ds = ct_slice()
            assert int(assoc.send_c_store(ds).Status) == 0
            [(name, record)] = [(n, r) for n, r in landed(root, "dicom") if r.header["sop_instance_uid"] ==
                                ds.SOPInstanceUID]
            end = record.body_offset + len(record.body) + 4  # + the record's CRC
            assert synced and max(synced) >= end, f"{name}: Success before the fsync that covers byte {end}"
            assert record.body.endswith(dataset_bytes(ds))
        assoc.release()


def test_calling_ae_allow_list_rejects_unknown_modalities(tmp_path):
    with GatewayProcess(tmp_path / "lake", "--dicom-port", "0", "--ae-title", "CARELAKE",
                        CARELAKE_GATEWAY__DICOM__CALLING_AE_TITLES="CT_SCANNER_1,MR_SCANNER_2") as gw:
        assert gw.dicom is not None
        intruder = scu("INTRUDER").associate(*gw.dicom, ae_title="CARELAKE")
        assert intruder.is_rejected and not intruder.is_established
        allowed = scu("CT_SCANNER_1").associate(*gw.dicom, ae_title="CARELAKE")
        assert allowed.is_established
        assert int(allowed.send_c_echo().Status) == 0
        ds = ct_slice()
        assert int(allowed.send_c_store(ds).Status) == 0
        allowed.release()
        # a peer that speaks garbage does not hurt the gateway
        import socket

        with socket.create_connection(gw.dicom, timeout=5) as sock:
            sock.sendall(b"\x01\x00\x00\x00\xff\xff" + os.urandom(300))
        assert store(gw.dicom, ct_slice()) == [0]
        import urllib.request

        metrics = urllib.request.urlopen(f"{gw.http}/metrics", timeout=10).read().decode()
        assert 'carelake_gateway_dicom_associations_total{outcome="rejected"} 1' in metrics
        assert 'carelake_gateway_dicom_associations_total{outcome="accepted"} 2' in metrics
        assert 'carelake_gateway_landed_total{feed="dicom",status="accepted"} 2' in metrics
        assert gw.stop() == 0
    instances = landed_instances(gw.root)
    assert ds.SOPInstanceUID in instances and len(instances) == 2
    header = next(r.header for _, r in landed(gw.root, "dicom") if r.header["sop_instance_uid"] == ds.SOPInstanceUID)
    assert header["calling_ae"] == "CT_SCANNER_1" and header["protocol"] == "dimse"
    assert header["transfer_syntax_uid"] == ExplicitVRLittleEndian


@pytest.mark.parametrize("instance", ["1.2.3.4", "1.2.3.45", "2.25." + "9" * 59])  # even, odd, the 64-char maximum
def test_the_part10_prefix_is_the_one_pynetdicom_builds(instance):
    from pynetdicom.dsutils import create_file_meta, encode_file_meta

    from pipelines.gateway.dicom import part10_prefix

    for syntax in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.4.50"):
        meta = create_file_meta(sop_class_uid=CTImageStorage, sop_instance_uid=instance, transfer_syntax=syntax)
        assert part10_prefix(CTImageStorage, instance, syntax) == b"\0" * 128 + b"DICM" + encode_file_meta(meta)


def test_bad_dicom_settings_are_one_clear_error(tmp_path):
    from pipelines.errors import ConfigError

    with pytest.raises(ConfigError, match=r"gateway.dicom.calling_ae_titles\[1\] must be a DICOM AE title"):
        make_config(tmp_path, **{"gateway.dicom.calling_ae_titles": ["CT_1", "A_TITLE_LONGER_THAN_16"]})
    with pytest.raises(ConfigError, match="gateway.dicom.max_instance_mb must be 1-2047"):
        make_config(tmp_path, **{"gateway.dicom.max_instance_mb": 4096})
    with pytest.raises(ConfigError, match="gateway.dicom.port must be a TCP port"):
        make_config(tmp_path, **{"gateway.dicom.port": 70000})
    with pytest.raises(ConfigError, match=r"gateway.dicom.workers must be 0-64 \(acceptor processes"):
        make_config(tmp_path, **{"gateway.dicom.workers": -1})
    with pytest.raises(ConfigError, match="gateway.dicom.workers must be a whole number"):
        make_config(tmp_path, **{"gateway.dicom.workers": "two"})


# -- DICOMweb STOW-RS -----------------------------------------------------------------------------------------
def part10(ds: Dataset) -> bytes:
    from io import BytesIO

    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def multipart(boundary: str, *parts: tuple[str, bytes]) -> bytes:
    out = b""
    for content_type, data in parts:
        out += f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def stow_post(url: str, body: bytes, content_type: str) -> tuple[int, dict, list[str]]:
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type,
                                                                         "Accept": "application/dicom+json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read()), resp.headers.get_all("Warning") or []
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}"), err.headers.get_all("Warning") or []


def _uids(items: dict, tag: str) -> list[str | None]:
    return [item["00081155"].get("Value", [None])[0] for item in items.get(tag, {}).get("Value", [])]


def test_an_acceptor_process_that_dies_is_replaced_and_the_port_keeps_serving(tmp_path):
    import signal
    import time

    with GatewayProcess(tmp_path / "lake", "--dicom-port", "0", CARELAKE_GATEWAY__DICOM__WORKERS="2") as gw:
        first = gw.children()
        assert len(first) == 2
        os.kill(first[0], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while first[0] in gw.children() and time.monotonic() < deadline:  # reaped by the gateway
            time.sleep(0.05)
        assert store(gw.dicom, ct_slice()) == [0] and store(gw.dicom, ct_slice()) == [0]
        now = gw.children()
        assert len(now) == 2 and first[0] not in now and first[1] in now
        assert gw.stop() == 0
    assert "dicom: acceptor process scp" in gw.stderr and "ended unexpectedly" in gw.stderr
    assert len(landed_instances(gw.root)) == 2
    assert gw.children() == []


def test_stow_rs_lands_each_good_part_and_names_each_broken_one(tmp_path):
    good, other_study = ct_slice(), ct_slice()
    broken = part10(ct_slice())[:100]  # cut inside the preamble: no DICM, no meta
    study = good.StudyInstanceUID
    with GatewayProcess(tmp_path / "lake") as gw:
        kind = 'multipart/related; type="application/dicom"; boundary=XyZ'
        body = multipart("XyZ", ("application/dicom", part10(good)), ("application/dicom", broken),
                         ("application/dicom", part10(other_study)), ("text/plain", b"hello"))
        status, doc, warnings = stow_post(f"{gw.http}/dicomweb/studies/{study}", body, kind)
        assert status == 202  # some stored, some not
        assert _uids(doc, "00081199") == [good.SOPInstanceUID]
        assert doc["00081199"]["Value"][0]["00081150"] == {"vr": "UI", "Value": [CTImageStorage]}
        failed = doc["00081198"]["Value"]
        assert [f["00081197"]["Value"][0] for f in failed] == [0xC000, 0xA900, 0xC000]
        assert _uids(doc, "00081198") == [None, other_study.SOPInstanceUID, None]
        assert len(warnings) == 3 and "part 2: not a DICOM Part 10 file" in warnings[0]
        assert "part 3: Study Instance UID" in warnings[1] and "part 4: content type 'text/plain'" in warnings[2]
        all_ok, doc, _ = stow_post(f"{gw.http}/dicomweb/studies", multipart("b2", ("application/dicom",
                                                                                   part10(other_study))), kind
                                   .replace("XyZ", "b2"))
        assert all_ok == 200 and _uids(doc, "00081199") == [other_study.SOPInstanceUID] and "00081198" not in doc
        none_ok, doc, _ = stow_post(f"{gw.http}/dicomweb/studies", multipart("b3", ("application/dicom", b"x")),
                                    kind.replace("XyZ", "b3"))
        assert none_ok == 409 and "00081199" not in doc
        cut, doc, _ = stow_post(f"{gw.http}/dicomweb/studies", multipart("b4", ("application/dicom",
                                                                                part10(good)))[:-10],
                                kind.replace("XyZ", "b4"))
        assert cut == 400 and "cut short" in doc["issue"][0]["diagnostics"]
        wrong, doc, _ = stow_post(f"{gw.http}/dicomweb/studies", b"{}", "application/json")
        assert wrong == 415 and "multipart/related" in doc["issue"][0]["diagnostics"]
        assert gw.stop() == 0
    stored = {r.header["sop_instance_uid"]: r for _, r in landed(gw.root, "dicom")}
    assert set(stored) == {good.SOPInstanceUID, other_study.SOPInstanceUID}
    assert stored[good.SOPInstanceUID].body == part10(good)  # the part byte for byte
    assert stored[good.SOPInstanceUID].header["protocol"] == "dicomweb"
    rejects = [r for _, r in landed(gw.root, "dicom", rejected=True)]
    assert len(rejects) == 6  # 3 bad parts, the only part of the 409, the cut body, the wrong type
    assert broken in [r.body for r in rejects]


def test_dicom_flag_errors_are_one_clear_line(tmp_path):
    import subprocess

    from tests.conftest import REPO, carelake_cmd, carelake_env

    def run(*args: str) -> str:
        proc = subprocess.run(carelake_cmd(*args), env=carelake_env(tmp_path / "lake"), capture_output=True,
                              text=True, timeout=60, cwd=REPO)
        assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "Traceback" not in proc.stderr
        return proc.stderr

    assert "--dicom-port must be a TCP port 0-65535" in run("gateway", "--dicom-port", "70000")
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:  # the acceptors' port is the gateway's: a clear error
        port = str(taken.getsockname()[1])
        assert f"dicom {port}): Address already in use" in run("gateway", "--dicom-port", port)
    assert "--ae-title must be a DICOM AE title" in run("gateway", "--dicom-port", "0", "--ae-title", "BAD\\TITLE")
    assert "expected dicom://HOST:PORT" in run("send", "--to", "dicom://nowhere", str(tmp_path))
    assert "the called AE title in --to must be a DICOM AE title" in run(
        "send", "--to", "dicom://127.0.0.1:104/THIS_TITLE_IS_TOO_LONG", str(tmp_path))


def test_a_lakehouse_without_the_dicom_feed_serves_the_others_and_refuses_c_store_clearly(tmp_path):
    from pipelines.errors import UsageError
    from pipelines.gateway.server import Gateway

    cfg = make_config(tmp_path / "lake", **{"landing.feeds": ["hl7", "fhir", "devices"]})
    gw = Gateway(cfg, mllp_port=0, http_port=0)
    assert gw.feeds == ("hl7", "fhir", "devices") and not gw.http.stow  # no STOW route, no dicom folder
    with pytest.raises(UsageError, match="--dicom-port needs the dicom feed in landing.feeds"):
        Gateway(cfg, mllp_port=0, http_port=0, dicom_port=0)


def test_a_stop_lands_what_was_answered_and_aborts_open_associations(tmp_path):
    import time

    gw = GatewayProcess(tmp_path / "lake", "--dicom-port", "0").start()
    assoc = scu().associate(*gw.dicom, ae_title="CARELAKE")
    ds = ct_slice()
    assert int(assoc.send_c_store(ds).Status) == 0
    began = time.monotonic()
    assert gw.stop() == 0  # SIGTERM with the association still open
    assert time.monotonic() - began < 10  # gateway.shutdown_timeout
    assert assoc.is_aborted and not assoc.is_established
    assert list((gw.root / "landing" / "dicom").glob(".open-*")) == []  # sealed
    assert set(landed_instances(gw.root)) == {ds.SOPInstanceUID}


def test_a_stow_body_with_more_parts_than_the_batch_bound_is_refused_whole(tmp_path):
    with GatewayProcess(tmp_path / "lake", CARELAKE_GATEWAY__MAX_BATCH_MESSAGES="3") as gw:
        kind = 'multipart/related; type="application/dicom"; boundary=b'
        parts = [("application/dicom", part10(ct_slice(4, 4))) for _ in range(4)]
        status, doc, _ = stow_post(f"{gw.http}/dicomweb/studies", multipart("b", *parts), kind)
        assert status == 413 and "more than gateway.max_batch_messages (3)" in doc["issue"][0]["diagnostics"]
        ok, _, _ = stow_post(f"{gw.http}/dicomweb/studies", multipart("b", *parts[:3]), kind)
        assert ok == 200
        assert gw.stop() == 0
    assert len(landed(gw.root, "dicom")) == 3 and len(landed(gw.root, "dicom", rejected=True)) == 1
