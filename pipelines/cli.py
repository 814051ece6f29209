"""The `carelake` command. Heavy imports (Spark, delta-rs) happen inside commands, so --help is instant."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pipelines.errors import CarelakeError, UsageError
from pipelines.output import print_table

if TYPE_CHECKING:
    from pipelines.config import Config
    from pipelines.store import TableStore

log = logging.getLogger("carelake")


class Context:
    """What a command needs, built on first use: config, then Spark and the store only if asked."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self._cfg: Config | None = None
        self._spark = None

    @property
    def cfg(self) -> Config:
        if self._cfg is None:
            from pipelines.config import load_config

            overrides = dict(_split_setting(s) for s in self.args.set or [])
            self._cfg = load_config(env=self.args.env, root=self.args.root, overrides=overrides,
                                    conf_dir=self.args.conf_dir)
            from pipelines.permissions import protect

            protect(self._cfg.root, self._cfg.storage.group)  # before anything (Spark's JVM too) creates a file
        return self._cfg

    @property
    def spark(self):
        if self._spark is None:
            from pipelines.spark import create_spark

            self._spark = create_spark(self.cfg.spark)
        return self._spark

    def store(self, *, need_spark: bool) -> TableStore:
        from pipelines.store import open_store

        if not need_spark and self.cfg.storage.engine != "delta-spark":
            return open_store(self.cfg, None)
        return open_store(self.cfg, self.spark)


def _folds(text: str) -> int:
    if not text.isdigit() or not 2 <= int(text) <= 20:
        raise argparse.ArgumentTypeError(f"expected a whole number of folds from 2 to 20, got {text!r}")
    return int(text)


def _split_setting(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"--set expects KEY=VALUE (e.g. --set storage.commit_retries=30), got {text!r}")
    return key.strip(), value


# -- commands ----------------------------------------------------------------------------------
def cmd_run(ctx: Context) -> int:
    from pipelines.config import parse_duration_ms
    from pipelines.jobs import load_registry
    from pipelines.runner import Runner, Trigger

    a = ctx.args
    registry = load_registry(ctx.cfg)
    if "all" in a.jobs and len(a.jobs) > 1:
        raise UsageError("'all' runs every job: name the jobs to run, or 'all' alone")
    names = None if a.jobs == ["all"] else list(dict.fromkeys(registry.get(j).name for j in a.jobs))
    if a.interval and not a.continuous:
        raise UsageError("--interval only applies with --continuous")
    interval = parse_duration_ms(a.interval, "--interval") if a.interval else ctx.cfg.streaming.interval_ms
    trigger = Trigger(available_now=not a.continuous, interval_ms=interval)
    if a.recompute or a.start or a.end:
        name, start, end = _recompute_args(registry, names, a)
        runner = Runner(ctx.cfg, ctx.spark, ctx.store(need_spark=True), registry)
        print(runner.recompute(name, start, end).line(), flush=True)
        return 0
    runner = Runner(ctx.cfg, ctx.spark, ctx.store(need_spark=True), registry)
    jobs = registry.order(names)
    log.info("running %d job(s) %s: %s", len(jobs), trigger.describe(), ", ".join(j.name for j in jobs))
    summaries = runner.run([j.name for j in jobs], trigger, on_summary=lambda s: print(s.line(), flush=True))
    total = sum(s.rows_out for s in summaries)
    print(f"done: {len(summaries)} job(s), {total:,} rows written under {ctx.cfg.root}")
    return 0


def _recompute_args(registry, names: list[str] | None, a):
    """(job, from, to) of `run JOB --recompute --from T1 --to T2`, checked before Spark starts."""
    from pipelines.runner import check_recompute
    from pipelines.timeutil import parse_timestamp

    if not a.recompute:
        raise UsageError("--from and --to go with --recompute: carelake run gold.early_warning_scores --recompute "
                         "--from 2026-01-05T00:00Z --to 2026-01-06T00:00Z")
    if names is None or len(names) != 1 or a.continuous:
        raise UsageError("--recompute redoes one job's rows for a time range as one batch: name one job (e.g. "
                         "gold.early_warning_scores), without --continuous")
    if not (a.start and a.end):
        raise UsageError("--recompute needs --from and --to (ISO-8601 event times, UTC unless a zone is given)")
    start, end = parse_timestamp(a.start), parse_timestamp(a.end)
    check_recompute(registry.get(names[0]), start, end)
    return names[0], start, end


