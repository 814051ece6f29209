"""The SQL server's parts without a server: roles, the users file, the statement guard, the catalog of views."""

from __future__ import annotations

import io
import os

import pyarrow as pa
import pytest

from pipelines.errors import ConfigError, TableNotFound, UsageError
from pipelines.sqlrefs import TableReference, pin
from pipelines.sqlserver.policy import refusal

VIEWS = {"gold.patients_masked"}


@pytest.mark.parametrize("role, ref, refused_because", [
    ("analyst", TableReference("gold.early_warning_scores"), None),
    ("analyst", TableReference("gold.patients_masked"), None),
    ("analyst", TableReference("silver.patients"), "role analyst may read gold tables and the masked views only"),
    ("analyst", TableReference("bronze.hl7_messages"), "role analyst may read gold tables"),
    ("analyst", TableReference("ops.audit_log"), "role analyst may read gold tables"),
    ("analyst", TableReference("gold.early_warning_scores", version=1), "time travel is for the auditor role"),
    ("engineer", TableReference("silver.patients"), None),
    ("engineer", TableReference("ops.metrics"), None),
    ("engineer", TableReference("ops.audit_log"), "the audit log is for the auditor role"),
    ("engineer", TableReference("silver.patients", timestamp="2026-01-01"), "time travel is for the auditor role"),
    ("auditor", TableReference("ops.audit_log"), None),
    ("auditor", TableReference("silver.patients", version=0), None),
    ("auditor", TableReference("gold.patients_masked", version=0), "time travel applies to tables only"),
])
def test_roles(role, ref, refused_because):
    why = refusal(role, [ref], VIEWS)
    assert (why is None) if refused_because is None else (refused_because in why)


def test_users_file_hashes_and_checks(tmp_path):
    from pipelines.sqlserver import users

    path = tmp_path / "secrets" / "sql_users"
    assert users.add_user(path, "ana", "analyst", "a-long-password") is False
    assert users.add_user(path, "ana", "engineer", "another-password") is True
    text = path.read_text()
    assert "another-password" not in text and "ana:engineer:scrypt$" in text
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    directory = users.Directory(path)
    assert directory.login("ana", "another-password") == "engineer"
    assert directory.login("ana", "a-long-password") is None and directory.login("bob", "x") is None
    users.remove_user(path, "ana")
    assert directory.login("ana", "another-password") is None  # read again after the change
    with pytest.raises(UsageError, match="at least 12 characters"):
        users.add_user(path, "ana", "analyst", "short")
    with pytest.raises(UsageError, match="choose one of analyst, engineer, auditor"):
        users.add_user(path, "ana", "admin", "a-long-password")
    path.write_text("ana:analyst:plaintext\n")
    with pytest.raises(ConfigError, match="line 1: expected name:role:scrypt"):
        users.read_users(path)
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        users.read_users(path)


def test_pin_adds_a_point_in_time_to_unpinned_references():
    sql = "select * from gold.a x join silver.b VERSION AS OF 2 y on 1=1 where 'gold.c' = x.s -- ops.d"
    assert pin(sql, version=5) == ("select * from gold.a VERSION AS OF 5 x join silver.b VERSION AS OF 2 y on 1=1 "
                                   "where 'gold.c' = x.s -- ops.d")
    assert pin("select 1 from gold.a", timestamp="2026-01-05 10:00") == (
        "select 1 from gold.a TIMESTAMP AS OF '2026-01-05 10:00'")
    assert pin(sql) == sql


def test_views_from_files(tmp_path):
    from pipelines.sqlserver.catalog import load_views

    (tmp_path / "gold.by_month.sql").write_text("-- a view\nSELECT date_trunc('{{ unit }}', t) FROM gold.x;\n")
    views = load_views(tmp_path, {"unit": "month"})
    assert views["gold.by_month"].sql == "-- a view\nSELECT date_trunc('month', t) FROM gold.x"
    with pytest.raises(ConfigError, match="unknown placeholder"):
        load_views(tmp_path, {})
    (tmp_path / "Not A Table.sql").write_text("SELECT 1")
    with pytest.raises(UsageError, match="is not a table name"):
        load_views(tmp_path, {"unit": "month"})


