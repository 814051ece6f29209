"""The demo's clinical summary: text for the terminal and an HTML page with plots (matplotlib, inline PNGs).

Reads gold and silver through the table store (Arrow, no Spark) and the training result; writes one
self-contained HTML file. Patient keys are pseudonyms: nothing here shows an MRN or a name.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from pipelines.config import Config

SCORES, ALERTS, OBSERVATIONS = "gold.early_warning_scores", "gold.deterioration_alerts", "silver.observations"
BAND_COLOURS = {"low": "#4c9a2a", "low-medium": "#c9a227", "medium": "#e07b00", "high": "#c0392b"}


@dataclass
class Report:
    text: str
    path: Path


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _table(df: pd.DataFrame) -> str:
    return df.to_html(index=False, border=0, classes="t", float_format=lambda x: f"{x:.3f}")


def _text_table(df: pd.DataFrame) -> str:
    return df.to_string(index=False, float_format=lambda x: f"{x:.3f}")


MEASURES = (("AUROC", "auroc"), ("AUPRC", "auprc"), ("median lead time before the event (h)", "median_lead_time_h"),
            ("deteriorating patients alerted in time", "detected_fraction"), ("PPV of an alerting point", "ppv"),
            ("alert episodes per 100 patient-days", "alerts_per_100_patient_days"))


def comparison(result: Any) -> pd.DataFrame:
    """Model vs NEWS2 >= 5 on the held-out patients, one row per measure."""
    m = result.metrics
    return pd.DataFrame([{"held-out patients": label, "model": m.get(f"model_{key}"),
                          "NEWS2 >= 5": m.get(f"news2_{key}")} for label, key in MEASURES])


def load(cfg: Config) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    from pipelines.store.deltars import DeltaRsStore

    store = DeltaRsStore(cfg)
    scores = store.read_arrow(SCORES).select(
        ["patient_key", "scored_at", "news2_score", "news2_band", "news2_partial", "qsofa_score", "model_risk",
         "model_version"]).to_pandas()
    alerts = store.read_arrow(ALERTS).to_pandas()
    obs = store.read_arrow(OBSERVATIONS).select(["patient_key", "source_feed", "concept"]).to_pandas()
    return scores, alerts, obs


def demo_report(cfg: Config, result: Any, *, out: Path, max_patients: int = 4,
                extra: tuple[list[str], list[str]] | None = None) -> Report:
    """Summary text + HTML report. `result` is the training result (metrics and ROC points), or None; `extra` more
    text lines and HTML blocks (the imaging part)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores, alerts, obs = load(cfg)
    live = alerts[~alerts["status"].isin(["withdrawn", "merged"])]  # a merged identity's finding counts once
    latest = scores.sort_values("scored_at").groupby("patient_key").tail(1)
    lines = [
        f"patients scored: {scores['patient_key'].nunique():,} "
        f"(with any observation: {obs['patient_key'].nunique():,})",
        f"observations in silver: {len(obs):,} ("
        + ", ".join(f"{feed} {n:,}" for feed, n in obs["source_feed"].value_counts().sort_index().items()) + ")",
        f"score rows: {len(scores):,}; partial (an input missing or older than the look-back): "
        f"{int(scores['news2_partial'].sum()):,}",
        "alerts (episodes; open now / total): " + ", ".join(
            f"{lvl} {int((g['status'] == 'open').sum())}/{len(g)}" for lvl, g in live.groupby("level")),
        "patients by their latest NEWS2 band: " + ", ".join(
            f"{b} {int((latest['news2_band'] == b).sum())}" for b in BAND_COLOURS),
    ]
    sections = []
    if result is not None:
        lines.append("")
        lines.append("model vs NEWS2 >= 5 on held-out patients:")
        lines.append(_text_table(comparison(result)))
        lines.append(f"{result.decision}: registered carelake-deterioration version {result.version}"
                     if result.champion else f"{result.decision} (scores carry no model risk)")
        lines += ["", "model card:", result.card]
    ranked = latest.assign(model_risk=latest["model_risk"].fillna(-1)).sort_values(
        ["news2_score", "model_risk"], ascending=False).head(5)
    top = ranked[["patient_key", "scored_at", "news2_score", "news2_band", "qsofa_score", "model_risk"]].copy()
    top["model_risk"] = top["model_risk"].where(top["model_risk"] >= 0)
    top["patient_key"] = top["patient_key"].str[:12] + "..."
    lines += ["", "top-5 patients at risk now (latest score):", _text_table(top)]

    # Plots: trajectories of the patients with the most alerts, alerts per hour, ROC.
    busiest = live["patient_key"].value_counts().head(max_patients).index.tolist()
    fig, axes = plt.subplots(len(busiest) or 1, 1, figsize=(10, 2.3 * max(1, len(busiest))), sharex=False)
    axes = list(axes) if hasattr(axes, "__len__") else [axes]
    for ax, patient in zip(axes, busiest, strict=False):
        s = scores[scores["patient_key"] == patient].sort_values("scored_at")
        ax.step(s["scored_at"], s["news2_score"], where="post", color="#34495e", lw=1)
        for _, a in live[live["patient_key"] == patient].iterrows():
            colour = {"news2_medium": BAND_COLOURS["medium"], "news2_high": BAND_COLOURS["high"]}.get(
                a["level"], "#8e44ad")
            ax.axvline(a["opened_at"], color=colour, ls="--", lw=1)
            ax.annotate(a["level"], (a["opened_at"], ax.get_ylim()[1] * 0.9), fontsize=7, color=colour)
        ax.axhline(5, color=BAND_COLOURS["medium"], lw=0.5)
        ax.axhline(7, color=BAND_COLOURS["high"], lw=0.5)
        ax.set_ylabel("NEWS2")
        ax.set_title(f"patient {patient[:12]}...", fontsize=9)
    sections.append(("NEWS2 trajectories with alert openings (dashed)", _png(fig)))

    fig, ax = plt.subplots(figsize=(10, 3))
    if len(live):
        per_hour = live.assign(hour=live["opened_at"].dt.floor("h")).groupby(["hour", "level"]).size().unstack(
            fill_value=0)
        per_hour.plot(kind="bar", stacked=True, ax=ax, width=0.9)
        ax.set_xticklabels([t.strftime("%d %H:00") for t in per_hour.index], rotation=90, fontsize=6)
    ax.set_ylabel("alerts opened")
    sections.append(("Alerts per hour, by level", _png(fig)))

    if result is not None and result.roc:
        fig, ax = plt.subplots(figsize=(5, 5))
        for who, curve in result.roc.items():
            label = "model" if who == "model" else "NEWS2"
            ax.plot(curve["fpr"], curve["tpr"], label=f"{label} (AUROC {result.metrics.get(f'{who}_auroc', 0):.3f})")
        ax.plot([0, 1], [0, 1], color="grey", lw=0.5)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.legend()
        sections.append(("ROC, held-out patients: model vs NEWS2", _png(fig)))

    lines += extra[0] if extra else []
    text = "\n".join(lines)
    body = [f"<h1>carelake demo: deterioration in a simulated hospital</h1><pre>{html.escape(text)}</pre>"]
    if result is not None:
        body.append("<h2>Model vs NEWS2 &ge; 5</h2>" + _table(comparison(result)))
    body.append("<h2>Top-5 patients at risk now</h2>" + _table(top))
    body += [f"<h2>{html.escape(title)}</h2><img src='{png}'>" for title, png in sections]
    body += extra[1] if extra else []
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("<!doctype html><meta charset='utf-8'><title>carelake demo</title><style>body{font-family:"
                   "sans-serif;margin:2em}table.t{border-collapse:collapse}table.t td,table.t th{padding:2px 8px;"
                   "border-bottom:1px solid #ddd}</style>" + "".join(body), encoding="utf-8")
    return Report(text=text, path=out)


