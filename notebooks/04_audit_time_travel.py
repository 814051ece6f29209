# %% [markdown]
# # 04 · An audit with time travel
#
# The questions an auditor (a patient-safety review, a regulator, a complaint) asks of a lakehouse, answered with
# the functions behind `carelake audit` and `carelake restore`:
#
# 1. **What did we know about this patient at the moment the alert fired?** Tables read *as of* a version or a
#    commit time, not as they are today.
# 2. **Which model version raised this alert, and on which observations?** `audit explain`, down to the landing
#    bytes, each unit hashed again and compared with the sha256 recorded when it arrived.
# 3. **What changed between two versions?** `audit diff`, row by row, by the table's key.
# 4. **A restore, with its reason**, and the audit log rows it leaves — rehearsed on a copy of the table, so the
#    lakehouse `ROOT` points at is not changed by reading this notebook.
#
# Patient keys are pseudonyms (a keyed hash), shortened for display; no names or MRNs are shown.

# %% tags=["parameters"]
ROOT = None  # a lakehouse (e.g. "../demo-lakehouse" after `./dev demo`); built there if it holds no tables; None = new
ENV = "local"  # configuration overlay (conf/<ENV>.yaml)
PATIENTS = 40  # the simulated hospital built when ROOT holds no tables ...
HOURS = 10  # ... its window in hours ...
SEED = 7  # ... and its seed
SETTINGS = {"simulator.icu_cadence_min_s": 30, "simulator.icu_cadence_max_s": 60, "imaging.clock": "data"}

# %%
import io
import shutil
import tempfile
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pandas as pd
from IPython.display import display

from pipelines import notebooks as nbk
from pipelines.audit import ALERTS, SCORES, Target, explain
from pipelines.audit_cli import audited_restore, write_explanation
from pipelines.audit_tables import as_of, diff, table_keys
from pipelines.config import load_config
from pipelines.store.deltars import DeltaRsStore

nbk.setup_display()
cfg, spark, store, simulation = nbk.lakehouse(ROOT, ENV, SETTINGS, patients=PATIENTS, hours=HOURS, seed=SEED)
audit = DeltaRsStore(cfg)  # audits read the Delta logs and files directly, as `carelake audit` does: no Spark

# %% [markdown]
# ## The alert under review
# The first alert of the highest level the lakehouse holds (a real review starts from an incident's alert id).

# %%
ORDER = {"news2_high": 0, "model": 1, "qsofa": 2, "news2_medium": 3}
alerts = audit.read_arrow(ALERTS, columns=["alert_id", "patient_key", "level", "status", "opened_at",
                                           "news2_score", "model_version", "scores_version"]).to_pandas()
if alerts.empty:
    raise nbk.NotebookStop(f"{ALERTS} holds no alert: nothing to audit here; simulate more patients or hours")
alerts["order"] = alerts["level"].map(ORDER).fillna(9)
alert = alerts.sort_values(["order", "opened_at", "alert_id"]).iloc[0]  # the same alert on every run
patient, opened = alert["patient_key"], alert["opened_at"].to_pydatetime()
print(f"{len(alerts)} alert(s) in {ALERTS}; under review: {alert['level']} alert {nbk.short(alert['alert_id'])} for "
      f"patient {nbk.short(patient)}, opened {opened:%Y-%m-%d %H:%M} (event time), NEWS2 {alert['news2_score']}")

# %% [markdown]
# ## 1. What did we know, and when?
# Every commit is a version with a time. `as_of(table, TIME)` is `carelake audit as-of TABLE TIME`: the version that
# was current at that commit time. Below, the patient's scores up to the alert's event time, as each version of
# the scores table held them: rows can arrive late (a delayed feed) or be corrected, so what was known at the
# alert is not always what the table says today.

# %%
commits = sorted(audit.history(SCORES), key=lambda c: c.version)
known = []
for commit in commits:
    rows = audit.read_arrow(SCORES, version=commit.version, columns=["patient_key", "scored_at", "news2_score"])
    mine = rows.to_pandas().query("patient_key == @patient and scored_at <= @opened")
    known.append({"version": commit.version, "committed": f"{commit.timestamp:%H:%M:%S}",
                  "operation": commit.operation, "this patient's scores up to the alert": len(mine),
                  "max NEWS2 among them": mine["news2_score"].max() if len(mine) else None,
                  "holds the alert's score": bool((mine["scored_at"] == opened).any())})
known = pd.DataFrame(known)
display(known)
holding = known.loc[known["holds the alert's score"], "version"]
then = int(holding.min()) if len(holding) else commits[-1].version  # withdrawn since (late data): the newest
committed = next(c.timestamp for c in commits if c.version == then)
if then > 0:  # the question "what did we know just before?", asked by time as an auditor would
    moment = (committed - timedelta(milliseconds=1)).isoformat()
    earlier = as_of(audit, SCORES, moment, 0)
    print(f"as of {moment} (`carelake audit as-of {SCORES} TIME`): version {earlier.version}, {earlier.rows} rows, "
          "before the alert's score row was written")