def cmd_jobs(ctx: Context) -> int:
    from pipelines.jobs import load_registry

    rows = [(j.name, j.source.describe(), j.write, j.description) for j in load_registry(ctx.cfg)]
    print_table(["job", "source", "write", "description"], rows)
    return 0


def cmd_tables(ctx: Context) -> int:
    store = ctx.store(need_spark=False)
    names = store.list_tables()
    if not names:
        print(f"no tables yet under {ctx.cfg.root}; land data with `carelake ingest` and run `carelake run all`")
        return 0
    infos = [store.info(n) for n in names]
    rows = [(i.name, i.version, f"{i.rows:,}", i.last_commit, i.last_operation) for i in infos]
    if ctx.args.format == "json":
        import json

        for i in infos:
            print(json.dumps({"name": i.name, "version": i.version, "rows": i.rows,
                              "last_commit": i.last_commit.isoformat(), "operation": i.last_operation}))
        return 0
    print_table(["table", "version", "rows", "last commit (UTC)", "operation"], rows)
    return 0


def cmd_history(ctx: Context) -> int:
    store = ctx.store(need_spark=False)
    commits = store.history(ctx.args.table, limit=ctx.args.limit)
    rows = []
    for c in commits:
        written = c.metrics.get("num_added_rows", c.metrics.get("num_output_rows", c.metrics.get("numOutputRows", "")))
        job = c.metadata.get("carelake.job", "")
        batch = c.metadata.get("carelake.batch", "")
        rows.append((c.version, c.timestamp, c.operation, written, f"{job} #{batch}" if batch else job,
                     c.metadata.get("carelake.reason", "")))
    print_table(["version", "committed (UTC)", "operation", "rows", "job / batch", "reason"], rows)
    return 0


def cmd_sql(ctx: Context) -> int:
    from pipelines.sqlrefs import rewrite

    a = ctx.args
    if a.as_of_version is not None and a.as_of_timestamp is not None:
        raise UsageError("give --as-of-version or --as-of-timestamp, not both")
    if not a.local and _sql_through_server(ctx):
        return 0
    text, refs = rewrite(a.query)
    spark = ctx.spark
    store = ctx.store(need_spark=True)
    for ref in refs:
        version = ref.version if ref.version is not None else a.as_of_version
        timestamp = ref.timestamp if ref.timestamp is not None else a.as_of_timestamp
        store.read(ref.table, version=version, timestamp=timestamp).createOrReplaceTempView(ref.view)
    from pyspark.errors import PySparkException

    try:
        df = spark.sql(text)
        from pipelines.output import write_rows

        write_rows(df, a.format, a.limit, sys.stdout)
    except PySparkException as exc:
        message = str(exc).splitlines()[0]
        for ref in refs:
            message = message.replace(f"`{ref.view}`", ref.table).replace(ref.view, ref.table)
        raise UsageError(f"SQL error: {message}") from exc
    return 0


def _sql_through_server(ctx: Context) -> bool:
    """Answer `carelake sql` from a running `carelake sql-server` of this lakehouse; False when there is none."""
    from pipelines.sqlrefs import pin
    from pipelines.sqlserver.client import query, running_server

    a = ctx.args
    info = running_server(ctx.cfg)
    if info is None:
        return False
    log.debug("answering through the SQL server at %s", info["url"])
    query(info, pin(a.query, version=a.as_of_version, timestamp=a.as_of_timestamp), a.format, a.limit, sys.stdout)
    return True


def cmd_ingest(ctx: Context) -> int:
    from pipelines.landing import ingest

    landed = ingest(ctx.cfg, ctx.args.paths, ctx.args.feed)
    total = sum(f.bytes for f in landed)
    for f in landed:
        log.info("landed %s -> %s (%s bytes)", f.source, f.landed.name, f"{f.bytes:,}")
    print(f"landed {len(landed)} file(s), {total:,} bytes, into {ctx.cfg.path('landing', ctx.args.feed)}")
    return 0