def test_repository_views_load_with_the_configured_mask(cfg):
    from pipelines.sqlserver.catalog import load_views
    from pipelines.sqlserver.server import views_dir

    views = load_views(views_dir(cfg), {"mask_date_unit": cfg.sql_server.mask_date_unit})
    assert {"gold.alerts_by_ward_day", "gold.fraud_flags_by_provider", "gold.patients_masked",
            "gold.imaging_sla_by_day", "gold.imaging_worklist_by_priority"} <= set(views)
    masked = "\n".join(line for line in views["gold.patients_masked"].sql.splitlines() if not line.startswith("--"))
    assert "date_trunc('month', birth_date)" in masked
    tokens = set(masked.split("FROM")[0].replace(",", " ").replace("(", " ").replace(")", " ").split())
    assert not {"mrn", "family_name", "given_name", "address_line", "city", "postal_code", "phone"} & tokens
    assert masked.count("birth_date") == masked.count("date_trunc('month', birth_date)") == 1


def test_mask_date_unit_is_checked(tmp_path):
    from tests.conftest import make_config

    with pytest.raises(ConfigError, match="sql_server.mask_date_unit must be one of year, quarter"):
        make_config(tmp_path, **{"sql_server.mask_date_unit": "decade"})


def test_write_records_formats():
    from pipelines.output import write_records

    out = io.StringIO()
    assert write_records(["a", "b"], iter([(1, "x"), (2, None)]), "csv", None, out) == 2
    assert out.getvalue().splitlines() == ["a,b", "1,x", "2,"]
    out = io.StringIO()
    assert write_records(["a"], iter([(1,), (2,), (3,)]), "json", 2, out) == 2
    assert out.getvalue() == '{"a": 1}\n{"a": 2}\n'
    out = io.StringIO()
    assert write_records(["a"], iter([(1,), (2,), (3,)]), "table", 2, out) == 2
    assert out.getvalue().splitlines()[-1].startswith("(2 rows) (more rows not shown")


@pytest.mark.parametrize("sql, refused", [
    ("WITH x AS (SELECT * FROM global_temp.a) SELECT * FROM x JOIN x y ON true", None),
    ("SELECT * FROM global_temp.a LATERAL VIEW explode(array(1)) t AS c", None),
    ("SELECT * FROM range(3)", None),
    ("SELECT (SELECT max(id) FROM global_temp.b) FROM global_temp.a", "global_temp.b is not a table"),
    ("SELECT * FROM global_temp.a WHERE id IN (SELECT id FROM global_temp.b)", "global_temp.b is not a table"),
    ("SELECT * FROM global_temp.a, LATERAL (SELECT * FROM global_temp.b)", "global_temp.b is not a table"),
    ("WITH x AS (SELECT * FROM global_temp.b) SELECT * FROM x", "global_temp.b is not a table"),
    ("INSERT INTO global_temp.a SELECT 1", "only queries"),
    ("ADD JAR /tmp/x.jar", "only queries"),
    ("CACHE TABLE global_temp.a", "only queries"),
    ("SELECT java_method('java.lang.Runtime', 'getRuntime')", "java_method is not available"),
    ("SELECT x.f() FROM global_temp.a", "x.f is not available"),
    ("SELECT 1; SELECT 2", "SQL syntax error"),
    ("SELECT * FROM IDENTIFIER('global_temp.b')", "IDENTIFIER"),
    ("SELECT * FROM global_temp.a WHERE id = (SELECT 1 FROM IDENTIFIER('global_temp.b'))", "IDENTIFIER"),
    ("SELECT IDENTIFIER('reflect')('java.lang.System', 'getenv', 'HOME')", "IDENTIFIER"),
    ("EXECUTE IMMEDIATE 'SELECT * FROM global_temp.b'", "EXECUTE IMMEDIATE"),
    ("DECLARE VARIABLE v INT", "only queries"),
    ("CALL sys.some_procedure()", "only queries"),
    ("MERGE INTO global_temp.a t USING global_temp.a s ON t.id = s.id WHEN MATCHED THEN DELETE", "only queries"),
    ("INSERT OVERWRITE DIRECTORY '/tmp/x' SELECT * FROM global_temp.a", "only queries"),
    ("SELECT xpath_string('<a>x</a>', 'a')", "xpath_string is not available"),
    ("SELECT * FROM global_temp.b |> WHERE id > 1", "global_temp.b is not a table"),
])
def test_guard(spark, sql, refused):
    from pipelines.sqlserver.guard import StatementRefused, check_statement

    if refused is None:
        check_statement(spark, sql, ["a"])
        return
    with pytest.raises(StatementRefused, match=refused):
        check_statement(spark, sql, ["a"])