at_alert = audit.read_arrow(SCORES, version=then).to_pandas().query("patient_key == @patient and scored_at <= @opened")
now = audit.read_arrow(SCORES).to_pandas().query("patient_key == @patient and scored_at <= @opened")
print(f"when the alert was raised ({SCORES} v{then}, committed {committed:%H:%M:%S}) the patient had "
      f"{len(at_alert)} score row(s) up to {opened:%H:%M}; today (v{audit.version(SCORES)}) the table holds "
      f"{len(now)} for the same span")
display(at_alert.sort_values("scored_at").tail(5)[["scored_at", "news2_score", "news2_band", "news2_partial",
                                                   "model_risk", "silver_version"]])

# %% [markdown]
# ## 2. Which model version raised the alert, on which observations — verified to the bytes
# `explain` is `carelake audit explain ALERT_ID`: the alert, the score row it came from (with the model and code
# versions), each input observation in silver *as of the version the score read*, its bronze record, and the
# landing file's bytes at the recorded offset, hashed now and compared with the sha256 recorded on arrival.

# %%
chain = explain(audit, cfg, Target(alert_id=alert["alert_id"]))
text = io.StringIO()
write_explanation(chain, text)
shown = text.getvalue().replace(patient, nbk.short(patient)).replace(alert["alert_id"], nbk.short(alert["alert_id"]))
print(shown.replace(str(cfg.root), "<ROOT>"))
model = chain["model_version"] or "none (no model was registered when it was scored: the NEWS2 rule raised it)"
landing = Counter(o["landing"]["status"] for o in chain["observations"] if "landing" in o)
print(f"verdict: {chain['verdict']}; model version: {model}; code version: {chain['code_version']}; "
      f"landing units: {dict(landing)}; tables read at: {chain['tables_read']}")

# %% [markdown]
# ## 3. What changed between two versions
# `diff` is `carelake audit diff TABLE V1 V2`: rows added, changed and removed, matched by the table's key (the
# merge keys of the job that writes it). Here: the scores table from the version before the alert's score row was
# written to now: what the batch that raised the alert (and any later one) changed.

# %%
key = table_keys(cfg, SCORES)
since = max(0, then - 1)
changes = diff(audit, SCORES, since, audit.version(SCORES), key)
print(f"{SCORES} v{since} -> v{audit.version(SCORES)} by {', '.join(key)}: {changes.summary()}")
listed = pd.DataFrame([{"change": c["change"], "patient": nbk.short((c["key"] or {}).get("patient_key")),
                        "scored_at": (c["key"] or {}).get("scored_at"), "columns": ", ".join(c.get("columns") or [])}
                       for c in changes.changes()])
display(listed.head(10) if len(listed) else "no change")

# %% [markdown]
# ## 4. A restore, with its reason, and what it leaves in the audit log
# Say the review finds the alerts table must go back to the version before the alert (a faulty deployment). A
# restore is a new commit (history keeps everything) whose reason and actor are written into the commit and into
# `ops.audit_log`. It is rehearsed here on a copy of the table in a scratch lakehouse; on the real one it is
# `carelake restore gold.deterioration_alerts --version N --reason "INC-...: ..."`.

# %%
drill = load_config(env=ENV, root=Path(tempfile.mkdtemp(prefix="carelake-restore-drill-")) / "lake",
                    overrides=SETTINGS)
scratch = DeltaRsStore(drill)
shutil.copytree(audit.ref(ALERTS).path, scratch.ref(ALERTS).path)
first_with_alert = next(v for v in range(audit.version(ALERTS) + 1) if alert["alert_id"] in
                        audit.read_arrow(ALERTS, version=v, columns=["alert_id"]).column(0).to_pylist())
target, before = max(0, first_with_alert - 1), scratch.version(ALERTS)
REASON = "INC-0042 drill: alerts raised by a faulty deployment are withdrawn pending review"
done = audited_restore(scratch, ALERTS, target, None, REASON)
print(f"restored {ALERTS} (copy) to v{done['restored_to']}: now v{scratch.version(ALERTS)}, "
      f"{as_of(scratch, ALERTS, str(scratch.version(ALERTS)), 0).rows} alert(s) (was {len(alerts)})")
restore_commit = scratch.history(ALERTS, limit=1)[0]
print(f"its commit: {restore_commit.operation}, reason {restore_commit.metadata.get('carelake.reason')!r}, "
      f"actor {restore_commit.metadata.get('carelake.actor')!r}")
log = scratch.read_arrow("ops.audit_log").to_pandas()
display(log[["at_utc", "actor", "action", "outcome", "statement", "tables", "detail"]])
undone = diff(scratch, ALERTS, before, scratch.version(ALERTS), table_keys(cfg, ALERTS)).summary()
print(f"what the restore took away (audit diff v{before} -> v{scratch.version(ALERTS)}): {undone}")

# %% [markdown]
# ## What to take from this
# - Every answer above is a command an auditor can rerun: `carelake audit as-of`, `audit explain`, `audit diff`,
#   `restore --reason`; the CLI versions also record each audit in `ops.audit_log`.
# - Time travel reaches as far back as retention allows: `storage.retention_days.audit` keeps what audits need.
