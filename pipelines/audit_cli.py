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


def _record(store, action: str, statement: str, outcome: str, tables: dict, rows: int | None,
            detail: str | None) -> None:
    from pipelines.audit_log import record

    record(store, action=action, outcome=outcome, statement=statement, tables=tables, rows=rows, detail=detail)


def cmd_explain(ctx: Context) -> int:
    from pipelines.audit import MISMATCH, VERIFIED, Target, explain

    store = ctx.store(need_spark=False)
    target = Target.parse(ctx.args.target)
    statement = f"carelake audit explain {ctx.args.target}"
    try:
        result = explain(store, ctx.cfg, target)
    except Exception as exc:
        _record(store, "explain", statement, "failed", {}, None, str(exc).splitlines()[0] if str(exc) else repr(exc))
        raise
    _record(store, "explain", statement, "allowed", result["tables_read"], len(result["observations"]),
            result["verdict"])
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