def test_catalog_resolves_each_statement_at_the_latest_version(spark, cfg):
    from pipelines.sqlserver.catalog import Catalog, ViewDef
    from pipelines.store.deltars import DeltaRsStore

    store = DeltaRsStore(cfg, spark)
    store.append("gold.things", pa.table({"n": [1, 2]}))
    catalog = Catalog(spark, store, {"gold.big_things": ViewDef("gold.big_things",
                                                                "SELECT n FROM gold.things WHERE n > 1")})
    first = catalog.resolve("select sum(n) from gold.things")
    assert first.sql == "select sum(n) from global_temp.`gold__things__v0`" and first.reads == (("gold.things", 0),)
    store.append("gold.things", pa.table({"n": [3]}))
    second = catalog.resolve("select sum(n) from gold.things")
    assert spark.sql(second.sql).collect()[0][0] == 6 and second.reads == (("gold.things", 1),)
    old = catalog.resolve("select sum(n) from gold.things VERSION AS OF 0")
    assert spark.sql(old.sql).collect()[0][0] == 3
    view = catalog.resolve("select count(*) from gold.big_things")
    assert spark.sql(view.sql).collect()[0][0] == 2
    assert view.reads == (("gold.big_things", None), ("gold.things", 1))
    with pytest.raises(TableNotFound, match="carelake run gold.nothing"):
        catalog.resolve("select * from gold.nothing")
    store.append("gold.things", pa.table({"n": [4]}))
    assert catalog.refresh() == ["gold__things__v2"]  # ready before any statement asks for version 2
    assert catalog.refresh() == []


def test_audit_events_group_committed_each_writer_waits_for_its_commit():
    import threading
    import time

    from pipelines.audit_log import event
    from pipelines.sqlserver.server import GroupCommit

    committed: list[str] = []

    class SlowStore:
        def append(self, name, rows, metadata=None):
            assert name == "ops.audit_log"
            time.sleep(0.05)
            committed.extend(rows["actor"].to_pylist())

    group = GroupCommit(SlowStore())
    seen_after_return: dict[str, bool] = {}

    def write(actor: str) -> None:
        group.write(event(actor=actor, action="query", outcome="allowed"))
        seen_after_return[actor] = actor in committed

    threads = [threading.Thread(target=write, args=(f"u{i}",)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(committed) == sorted(f"u{i}" for i in range(12))
    assert all(seen_after_return.values()) and len(seen_after_return) == 12


def test_audit_commit_failure_reaches_every_writer_of_the_batch():
    from pipelines.audit_log import event
    from pipelines.sqlserver.server import GroupCommit

    class BrokenStore:
        def append(self, name, rows, metadata=None):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        GroupCommit(BrokenStore()).write(event(actor="a", action="query", outcome="allowed"))


def test_a_stale_discovery_file_means_no_server(cfg):
    import json

    from pipelines.sqlserver.client import discovery_file, running_server

    path = discovery_file(cfg)
    path.parent.mkdir(parents=True)
    assert running_server(cfg) is None
    path.write_text(json.dumps({"pid": 2**22 + 12345, "host": "127.0.0.1", "port": 1, "token": "t", "url": "u"}))
    assert running_server(cfg) is None  # its process is gone: carelake sql starts Spark itself
    path.write_text(json.dumps({"pid": os.getpid(), "host": "127.0.0.1", "port": 1, "token": "t", "url": "u"}))
    assert running_server(cfg)["port"] == 1


def test_sql_user_command(tmp_path, monkeypatch, capsys):
    from pipelines.cli import main

    root = str(tmp_path / "lake")
    monkeypatch.setattr("sys.stdin", io.StringIO("a-long-password\n"))
    assert main(["--env", "test", "--root", root, "sql-user", "add", "ana", "--role", "analyst",
                 "--password-stdin"]) == 0
    assert "added ana (analyst)" in capsys.readouterr().out
    assert main(["--env", "test", "--root", root, "sql-user", "list"]) == 0
    assert capsys.readouterr().out.splitlines()[2].split() == ["ana", "analyst"]
    assert main(["--env", "test", "--root", root, "sql-user", "add", "bob"]) == 2
    assert "needs --role" in capsys.readouterr().err
    assert main(["--env", "test", "--root", root, "sql-user", "remove", "bob"]) == 2
    assert "no user 'bob'" in capsys.readouterr().err
    assert main(["--env", "test", "--root", root, "sql-user", "remove", "ana"]) == 0