def cmd_import_physionet2012(ctx: Context) -> int:
    from pathlib import Path

    from pipelines.physionet2012 import OUTCOMES_TABLE, import_records, parse_anchor

    a = ctx.args
    anchor = parse_anchor(a.anchor)
    store = ctx.store(need_spark=False) if a.outcomes else None
    s = import_records(ctx.cfg, store, Path(a.dir), outcomes=Path(a.outcomes) if a.outcomes else None,
                       anchor=anchor)
    sent = {k: v for k, v in s.lines.items() if not k.startswith("skipped:")}
    skipped = {k.removeprefix("skipped:"): v for k, v in s.lines.items() if k.startswith("skipped:")}
    print(f"imported {s.records:,} record(s): {s.resources:,} FHIR resources and {sum(sent.values()):,} device "
          f"readings ({s.landed_bytes:,} bytes) landed; run `carelake run all --available-now` to process them")
    print("readings per parameter: " + ", ".join(f"{k} {v:,}" for k, v in sorted(sent.items())))
    if skipped:
        print(f"not sent (no LOINC code in silver): {sum(skipped.values()):,} values of "
              + ", ".join(sorted(skipped)))
    if a.outcomes:
        print(f"{s.outcomes:,} outcome label(s) merged into {OUTCOMES_TABLE}")
    return 0


def cmd_simulate(ctx: Context) -> int:
    from pipelines.simulator.params import resolve_params
    from pipelines.simulator.run import simulate

    a = ctx.args
    params = resolve_params(ctx.cfg.simulator, a.out, force=a.force, patients=a.patients, hours=a.hours,
                            seed=a.seed, feeds=a.feeds, start=a.start)
    log.info("simulating %d patients over %d h (seed %d) into %s", params.patients, params.hours, params.seed,
             params.out)
    summary = simulate(ctx.spark, params)
    print(summary.text())
    return 0


def cmd_optimize(ctx: Context) -> int:
    metrics = ctx.store(need_spark=False).optimize(ctx.args.table)
    print(f"optimized {ctx.args.table}: {dict(metrics)}")
    return 0


def cmd_vacuum(ctx: Context) -> int:
    a = ctx.args
    if a.all == bool(a.table) or (a.all and a.retain_hours is not None):
        raise UsageError("vacuum takes a table, or --all (every table and landing feed, each within its configured "
                         "retention: storage.retention_days; --retain-hours goes with one table)")
    if a.all:
        from pipelines.audit_cli import cmd_vacuum_all

        return cmd_vacuum_all(ctx)
    removed = ctx.store(need_spark=False).vacuum(a.table, retention_hours=a.retain_hours, dry_run=a.dry_run)
    verb = "would remove" if a.dry_run else "removed"
    print(f"vacuum {a.table}: {verb} {len(removed)} file(s) no version inside the retention window needs")
    return 0


def cmd_restore(ctx: Context) -> int:
    from pipelines.audit_cli import audited_restore

    a = ctx.args
    if (a.version is None) == (a.timestamp is None):
        raise UsageError("restore needs exactly one of --version N or --timestamp TS")
    out = audited_restore(ctx.store(need_spark=False), a.table, a.version, a.timestamp, a.reason)
    state = "restored" if out.get("changed") else "already at"
    print(f"{a.table}: {state} version {out.get('restored_to', a.version)} (a new commit; history keeps the rest)")
    return 0


def cmd_gateway(ctx: Context) -> int:
    from pipelines.gateway.server import serve

    a = ctx.args
    return serve(ctx.cfg, host=a.host, mllp_port=a.mllp_port, http_port=a.http_port, dicom_port=a.dicom_port,
                 ae_title=a.ae_title)