# -- imaging -------------------------------------------------------------------------------------------
WORKLIST, BREACHES = "gold.imaging_worklist", "gold.imaging_sla_breaches"


def _why(factors: list[dict]) -> str:
    """The factors that gave points, as `factor value +points`."""
    return "; ".join(f"{f['factor']} {f['value']} +{f['points']:g}" for f in factors or () if f["points"])


def worklist_snapshot(cfg: Config, top: int = 10) -> pd.DataFrame | None:
    """The worklist's first rows with why they rank there (None when the table does not exist)."""
    from pipelines.store.deltars import DeltaRsStore

    store = DeltaRsStore(cfg)
    if not store.exists(WORKLIST):
        return None
    rows = store.read_arrow(WORKLIST).to_pylist()
    unread = sorted((r for r in rows if r["status"] == "unread"), key=lambda r: r["rank"])[:top]
    return pd.DataFrame([{"rank": r["rank"], "score": r["score"], "exam": f"{r['modality']}/{r['body_part']}",
                          "priority": r["priority"] or "no order", "waited (min)": r["waited_minutes"],
                          "SLA breached": r["sla_breached"], "why": _why(r["factors"])} for r in unread],
                        columns=["rank", "score", "exam", "priority", "waited (min)", "SLA breached", "why"])


