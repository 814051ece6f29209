"""Landing segments: the record format, torn tails, crash recovery and group commit."""

from __future__ import annotations

import random
import re
import threading

import pytest

from bronze import hl7_wire
from bronze.hl7_wire import count_messages, split_messages
from bronze.records import FILE_MAGIC, SegmentFormatError, encode_record, scan
from pipelines.gateway.segments import SegmentLog, recover


def _segment(*bodies: bytes) -> bytes:
    return FILE_MAGIC + b"".join(encode_record({"n": i}, b) for i, b in enumerate(bodies))


def test_records_round_trip_with_offsets():
    data = _segment(b"first", b"", b"\x00\xff binary \r\n")
    result = scan(data)
    assert result.problem is None and result.valid_end == len(data)
    assert [(r.header["n"], r.body) for r in result.records] == [(0, b"first"), (1, b""), (2, b"\x00\xff binary \r\n")]
    for r in result.records:
        assert data[r.body_offset:r.body_offset + len(r.body)] == r.body


@pytest.mark.parametrize("cut", [1, 5, 11, 30, 40])
def test_a_torn_tail_is_detected_at_any_byte_and_never_parsed(cut):
    whole = _segment(b"kept one", b"kept two")
    torn = whole + encode_record({"n": 9}, b"being written when the power went")[:cut]
    result = scan(torn)
    assert [r.body for r in result.records] == [b"kept one", b"kept two"]
    assert result.valid_end == len(whole) and result.torn_bytes == cut and result.problem


def test_a_flipped_bit_is_caught_by_the_checksum():
    data = bytearray(_segment(b"one", b"two", b"three"))
    data[data.index(b"two")] ^= 0x01
    result = scan(bytes(data))
    assert [r.body for r in result.records] == [b"one"] and "checksum mismatch" in result.problem


def test_not_a_segment_is_refused():
    with pytest.raises(SegmentFormatError):
        scan(b"MSH|^~\\&|plain file\r")


def test_recover_seals_whole_records_and_sets_the_torn_tail_aside(tmp_path):
    whole = _segment(b"a", b"b")
    tail = encode_record({"n": 2}, b"c")[:-2]
    (tmp_path / ".open-20260101T000000Z-hl7-aaa.clrec").write_bytes(whole + tail)
    (tmp_path / ".open-20260101T000001Z-hl7-bbb.clrec").write_bytes(FILE_MAGIC[:3])  # died before any record
    (tmp_path / "20251231T000000Z-hl7-ccc.clrec").write_bytes(_segment(b"sealed earlier"))
    out = recover(tmp_path)
    assert [(r.segment, r.records, r.torn_bytes) for r in out] == [
        ("20260101T000000Z-hl7-aaa.clrec", 2, len(tail)), ("20260101T000001Z-hl7-bbb.clrec", 0, 3)]
    assert sorted(p.name for p in tmp_path.glob("*.clrec")) == [
        "20251231T000000Z-hl7-ccc.clrec", "20260101T000000Z-hl7-aaa.clrec"]
    assert (tmp_path / "20260101T000000Z-hl7-aaa.clrec").read_bytes() == whole
    assert (tmp_path / "_torn" / "20260101T000000Z-hl7-aaa.clrec.tail").read_bytes() == tail
    assert not list(tmp_path.glob(".open-*"))
    assert recover(tmp_path) == []  # idempotent


def test_group_commit_lands_concurrent_appends_in_few_fsyncs_and_seals_by_size(tmp_path):
    fsyncs = []
    log = SegmentLog(tmp_path, "devices", segment_bytes=4096, segment_age_s=60,
                     on_fsync=lambda s, n, b: fsyncs.append(n)).start()
    futures = []
    lock = threading.Lock()

    def writer(k: int) -> None:
        for i in range(50):
            f = log.append({"k": k}, f"reading {k}-{i}".encode())
            with lock:
                futures.append(f)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    places = [f.result(timeout=10) for f in futures]
    log.close()
    assert sum(fsyncs) == 200 and len(fsyncs) <= 200
    segments = sorted(tmp_path.glob("*.clrec"))
    assert len(segments) > 1 and not list(tmp_path.glob(".open-*"))  # 4 KiB limit: several sealed segments
    bodies = sorted(r.body for p in segments for r in scan(p.read_bytes()).records)
    assert bodies == sorted(f"reading {k}-{i}".encode() for k in range(4) for i in range(50))
    for place in places:  # every reported place holds a whole record
        data = (tmp_path / place.segment).read_bytes()
        assert data[place.offset:place.offset + 2] == b"CR"


def test_append_after_close_fails_instead_of_pretending(tmp_path):
    log = SegmentLog(tmp_path, "hl7").start()
    log.close()
    with pytest.raises(RuntimeError, match="closed"):
        log.append({}, b"late").result(timeout=5)


def test_split_messages_handles_terminators_bom_batches_and_leading_garbage():
    data = (b"\xef\xbb\xbfFHS|^~\\&\rBHS|^~\\&\rMSH|^~\\&|A|||||||1\rPID|1\nMSH|^~\\&|B|||||||2\r\n"
            b"OBX|1\r\nBTS|2\rFTS|1\r")
    pieces = [data[o:o + n] for o, n in split_messages(data)]
    assert pieces == [b"MSH|^~\\&|A|||||||1\rPID|1\n", b"MSH|^~\\&|B|||||||2\r\nOBX|1\r\n"]
    junk = b"junk\rMSH|x\r"
    assert [junk[o:o + n] for o, n in split_messages(junk)] == [b"junk\r", b"MSH|x\r"]


def _reference_split(data: bytes) -> list[tuple[int, int]]:
    """split_messages as it was written with regular expressions (before the windowed scan)."""
    starts = [m.start() for m in re.finditer(rb"(?:^|(?<=[\r\n]))MSH", data, re.MULTILINE)]
    cuts = sorted({*starts, *(m.start() for m in re.finditer(rb"(?:^|(?<=[\r\n]))(?:FHS|BHS|BTS|FTS)", data)),
                   len(data)})
    lead = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    bounds = [lead, *[c for c in cuts if c > lead]]
    out = []
    for begin, end in zip(bounds, bounds[1:], strict=False):
        if data[begin:begin + 3] in (b"FHS", b"BHS", b"BTS", b"FTS"):
            brk = re.compile(rb"\r\n|\r|\n").search(data, begin, end)
            begin = brk.end() if brk else end
        if begin < end and data[begin:end].strip(b"\r\n\t \x00"):
            out.append((begin, end - begin))
    return out


@pytest.mark.parametrize("window", [1, 2, 3, 5, 1 << 20])
def test_split_and_count_scan_in_windows_and_find_what_the_line_start_patterns_found(monkeypatch, window):
    """The scan goes a window at a time (each C call short, so a gateway thread splitting a 16 MB batch never holds
    the GIL for long); matches across a window's edge are found once, as the regular expressions found them."""
    monkeypatch.setattr(hl7_wire, "_SCAN_WINDOW", window)
    parts = [b"MSH", b"FHS", b"BHS", b"BTS", b"FTS", b"\r", b"\n", b"\r\n", b"|", b"x", b"\xef\xbb\xbf", b"MS", b"H"]
    rng = random.Random(window)
    for _ in range(3000):
        data = b"".join(rng.choice(parts) for _ in range(rng.randint(0, 25)))
        assert split_messages(data) == _reference_split(data), data
        assert count_messages(data) == len(re.findall(rb"(?:^|(?<=[\r\n]))MSH", data, re.MULTILINE)), data
