"""`carelake audit ...`: the commands and how their answers read. Heavy imports stay inside the commands."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any, TextIO

from pipelines.output import cell, jsonable

if TYPE_CHECKING:
    from pipelines.cli import Context


def add_parser(sub: argparse._SubParsersAction) -> None:
    """`carelake audit explain | as-of | diff`."""
    a = sub.add_parser("audit", help="audits: explain an alert or score down to the bytes received; a table as of "
                                     "a time or version; what changed between two versions")
    asub = a.add_subparsers(dest="audit_command", required=True, metavar="AUDIT")
    e = asub.add_parser("explain", help="the chain behind an alert or a score row: score, model and code version, "
                                        "silver observations, bronze records, landing bytes (verified)")
    e.add_argument("target", help="an alert_id, or a score row as PATIENT_KEY@SCORED_AT")
    e.add_argument("--json", action="store_true", help="one JSON document instead of text")
    e.set_defaults(func=cmd_explain)
    o = asub.add_parser("as-of", help="what a table said at a version or a time: the commit, the row count, the first "
                                      "rows")
    o.add_argument("table")
    o.add_argument("moment", metavar="TIME|VERSION", help="a version number, or ISO-8601 time (UTC unless a zone)")
    o.add_argument("--limit", type=int, default=20, help="rows to show (default 20; the count is always whole)")
    o.add_argument("--json", action="store_true", help="JSON lines: the commit first, then one object per row")
    o.set_defaults(func=cmd_as_of)
    d = asub.add_parser("diff", help="rows added, changed and removed between two versions, by the table's key")
    d.add_argument("table")
    d.add_argument("v1", type=int, help="the older version")
    d.add_argument("v2", type=int, help="the newer version")
    d.add_argument("--key", help="comma-separated key columns (default: the merge keys of the job that writes it; "
                                 "append-only tables compare whole rows)")
    d.add_argument("--limit", type=int, default=50, help="changes to list in text (default 50; JSON lists all)")
    d.add_argument("--json", action="store_true", help="JSON lines: a summary first, then one object per change")
    d.set_defaults(func=cmd_diff)


def audit_store(ctx: Context):
    """Audits read Delta logs and files directly (delta-rs), whichever engine writes the tables: no Spark."""
    from pipelines.store.deltars import DeltaRsStore

    return DeltaRsStore(ctx.cfg)


def _record(store, action: str, statement: str, outcome: str, tables, rows: int | None, detail: str | None) -> None:
    from pipelines.audit_log import record

    record(store, action=action, outcome=outcome, statement=statement, tables=tables, rows=rows, detail=detail)


def _audited(store, action: str, statement: str, run):
    """run() -> (result, tables, rows, detail), recorded in ops.audit_log as allowed; a failure as failed."""
    try:
        result, tables, rows, detail = run()
    except Exception as exc:
        _record(store, action, statement, "failed", {}, None, str(exc).splitlines()[0] if str(exc) else repr(exc))
        raise
    _record(store, action, statement, "allowed", tables, rows, detail)
    return result


def cmd_explain(ctx: Context) -> int:
    from pipelines.audit import MISMATCH, VERIFIED, Target, explain

    store = audit_store(ctx)
    target = Target.parse(ctx.args.target)

    def run():
        r = explain(store, ctx.cfg, target)
        return r, r["tables_read"], len(r["observations"]), r["verdict"]

    result = _audited(store, "explain", f"carelake audit explain {ctx.args.target}", run)
    if ctx.args.json:
        print(json.dumps(jsonable(result), indent=2, ensure_ascii=False))
    else:
        write_explanation(result, sys.stdout)
    return 0 if result["verdict"] == VERIFIED else 3 if result["verdict"] == MISMATCH else 4


def write_explanation(r: dict[str, Any], out: TextIO) -> None:
    """The chain as people read it: one block per hop, each landing unit with its verdict."""
    w = out.write
    w(f"audit explain {r['target']}: {r['verdict']}\n")
    if r["alert"]:
        a = r["alert"]
        w(f"alert      {a['alert_id']}  {a['level']} {a['status']}  opened {cell(a['opened_at'])}  NEWS2 "
          f"{cell(a['news2_score'])} ({cell(a['news2_band'])})  gold.early_warning_scores v{cell(a['scores_version'])}"
          "\n")
    s = r["score"]
    if s is None:
        w("score      not in the current gold.early_warning_scores (withdrawn, or never scored): see `carelake audit "
          "diff gold.early_warning_scores`\n")
        return
    if s["withdrawn_since"]:
        w(f"score      withdrawn since (late or corrected data): shown as of gold.early_warning_scores "
          f"v{r['tables_read']['gold.early_warning_scores']}\n")
    w(f"score      patient {s['patient_key']} at {cell(s['scored_at'])}  NEWS2 {cell(s['news2_score'])} "
      f"({cell(s['news2_band'])}{', partial' if s['news2_partial'] else ''})  qSOFA {cell(s['qsofa_score'])}  "
      f"SIRS {cell(s['sirs_count'])}  model risk {cell(s['model_risk'])}\n")
    w(f"versions   model {cell(r['model_version'])}  code {cell(r['code_version'])}  silver.observations "
      f"v{cell(s['silver_version'])}  computed by {cell(s['computed_by'])} at {cell(s['computed_at'])}\n")
    for o in r["observations"]:
        if "landing" not in o:
            w(f"  observation {o['observation_id']}: not in silver.observations v{s['silver_version']}\n")
            continue
        value = o["value"] if o["value"] is not None else o["value_text"]
        w(f"  observation {o['observation_id']}  {cell(o['concept'])} {cell(value)} {o['unit'] or ''}  at "
          f"{cell(o['effective_at'])}  {o['status']}  from {o['source_feed']} {cell(o['source_id'])}\n")
        b = o["bronze"]
        if b:
            w(f"    bronze   {b['table']}  batch {b['ingest_batch_id']}  received {cell(b['received_at'])}\n")
        ld = o["landing"]
        w(f"    landing  {ld['file']}  offset {ld['offset']}  {cell(ld.get('bytes'))} bytes  sha256 "
          f"{cell(ld.get('sha256_recorded'))}: {ld['status']}{' (' + ld['detail'] + ')' if ld.get('detail') else ''}"
          "\n")


def cmd_as_of(ctx: Context) -> int:
    from pipelines.audit_tables import as_of
    from pipelines.output import print_table

    a = ctx.args
    store = audit_store(ctx)

    def run():
        found = as_of(store, a.table, a.moment, a.limit)
        return found, {a.table: found.version}, found.head.num_rows, None

    r = _audited(store, "as_of", f"carelake audit as-of {a.table} {a.moment}", run)
    c = r.commit
    head = {"table": r.table, "version": r.version, "committed": c.timestamp, "operation": c.operation,
            "rows": r.rows, "reason": c.metadata.get("carelake.reason")}
    rows = r.head.to_pylist()
    if a.json:
        for item in (head, *rows):
            print(json.dumps(jsonable(item), ensure_ascii=False))
        return 0
    print(f"{r.table} as of {a.moment}: version {r.version}, committed {cell(c.timestamp)} ({c.operation}), "
          f"{r.rows:,} rows")
    if rows:
        print_table(r.head.column_names, [[row[k] for k in r.head.column_names] for row in rows])
        print(f"({len(rows)} of {r.rows:,} rows shown; all of them: carelake sql \"select * from {r.table}\" "
              f"--as-of-version {r.version})")
    return 0


def cmd_diff(ctx: Context) -> int:
    from pipelines.audit_tables import diff, table_keys

    a = ctx.args
    store = audit_store(ctx)
    key = tuple(k.strip() for k in a.key.split(",") if k.strip()) if a.key else table_keys(ctx.cfg, a.table)

    def run():
        found = diff(store, a.table, a.v1, a.v2, key)
        n = found.summary()
        return found, [(a.table, a.v1), (a.table, a.v2)], n["added"] + n["changed"] + n["removed"], None

    d = _audited(store, "diff", f"carelake audit diff {a.table} {a.v1} {a.v2}", run)
    s = d.summary()
    if a.json:
        for item in (s, *d.changes()):
            print(json.dumps(jsonable(item), ensure_ascii=False))
        return 0
    keyed = f"by {', '.join(d.key)}" if d.key else "whole rows (no key)"
    print(f"{d.table} v{d.from_version} -> v{d.to_version} ({keyed}): {s['added']:,} added, {s['changed']:,} changed, "
          f"{s['removed']:,} removed; read {s['files_read']} file(s), {s['rows_read']:,} rows")
    for i, ch in enumerate(d.changes()):
        if i == a.limit:
            print(f"... {s['added'] + s['changed'] + s['removed'] - a.limit:,} more (--limit, or --json for all)")
            break
        print(_change_line(ch))
    return 0


def _change_line(ch: dict[str, Any]) -> str:
    key = ", ".join(f"{k}={cell(v)}" for k, v in (ch["key"] or {}).items())
    if ch["change"] == "changed":
        cols = "; ".join(f"{c}: {cell(ch['before'][c])} -> {cell(ch['after'][c])}" for c in ch["columns"])
        return f"  changed  {key}  {cols}"
    row = ch.get("after") or ch.get("before")
    return f"  {ch['change']:<8} {key or json.dumps(jsonable(row), ensure_ascii=False)[:200]}"


def audited_restore(store, table: str, version: int | None, timestamp: str | None, reason: str) -> dict[str, Any]:
    """A restore whose reason and actor go into its commit and into ops.audit_log, whether it works or fails."""
    from pipelines.audit_log import os_actor, record
    from pipelines.errors import UsageError

    reason = reason.strip()
    if not reason:
        raise UsageError("restore --reason must say why (e.g. --reason \"INC-4411: scores from a bad model\"); it is "
                         "recorded in the table's history and in ops.audit_log")
    actor = os_actor()
    target = f"--version {version}" if version is not None else f"--timestamp {timestamp}"
    statement = f"carelake restore {table} {target}"
    try:
        out = dict(store.restore(table, version=version, timestamp=timestamp,
                                 metadata={"carelake.reason": reason, "carelake.actor": actor}))
    except Exception as exc:
        record(store, actor=actor, action="restore", outcome="failed", statement=statement, tables={table: version},
               detail=f"{reason} | {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
        raise
    changed = bool(out.get("changed"))
    record(store, actor=actor, action="restore", outcome="allowed", statement=statement,
           tables={table: store.version(table)}, rows=None,
           detail=reason if changed else f"{reason} | already at version {out.get('restored_to')}: nothing committed")
    return out


def cmd_vacuum_all(ctx: Context) -> int:
    """`carelake vacuum --all`: every table and landing feed within its retention; one line each, one audit row."""
    from pipelines.output import print_table
    from pipelines.retention import vacuum_all

    store = ctx.store(need_spark=False)
    dry = ctx.args.dry_run

    def run():
        done = vacuum_all(store, ctx.cfg, dry_run=dry)
        tables = [(s.what, None) for s in done if s.removed and not s.what.startswith("landing/")]
        detail = "; ".join(f"{s.what}: {s.removed} file(s) past {s.kept_days} d" for s in done if s.removed)
        return done, tables, sum(s.removed for s in done), detail or None

    swept = _audited(store, "vacuum", "carelake vacuum --all" + (" --dry-run" if dry else ""), run)
    total = sum(s.removed for s in swept)
    print_table(["table / landing feed", "kept (days)", "would remove" if dry else "removed"],
                [(s.what, s.kept_days, s.removed) for s in swept])
    print(f"vacuum --all: {'would remove' if dry else 'removed'} {total} file(s) past their retention")
    return 0
