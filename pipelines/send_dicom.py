"""`carelake send --to dicom://HOST:PORT[/AE_TITLE]`: DICOM folders over C-STORE (a pynetdicom SCU).

Each file is sent exactly as stored: its file meta names the SOP class, instance and transfer syntax, the
association proposes exactly those pairs, and the data set's bytes go on the wire undecoded (pynetdicom's chunked
send), so what lands at the gateway is byte for byte what was on disk. Every file gets an outcome: the C-STORE
status, or why it could not be sent (no usable file meta: such files go in with `carelake ingest --feed dicom`).
A failure the peer may get over (0xA7xx Out of Resources, no answer, the association lost) is resent with backoff;
any other failure status is reported, not resent.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from bronze.dicom_wire import DicomFormatError, read_meta
from pipelines.config import Config
from pipelines.send import _BACKOFF_S  # the same resend schedule as MLLP and HTTP

log = logging.getLogger("carelake.send")

# pynetdicom accepts at most 128 presentation contexts in one association request (PS3.8: 8-bit context ids).
MAX_CONTEXTS = 128
MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"  # a DICOMDIR: an index of files on a medium, not an instance to store
# Status categories (PS3.4 Annex B.2.3 and C.4.2.1.4 for the common codes).
_WARNINGS = (0x0001, 0xB000, 0xB006, 0xB007)


@dataclass(frozen=True)
class DicomItem:
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


@dataclass(frozen=True)
class DicomPlan:
    items: list[DicomItem]
    unsendable: list[str]  # "path: why"


def plan_dicom(files: Iterable[Path]) -> DicomPlan:
    """The files C-STORE can carry (a Part 10 file meta with class, instance and transfer syntax), and the rest."""
    items, unsendable = [], []
    for path in files:
        try:
            meta = read_meta(path)
        except DicomFormatError as exc:
            unsendable.append(f"{path}: {exc} (not sent; land it with carelake ingest --feed dicom)")
            continue
        if meta.sop_class_uid == MEDIA_DIRECTORY:
            unsendable.append(f"{path}: a DICOMDIR (media directory index), not an instance; not sent (send the files "
                              "it lists)")
            continue
        items.append(DicomItem(path, meta.sop_class_uid, meta.sop_instance_uid, meta.transfer_syntax_uid))
    return DicomPlan(items, unsendable)


def status_text(status: int) -> str:
    if status == 0x0000:
        return "0x0000 Success"
    if status in _WARNINGS:
        return f"0x{status:04X} Warning"
    if status & 0xFF00 == 0xA700:
        return f"0x{status:04X} Out of Resources"
    return f"0x{status:04X} Failure"


def _retryable(status: int) -> bool:
    return status & 0xFF00 == 0xA700 or status == 0xC211  # out of resources, an error in the SCP's handler


def _context_groups(items: list[DicomItem]) -> list[list[DicomItem]]:
    """Items in groups whose (SOP class, transfer syntax) pairs fit one association request."""
    groups: list[list[DicomItem]] = []
    pairs: list[set[tuple[str, str]]] = []
    for item in items:
        pair = (item.sop_class_uid, item.transfer_syntax_uid)
        for group, seen in zip(groups, pairs, strict=True):
            if pair in seen or len(seen) < MAX_CONTEXTS:
                group.append(item)
                seen.add(pair)
                break
        else:
            groups.append([item])
            pairs.append({pair})
    return groups


class _Sender:
    """One worker's association, opened on first use and again after it is lost."""

    def __init__(self, host: str, port: int, called: str, calling: str, contexts: set[tuple[str, str]],
                 timeout_s: float):
        from pynetdicom import AE

        self.host, self.port, self.called = host, port, called
        self.ae = AE(ae_title=calling)
        for sop_class, syntax in sorted(contexts):
            self.ae.add_requested_context(sop_class, syntax)
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = timeout_s
        self.assoc = None

    def store(self, item: DicomItem) -> tuple[int | None, str, bool]:
        """(status or None when nothing came back, a note, whether a resend may succeed)."""
        if self.assoc is None or not self.assoc.is_established:
            self.assoc = self.ae.associate(self.host, self.port, ae_title=self.called)
            if not self.assoc.is_established:
                rejected = self.assoc.is_rejected
                self.assoc = None
                if rejected:
                    return None, (f"association rejected by {self.called!r} (is this sender's AE title in the "
                                  "gateway's gateway.dicom.calling_ae_titles? is the called AE title right?)"), False
                return None, "no association (connection refused or timed out)", True
        cx = [c for c in self.assoc.accepted_contexts
              if (c.abstract_syntax, c.transfer_syntax[0]) == (item.sop_class_uid, item.transfer_syntax_uid)]
        if not cx:
            return None, (f"the peer does not accept SOP class {item.sop_class_uid} in transfer syntax "
                          f"{item.transfer_syntax_uid}"), False
        try:
            answer = self.assoc.send_c_store(item.path)
        except (OSError, RuntimeError, ValueError, AttributeError) as exc:
            self.close()
            return None, f"{type(exc).__name__}: {exc}", True
        status = getattr(answer, "Status", None)
        if status is None:
            self.close()
            return None, "no C-STORE response (association lost or timed out)", True
        return int(status), str(getattr(answer, "ErrorComment", "") or ""), _retryable(int(status))

    def close(self) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()
        self.assoc = None


def deliver_dicom(cfg: Config, items: list[DicomItem], *, host: str, port: int, called: str, calling: str,
                  connections: int, on_answer: Callable[[DicomItem, str], None], on_problem: Callable[[str], None],
                  on_retry: Callable[[], None]) -> list[str]:
    """C-STORE every item over `connections` associations; return the items never answered after every retry."""
    from pynetdicom import _config

    _config.STORE_SEND_CHUNKED_DATASET = True  # send each data set's bytes as stored: never decoded, re-encoded
    failed: list[str] = []
    lock = threading.Lock()
    for group in _context_groups(items):
        contexts = {(i.sop_class_uid, i.transfer_syntax_uid) for i in group}
        queue = list(reversed(group))

        def worker(contexts=contexts, queue=queue) -> None:
            sender = _Sender(host, port, called, calling, contexts, cfg.gateway.ack_timeout_s)
            try:
                while True:
                    with lock:
                        if not queue:
                            return
                        item = queue.pop()
                    _send_one(sender, item, cfg.gateway.send_retries, on_answer, on_problem, on_retry, failed, lock)
            finally:
                sender.close()

        threads = [threading.Thread(target=worker, name=f"dicom-send-{n}") for n in range(connections)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return failed


def _send_one(sender: _Sender, item: DicomItem, retries: int, on_answer, on_problem, on_retry, failed: list[str],
              lock: threading.Lock) -> None:
    status, note = None, ""
    for tries in range(retries + 1):
        status, note, again = sender.store(item)
        if not again:
            text = status_text(status) if status is not None else "not sent"
            with lock:
                on_answer(item, text)
                if status != 0x0000 and status not in _WARNINGS:
                    on_problem(f"{item.path} ({item.sop_instance_uid}): {text}{f': {note}' if note else ''}")
            return
        if tries < retries:
            with lock:
                on_retry()
            time.sleep(_BACKOFF_S[min(tries, len(_BACKOFF_S) - 1)])
    with lock:
        failed.append(f"{item.path}: {status_text(status) if status is not None else note}")