def time_to_read(figures: dict) -> pd.DataFrame:
    """The replay's figures as one row per load and policy (minutes; medians across the replayed days)."""
    names = {"fifo": "FIFO", "priority": "order priority only", "worklist": "carelake worklist"}
    return pd.DataFrame([{"load": load["utilisation"], "policy": label,
                          "critical median": load[p]["critical_median_min"]["median"],
                          "critical p90": load[p]["critical_p90_min"]["median"],
                          "other median": load[p]["noncritical_median_min"]["median"],
                          "routine within SLA": load[p].get("routine_within_sla", {}).get("median")}
                         for load in figures["loads"] for p, label in names.items()])


def imaging_sections(cfg: Config, truth_csv: Path) -> tuple[list[str], list[str]]:
    """The demo's imaging part: (text lines, HTML blocks): the worklist snapshot and the queue replay's
    time-to-read comparison (without the model: it was trained on this same day)."""
    from pipelines.errors import UsageError
    from pipelines.imaging_replay import replay_acuity, run_replay

    lines, blocks = ["", "imaging worklist (top rows, why they rank there):"], []
    snapshot = worklist_snapshot(cfg)
    if snapshot is None or snapshot.empty:
        lines.append("  (no unread study on gold.imaging_worklist)")
    else:
        lines.append(_text_table(snapshot.drop(columns=["why"])))
        lines += [f"  #{r['rank']}: {r['why']}" for _, r in snapshot.head(3).iterrows()]
        blocks.append("<h2>Imaging worklist: the first rows and why they rank there</h2>" + _table(snapshot))
    try:
        figures = run_replay([truth_csv], cfg.imaging, acuity=replay_acuity(cfg))
    except UsageError as exc:
        lines.append(f"time-to-read replay: not run ({exc})")
        return lines, blocks
    table = time_to_read(figures)
    loads = ", ".join(str(x["utilisation"]) for x in figures["loads"])
    room = f"{figures['radiologists']} radiologists by day, {figures['night_radiologists']} at night, at loads {loads}"
    studies, critical = figures["studies"][0], figures["critical_studies"][0]
    lines += ["", f"time to read (minutes), {studies} studies ({critical} with a critical finding) replayed through "
                  f"{room}:", _text_table(table)]
    blocks.append(f"<h2>Time to read: a simulated day through {html.escape(room)}</h2>"
                  f"<p>{studies} studies, {critical} with a critical finding; minutes from the study to the end of "
                  "its read, the report (carelake imaging replay, without the model).</p>"
                  + _table(table))
    return lines, blocks


# -- claims --------------------------------------------------------------------------------------------
CLAIM_SCORES = "gold.claims_fraud_scores"
PRECISION = (("AUROC", "auroc"), ("AUPRC", "auprc"), ("precision, top 1 % of claims", "precision_top_1pct"),
             ("precision, top 5 % of claims", "precision_top_5pct"))


def _reasons(reasons) -> str:
    return "; ".join(f"{r['code']}: {r['detail']}" for r in reasons if r is not None) if reasons is not None else ""


def flagged_claims(rows: pd.DataFrame, top: int = 10) -> pd.DataFrame:
    """The highest-scored flagged claims (score, then the model's probability) with their reasons in words."""
    flagged = rows[rows["score"] > 0].assign(_p=rows["model_probability"].fillna(-1.0)).sort_values(
        ["score", "_p", "claim_id"], ascending=[False, False, True]).head(top)
    return pd.DataFrame({"claim": flagged["claim_id"], "provider NPI": flagged["provider_npi"],
                         "service from": flagged["service_from"].astype(str),
                         "billed": flagged["billed_amount"].map(lambda x: f"{x:,.2f}"), "score": flagged["score"],
                         "band": flagged["band"], "model probability": flagged["model_probability"],
                         "reasons": flagged["reasons"].map(_reasons)})


