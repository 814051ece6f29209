# %% [markdown]
# # 05 · The imaging worklist: which study a radiologist reads next, and does it get critical findings read sooner?
#
# `gold.imaging_worklist` ranks every unread study by points a person can check: order priority, exam urgency,
# indication (stroke, PE, bleed, trauma), where the patient is, the patient's current NEWS2 band and open
# deterioration alerts, time waited against the SLA, and a critical-finding model's probability. This notebook
# shows a snapshot with its factors, trains and judges the critical-finding model against order priority on
# held-out patients (MLflow), and replays the simulated day through a reading room under FIFO, order priority and
# the worklist (`carelake imaging replay`).
#
# The figures describe the **simulator**'s hospital: a check of the method, not evidence for a real department.
# Patient keys are pseudonyms, shortened; no names, MRNs or accession numbers are shown.

# %% tags=["parameters"]
ROOT = None  # a lakehouse with its simulation (e.g. "../demo-lakehouse"); built there if it holds no tables; None = new
ENV = "local"  # configuration overlay (conf/<ENV>.yaml)
PATIENTS = 40  # the simulated hospital built when ROOT holds no tables ...
HOURS = 10  # ... its window in hours ...
SEED = 7  # ... and its seed
SETTINGS = {"simulator.icu_cadence_min_s": 30, "simulator.icu_cadence_max_s": 60, "imaging.clock": "data"}

# %%
import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import display

from pipelines import notebooks as nbk
from pipelines.errors import UsageError
from pipelines.imaging_replay import replay_acuity, run_replay
from pipelines.report import BREACHES, WORKLIST, time_to_read, worklist_snapshot
from pipelines.training import print_critical_finding, train_critical_finding

nbk.setup_display()
cfg, spark, store, simulation = nbk.lakehouse(ROOT, ENV, SETTINGS, patients=PATIENTS, hours=HOURS, seed=SEED)
truth = nbk.truth_file(simulation, "imaging.csv", cfg.root)
nbk.require_table(store, WORKLIST, "the lakehouse has no imaging (simulate with the dicom feed, run every job)")

# %% [markdown]
# ## 1. The worklist now, and why each study ranks where it does
# The same snapshot the demo report shows (`pipelines.report.worklist_snapshot`): the first unread studies, each
# with the factors that gave it points.

# %%
snapshot = worklist_snapshot(cfg, top=10)
display(snapshot)
rows = store.read_arrow(WORKLIST, columns=["status", "rank", "factors"]).to_pylist()
unread = sorted((r for r in rows if r["status"] == "unread"), key=lambda r: r["rank"])[:10]
points = pd.DataFrame([{f["factor"]: f["points"] for f in r["factors"] if f["points"]} for r in unread],
                      index=[f"#{r['rank']}" for r in unread]).fillna(0)
statuses = {status: int(n) for status, n in pd.Series([r["status"] for r in rows]).value_counts().items()}
breaches = store.read_arrow(BREACHES).num_rows if store.exists(BREACHES) else 0
print(f"{WORKLIST}: {statuses}; {BREACHES}: {breaches} row(s)")
if len(points):
    ax = points.plot.barh(stacked=True, figsize=(8, 3.5), title="points per factor, first unread studies")
    ax.invert_yaxis()
    ax.set_xlabel("points (the worklist score is their sum)")
    ax.legend(fontsize=7, loc="lower right")
    plt.show()

# %% [markdown]
# ## 2. The critical-finding model against order priority, on held-out patients
# `train_critical_finding` is `carelake imaging train`: a model of whether a study holds a critical finding, fitted
# on the training patients' studies, judged by AUROC on the held-out patients' against order priority alone, and
# logged to MLflow; registered as champion only if it beats priority (with enough critical studies held out).

# %%
try:
    result, tracking_uri = train_critical_finding(cfg, spark, store, truth)
except UsageError as exc:  # too few studies of one outcome for a patient split: said, and the replay still runs
    result = None
    print(f"critical-finding model not trained: {exc}")
else:
    print_critical_finding(result, tracking_uri)
    m = result.metrics
    display(pd.DataFrame({"held-out AUROC": [m["model_auroc"], m["priority_auroc"]]},
                         index=["critical-finding model", "order priority alone"]).round(3))

# %% [markdown]
# ## 3. A day through the reading room: FIFO, order priority, the worklist
# `run_replay` is `carelake imaging replay`: the simulated day's studies arrive at their study times and a fixed
# number of radiologists (fewer at night) read them, each next study chosen by the policy, at loads that fill a
# share of their time. Time to read = study time to the end of its read. Without the model here: it was trained on
# this same day, so ranking the day with it would flatter the worklist.

# %%
figures = run_replay([truth], cfg.imaging, acuity=replay_acuity(cfg), seed=cfg.models.seed)
table = time_to_read(figures)
print(f"{figures['studies'][0]} studies ({figures['critical_studies'][0]} with a critical finding), "
      f"{figures['radiologists']} radiologists by day and {figures['night_radiologists']} at night; minutes:")
display(table)

# %%
critical = table.pivot(index="load", columns="policy", values="critical median")
p90 = table.pivot(index="load", columns="policy", values="critical p90")
fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5), sharey=False)
critical.plot.bar(ax=left, rot=0, title="critical studies: median time to read")
p90.plot.bar(ax=right, rot=0, title="critical studies: p90 time to read")
for ax in (left, right):
    ax.set_xlabel("load (share of the radiologists' time)")
    ax.set_ylabel("minutes")
    ax.legend(fontsize=7)
plt.show()
cuts = figures["loads"][-1]["worklist_cuts_critical_median_days"]
print(f"at load {figures['loads'][-1]['utilisation']}: the worklist cuts the critical median below both FIFO and "
      f"order priority on {cuts} simulated day(s)")

# %% [markdown]
# ## What to take from this
# - Every rank is a sum of points the configuration (`imaging.*` in `conf/base.yaml`) sets; the factors column
#   says which ones applied, so a radiologist can check an order by hand.
# - One simulated day is a small sample: `carelake imaging replay --truth DAY1 --truth DAY2 ...` replays several,
#   with the range across days, and `--model cross-day` ranks each day with a model fitted on the others.
