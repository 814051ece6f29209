"""bronze.dicom_instances: one row per instance, header as DICOM JSON, the stored bytes' address and digest, and a
parse status for everything that is not a usable instance."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from io import BytesIO
from pathlib import Path

import pytest

from bronze.dicom_instances import SCHEMA, dicom_instances
from bronze.dicom_wire import parse_instance, read_meta
from bronze.records import FILE_MAGIC, encode_record
from pipelines.runner import LANDING_FILE_SCHEMA

DICOM = Path("dicom")


def _bronze(spark, *files: tuple[str, bytes]):
    rows = [(path, datetime(2026, 12, 6, 4, 0), len(content), content) for path, content in files]
    out = dicom_instances(spark.createDataFrame(rows, LANDING_FILE_SCHEMA), ingest_batch_id="b-1")
    assert [(f.name, f.dataType) for f in out.schema] == [(f.name, f.dataType) for f in SCHEMA]
    return sorted(out.collect(), key=lambda r: (r.landing_file, r.landing_position))


def _uri_bytes(uri: str, files: dict[str, bytes]) -> bytes:
    """What a stored_uri points at: the whole landing file, or its #bytes=FIRST-LAST range."""
    path, _, frag = uri.partition("#bytes=")
    data = files[path]
    if not frag:
        return data
    first, last = (int(x) for x in frag.split("-"))
    return data[first:last + 1]


@pytest.mark.realdata
def test_gateway_records_and_dropped_files_become_rows_that_point_at_their_bytes(spark, realdata):
    ct = (realdata / DICOM / "CT_small.dcm").read_bytes()
    mr = (realdata / DICOM / "MR_small_bigendian.dcm").read_bytes()
    header = {"received_at": "2026-12-06T04:00:00.5Z", "peer": "10.1.1.7:4100", "protocol": "dimse",
              "calling_ae": "CT_SCANNER_1", "status": "accepted"}
    segment = FILE_MAGIC + encode_record(header, ct) + encode_record({**header, "protocol": "dicomweb"}, mr)
    torn = encode_record(header, ct)[:-100]
    files = {"file:/l/dicom/a.clrec": segment + torn, "file:/l/dicom/drop-MR_small.dcm": mr,
             "file:/l/dicom/notes.json": b'{"not": "dicom"}', "file:/l/dicom/empty.dcm": b""}
    rows = _bronze(spark, *files.items())
    by = [(r.landing_file.rsplit("/", 1)[1], r.source, r.parse_status) for r in rows]
    assert by == [("a.clrec", "dimse", "ok"), ("a.clrec", "dicomweb", "ok"), ("a.clrec", "gateway",
                                                                             "corrupt_landing_record"),
                  ("drop-MR_small.dcm", "file", "ok"), ("empty.dcm", "file", "not_dicom"),
                  ("notes.json", "file", "not_dicom")]
    for r in rows:
        stored = _uri_bytes(r.stored_uri, files)
        assert len(stored) == r.stored_bytes and hashlib.sha256(stored).hexdigest() == r.sha256
    first = rows[0]
    assert _uri_bytes(first.stored_uri, files) == ct  # the exact instance, byte for byte
    assert (first.calling_ae, first.peer, first.modality) == ("CT_SCANNER_1", "10.1.1.7:4100", "CT")
    assert first.transfer_syntax_uid == "1.2.840.10008.1.2.1"
    assert first.received_at == datetime(2026, 12, 6, 4, 0, 0, 500000)
    doc = json.loads(first.header_json)
    assert doc["00080018"] == {"vr": "UI", "Value": [first.sop_instance_uid]}
    assert doc["0020000D"]["Value"] == [first.study_instance_uid]
    assert "7FE00010" not in doc  # pixel data is left out
    assert rows[3].sop_instance_uid == rows[1].sop_instance_uid  # the same MR, big endian, by either path
    assert rows[3].stored_uri == "file:/l/dicom/drop-MR_small.dcm" and rows[3].landing_position == 0
    assert rows[2].parse_detail and rows[2].header_json is None


