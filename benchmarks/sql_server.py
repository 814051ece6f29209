"""`carelake sql-server` over JDBC's protocol (PyHive): point and daily-aggregate query latency on a gold table of many
score rows, queries/s at 4 concurrent clients, and commit-to-visible delay.

Run: .venv/bin/python benchmarks/sql_server.py [--rows 10000000] [--queries 20] [--seconds 20]

The scores are generated with pyarrow (sorted by time, 10,000 patients, one row a patient a minute) and appended
through the table store in chunks of 1M rows (one file each); the server is a real process (conf/local.yaml: local[*],
2 GB driver) with a login (engineer): every statement passes the proxy, the guard and the audit log.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta

from _common import REPO, emit, median, percentile, temp_config

PATIENTS = 10_000
CHUNK = 1_000_000
T0 = datetime(2026, 1, 1, tzinfo=UTC)
PASSWORD = "benchmark-password"


def write_scores(store, rows: int) -> None:
    import numpy as np
    import pyarrow as pa

    for start in range(0, rows, CHUNK):
        i = np.arange(start, min(rows, start + CHUNK), dtype=np.int64)
        patient = i % PATIENTS
        scored = np.datetime64(T0.replace(tzinfo=None), "us") + (i // PATIENTS).astype("timedelta64[m]")
        score = (i * 7919) % 12
        band = np.where(score >= 7, "high", np.where(score >= 5, "medium", "low"))
        keys = pa.array([f"p{p:05d}" for p in patient.tolist()])
        store.append("gold.early_warning_scores", pa.table({
            "patient_key": keys, "encounter_key": keys, "scored_at": pa.array(scored, pa.timestamp("us", tz="UTC")),
            "news2_score": pa.array(score.astype(np.int32)), "news2_band": pa.array(band),
            "model_risk": pa.array((score / 12.0).astype(np.float64))}))


class Server:
    def __init__(self, root):
        env = {k: v for k, v in os.environ.items() if not k.startswith("CARELAKE_")}
        env.update({"CARELAKE_ROOT": str(root), "CARELAKE_CONF_DIR": str(REPO / "conf"), "PYTHONPATH": str(REPO)})
        exe = os.path.join(os.path.dirname(sys.executable), "carelake")
        self.proc = subprocess.Popen([exe, "sql-server", "--port", "0"], env=env, cwd=REPO, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        line = self.proc.stdout.readline()
        if not line.startswith("carelake sql-server: jdbc:hive2://"):
            raise SystemExit(f"sql-server did not start: {line!r}")
        self.port = int(line.rsplit(":", 1)[1].split("/")[0])

    def connect(self):
        from pyhive import hive

        return hive.connect(host="127.0.0.1", port=self.port, username="bench", password=PASSWORD, auth="CUSTOM")

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=60)


def timed(cursor, sql: str) -> float:
    t = time.perf_counter()
    cursor.execute(sql)
    cursor.fetchall()
    return (time.perf_counter() - t) * 1000


def latencies(cursor, sql: str, n: int) -> dict:
    for _ in range(2):
        timed(cursor, sql)  # warm: first views, JIT
    ms = [timed(cursor, sql) for _ in range(n)]
    return {"p50_ms": round(median(ms), 1), "p95_ms": round(percentile(ms, 0.95), 1)}


def point_sql(k: int) -> str:
    at = (T0 + timedelta(minutes=k % 500)).strftime("%Y-%m-%d %H:%M:%S")
    return (f"SELECT * FROM gold.early_warning_scores WHERE patient_key = 'p{k % PATIENTS:05d}' "
            f"AND scored_at = TIMESTAMP'{at}'")


DAILY = ("SELECT CAST(scored_at AS DATE) AS day, news2_band, count(*) AS scores, avg(news2_score) AS mean_news2 "
         "FROM gold.early_warning_scores GROUP BY 1, 2 ORDER BY 1, 2")


def concurrent_qps(server: Server, clients: int, seconds: float) -> float:
    done = [0] * clients
    stop = time.monotonic() + seconds

    def work(c: int) -> None:
        conn = server.connect()
        cursor = conn.cursor()
        k = c * 1000
        while time.monotonic() < stop:
            cursor.execute(point_sql(k))
            cursor.fetchall()
            done[c] += 1
            k += 1
        conn.close()

    threads = [threading.Thread(target=work, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / seconds


def commit_to_visible(store, cursor, n: int) -> list[float]:
    import pyarrow as pa

    out = []
    for k in range(n):
        store.append("gold.bench_commits", pa.table({"k": [k]}))
        t = time.perf_counter()
        while True:
            cursor.execute(f"SELECT count(*) FROM gold.bench_commits WHERE k = {k}")
            if cursor.fetchall()[0][0]:
                break
        out.append((time.perf_counter() - t) * 1000)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--queries", type=int, default=20, help="timed runs of each query")
    ap.add_argument("--seconds", type=float, default=20, help="length of the 4-client run")
    a = ap.parse_args()
    import pyarrow as pa

    from pipelines.sqlserver.users import add_user
    from pipelines.store.deltars import DeltaRsStore

    cfg = temp_config()
    store = DeltaRsStore(cfg)
    t = time.perf_counter()
    write_scores(store, a.rows)
    load_s = time.perf_counter() - t
    store.append("gold.bench_commits", pa.table({"k": [-1]}))
    add_user(cfg.path("_secrets", "sql_users"), "bench", "engineer", PASSWORD)
    server = Server(cfg.root)
    try:
        conn = server.connect()
        cursor = conn.cursor()
        point = latencies(cursor, point_sql(42), a.queries)
        daily = latencies(cursor, DAILY, a.queries)
        visible = commit_to_visible(store, cursor, 5)
        conn.close()
        qps = concurrent_qps(server, 4, a.seconds)
    finally:
        server.stop()
    emit({"benchmark": "sql_server", "rows": a.rows, "load_s": round(load_s, 1), "point": point, "daily": daily,
          "qps_4_clients_point": round(qps, 1), "commit_to_visible_p50_ms": round(median(visible), 1),
          "commit_to_visible_max_ms": round(max(visible), 1), "cores": os.cpu_count(),
          "loadavg_1m": round(os.getloadavg()[0], 2)})


if __name__ == "__main__":
    main()
