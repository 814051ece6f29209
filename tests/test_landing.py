"""carelake ingest: byte-for-byte, immutable, durable landing; clear refusals."""

from __future__ import annotations

import pytest

from pipelines.errors import UsageError
from pipelines.landing import ingest


def test_files_and_folders_land_byte_for_byte(cfg, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.hl7").write_bytes(b"MSH|^~\\&|A\rPID|1\r")
    (src / "sub" / "b weird name!.hl7").write_bytes(b"\xef\xbb\xbfMSH|x\n")
    (src / ".hidden").write_bytes(b"skip me")
    landed = ingest(cfg, [src], "hl7")
    assert len(landed) == 2
    folder = cfg.path("landing", "hl7")
    names = sorted(p.name for p in folder.iterdir())
    assert len(names) == 2 and not any(n.startswith(".") for n in names)
    assert all(" " not in n and "!" not in n for n in names)
    assert {f.landed.read_bytes() for f in landed} == {b"MSH|^~\\&|A\rPID|1\r", b"\xef\xbb\xbfMSH|x\n"}


def test_unknown_feed_lists_known_feeds(cfg, tmp_path):
    (tmp_path / "x").write_text("x")
    with pytest.raises(UsageError, match="unknown feed 'vitals'; known feeds: hl7, fhir, devices, dicom, claims"):
        ingest(cfg, [tmp_path / "x"], "vitals")


def test_missing_path_lands_nothing(cfg, tmp_path):
    (tmp_path / "ok").write_text("x")
    with pytest.raises(UsageError, match="does not exist"):
        ingest(cfg, [tmp_path / "ok", tmp_path / "missing"], "devices")
    assert not cfg.path("landing", "devices").exists()
