# %% [markdown]
# # 01 · A tour of a carelake lakehouse
#
# What a clinical data scientist does first: open a lakehouse, see its tables and their versions, read silver
# and gold (with Spark, and with Arrow when the data fits in memory), look at what quality checks quarantined,
# read a table **as it was** at an earlier version, and trace one early-warning score back to the silver
# observations it was computed from — and on to the bytes the hospital sent.
#
# Every cell calls the same functions as the `carelake` command line (`pipelines.config`, `pipelines.spark`,
# `pipelines.store`, `pipelines.runner`, `pipelines.audit`); nothing here re-implements the pipeline.
# Patient keys are pseudonyms (a keyed hash); they are shortened for display. No names or MRNs are shown.

# %% tags=["parameters"]
ROOT = None  # a lakehouse (e.g. "../demo-lakehouse" after `./dev demo`); built there if it holds no tables; None = new
ENV = "local"  # configuration overlay (conf/<ENV>.yaml)
PATIENTS = 40  # the small simulated hospital built when ROOT holds no tables ...
HOURS = 10  # ... its window in hours ...
SEED = 7  # ... and its seed (same seed, same hospital)
SETTINGS = {"simulator.icu_cadence_min_s": 30, "simulator.icu_cadence_max_s": 60,  # monitors every 30-60 s
            "imaging.clock": "data"}  # imaging waits on the simulated day's clock

# %%
import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import display
from pyspark.sql import functions as F

from pipelines import notebooks as nbk
from pipelines.notebooks import short

pd.set_option("display.max_rows", 30)
pd.set_option("display.width", 160)
pd.set_option("display.max_columns", 12)
plt.rcParams.update({"figure.dpi": 72, "figure.figsize": (7, 3)})


# A lakehouse built here: `carelake simulate` writes a seeded synthetic hospital (HL7 v2, FHIR, bedside monitors,
# DICOM, claims; fake names, ground truth kept apart), `carelake ingest` lands it in two arrivals, and
# `carelake run all --available-now` takes each through bronze, silver and gold.
cfg, spark, store, simulation = nbk.lakehouse(ROOT, ENV, SETTINGS, patients=PATIENTS, hours=HOURS, seed=SEED)

# %% [markdown]
# ## Tables and their versions
# Every table is a Delta table: each write is a new version, and the history says who wrote what.

# %%
tables = pd.DataFrame([vars(store.info(name)) for name in store.list_tables()])
display(tables[["name", "version", "rows", "last_commit", "last_operation"]])

# %%
SCORES, OBSERVATIONS, QUARANTINE = "gold.early_warning_scores", "silver.observations", "silver.quarantine"
history = pd.DataFrame([{"version": c.version, "at": c.timestamp, "operation": c.operation,
                         "job": c.metadata.get("carelake.job"),
                         "rows written": c.metrics.get("num_output_rows", c.metrics.get("num_added_rows"))}
                        for c in store.history(SCORES, limit=8)])
print(f"{SCORES}: the last {len(history)} commits")
display(history)

# %% [markdown]
# ## Silver with Spark
# `store.read` gives a Spark DataFrame (the engine reads the Delta files; Spark computes). Observations per
# scoring concept and source feed, in canonical UCUM units:

# %%
obs = store.read(OBSERVATIONS)
per_concept = (obs.groupBy("concept", "unit", "source_feed").agg(F.count("*").alias("observations"),
                                                                 F.round(F.avg("value"), 1).alias("mean_value"))
               .orderBy("concept", "source_feed"))
display(per_concept.toPandas())

# %% [markdown]
# ## Data quality: what silver refused, and why
# Nothing is dropped silently: a message or reading that fails validation lands in `silver.quarantine` with a
# reason code and a pointer to its bronze record.

# %%
quarantine = store.read(QUARANTINE).groupBy("source_table", "reason").count().orderBy(F.desc("count"))
display(quarantine.toPandas())

# %% [markdown]
# ## Gold with Arrow
# `store.read_arrow` reads a table (or some columns) straight into this process, no Spark needed: the right tool
# for a few hundred thousand rows and pandas.

# %%
scores = store.read_arrow(SCORES, columns=["patient_key", "scored_at", "news2_score", "news2_band",
                                           "news2_partial", "qsofa_score", "silver_version",
                                           "input_observation_ids"]).to_pandas()
print(f"{len(scores):,} score rows for {scores['patient_key'].nunique():,} patients; "
      f"{int(scores['news2_partial'].sum()):,} partial (an input missing or stale)")
bands = scores["news2_band"].value_counts().reindex(["low", "low-medium", "medium", "high"]).fillna(0).astype(int)
display(bands.rename("score rows").to_frame())
ax = bands.plot.bar(color=["#4c9a2a", "#c9a227", "#e07b00", "#c0392b"], rot=0, title="NEWS2 band of every score")
ax.set_ylabel("score rows")
plt.show()

# %% [markdown]
# ## Time travel: a table as of an earlier version
# Auditors ask "what did we know then?". Any version inside the retention window can be read back, with Spark
# (`store.read(name, version=v)`) or Arrow (`store.read_arrow(name, version=v)`).

# %%
now = store.version(SCORES)
earlier = list(range(max(0, now - 4), now + 1))
as_of = pd.DataFrame([{"version": v, "score rows": store.read(SCORES, version=v).count(),
                       "patients": len(store.read_arrow(SCORES, version=v, columns=["patient_key"])
                                       .column(0).unique())} for v in earlier])
print(f"{SCORES} at its last {len(earlier)} versions (the table grows as batches commit):")
display(as_of)

# %% [markdown]
# ## Lineage: one score row back to the silver observations it used
# Each score row carries the silver version it read and the ids of the observations it scored. Reading silver
# **as of that version** gives exactly the inputs, even if silver changed since (a correction, a merge).

# %%
row = scores.sort_values(["news2_score", "scored_at"], ascending=False).iloc[0]
print(f"score row: patient {short(row['patient_key'])} at {row['scored_at']}: NEWS2 {row['news2_score']} "
      f"({row['news2_band']}), computed from silver.observations v{row['silver_version']}")
inputs = (store.read(OBSERVATIONS, version=int(row["silver_version"]))
          .where(F.col("observation_id").isin(list(row["input_observation_ids"])))
          .select("concept", "value", "value_text", "unit", "effective_at", "source_feed",
                  F.col("source_record.table").alias("bronze_table"))
          .orderBy("concept").toPandas())
print(f"{len(inputs)} of its {len(row['input_observation_ids'])} input observation(s) found in that version:")
display(inputs)

# %% [markdown]
# And the whole chain, down to the landing file and the sha256 of the bytes received: the same function as
# `carelake audit explain PATIENT_KEY@SCORED_AT`.

# %%
import io

from pipelines.audit import Target, explain
from pipelines.audit_cli import write_explanation

chain = explain(store, cfg, Target(patient_key=row["patient_key"], scored_at=row["scored_at"].to_pydatetime()))
text = io.StringIO()
write_explanation(chain, text)
print(text.getvalue().replace(row["patient_key"], short(row["patient_key"])))
