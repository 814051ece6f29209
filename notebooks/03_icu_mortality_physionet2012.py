# %% [markdown]
# # 03 · ICU mortality on real data: the PhysioNet/CinC Challenge 2012
#
# Real ICU stays (set-a of the 2012 Challenge: first 48 h of measurements, with in-hospital death, SAPS-I and
# SOFA) go through the same pipeline as live feeds: each record becomes a FHIR Patient and Encounter and
# bedside-device readings, landed, then bronze -> silver (where `-1` and impossible values are quarantined) ->
# gold (NEWS2 computed by carelake). A mortality model is cross-validated on the stays and judged the way the
# Challenge judged it — **Event 1** = min(sensitivity, positive predictivity), and calibration (Hosmer-Lemeshow
# H) — beside AUROC, against **SAPS-I**, **SOFA** and the **highest NEWS2** on the same stays and folds.
# Published references (Silva et al., CinC 2012): Event 1 = 0.535 for the winner on the hidden set, 0.313 for
# SAPS-I. The data carry no names; the record id is the MRN in silver, and only pseudonymous keys reach gold.
#
# Calls are the CLI's own: `carelake import physionet2012` (`pipelines.physionet2012.import_records`),
# `carelake run all --available-now`, `carelake train mortality` (`pipelines.training.train_mortality`).

# %% tags=["parameters"]
DATA = None  # folder with set-a/ and Outcomes-a.txt; None = the project's ../shared/realdata/physionet2012
SAMPLE = 200  # records imported: the first SAMPLE of set-a by RecordID (all 4,000: SAMPLE = 4000)
FOLDS = 5  # cross-validation folds
ROOT = None  # lakehouse folder (must not hold tables yet); None = a new folder under a temp dir
ENV = "local"  # configuration overlay (conf/<ENV>.yaml)

# %%
import os
import shutil
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import display

from pipelines import notebooks as nbk

pd.set_option("display.width", 160)
pd.set_option("display.max_columns", 12)
plt.rcParams.update({"figure.dpi": 72})
os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"

data = nbk.require_folder(DATA or nbk.FOLDER.parent.parent / "shared" / "realdata" / "physionet2012",
                          "The PhysioNet 2012 data (set-a/ and Outcomes-a.txt)",
                          "set DATA to the folder holding set-a/ and Outcomes-a.txt (PhysioNet/CinC Challenge "
                          "2012, ODC-By 1.0)")
records = sorted((nbk.require_folder(data / "set-a", "set-a/", "DATA must hold the set-a/ record folder")
                  ).glob("*.txt"))[:SAMPLE]
outcomes_file = data / "Outcomes-a.txt"
if not records or not outcomes_file.is_file():
    raise nbk.NotebookStop(f"{data} holds {len(records)} record file(s) in set-a/ and "
                           f"{'an' if outcomes_file.is_file() else 'no'} Outcomes-a.txt: both are needed")
print(f"{len(records):,} record(s) from {data / 'set-a'} (the first {SAMPLE:,} by RecordID)")

# %%
from pipelines.config import load_config
from pipelines.physionet2012 import import_records
from pipelines.spark import create_spark
from pipelines.store import open_store

work = Path(tempfile.mkdtemp(prefix="carelake-physionet-"))
cfg = load_config(env=ENV, root=Path(ROOT) if ROOT else work / "lake")
spark = create_spark(cfg.spark)
store = open_store(cfg, spark)
if store.list_tables():
    raise nbk.NotebookStop(f"{cfg.root} already holds tables: give ROOT a new folder (or None)")
sample = work / "set-a-sample"  # a copy of the chosen records, outside the repository
sample.mkdir()
for f in records:
    shutil.copy(f, sample / f.name)
print(f"lakehouse at {cfg.root}")

# %% [markdown]
# ## 1. Import the records through the feeds, then run every job

# %%
imported = import_records(cfg, store, sample, outcomes=outcomes_file)
sent = {k: v for k, v in imported.lines.items() if not k.startswith("skipped:")}
skipped = {k.removeprefix("skipped:"): v for k, v in imported.lines.items() if k.startswith("skipped:")}
print(f"imported {imported.records:,} record(s): {imported.resources:,} FHIR resources and "
      f"{sum(sent.values()):,} device readings landed; {imported.outcomes:,} outcome labels in silver.outcomes")
print(f"not sent (no LOINC code in silver): {sum(skipped.values()):,} values of {', '.join(sorted(skipped))}")
summaries = nbk.run_jobs(cfg, spark, store)

# %% [markdown]
# ## 2. Where every record went: silver, or quarantine with a reason
# Each record's RecordID is its MRN in `silver.patients`; each measurement is an observation in silver or a row
# in `silver.quarantine` saying why not.

