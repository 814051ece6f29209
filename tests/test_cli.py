"""The carelake command: instant help, one-line errors, and the ingest -> run -> sql flow."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, carelake_cmd, carelake_env


def run_cli(root, *args, check=True, **extra_env):
    import os

    os.umask(0o022)  # the usual umask: carelake must not depend on a stricter one
    proc = subprocess.run(carelake_cmd(*args), env=carelake_env(root, **extra_env), capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"carelake {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def test_help_does_not_import_spark_or_delta():
    code = ("import sys; from pipelines.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('pyspark', 'deltalake', 'pyarrow') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert "usage: carelake" in out.stdout
    assert "HEAVY []" in out.stdout


@pytest.mark.parametrize(("args", "message"), [
    (("ingest", "nowhere.txt", "--feed", "devices"), "nowhere.txt does not exist"),
    (("ingest", "README.md", "--feed", "vitals"), "unknown feed 'vitals'; known feeds: hl7"),
    (("history", "platinum.x"), "is not a table name"),
    (("history", "silver.missing"), "table silver.missing does not exist yet"),
    (("run", "silver.nope"), "no job writes 'silver.nope'; jobs: bronze.claim_files, bronze.device_readings"),
    (("run", "all", "silver.observations"), "'all' runs every job: name the jobs to run, or 'all' alone"),
    (("run", "silver.quarantine"), "silver.quarantine is written by the jobs silver.claims, silver.encounters, "
                                   "silver.imaging_orders, silver.imaging_reports, silver.imaging_studies, "
                                   "silver.observations, silver.patients as a side output; run one of them"),
    (("--set", "storage.engine=duckdb", "tables"), "storage.engine must be one of"),
    (("restore", "silver.x", "--reason", "test"), "restore needs exactly one of --version N or --timestamp TS"),
    (("run", "gold.early_warning_scores", "--from", "2026-01-01"), "--from and --to go with --recompute"),
    (("run", "all", "--recompute", "--from", "2026-01-01", "--to", "2026-01-02"), "name one job"),
    (("run", "gold.early_warning_scores", "--recompute", "--from", "2026-01-01"), "--recompute needs --from and --to"),
    (("run", "gold.early_warning_scores", "--recompute", "--from", "2026-01-02", "--to", "2026-01-01"),
     "must be before --to"),
    (("run", "gold.early_warning_scores", "--recompute", "--from", "soon", "--to", "2026-01-01"),
     "'soon' is not a timestamp"),
    (("run", "silver.observations", "--recompute", "--from", "2026-01-01", "--to", "2026-01-02"),
     "--recompute applies to jobs that keep state per key"),
])
def test_errors_are_one_line_with_nonzero_exit(tmp_path, args, message):
    proc = run_cli(tmp_path / "lake", *args, check=False)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("carelake:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_side_output_written_by_one_job_names_that_job(tmp_path):
    from pipelines.jobs import Job, Registry, TableSource, load_registry
    from tests.conftest import make_config

    registry = load_registry(make_config(tmp_path / "lake"))
    assert registry.get("gold.deterioration_alerts").name == "gold.early_warning_scores"
    assert [j.name for j in registry.order(["gold.deterioration_alerts", "gold.early_warning_scores"])] == [
        "gold.early_warning_scores"]
    # A job reading a side output runs after the job that writes it.
    reader = Job(name="gold.alert_counts", source=TableSource("gold.deterioration_alerts"), transform=lambda df: df)
    names = [j.name for j in Registry([*registry, reader])]
    assert names.index("gold.early_warning_scores") < names.index("gold.alert_counts")


@pytest.mark.slow
def test_ingest_run_all_sql_tables_history_together(tmp_path):
    root = tmp_path / "lake"
    src = tmp_path / "readings.jsonl"
    src.write_text("".join(json.dumps({"device_id": f"m{i % 3}", "time": "2026-11-21T03:00:00Z", "v": i}) + "\n"
                           for i in range(30)) + "garbage\n")
    run_cli(root, "ingest", str(src), "--feed", "devices")
    out = run_cli(root, "run", "all", "--available-now", CARELAKE_JOBS__MODULES="tests.toyjobs").stdout
    assert "bronze.device_readings: done" in out and "gold.toy_device_totals: done" in out

    q = "select device_id, readings from gold.toy_device_totals order by device_id"
    rows = [json.loads(line) for line in run_cli(root, "sql", q, "--format", "json").stdout.splitlines()]
    assert rows == [{"device_id": "m0", "readings": 10}, {"device_id": "m1", "readings": 10},
                    {"device_id": "m2", "readings": 10}]
    text = run_cli(root, "sql", "select parse_status, count(*) n from bronze.device_readings group by 1 order by 1",
                   "--format", "csv").stdout
    assert list(csv.reader(io.StringIO(text))) == [["parse_status", "n"], ["invalid_json", "1"], ["ok", "30"]]

    # a second file, a second run of two named jobs (named downstream first: they run in dependency order);
    # time travel still sees the first state
    run_cli(root, "ingest", str(src), "--feed", "devices")
    out = run_cli(root, "run", "gold.toy_device_totals", "bronze.device_readings", "silver.toy_readings",
                  CARELAKE_JOBS__MODULES="tests.toyjobs").stdout
    done = [out.index(f"{job}: done") for job in ("bronze.device_readings", "silver.toy_readings",
                                                   "gold.toy_device_totals")]
    assert done == sorted(done)
    # one JVM start: the totals, and the bronze count now and (inline time travel) as of version 0
    after = run_cli(root, "sql", "select device_id, readings, (select count(*) from bronze.device_readings) now, "
                                 "(select count(*) from bronze.device_readings VERSION AS OF 0) inline "
                                 "from gold.toy_device_totals order by device_id", "--format", "json").stdout
    rows = [json.loads(line) for line in after.splitlines()]
    assert [(r["readings"], r["now"], r["inline"]) for r in rows] == [(20, 62, 31)] * 3
    then = run_cli(root, "sql", "select count(*) n from bronze.device_readings", "--format", "json",
                   "--as-of-version", "0").stdout
    assert json.loads(then)["n"] == 31

    tables = [json.loads(line) for line in run_cli(root, "tables", "--format", "json").stdout.splitlines()]
    assert {t["name"]: t["rows"] for t in tables}["bronze.device_readings"] == 62
    assert "ops.metrics" in {t["name"] for t in tables}
    history = run_cli(root, "history", "bronze.device_readings").stdout
    assert "bronze.device_readings #1" in history and "bronze.device_readings #0" in history

    # PHI at rest: whatever the caller's umask (this test's, typically 022), everything created under the root —
    # landing, tables, reports, metrics — is owner-only; Spark's checkpoint files take Hadoop's own modes, inside a
    # checkpoint folder that is owner-only
    import os
    import stat

    open_to_others = [str(p.relative_to(root)) for p in [root, *root.rglob("*")]
                      if stat.S_IMODE(p.lstat().st_mode) & 0o077 and p.relative_to(root).parts[0] != "_checkpoints"]
    assert open_to_others == [], open_to_others[:10]
    assert stat.S_IMODE((root / "_checkpoints").stat().st_mode) == 0o700
    assert stat.S_IMODE(root.stat().st_mode) == 0o700 and os.umask(0o022) == 0o022

    bad = run_cli(root, "sql", "select nope from bronze.device_readings", check=False)
    errors = [line for line in bad.stderr.splitlines() if "nope" in line]
    assert bad.returncode != 0 and len(errors) == 1 and errors[0].startswith("carelake: error: SQL error:")


@pytest.mark.slow
def test_the_readme_spark_submit_line_runs_the_jobs(tmp_path):
    """The README's spark-submit line, as written (its .venv/bin/ is this interpreter's folder): spark-submit
    starts the JVM, carelake joins it and runs the jobs, and the executors write the tables."""
    import shlex
    from pathlib import Path

    line = next(x for x in (REPO / "README.md").read_text().splitlines() if "spark-submit --master" in x)
    words = shlex.split(line.split("  #")[0])
    env_words = [w for w in words if "=" in w and not w.startswith("-") and words.index(w) < 2]
    argv = [w.replace(".venv/bin/", f"{Path(sys.executable).parent}/", 1) for w in words[len(env_words):]]
    root = tmp_path / "lake"
    src = tmp_path / "readings.jsonl"
    src.write_text("".join(json.dumps({"device_id": f"m{i % 2}", "time": "2026-11-21T03:00:00Z", "v": i}) + "\n"
                           for i in range(10)))
    run_cli(root, "ingest", str(src), "--feed", "devices")
    env = carelake_env(root, CARELAKE_JOBS__MODULES="tests.toyjobs")
    env.update({k: v.replace(".venv/bin/", f"{Path(sys.executable).parent}/", 1)
                for k, v in (w.split("=", 1) for w in env_words)})
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "gold.toy_device_totals: done" in proc.stdout + proc.stderr
    out = run_cli(root, "sql", "select device_id, readings from gold.toy_device_totals order by 1", "--format",
                  "json").stdout
    assert [json.loads(x) for x in out.splitlines()] == [{"device_id": "m0", "readings": 5},
                                                          {"device_id": "m1", "readings": 5}]


def test_an_existing_root_is_closed_to_others_and_opened_to_a_configured_group(tmp_path):
    import grp
    import os
    import stat

    from pipelines.errors import ConfigError
    from pipelines.permissions import protect

    root = tmp_path / "lake"
    root.mkdir(mode=0o755)
    before = os.umask(0o022)
    try:
        protect(root)
        assert stat.S_IMODE(root.stat().st_mode) == 0o700
        assert os.umask(0o022) == 0o077
        mine = grp.getgrgid(os.getgid()).gr_name
        protect(root, mine)
        assert stat.S_IMODE(root.stat().st_mode) == 0o2750 and root.stat().st_gid == os.getgid()
        assert os.umask(0o022) == 0o027
        with pytest.raises(ConfigError, match="'no-such-group-x' is not a group on this machine"):
            protect(root, "no-such-group-x")
    finally:
        os.umask(before)