def cmd_send(ctx: Context) -> int:
    from pipelines.send import send

    a = ctx.args
    report = send(ctx.cfg, a.to, a.paths, rate=a.rate, connections=a.connections, batch=a.batch,
                  ack_log=a.ack_log, on_progress=lambda line: log.info("%s", line), ae_title=a.ae_title,
                  tls_ca=a.tls_ca, tls_cert=a.tls_cert, tls_key=a.tls_key, token_file=a.token_file)
    print(report.summary())
    return 0 if report.complete else 1


def cmd_demo(ctx: Context) -> int:
    from pipelines.demo import run

    a = ctx.args
    argv = ["--root", a.root or "./demo-lakehouse", "--patients", str(a.patients), "--hours", str(a.hours),
            "--seed", str(a.seed), "--train-hours", str(a.train_hours)]
    return run(argv)


def cmd_notebook(ctx: Context) -> int:
    from pipelines import workbench

    a = ctx.args
    cmd = workbench.notebook_command(ctx.cfg, host=a.host, port=a.port, browser=a.browser)
    print(f"carelake notebook: JupyterLab in {workbench.NOTEBOOKS} on {ctx.cfg.root.resolve()}; in a notebook: "
          "`from pipelines.workbench import open_lakehouse; lake = open_lakehouse()`", flush=True)
    return workbench.run(cmd, workbench.notebook_env(ctx.cfg))


def cmd_mlflow_ui(ctx: Context) -> int:
    from pipelines import workbench

    a = ctx.args
    cmd = workbench.mlflow_command(ctx.cfg, host=a.host, port=a.port)
    print(f"carelake mlflow-ui: http://{a.host}:{a.port} (tracking store {cmd[cmd.index('--backend-store-uri') + 1]})",
          flush=True)
    return workbench.run(cmd)


def cmd_train(ctx: Context) -> int:
    from pipelines import training

    store = ctx.store(need_spark=False)
    if ctx.args.model == "fraud":
        if not ctx.args.labels:
            raise UsageError("train fraud needs --labels: the simulator's DIR/truth/fraud_labels.csv")
        result, uri = training.train_fraud(ctx.cfg, store, ctx.args.labels, tracking_uri=ctx.args.tracking_uri)
        training.print_fraud_training(result, uri)
        return 0
    if ctx.args.model == "mortality":
        if ctx.args.labels:
            raise UsageError("train mortality takes its labels from silver.outcomes (`carelake import physionet2012 "
                             "DIR --outcomes FILE`): drop --labels")
        result, uri = training.train_mortality(ctx.cfg, store, tracking_uri=ctx.args.tracking_uri,
                                               folds=ctx.args.folds)
        training.print_mortality(result, uri)
        return 0
    if not ctx.args.labels:
        raise UsageError("train deterioration needs --labels: the simulator's DIR/truth/deteriorations.csv")
    result, uri = training.train_deterioration(ctx.cfg, store, ctx.args.labels, tracking_uri=ctx.args.tracking_uri)
    training.print_training(result, ctx.cfg.models.alert_rate_per_100_patient_days, uri)
    return 0


def cmd_imaging_replay(ctx: Context) -> int:
    import json

    from pipelines.imaging_replay import replay_acuity, run_replay

    a = ctx.args
    model = a.model if a.model == "cross-day" else None
    if a.model == "champion":
        from models.critical_finding import load_champion
        from models.deterioration import default_tracking_uri

        model = load_champion(a.tracking_uri or default_tracking_uri(ctx.cfg))
    figures = run_replay(a.truth, ctx.cfg.imaging, radiologists=a.radiologists, utilisation=a.utilisation,
                         model=model, acuity=replay_acuity(ctx.cfg), seed=ctx.cfg.models.seed)
    print(json.dumps(figures, sort_keys=True))
    return 0


def _utilisation(text: str) -> list[float]:
    import argparse

    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated shares like 0.8,0.9,1.0, got {text!r}") from None


def cmd_imaging_train(ctx: Context) -> int:
    from pipelines.training import print_critical_finding, train_critical_finding

    result, uri = train_critical_finding(ctx.cfg, ctx.spark, ctx.store(need_spark=True), ctx.args.labels,
                                         tracking_uri=ctx.args.tracking_uri)
    print_critical_finding(result, uri)
    return 0