# %%
from pyspark.sql import functions as F

patients = store.read("silver.patients").where(F.col("mrn").isNotNull()).select("mrn").distinct().count()
stays = store.read("silver.encounters").where(F.col("patient_key").isNotNull()).select("patient_key").distinct().count()
observations = store.read("silver.observations").count()
reasons = (store.read("silver.quarantine").where(F.col("feed") == "devices").groupBy("reason").count()
           .orderBy(F.desc("count")).toPandas())
print(f"records: {len(records):,} imported -> {patients:,} patients with their RecordID as MRN, {stays:,} ICU "
      f"encounters; {observations:,} observations in silver, {int(reasons['count'].sum()):,} readings quarantined:")
display(reasons)

# %% [markdown]
# ## 3. Cross-validated mortality model vs SAPS-I, SOFA and max NEWS2
# Every stay is predicted by a model that never saw it (stratified k-fold); baselines go through the same folds.
# 95 % intervals are bootstraps over stays. The model is registered only if its AUROC minus SAPS-I's has an
# interval above zero and its Event 1 is no worse than SAPS-I's.

# %%
from pipelines.training import mortality_frame, print_mortality, train_mortality

result, tracking_uri = train_mortality(cfg, store, folds=FOLDS)
print_mortality(result, tracking_uri)

# %%
m = result.metrics
names = {"model": "carelake model", "saps_i": "SAPS-I", "sofa": "SOFA", "max_news2": "max NEWS2 (carelake)"}
challenge = pd.DataFrame([{"predictor": label, "AUROC": m[f"{who}_auroc"],
                           "AUROC 95% CI": f"{m[f'{who}_auroc_ci_low']:.3f}-{m[f'{who}_auroc_ci_high']:.3f}",
                           "Event 1": m[f"{who}_event1"], "H (Hosmer-Lemeshow)": m[f"{who}_hosmer_lemeshow_h"],
                           "Brier": m[f"{who}_brier"]} for who, label in names.items()])
display(challenge.round(3))
print(f"published Event 1 (hidden set C): 2012 winner 0.535, SAPS-I 0.313; here ({result.counts['stays']:,} stays "
      f"of set-a, {FOLDS}-fold): model {m['model_event1']:.3f}, SAPS-I {m['saps_i_event1']:.3f}")

# %% [markdown]
# ## 4. Calibration
# The out-of-fold probabilities again (same frame, same seed and folds as the run above: checked by its
# AUROC); the baselines' scores are mapped to probabilities by a logistic fit on the training folds.

# %%
from sklearn.calibration import calibration_curve
from sklearn.metrics import roc_auc_score

from models.mortality import LABEL, cross_validate

frame = mortality_frame(cfg, store)
oof = cross_validate(frame, seed=cfg.models.seed, folds=FOLDS, bootstraps=20)  # intervals are not needed here
y = frame[LABEL].to_numpy()
again = roc_auc_score(y, oof.probability["model"])
assert abs(again - m["model_auroc"]) < 1e-9, f"out-of-fold predictions differ from the run's: {again}"
bins = int(min(10, max(2, y.sum() // 5)))
fig, ax = plt.subplots(figsize=(5.5, 5))
for who, label in names.items():
    observed, predicted = calibration_curve(y, oof.probability[who], n_bins=bins, strategy="quantile")
    ax.plot(predicted, observed, "o-", ms=3, label=f"{label} (H {m[f'{who}_hosmer_lemeshow_h']:.1f})")
ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
ax.set(xlabel="predicted probability of in-hospital death", ylabel="observed share who died",
       title=f"Calibration, out-of-fold ({bins} risk quantiles)")
ax.legend(fontsize=8)
plt.show()
print(f"{len(y):,} stays, {int(y.sum()):,} deaths ({y.mean():.1%}); AUROC recomputed {again:.3f}")

# %% [markdown]
# ## 5. Reading these figures
# - A sample of set-a is not the Challenge's hidden test set: compare the ranking of the predictors, not the
#   third decimal. Set `SAMPLE = 4000` for the whole training set (minutes on a laptop; the pipeline is the
#   same).
# - SAPS-I and SOFA were computed by clinicians' systems from the whole first day; max NEWS2 is what carelake
#   computed from the vital signs alone.
# - MLflow holds the run (params, metrics, the model): `.venv/bin/mlflow ui --backend-store-uri <tracking URI>`.

# %%
print(f"MLflow run {result.run_id} at {tracking_uri}")
print(f"registered carelake-mortality v{result.version} as champion" if result.champion else
      "not registered: the model did not beat SAPS-I by the rule above")
