"""A real `carelake gateway` process for tests and benchmarks: start on free ports, talk, stop or kill."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from bronze.hl7_wire import MLLP_END, frame
from bronze.records import SEGMENT_SUFFIX, Record, scan
from tests.conftest import REPO, carelake_cmd, carelake_env


class GatewayProcess:
    def __init__(self, root: Path, *args: str, **env: str):
        self.root = root
        self.args = args
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.mllp: tuple[str, int] = ("", 0)
        self.http = ""
        self.dicom: tuple[str, int] | None = None  # when started with --dicom-port
        self.stdout = ""

    def start(self, timeout: float = 30) -> GatewayProcess:
        self.proc = subprocess.Popen(carelake_cmd("gateway", *self.args), env=carelake_env(self.root, **self.env),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        line = self.proc.stdout.readline()
        if not line.startswith("carelake gateway:") or time.monotonic() > deadline:
            self.proc.kill()
            raise AssertionError(f"gateway did not start: {line!r} {self.proc.stderr.read()}")
        fields = dict(part.split("=", 1) for part in line.split()[2:])
        host, port = fields["mllp"].rsplit(":", 1)
        self.mllp = (host, int(port))
        self.http = fields["http"]
        if fields.get("dicom", "off") != "off":
            host, port = fields["dicom"].rsplit(":", 1)
            self.dicom = (host, int(port))
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.proc is not None
        os.killpg(self.proc.pid, sig)
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            out, err = self.proc.communicate()
        self.stdout += out
        self.stderr = err
        return self.proc.returncode

    def children(self) -> list[int]:
        """The pids of the processes the gateway started (its DICOM acceptors), from /proc."""
        assert self.proc is not None
        out = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:  # ended while we looked
                continue
            if int(fields[1]) == self.proc.pid:
                out.append(int(stat.parent.name))
        return sorted(out)

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()


def mllp_exchange(address: tuple[str, int], *messages: bytes, timeout: float = 10, tls=None) -> list[bytes]:
    """Send each message on one connection and return each ACK (without framing); over TLS with an SSLContext."""
    replies = []
    with socket.create_connection(address, timeout=timeout) as raw, \
            (tls.wrap_socket(raw, server_hostname=address[0]) if tls else raw) as sock:
        for message in messages:
            sock.sendall(frame(message))
            data = b""
            while not data.endswith(MLLP_END):
                chunk = sock.recv(65536)
                if not chunk:
                    raise AssertionError(f"gateway closed the connection; got {data!r}")
                data += chunk
            replies.append(data[1:-len(MLLP_END)])
    return replies


def landed(root: Path, feed: str, *, rejected: bool = False) -> list[tuple[str, Record]]:
    """Every whole record in a feed's landing folder (sealed and open segments), oldest segment first."""
    folder = root / "landing" / ("_rejects" if rejected else "") / feed
    out = []
    for path in sorted(folder.glob(f"*{SEGMENT_SUFFIX}"), key=lambda p: p.name.removeprefix(".open-")):
        result = scan(path.read_bytes())
        assert result.problem is None or path.name.startswith(".open-"), f"{path.name}: {result.problem}"
        out += [(path.name, r) for r in result.records]
    return out