def add_imaging_parser(sub) -> None:
    """`carelake imaging replay | train`."""
    im = sub.add_parser("imaging", help="imaging worklist: replay a day through a reading room; train the "
                                        "critical-finding model")
    isub = im.add_subparsers(dest="imaging_command", metavar="ACTION", required=True)
    rp = isub.add_parser("replay", help="time-to-read of critical studies under FIFO, order priority and the "
                                        "carelake worklist, per load, across simulated days (one JSON line)")
    rp.add_argument("--truth", required=True, action="append",
                    help="a simulator's DIR/truth/imaging.csv (repeat for several days/seeds)")
    rp.add_argument("--radiologists", type=int, help="readers (imaging.replay_radiologists)")
    rp.add_argument("--utilisation", type=_utilisation,
                    help="loads, e.g. 0.8,0.9,1.0 (imaging.replay_utilisation)")
    rp.add_argument("--model", choices=["champion", "cross-day", "none"], default="champion",
                    help="rank with the registered critical-finding champion (if any), with a model fitted on the "
                         "other days' labels (needs 2+ --truth), or without a model")
    rp.add_argument("--tracking-uri", help="MLflow tracking URI (models.tracking_uri; default sqlite under the root)")
    rp.set_defaults(func=cmd_imaging_replay)
    tr = isub.add_parser("train", help="train the critical-finding model on the lakehouse's studies and the "
                                       "simulator's labels; champion only if it beats order priority")
    tr.add_argument("--labels", required=True, help="the simulator's DIR/truth/imaging.csv (critical_finding)")
    tr.add_argument("--tracking-uri", help="MLflow tracking URI (models.tracking_uri; default sqlite under the root)")
    tr.set_defaults(func=cmd_imaging_train)
def cmd_sql_server(ctx: Context) -> int:
    from pipelines.sqlserver.server import serve

    a = ctx.args
    return serve(ctx.cfg, host=a.host, port=a.port, no_auth=a.no_auth)


def cmd_sql_user(ctx: Context) -> int:
    from pipelines.sqlserver import users

    a = ctx.args
    path = users.users_file(ctx.cfg)
    if a.action == "list":
        print_table(["user", "role"], [(u.name, u.role) for u in users.read_users(path).values()])
        return 0
    if not a.name:
        raise UsageError(f"sql-user {a.action} needs a user name: carelake sql-user {a.action} NAME")
    if a.action == "remove":
        users.remove_user(path, a.name)
        print(f"removed {a.name} from {path}")
        return 0
    if not a.role:
        raise UsageError("sql-user add needs --role analyst, engineer or auditor")
    replaced = users.add_user(path, a.name, a.role, _read_password(a.password_stdin))
    print(f"{'updated' if replaced else 'added'} {a.name} ({a.role}) in {path}")
    return 0


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    import getpass

    first, second = getpass.getpass("password: "), getpass.getpass("again: ")
    if first != second:
        raise UsageError("the two passwords differ; nothing was written")
    return first


def cmd_evaluate(ctx: Context) -> int:
    import json

    from pipelines.training import evaluate_fraud, print_fraud_evaluation

    report = evaluate_fraud(ctx.cfg, ctx.store(need_spark=False), ctx.args.labels)
    if ctx.args.json:
        print(json.dumps(report, sort_keys=True))
    else:
        print_fraud_evaluation(report)
        print(json.dumps(report, sort_keys=True))
    return 0


