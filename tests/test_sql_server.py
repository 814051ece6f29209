"""`carelake sql-server` end to end: real clients (PyHive DB-API, beeline) against one server process per module.

The must-shows of issue 24's SQL half: a score committed after the server started is seen by the next statement;
an analyst's query for MRNs is refused, the same as engineer works, and both are in ops.audit_log.
"""

from __future__ import annotations

import glob
import os
import signal
import socket
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pytest

from tests.conftest import REPO, carelake_cmd, carelake_env, make_config

pytestmark = pytest.mark.slow
PASSWORD = {"ana": "analyst-password-1", "eng": "engineer-password-1", "aud": "auditor-password-1"}
T0 = datetime(2026, 1, 5, 8, 0, tzinfo=UTC)


def _rows(struct, rows: list[dict]) -> pa.Table:
    from pyspark.sql.pandas.types import to_arrow_schema

    return pa.Table.from_pylist(rows, schema=to_arrow_schema(struct))


def _score(n: int) -> dict:
    return {"patient_key": f"p{n % 3}", "encounter_key": f"e{n % 3}", "scored_at": T0.replace(minute=n),
            "news2_score": n % 8, "news2_band": ["low", "medium", "high"][n % 3]}


def build_lake(root: Path) -> None:
    """A tiny lakehouse: scores, alerts, encounters and patients (names, MRNs, birth dates) in their real schemas."""
    from gold import deterioration_alerts, early_warning_scores, imaging_worklist
    from pipelines.store.deltars import DeltaRsStore
    from silver import encounters, patients

    store = DeltaRsStore(make_config(root))
    store.append("gold.early_warning_scores", _rows(early_warning_scores.SCHEMA, [_score(n) for n in range(5)]))
    store.append("gold.deterioration_alerts", _rows(deterioration_alerts.SCHEMA, [
        {"alert_id": "a1", "patient_key": "p1", "encounter_key": "e1", "level": "news2_high", "status": "open",
         "opened_at": T0, "news2_band": "high", "peak_news2_score": 9}]))
    store.append("silver.encounters", _rows(encounters.SCHEMA, [
        {"encounter_key": "e1", "identity_kind": "encounter", "patient_key": "p1", "location_point_of_care": "MED5E",
         "ingested_at": T0}]))
    store.append("gold.imaging_worklist", _rows(imaging_worklist.SCHEMA, [
        {"worklist_key": "1.2.3", "status": "unread", "rank": 1, "patient_key": "p1", "modality": "CT",
         "priority": "STAT", "sla_breached": True, "waited_minutes": 75.0, "as_of": T0}]))
    store.append("gold.imaging_sla_breaches", _rows(imaging_worklist.BREACH_SCHEMA, [
        {"breach_id": "b1", "study_instance_uid": "1.2.3", "patient_key": "p1", "priority": "STAT",
         "sla_minutes": 60.0, "available_at": T0, "opened_at": T0, "status": "open"}]))
    store.append("silver.patients", _rows(patients.SCHEMA, [
        {"patient_key": "p1", "identity_kind": "patient", "mrn": "MRN0001", "family_name": "Doe",
         "given_name": "Jane", "birth_date": datetime(1961, 3, 17).date(), "sex": "female", "ingested_at": T0}]))


