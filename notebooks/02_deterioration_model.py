# %% [markdown]
# # 02 · A deterioration model, judged against NEWS2
#
# A small simulated hospital goes through the whole pipeline (HL7 v2, FHIR and bedside monitors -> landing ->
# bronze -> silver -> gold scores and features), then a model is trained to foresee deterioration within the
# horizon (`models.horizon`) and compared with the rule wards use today, **NEWS2 >= 5**, on held-out patients:
# AUROC with a patient-bootstrap 95 % interval, patients alerted in time, alert burden, PPV. The model becomes the
# registered champion only if the AUROC difference's interval lies above zero **and** it alerts in time for no
# fewer deteriorating patients at the same alert burden; otherwise NEWS2 stays the alerting rule. Every run is
# tracked in MLflow with its model card.
#
# The figures below describe the **simulator**, not a hospital: read them as a check of the method, not as
# evidence for clinical use. Calls are the CLI's own: `carelake simulate`, `ingest`, `run all --available-now`,
# `train deterioration` (`pipelines.training.train_deterioration`).

# %% tags=["parameters"]
ROOT = None  # a lakehouse with its simulation (e.g. "../demo-lakehouse"); built there if it holds no tables; None = new
ENV = "local"  # configuration overlay (conf/<ENV>.yaml)
PATIENTS = 50  # people in the simulated hospital built when ROOT holds no tables
HOURS = 20  # simulated window in hours
SEED = 7  # same seed, same hospital
SETTINGS = {"simulator.icu_cadence_min_s": 30, "simulator.icu_cadence_max_s": 60,  # monitors every 30-60 s
            "imaging.clock": "data"}  # imaging waits on the simulated day's clock

# %%
import os
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import mlflow
import pandas as pd
from IPython.display import Markdown, display

from models.deterioration import LABEL, split_patients
from pipelines import notebooks as nbk
from pipelines.report import comparison
from pipelines.training import deterioration_frame, print_training, train_deterioration

pd.set_option("display.width", 160)
pd.set_option("display.max_columns", 12)
plt.rcParams.update({"figure.dpi": 72})
os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"

cfg, spark, store, simulation = nbk.lakehouse(ROOT, ENV, SETTINGS, patients=PATIENTS, hours=HOURS, seed=SEED)
print(f"horizon {cfg.models.horizon}, test fraction {cfg.models.test_fraction}, seed {cfg.models.seed}")

# %% [markdown]
# ## 1. The hospital and its ground truth
# A lakehouse built here went through every job, available-now (`nbk.lakehouse`: simulate, ingest, run all). The
# simulator keeps its ground truth apart (`truth/`); the pipeline never sees it. The labels for training come from
# `truth/deteriorations.csv` (who deteriorates, and when the event peaks).

# %%
labels_path = nbk.truth_file(simulation, "deteriorations.csv", cfg.root)
truth = pd.read_csv(labels_path)
patients = store.read_arrow("silver.patients", columns=["patient_key"]).num_rows
kinds = ", ".join(f"{kind} {n}" for kind, n in truth["kind"].value_counts().items())
print(f"ground truth: {len(truth)} deterioration(s) among {patients} patient record(s) ({kinds}); the model's "
      f"event is the {cfg.models.label_event} column")

# %% [markdown]
# ## 2. Train, evaluate on held-out patients, decide
# `train_deterioration` is `carelake train deterioration`: a patient split, a gradient-boosted model on the
# gold features, its alert threshold set for NEWS2 >= 5's alert burden on the training patients, both judged on
# the held-out patients, and one MLflow run (registered as champion only if it earns it).

# %%
result, tracking_uri = train_deterioration(cfg, store, labels_path)
print_training(result, cfg.models.alert_rate_per_100_patient_days, tracking_uri)