def fraud_precision(metrics: dict, who: tuple[str, ...]) -> pd.DataFrame:
    """Precision measures, one row each, one column per scorer (model, anomaly, rules)."""
    return pd.DataFrame([{"measure": label, **{w: metrics.get(f"{w}_{key}") for w in who}}
                         for label, key in PRECISION])


def _rules_only(rows: pd.DataFrame, labels: dict[str, set[str]]) -> dict | None:
    """The rules' precision over every scored claim with the labels (None if one class is missing)."""
    from models.claims_fraud import evaluate

    y = rows["claim_id"].isin(list(labels)).astype(int).to_numpy()
    if y.min() == y.max():
        return None
    return evaluate(y, rows["score"].to_numpy(dtype="float64"), "rules")


def claims_sections(cfg: Config, labels_csv: Path, result: Any = None, why_not: str = ""
                    ) -> tuple[list[str], list[str]]:
    """The demo's claims part: (text lines, HTML blocks): the top flagged claims with their reasons, and model vs
    rules precision (the training's held-out providers; the rules alone over every claim when no model was
    trained, `why_not` saying why)."""
    from models.claims_fraud import labels_from_truth, pattern_recall, precision_figure
    from pipelines.store.deltars import DeltaRsStore

    store = DeltaRsStore(cfg)
    if not store.exists(CLAIM_SCORES):
        return ["", f"claims: {CLAIM_SCORES} does not exist (no claims ingested)"], []
    rows = store.read_arrow(CLAIM_SCORES).select(
        ["claim_id", "provider_npi", "service_from", "billed_amount", "score", "band", "reasons",
         "model_probability", "model_version"]).to_pandas()
    labels = labels_from_truth(labels_csv)
    bands = rows["band"].value_counts()
    codes = pd.Series([r["code"] for rs in rows["reasons"] if rs is not None for r in rs]).value_counts()
    recall = pattern_recall(rows, labels)
    lines = ["", f"claims scored: {len(rows):,}; flagged {int((rows['score'] > 0).sum()):,} ("
             + ", ".join(f"{b} {int(bands.get(b, 0))}" for b in ("high", "medium", "low")) + "); reasons: "
             + (", ".join(f"{c} {n}" for c, n in codes.items()) or "none"),
             "recall per labelled pattern (its own rule): " + ", ".join(
                 f"{p} {r['found']}/{r['labelled']}" for p, r in recall["patterns"].items() if r["labelled"])
             + f"; false-positive rate on clean claims {recall['clean']['false_positive_rate']:.3f}"]
    top = flagged_claims(rows)
    lines += ["top flagged claims:", _text_table(top.drop(columns=["reasons"]))]
    lines += [f"  {r['claim']}: {r['reasons']}" for _, r in top.head(3).iterrows()]
    blocks = ["<h2>Claims: the top flagged claims and why</h2>" + _table(top)]
    if result is not None:
        c = result.counts
        table = fraud_precision(result.metrics, ("model", "anomaly", "rules"))
        held = (f"{c['test_claims']:,} claims of {c['test_providers']} held-out providers "
                f"({c['test_fraud_claims']} fraudulent); the model was trained on {c['train_claims']:,} claims "
                f"({c['train_fraud_claims']} fraudulent)")
        verdict = (f"carelake-claims-fraud version {result.version}, {result.decision}" if result.champion else
                   result.decision)
        lines += ["", f"fraud model vs rules on {held}; {verdict}:", _text_table(table)]
        blocks.append(f"<h2>Claims: fraud model vs rules</h2><p>{html.escape(held)}; {html.escape(verdict)}.</p>"
                      + _table(table) + f"<img src='{_png(precision_figure(result.metrics))}'>")
        return lines, blocks
    metrics = _rules_only(rows, labels)
    lines += ["", f"fraud model: not trained ({why_not})"]
    if metrics is None:
        return lines, blocks
    table = fraud_precision(metrics, ("rules",))
    lines += [f"rules alone over all {len(rows):,} scored claims:", _text_table(table)]
    blocks.append(f"<h2>Claims: the rules' precision</h2><p>The fraud model was not trained "
                  f"({html.escape(why_not)}); the rules over all {len(rows):,} scored claims:</p>" + _table(table))
    return lines, blocks