class SqlServer:
    """A real `carelake sql-server` process on a free port."""

    def __init__(self, root: Path, *args: str):
        env = carelake_env(root)
        self.proc = subprocess.Popen(carelake_cmd("sql-server", "--port", "0", *args), env=env, cwd=REPO,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        line = self.proc.stdout.readline()
        if not line.startswith("carelake sql-server: jdbc:hive2://"):
            self.proc.kill()
            raise AssertionError(f"sql-server did not start: {line!r} {self.proc.stderr.read()[-3000:]}")
        self.url = line.split(": ", 1)[1].strip()
        self.host, port = self.url.removeprefix("jdbc:hive2://").split("/")[0].rsplit(":", 1)
        self.port = int(port)

    def connect(self, user: str, password: str | None = None):
        from pyhive import hive

        return hive.connect(host=self.host, port=self.port, username=user,
                            password=password or PASSWORD[user], auth="CUSTOM")

    def query(self, user: str, sql: str) -> list[tuple]:
        conn = self.connect(user)
        try:
            cur = conn.cursor()
            cur.execute(sql)
            return cur.fetchall()
        finally:
            conn.close()

    def stop(self) -> str:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            _, err = self.proc.communicate()
        return err


@pytest.fixture(scope="module")
def lake(tmp_path_factory) -> Path:
    from pipelines.sqlserver.users import add_user

    root = tmp_path_factory.mktemp("sqlserver") / "lake"
    build_lake(root)
    for user, role in (("ana", "analyst"), ("eng", "engineer"), ("aud", "auditor")):
        add_user(root / "_secrets" / "sql_users", user, role, PASSWORD[user])
    return root


@pytest.fixture(scope="module")
def server(lake):
    s = SqlServer(lake)
    yield s
    err = s.stop()
    assert s.proc.returncode == 0, err[-3000:]
    assert not (lake / "_sqlserver" / "server.json").exists(), "the discovery file outlived the server"
    assert (lake / "_sqlserver" / "derby.log").exists() and not (REPO / "derby.log").exists()


def audit_rows(root: Path) -> list[dict]:
    from deltalake import DeltaTable

    return DeltaTable(str(root / "_audit_log")).to_pyarrow_table().to_pylist()


def refusal(excinfo) -> str:
    return excinfo.value.args[0].status.errorMessage


def test_analyst_mrn_query_refused_engineer_allowed_both_audited(server, lake):
    from pyhive import exc

    sql = "SELECT mrn, family_name FROM silver.patients"
    with pytest.raises(exc.OperationalError) as refused:
        server.query("ana", sql)
    assert "role analyst may read gold tables and the masked views only" in refusal(refused)
    assert server.query("eng", sql) == [("MRN0001", "Doe")]
    mine = [r for r in audit_rows(lake) if r["statement"] == sql]
    assert {(r["actor"], r["outcome"], r["rows"]) for r in mine} == {("ana", "refused", None), ("eng", "allowed", 1)}
    allowed = next(r for r in mine if r["outcome"] == "allowed")
    assert allowed["tables"] == [{"name": "silver.patients", "version": 0}] and allowed["action"] == "query"
    assert "role analyst" in next(r for r in mine if r["outcome"] == "refused")["detail"]


def test_score_committed_after_start_is_seen_by_the_next_statement(server, lake):
    from gold import early_warning_scores
    from pipelines.store.deltars import DeltaRsStore

    count = "SELECT count(*) FROM gold.early_warning_scores"
    before = server.query("ana", count)[0][0]
    store = DeltaRsStore(make_config(lake))
    result = store.append("gold.early_warning_scores", _rows(early_warning_scores.SCHEMA, [_score(40)]))
    committed = time.monotonic()
    assert server.query("ana", count) == [(before + 1,)]  # the first statement after the commit sees it
    print(f"commit-to-visible (connect + query) {time.monotonic() - committed:.2f} s at version {result.version}")
    row = server.query("ana", "SELECT news2_score FROM gold.early_warning_scores WHERE scored_at = "
                              "TIMESTAMP'2026-01-05 08:40:00'")
    assert row == [(0,)]


def test_time_travel_is_for_auditors(server, lake):
    from pyhive import exc

    now = server.query("aud", "SELECT count(*) FROM gold.early_warning_scores")[0][0]
    assert server.query("aud", "SELECT count(*) FROM gold.early_warning_scores VERSION AS OF 0") == [(5,)]
    assert now >= 5
    for user in ("ana", "eng"):
        with pytest.raises(exc.OperationalError) as refused:
            server.query(user, "SELECT count(*) FROM gold.early_warning_scores VERSION AS OF 0")
        assert "time travel is for the auditor role" in refusal(refused)
    with pytest.raises(exc.OperationalError) as missing:
        server.query("aud", "SELECT count(*) FROM gold.early_warning_scores VERSION AS OF 999")
    assert "version 999 does not exist" in refusal(missing)
    assert server.query("aud", "SELECT count(*) FROM ops.audit_log WHERE outcome = 'refused'")[0][0] >= 2


def test_masked_views_and_marts_for_analysts(server):
    rows = server.query("ana", "SELECT * FROM gold.patients_masked")
    assert rows == [("p1", "female", "1961-03-01", None, None, None)]  # birth date to the month (conf default)
    conn = server.connect("ana")
    cur = conn.cursor()
    cur.execute("SELECT * FROM gold.patients_masked")
    assert [d[0] for d in cur.description] == ["patient_key", "sex", "birth_period", "deceased", "deceased_period",
                                               "country"]
    conn.close()
    ward = server.query("ana", "SELECT opened_on, ward, level, news2_band, alerts FROM gold.alerts_by_ward_day")
    assert ward == [("2026-01-05", "MED5E", "news2_high", "high", 1)]
    assert server.query("ana", "SELECT * FROM gold.imaging_worklist_by_priority") == [
        ("unread", "STAT", "CT", 1, 1, 75.0, 75.0, datetime(2026, 1, 5, 8, 0))]  # naive: UTC, the session zone
    assert server.query("ana", "SELECT available_on, priority, breaches, still_unread, sla_minutes "
                               "FROM gold.imaging_sla_by_day") == [("2026-01-05", "STAT", 1, 1, 60.0)]


@pytest.mark.parametrize("sql, reason", [
    ("SELECT * FROM global_temp.silver__patients__v0", "is not a table the SQL server serves"),
    ("SELECT * FROM `silver`.`patients`", "is not a table the SQL server serves"),
    ("SELECT * FROM parquet.`/etc`", "is not a table the SQL server serves"),
    ("SET spark.sql.runSQLOnFiles=true", "only queries run through the SQL server"),
    ("CREATE TABLE t AS SELECT 1", "only queries run through the SQL server"),
    ("SELECT reflect('java.lang.System', 'getenv', 'HOME')", "the function reflect is not available"),
    ("SELECT * FROM read_files('/etc')", "the table function read_files is not available"),
])
def test_statements_outside_the_served_tables_are_refused(server, sql, reason):
    from pyhive import exc

    with pytest.raises(exc.OperationalError) as refused:
        server.query("eng", sql)
    assert reason in refusal(refused)


def test_variables_are_not_substituted(server):
    assert server.query("eng", "SELECT '${env:HOME}', '${system:user.name}'") == [("${env:HOME}",
                                                                                  "${system:user.name}")]


def test_wrong_password_is_refused_and_audited(server, lake):
    from thrift.transport.TTransport import TTransportException

    with pytest.raises(TTransportException):
        server.connect("eng", "not-the-password")
    assert any(r["actor"] == "eng" and r["action"] == "login" and r["outcome"] == "refused"
               for r in audit_rows(lake))


def test_beeline_from_pyspark_jars(server):
    import pyspark

    jars = Path(pyspark.__file__).parent / "jars"
    assert glob.glob(str(jars / "hive-beeline-*.jar")), "pyspark ships beeline"
    out = subprocess.run(["java", "-cp", f"{jars}/*", "org.apache.hive.beeline.BeeLine", "-u", server.url, "-n", "ana",
                          "-p", PASSWORD["ana"], "--silent=true", "--outputformat=csv2", "-e",
                          "SELECT ward, alerts FROM gold.alerts_by_ward_day"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line.split("> ")[-1] for line in out.stdout.splitlines() if line.strip()]
    assert lines[-2:] == ["ward,alerts", "MED5E,1"]


def test_carelake_sql_answers_through_the_running_server(server, lake):
    out = subprocess.run(carelake_cmd("sql", "--format", "csv", "SELECT news2_band, count(*) AS n FROM "
                                      "gold.early_warning_scores VERSION AS OF 0 GROUP BY 1 ORDER BY 1"),
                         env=carelake_env(lake), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["news2_band,n", "high,1", "low,2", "medium,2"]
    assert any(r["actor"].startswith("local:") and "VERSION AS OF 0" in (r["statement"] or "")
               for r in audit_rows(lake))


def test_refuses_to_start_without_users_or_open_without_auth(tmp_path, capsys):
    from pipelines.cli import main

    root = str(tmp_path / "lake")
    assert main(["--env", "test", "--root", root, "sql-server", "--no-auth", "--host", "0.0.0.0"]) == 2
    assert "--no-auth serves every table without a login" in capsys.readouterr().err
    assert main(["--env", "test", "--root", root, "sql-server"]) == 2
    assert "carelake sql-user add NAME --role analyst" in capsys.readouterr().err
    assert main(["--env", "test", "--root", root, "--set", "sql_server.views_dir=/nowhere", "sql-server",
                 "--no-auth"]) == 2
    assert "sql_server.views_dir '/nowhere' is not a folder" in capsys.readouterr().err
    busy = socket.create_server(("127.0.0.1", 0))
    try:
        assert main(["--env", "test", "--root", root, "sql-server", "--no-auth", "--port",
                     str(busy.getsockname()[1])]) == 2
    finally:
        busy.close()
    assert "cannot listen on 127.0.0.1:" in capsys.readouterr().err


def _metadata(server, user: str, call: str, **req) -> list[tuple]:
    """A JDBC DatabaseMetaData call (GetSchemas, GetTables, GetColumns) through PyHive's Thrift client."""
    from TCLIService import ttypes

    conn = server.connect(user)
    try:
        resp = getattr(conn.client, call)(getattr(ttypes, f"T{call}Req")(sessionHandle=conn.sessionHandle, **req))
        assert resp.status.statusCode == ttypes.TStatusCode.SUCCESS_STATUS, resp.status
        cur = conn.cursor()
        cur._state, cur._operationHandle = cur._STATE_RUNNING, resp.operationHandle  # noqa: SLF001 - no DB-API call
        return cur.fetchall()
    finally:
        conn.close()


def test_catalog_browsing_shows_what_the_role_may_read(server):
    assert _metadata(server, "ana", "GetSchemas") == [("gold", "spark")]
    assert [r[0] for r in _metadata(server, "eng", "GetSchemas")] == ["gold", "silver"]  # ops.audit_log: auditors
    tables = {(r[1], r[2], r[3]) for r in _metadata(server, "ana", "GetTables", schemaName="gold", tableName="%")}
    assert ("gold", "early_warning_scores", "TABLE") in tables and ("gold", "patients_masked", "VIEW") in tables
    assert not any(schema != "gold" for schema, _, _ in tables)
    columns = _metadata(server, "ana", "GetColumns", schemaName="gold", tableName="patients_masked")
    assert [(r[3], r[4], r[5]) for r in columns][:3] == [("patient_key", 12, "STRING"), ("sex", 12, "STRING"),
                                                          ("birth_period", 91, "DATE")]
    assert not _metadata(server, "ana", "GetColumns", schemaName="silver", tableName="patients")