# -- parser ------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="carelake", description="carelake: a healthcare lakehouse on Spark and Delta.")
    p.add_argument("--root", help="lakehouse root folder (env CARELAKE_ROOT; default ./lakehouse)")
    p.add_argument("--env", help="configuration overlay: local, cluster, test (env CARELAKE_ENV; default local)")
    p.add_argument("--conf-dir", help="folder holding base.yaml and overlays (env CARELAKE_CONF_DIR)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override one setting, e.g. storage.engine=delta-rs")
    p.add_argument("-v", "--verbose", action="store_true", help="more progress, and tracebacks on errors")
    p.add_argument("-q", "--quiet", action="store_true", help="only results and errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    r = sub.add_parser("run", help="run jobs (or all), in dependency order, as streaming queries")
    r.add_argument("jobs", nargs="+", metavar="JOB",
                   help="job names (= the tables they write; their upstream jobs are not added), or 'all'")
    mode = r.add_mutually_exclusive_group()
    mode.add_argument("--available-now", action="store_true", help="process what is there, then stop (default)")
    mode.add_argument("--continuous", action="store_true", help="keep running; a micro-batch every --interval")
    r.add_argument("--interval", help="micro-batch interval with --continuous, e.g. 500ms, 5s (default from conf)")
    r.add_argument("--recompute", action="store_true",
                   help="redo the job's rows for event times --from .. --to from its upstream tables, as one batch")
    r.add_argument("--from", dest="start", metavar="TIME", help="with --recompute: first event time (ISO-8601)")
    r.add_argument("--to", dest="end", metavar="TIME", help="with --recompute: last event time (ISO-8601)")
    r.set_defaults(func=cmd_run)

    sub.add_parser("jobs", help="list the registered jobs").set_defaults(func=cmd_jobs)

    t = sub.add_parser("tables", help="list tables: name, version, rows, last commit")
    t.add_argument("--format", choices=["table", "json"], default="table")
    t.set_defaults(func=cmd_tables)

    h = sub.add_parser("history", help="a table's commits, newest first")
    h.add_argument("table")
    h.add_argument("--limit", type=int, help="show only the newest N commits")
    h.set_defaults(func=cmd_history)

    q = sub.add_parser("sql", help="run a SQL query over bronze.x / silver.x / gold.x / ops.x tables")
    q.add_argument("query", help="SQL; tables may carry VERSION AS OF n or TIMESTAMP AS OF 'ts'")
    q.add_argument("--format", choices=["table", "json", "csv"], default="table",
                   help="table (aligned, for people), json (one object per line), csv")
    q.add_argument("--as-of-version", type=int, help="read every referenced table as of this version")
    q.add_argument("--as-of-timestamp", help="read every referenced table as of this time (ISO-8601, UTC default)")
    q.add_argument("--limit", type=int, help="at most N rows (table format shows 200 unless told)")
    q.add_argument("--local", action="store_true",
                   help="start Spark here even when a `carelake sql-server` of this lakehouse is running")
    q.set_defaults(func=cmd_sql)

    i = sub.add_parser("ingest", help="durably copy files into the landing zone of a feed")
    i.add_argument("paths", nargs="+", help="files or folders (folders are read recursively)")
    i.add_argument("--feed", required=True, help="feed name, e.g. devices, hl7, fhir, x12 (837/835), claims (FHIR "
                   "Claim/EOB/Coverage, CMS RIF, CSV) (landing.feeds in conf)")
    i.set_defaults(func=cmd_ingest)

    im = sub.add_parser("import", help="import a public data set through the feeds (landing -> bronze -> silver)")
    isub = im.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    ph = isub.add_parser("physionet2012", help="PhysioNet/CinC Challenge 2012 ICU records: patients, ICU "
                         "encounters, device readings; outcomes into silver.outcomes")
    ph.add_argument("dir", help="folder of record files (<RecordID>.txt), e.g. set-a/")
    ph.add_argument("--outcomes", help="Outcomes-a.txt: labels merged into silver.outcomes")
    ph.add_argument("--anchor", help="ISO-8601 time admissions are anchored at (default 2020-01-01T00:00:00Z; each "
                    "record adds a fixed offset under 365 days)")
    ph.set_defaults(func=cmd_import_physionet2012)

    g = sub.add_parser("gateway", help="receive HL7 v2 over MLLP, FHIR/device JSON and DICOMweb STOW-RS over HTTP, "
                                       "and DICOM C-STORE, into landing")
    g.add_argument("--host", help="listen address (gateway.host in conf; default 127.0.0.1)")
    g.add_argument("--mllp-port", type=int, help="MLLP port (gateway.mllp_port; 0 picks a free one)")
    g.add_argument("--http-port", type=int, help="HTTP port (gateway.http_port; 0 picks a free one)")
    g.add_argument("--dicom-port", type=int, help="serve DICOM C-STORE on this port (gateway.dicom.port when "
                                                  "gateway.dicom.enabled; 0 picks a free one)")
    g.add_argument("--ae-title", help="the gateway's DICOM AE title (gateway.dicom.ae_title; default CARELAKE)")
    g.set_defaults(func=cmd_gateway)

    d = sub.add_parser("send", help="replay files into a gateway: HL7 over MLLP, FHIR/devices over HTTP, DICOM over "
                                    "C-STORE")
    d.add_argument("paths", nargs="+", help="files or folders (simulator output or real files)")
    d.add_argument("--to", required=True,
                   help="HOST:PORT (or mllp://HOST:PORT) for HL7 over MLLP; http://HOST:PORT for FHIR and devices; "
                        "dicom://HOST:PORT[/CALLED_AE] for DICOM C-STORE")
    d.add_argument("--ae-title", default="CARELAKE_SEND",
                   help="DICOM: the calling AE title this sender presents (default CARELAKE_SEND)")
    d.add_argument("--rate", type=float, help="at most this many messages (MLLP) or readings/resources (HTTP) a second")
    d.add_argument("--connections", type=int, default=1,
                   help="parallel MLLP connections or DICOM associations (default 1, which keeps the files' order)")
    d.add_argument("--batch", type=int, default=1000, help="JSON lines per HTTP POST (default 1000)")
    d.add_argument("--ack-log", help="append one line per answered message (answer, MSH-10, file:offset)")
    d.add_argument("--tls-ca", help="TLS: trust the gateway by this CA bundle (PEM); turns TLS on for MLLP")
    d.add_argument("--tls-cert", help="mutual TLS: the client certificate (PEM) to present, with --tls-key")
    d.add_argument("--tls-key", help="mutual TLS: the client certificate's private key (PEM)")
    d.add_argument("--token-file", help="HTTP: a file whose first line is the bearer token to send")
    d.set_defaults(func=cmd_send)

    o = sub.add_parser("optimize", help="compact a table's small files (time travel is kept)")
    o.add_argument("table")
    o.set_defaults(func=cmd_optimize)

    v = sub.add_parser("vacuum", help="delete files no version inside the retention window needs")
    v.add_argument("table", nargs="?")
    v.add_argument("--all", action="store_true", help="every table and landing feed within its retention (cron it: "
                   "docs/operations.md)")
    v.add_argument("--retain-hours", type=int, help="keep at least this long (never below the layer's retention)")
    v.add_argument("--dry-run", action="store_true", help="list what would go, delete nothing")
    v.set_defaults(func=cmd_vacuum)

    s = sub.add_parser("restore", help="make an old version current again (as a new commit)")
    s.add_argument("table")
    s.add_argument("--version", type=int)
    s.add_argument("--timestamp")
    s.add_argument("--reason", required=True, help="why (recorded in the commit, `carelake history` and ops.audit_log)")
    s.set_defaults(func=cmd_restore)

    e = sub.add_parser("demo", help="end to end: simulate a hospital, gateway, every job, train the model, report "
                                    "(--root defaults to ./demo-lakehouse, recreated)")
    e.add_argument("--patients", type=int, default=120, help="patients in the simulated hospital (default 120)")
    e.add_argument("--hours", type=int, default=30, help="simulated window (default 30 h)")
    e.add_argument("--train-hours", type=int, default=0, help="hours sent before training (default 2/3 of --hours)")
    e.add_argument("--seed", type=int, default=7)
    e.set_defaults(func=cmd_demo)

    nb = sub.add_parser("notebook", help="open JupyterLab on this lakehouse's notebooks (open_lakehouse() in a "
                                         "notebook gives Spark and the tables)")
    nb.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1: this machine only)")
    nb.add_argument("--port", type=int, default=8888)
    nb.add_argument("--browser", action="store_true", help="also open a web browser")
    nb.set_defaults(func=cmd_notebook)

    ml = sub.add_parser("mlflow-ui", help="serve this lakehouse's MLflow tracking store: runs, models, model cards")
    ml.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1: this machine only)")
    ml.add_argument("--port", type=int, default=5000)
    ml.set_defaults(func=cmd_mlflow_ui)

    m = sub.add_parser("simulate", help="write a seeded synthetic hospital as feed files, with ground truth")
    m.add_argument("--out", required=True, help="output folder (must be empty or new unless --force)")
    m.add_argument("--patients", type=int, help="people in the window (simulator.patients in conf)")
    m.add_argument("--hours", type=int, help="window length in hours (simulator.hours)")
    m.add_argument("--seed", type=int, help="random seed; the same seed and settings give byte-identical files")
    m.add_argument("--feeds", help="comma-separated subset of hl7,fhir,devices,dicom,claims (default: all)")
    m.add_argument("--start", help="window start, ISO-8601 with a zone, e.g. 2026-01-05T00:00:00Z")
    m.add_argument("--force", action="store_true", help="replace an earlier simulation's output in --out")
    m.set_defaults(func=cmd_simulate)

    tr = sub.add_parser("train", help="train a model from gold tables, track it in MLflow, register a champion")
    tr.add_argument("model", choices=["deterioration", "mortality", "fraud"],
                    help="deterioration: onset within models.horizon; mortality: in-hospital death from the first "
                         "48 h of an ICU stay (PhysioNet 2012 import, labels in silver.outcomes); fraud: claims "
                         "fraud (gold.claims_fraud_scores)")
    tr.add_argument("--labels", help="deterioration onsets: the simulator's DIR/truth/deteriorations.csv; fraud: its "
                                     "DIR/truth/fraud_labels.csv")
    tr.add_argument("--folds", type=_folds, default=5, help="mortality: cross-validation folds (2-20, default 5)")
    tr.add_argument("--tracking-uri", help="MLflow tracking URI (models.tracking_uri; default sqlite under the root)")
    tr.set_defaults(func=cmd_train)
    ev = sub.add_parser("evaluate", help="judge a gold product against ground truth labels")
    ev.add_argument("product", choices=["fraud"], help="fraud: gold.claims_fraud_scores vs labelled claims")
    ev.add_argument("--labels", required=True, help="the simulator's DIR/truth/fraud_labels.csv")
    ev.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ev.set_defaults(func=cmd_evaluate)
    add_imaging_parser(sub)

    from pipelines.audit_cli import add_parser as add_audit_parser

    add_audit_parser(sub)

    ss = sub.add_parser("sql-server", help="serve every table over JDBC/ODBC (HiveServer2) for BI tools, with "
                                           "logins, roles and the audit log")
    ss.add_argument("--host", help="listen address (sql_server.host; default 127.0.0.1)")
    ss.add_argument("--port", type=int, help="port (sql_server.port; default 10000; 0 picks a free one)")
    ss.add_argument("--no-auth", action="store_true",
                    help="no login, everyone reads everything: local development on loopback only")
    ss.set_defaults(func=cmd_sql_server)

    su = sub.add_parser("sql-user", help="add, remove or list the SQL server's users (scrypt-hashed passwords)")
    su.add_argument("action", choices=["add", "remove", "list"])
    su.add_argument("name", nargs="?")
    su.add_argument("--role", choices=["analyst", "engineer", "auditor"])
    su.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    su.set_defaults(func=cmd_sql_user)
    return p


def _configure_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger("carelake")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    # PySpark logs every failed query as a JSON record before raising it; carelake reports it once.
    for noisy in ("SQLQueryContextLogger", "py4j", "pyspark"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.CRITICAL)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose, args.quiet)
    try:
        return args.func(Context(args))
    except CarelakeError as exc:
        if args.verbose:
            log.exception("error")
        print(f"carelake: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("carelake: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:  # the one place unexpected failures become one line + an exit code
        if args.verbose:
            log.exception("internal error")
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"carelake: internal error: {type(exc).__name__}: {first} (rerun with --verbose for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