@pytest.mark.realdata
def test_files_read_from_their_paths_give_the_same_rows_as_their_content(spark, realdata, tmp_path):
    """LandingSource(content=False): Spark lists the files, the job maps each one itself."""
    ct = (realdata / DICOM / "CT_small.dcm").read_bytes()
    segment = FILE_MAGIC + encode_record({"received_at": "2026-12-06T04:00:00Z", "protocol": "dimse"}, ct)
    files = {"seg.clrec": segment + b"CR\x00", "drop.dcm": ct, "empty.dcm": b""}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    listed = [(f"file:{tmp_path / name}", datetime(2026, 12, 6, 4, 0), len(data)) for name, data in files.items()]
    by_path = dicom_instances(spark.createDataFrame(listed, "path STRING, modificationTime TIMESTAMP, length BIGINT"),
                              ingest_batch_id="b-1").collect()
    by_content = _bronze(spark, *((path, files[path.rsplit("/", 1)[1]]) for path, _, _ in listed))
    assert sorted(by_path, key=lambda r: (r.landing_file, r.landing_position)) == by_content
    assert [r.parse_status for r in by_content] == ["ok", "not_dicom", "ok", "corrupt_landing_record"]


@pytest.mark.realdata
@pytest.mark.parametrize("name, charset, patient_name", [
    ("charset/chrJapMulti.dcm", "\\ISO 2022 IR 87", {"Alphabetic": "やまだ^たろう"}),
    ("charset/chrX1.dcm", "ISO_IR 192", {"Alphabetic": "Wang^XiaoDong", "Ideographic": "王^小東"}),
    ("fo-dicom/GH1301.dcm", "GB18030", {"Alphabetic": "Wang^XiaoDong", "Ideographic": "王^小东"}),
    ("fo-dicom/chrGB2312.dcm", "\\ISO 2022 IR 58", {"Alphabetic": "Zhang^XiaoDong", "Ideographic": "张^小东"}),
    ("charset/chrGerm.dcm", "ISO_IR 100", {"Alphabetic": "Äneas^Rüdiger"}),
    ("charset/chrRuss.dcm", "ISO_IR 144", {"Alphabetic": "Люкceмбypг"}),
])
def test_character_sets_decode_into_names(realdata, name, charset, patient_name):
    got = parse_instance((realdata / DICOM / name).read_bytes(), lambda tag: f"#tag={tag:08X}")
    assert got.status == "ok", got.detail
    assert got.specific_character_set == charset
    assert json.loads(got.header_json)["00100010"] == {"vr": "PN", "Value": [patient_name]}


def _latin2_and_korean() -> dict[str, bytes]:
    """Instances in ISO_IR 101 (Latin-2) and ISO 2022 IR 149 (Korean), built with pydicom's own encoder."""
    from io import BytesIO

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    out = {}
    for key, charset, name in (("latin2", "ISO_IR 101", "Dvořák^Łukasz"),
                               ("korean", ["", "ISO 2022 IR 149"], "Hong^Gildong=洪^吉洞=홍^길동")):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SpecificCharacterSet = charset
        ds.PatientName = name
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out[key] = buf.getvalue()
    return out


def test_latin2_and_iso2022_korean_names_decode():
    built = _latin2_and_korean()
    latin2 = parse_instance(built["latin2"], str)
    assert b"Dvo\xf8\xe1k^\xa3ukasz" in built["latin2"]  # really encoded as Latin-2 bytes
    assert json.loads(latin2.header_json)["00100010"]["Value"] == [{"Alphabetic": "Dvořák^Łukasz"}]
    korean = parse_instance(built["korean"], str)
    assert b"\x1b$)C" in built["korean"]  # ISO 2022 escape to KS X 1001
    assert json.loads(korean.header_json)["00100010"]["Value"] == [
        {"Alphabetic": "Hong^Gildong", "Ideographic": "洪^吉洞", "Phonetic": "홍^길동"}]


