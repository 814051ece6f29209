# %% [markdown]
# # 06 · Claims fraud: flagged claims that explain themselves, the model against the rules, providers over months
#
# `gold.claims_fraud_scores` gives every current claim a score, a band and **reason codes** a payment-integrity
# analyst can act on (duplicate of claim X, unbundling, impossible volume, upcoding against specialty peers, service
# after death, excluded provider, and the bill against the chart: services billed without a matching encounter,
# ICU stay or observations). This notebook shows the top flagged claims, the rules' recall per labelled fraud
# pattern and their false-positive rate (`carelake evaluate fraud`), a supervised model and an unsupervised detector
# judged against the rules on held-out providers (`carelake train fraud`, MLflow), and `gold.provider_risk`
# month by month.
#
# The labels are the **simulator**'s: the figures check the method, not a payer's real fraud rate. Members are
# pseudonymous keys (shortened); providers are shown by NPI, as payers publish them.

# %% tags=["parameters"]
ROOT = None  # a lakehouse with its simulation (e.g. "../demo-lakehouse"); built there if it holds no tables; None = new
ENV = "local"  # configuration overlay (conf/<ENV>.yaml)
PATIENTS = 40  # the simulated hospital built when ROOT holds no tables ...
HOURS = 10  # ... its window in hours ...
SEED = 7  # ... and its seed
SETTINGS = {"simulator.icu_cadence_min_s": 30, "simulator.icu_cadence_max_s": 60, "imaging.clock": "data",
            **{f"simulator.fraud.{p}": 0.08 for p in ("duplicate_billing", "upcoding", "unbundling",
                                                       "phantom_services", "impossible_volume")}}

# %%
import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import display

from gold.provider_risk import RISK
from pipelines import notebooks as nbk
from pipelines.errors import UsageError
from pipelines.training import (
    CLAIM_SCORES,
    evaluate_fraud,
    print_fraud_evaluation,
    print_fraud_training,
    train_fraud,
)

nbk.setup_display()
cfg, spark, store, simulation = nbk.lakehouse(ROOT, ENV, SETTINGS, patients=PATIENTS, hours=HOURS, seed=SEED)
labels = nbk.truth_file(simulation, "fraud_labels.csv", cfg.root)
nbk.require_table(store, CLAIM_SCORES, "the lakehouse has no claims (simulate with the claims feed, run every job)")

# %% [markdown]
# ## 1. The top flagged claims, with their reasons
# Each reason names the rule, what it found (in words an analyst can check against the claim) and the claim's
# lines that drive it.

# %%
scores = store.read_arrow(CLAIM_SCORES, columns=["claim_id", "provider_npi", "member_key", "service_from",
                                                 "billed_amount", "score", "band", "reasons",
                                                 "model_probability"]).to_pandas()
flagged = scores[scores["score"] > 0].sort_values(["score", "billed_amount"], ascending=False)
bands = scores["band"].value_counts().reindex(["none", "low", "medium", "high"]).fillna(0).astype(int)
print(f"{len(scores):,} scored claims, {len(flagged):,} flagged by at least one rule; bands: "
      f"{', '.join(f'{band} {n}' for band, n in bands.items())}")
display(pd.DataFrame({
    "claim": flagged["claim_id"], "provider NPI": flagged["provider_npi"],
    "member": flagged["member_key"].map(nbk.short), "from": flagged["service_from"],
    "billed": flagged["billed_amount"].astype(float).round(2), "score": flagged["score"], "band": flagged["band"],
    "reasons": flagged["reasons"].map(lambda rs: "; ".join(
        f"{r['code']}: {r['detail']} (lines {', '.join(str(n) for n in (() if r['lines'] is None else r['lines']))})"
        for r in rs)),
}).head(10))

# %% [markdown]
# ## 2. Recall per fraud pattern, and the false-positive rate on clean claims
# `evaluate_fraud` is `carelake evaluate fraud --labels truth/fraud_labels.csv`: for each labelled pattern, how many
# of its claims the pattern's own rule found and how many any rule flagged; on the clean claims, how many any rule
# flagged.

# %%
report = evaluate_fraud(cfg, store, labels)
print_fraud_evaluation(report)
recall = pd.DataFrame(report["patterns"]).T  # the table above, as a frame to work with

# %% [markdown]
# ## 3. The model against the rules, on held-out providers
# `train_fraud` is `carelake train fraud`: a gradient-boosted model on the rules' values and the claims'
# descriptors, and an unsupervised detector (no labels needed), both fitted on the training providers and judged on
# held-out providers' claims against the rules' score: AUROC, AUPRC and precision at the top 1 % and 5 % of claims
# reviewed. The model is registered as champion only if it beats the rules' AUPRC with the difference's 95 %
# interval (a bootstrap over held-out providers) above zero, on at least 20 held-out fraudulent claims.

# %%
try:
    result, tracking_uri = train_fraud(cfg, store, labels)
except UsageError as exc:  # too few fraudulent claims or providers for a provider split: said
    result = None
    print(f"claims model not trained: {exc}")
else:
    print_fraud_training(result, tracking_uri)
    m = result.metrics
    who = {"model": "model", "anomaly": "anomaly detector (no labels)", "rules": "rules"}
    keys = {"AUROC": "auroc", "AUPRC": "auprc", "precision, top 1 %": "precision_top_1pct",
            "precision, top 5 %": "precision_top_5pct"}
    comparison = pd.DataFrame({label: [m[f"{w}_{k}"] for k in keys.values()] for w, label in who.items()},
                              index=list(keys)).round(3)
    display(comparison)
    ax = comparison.T.plot.bar(rot=0, figsize=(8, 3.5), ylim=(0, 1.05), title="held-out providers' claims")
    ax.set_ylabel("metric")
    ax.legend(fontsize=7, loc="lower right")
    plt.show()

# %% [markdown]
# ## 4. Providers over months
# `gold.provider_risk`: per provider and calendar month, claims against the specialty peers' median, the share of
# claims the rules flagged (and the model, once a champion scores), and the change from the provider's previous
# month.

# %%
risk = store.read_arrow(RISK).to_pandas().sort_values(["provider_npi", "month"])
print(f"{RISK}: {len(risk):,} provider-month(s), {risk['provider_npi'].nunique()} providers, months "
      f"{', '.join(str(m) for m in sorted(risk['month'].unique()))}")
display(risk.sort_values("flagged_share", ascending=False).head(8)[
    ["provider_npi", "month", "peer_group", "claims", "claims_vs_peers", "flagged_share", "peer_flagged_share",
     "claims_change", "top_reasons"]].round(3))
top = risk.groupby("provider_npi")["flagged_claims"].sum().nlargest(5).index
trend = risk[risk["provider_npi"].isin(top)].pivot(index="month", columns="provider_npi", values="flagged_share")
ax = trend.plot(marker="o", figsize=(8, 3.5), title="share of claims flagged, the 5 providers flagged most")
ax.set_ylabel("flagged share")
ax.legend(fontsize=7, title="provider NPI")
plt.show()

# %% [markdown]
# ## What to take from this
# - A flagged claim carries its reasons: the analyst checks the rule's finding, not a bare score.
# - The model earns its place only by beating the rules' AUPRC on providers it never saw; otherwise the rules
#   stay what ranks claims for review. With a tiny simulation the held-out set is small: simulate more patients.