# %%
m = result.metrics
table = comparison(result)
table["95% CI (model)"] = ["{:.3f}-{:.3f}".format(m["model_auroc_ci_low"], m["model_auroc_ci_high"])] + [""] * 5
table["95% CI (NEWS2)"] = ["{:.3f}-{:.3f}".format(m["news2_auroc_ci_low"], m["news2_auroc_ci_high"])] + [""] * 5
display(table.round(3))
print(f"AUROC difference (model - NEWS2): {m['model_auroc'] - m['news2_auroc']:+.3f}, 95% CI "
      f"{m['model_minus_news2_auroc_ci_low']:+.3f} to {m['model_minus_news2_auroc_ci_high']:+.3f}")
print(f"Decision: {result.decision}")
print("NEWS2 >= 5 stays the alerting rule." if not result.champion else
      f"Registered carelake-deterioration version {result.version} under the alias 'champion'.")

# %% [markdown]
# ## 3. The model card, as logged with the run in MLflow
# Read back from the tracking store, the way a reviewer would find it.

# %%
client = mlflow.MlflowClient(tracking_uri=tracking_uri)
card = Path(client.download_artifacts(result.run_id, "model_card.md", tempfile.mkdtemp())).read_text()
display(Markdown(card))

# %% [markdown]
# ## 4. ROC and calibration on the held-out patients
# The ROC curves are the ones logged with the run. For calibration the logged model scores the held-out
# patients again: the same frame and the same patient split as training (checked: the AUROC must match).

# %%
frame, _ = deterioration_frame(cfg, store, labels_path)
held_out = frame[split_patients(frame, cfg.models.test_fraction, cfg.models.seed)].reset_index(drop=True)
model = mlflow.sklearn.load_model(client.download_artifacts(result.run_id, "model", tempfile.mkdtemp()))
risk = model.predict_proba(held_out[list(result.feature_names)].astype("float64"))[:, 1]

from sklearn.calibration import calibration_curve
from sklearn.metrics import roc_auc_score

again = roc_auc_score(held_out[LABEL], risk)
assert abs(again - m["model_auroc"]) < 1e-9, f"held-out set differs from training's: {again} vs {m['model_auroc']}"
print(f"held-out points {len(held_out):,}, patients {held_out['patient_key'].nunique()}, "
      f"positive points {int(held_out[LABEL].sum()):,}; AUROC recomputed {again:.3f} (logged {m['model_auroc']:.3f})")

fig, (roc_ax, cal_ax) = plt.subplots(1, 2, figsize=(10, 4.5))
for who, name in (("model", "model"), ("news2", "NEWS2")):
    curve = result.roc[who]
    step = max(1, len(curve["fpr"]) // 200)  # at most ~200 points per curve: the committed notebook stays small
    roc_ax.plot(curve["fpr"][::step] + curve["fpr"][-1:], curve["tpr"][::step] + curve["tpr"][-1:],
                label=f"{name} (AUROC {m[f'{who}_auroc']:.3f})")
roc_ax.plot([0, 1], [0, 1], ":", color="grey")
roc_ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC, held-out patients")
roc_ax.legend(loc="lower right")
bins = min(10, max(2, int(held_out[LABEL].sum()) // 5))
observed, predicted = calibration_curve(held_out[LABEL], risk, n_bins=bins, strategy="quantile")
cal_ax.plot(predicted, observed, "o-", label=f"model ({bins} risk quantiles)")
cal_ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
cal_ax.axvline(result.threshold, color="#c0392b", lw=0.8, label=f"alert threshold {result.threshold:.3f}")
cal_ax.set(xlabel="predicted risk", ylabel="observed share with an event within the horizon",
           title="Calibration, held-out points")
cal_ax.legend(loc="upper left", fontsize=8)
plt.show()

# %% [markdown]
# ## 5. What to take from this
# - The decision above is the project's rule, not a judgement call: a model that does not beat NEWS2 with an
#   interval above zero, at no loss of patients caught, is logged and left unregistered.
# - With few deteriorating patients held out the intervals are wide; simulate more patients (`PATIENTS`) for
#   tighter ones, and see the model card's limits before reading anything clinical into these numbers.
# - Browse the runs: `.venv/bin/mlflow ui --backend-store-uri <tracking URI above>`.