@pytest.mark.realdata
def test_every_real_file_gets_a_status_and_a_reason_when_it_is_not_ok(realdata):
    expected = {
        "MR_truncated.dcm": "truncated", "fo-dicom/GH1339.dcm": "truncated",
        "fo-dicom/CR-MONO1-10-chest": "no_file_meta", "fo-dicom/GH340.dcm": "no_file_meta",
        "meta_missing_tsyntax.dcm": "bad_file_meta", "empty_charset_LEI.dcm": "missing_uids",
        "fo-dicom/DICOMDIR": "missing_uids", "fo-dicom/GH223.dcm": "missing_uids", "fo-dicom/GH487.dcm": "missing_uids",
        "no_meta_group_length.dcm": "missing_uids", "test1.json": "not_dicom", "test_PN.json": "not_dicom",
        "fo-dicom/GH177_D_CLUNIE_CT1_IVRLE_BigEndian_undefined_length.dcm": "unreadable",
    }
    seen = {}
    for path in sorted((realdata / DICOM).rglob("*")):
        if path.is_file() and path.name != "SOURCES.md":
            got = parse_instance(path.read_bytes(), str)
            name = str(path.relative_to(realdata / DICOM))
            seen[name] = got.status
            if got.status != "ok":
                assert got.detail, f"{name}: {got.status} without a reason"
    assert {n: s for n, s in seen.items() if s != "ok"} == {n: s for n, s in expected.items() if n in seen}
    assert seen["fo-dicom/Issue1097_FailToOpenDeflatedFileWithSQ.dcm"] == "ok"  # deflate
    assert seen["fo-dicom/D_CLUNIE_CT1_RLE_FRAGS.dcm"] == "ok"  # RLE


def test_read_meta_names_what_is_missing():
    from bronze.dicom_wire import DicomFormatError

    with pytest.raises(DicomFormatError) as not_dicom:
        read_meta(b"--boundary\r\nnot a dicom file")
    assert not_dicom.value.reason == "not_dicom"
    built = _latin2_and_korean()["latin2"]
    meta = read_meta(built)
    assert meta.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2" and meta.transfer_syntax_uid == "1.2.840.10008.1.2.1"


@pytest.mark.realdata
def test_mangled_instances_never_raise(realdata):
    """Bit flips, cuts and spliced garbage in real files: always a status, never an exception (bronze must not
    crash on one bad instance and replay it forever)."""
    import random

    from bronze.dicom_wire import DicomFormatError

    rng = random.Random(20)
    sources = [(realdata / DICOM / n).read_bytes() for n in ("CT_small.dcm", "charset/chrJapMulti.dcm",
                                                             "fo-dicom/GH184.dcm", "fo-dicom/mr_brucker.dcm")]
    statuses = set()
    for _ in range(400):
        data = bytearray(rng.choice(sources))
        for _ in range(rng.randint(1, 8)):
            kind, at = rng.random(), rng.randrange(len(data))
            if kind < 0.6:
                data[at] = rng.randrange(256)
            elif kind < 0.8:
                del data[at:]
                if not data:
                    break
            else:
                data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        got = parse_instance(bytes(data), str)
        statuses.add(got.status)
        assert got.status == "ok" or got.detail
        try:
            read_meta(bytes(data))
        except DicomFormatError:
            pass
    assert {"ok", "truncated", "unreadable"} <= statuses


def test_non_finite_values_are_written_as_strict_json():
    """JSON has no NaN or Infinity: a bare token would make Spark's JSON reader read nothing of the header."""
    from pydicom.uid import generate_uid

    from tests.test_gateway_dicom import ct_slice

    ds = ct_slice(8, 8)
    ds.StudyInstanceUID, ds.AccessionNumber = generate_uid(), "ACC-NAN"
    ds.SliceThickness, ds.SpacingBetweenSlices = "NaN", "-inf"  # DS
    ds.add_new(0x00189306, "FD", float("nan"))  # Single Collimation Width
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    header = parse_instance(buf.getvalue(), str).header_json

    def refuse(token):
        raise AssertionError(f"bare {token} in header_json")

    doc = json.loads(header, parse_constant=refuse)
    assert doc["00189306"]["Value"] == ["NaN"] and doc["00080050"]["Value"] == ["ACC-NAN"]
    assert doc["00180050"]["Value"] == ["NaN"] and doc["00180088"]["Value"] == ["-Infinity"]
