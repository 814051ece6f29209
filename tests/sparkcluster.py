"""A Spark standalone cluster on this machine for tests and benchmarks: one master and N workers, each its own
JVM process started with pyspark's own `spark-class`, listening on loopback only."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pyspark

SPARK_HOME = Path(pyspark.__file__).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StandaloneCluster:
    """`with StandaloneCluster(folder, workers=2) as cluster: ... cluster.master_url ...`"""

    def __init__(self, folder: Path, *, workers: int = 2, cores: int = 1, memory: str = "1g",
                 env: dict[str, str] | None = None):
        self.folder, self.workers, self.cores, self.memory = folder, workers, cores, memory
        self.env = {**os.environ, **(env or {}), "SPARK_HOME": str(SPARK_HOME)}
        self.procs: list[subprocess.Popen] = []
        self.port, self.ui = _free_port(), _free_port()
        self.master_url = f"spark://127.0.0.1:{self.port}"

    def work_dir(self, n: int) -> Path:
        return self.folder / f"worker-{n}"

    def _start(self, name: str, *args: str) -> None:
        log = open(self.folder / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        self.procs.append(subprocess.Popen([str(SPARK_HOME / "bin" / "spark-class"), *args], env=self.env,
                                           stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def state(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ui}/json", timeout=5) as resp:
            return json.loads(resp.read())

    def __enter__(self) -> StandaloneCluster:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._start("master", "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port",
                    str(self.port), "--webui-port", str(self.ui))
        for n in range(self.workers):
            self.work_dir(n).mkdir(exist_ok=True)
            self._start(f"worker-{n}", "org.apache.spark.deploy.worker.Worker", self.master_url, "--host",
                        "127.0.0.1", "--cores", str(self.cores), "--memory", self.memory, "--webui-port", "0",
                        "--work-dir", str(self.work_dir(n)))
        deadline = time.monotonic() + 120
        while True:
            try:
                if self.state().get("aliveworkers", 0) >= self.workers:
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                logs = "\n".join((self.folder / f).read_text(errors="replace")[-2000:]
                                 for f in os.listdir(self.folder) if f.endswith(".log"))
                self.__exit__(None, None, None)
                raise RuntimeError(f"the standalone cluster did not come up with {self.workers} workers:\n{logs}")
            time.sleep(0.5)

    def __exit__(self, *exc) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                os.killpg(p.pid, 15)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)
                p.wait()
