"""How hard the simulator's deteriorations are to foresee: NEWS2 and a small model on simulated vital signs.

Simulates a population (the simulator's own census, schedules and trajectory expressions, no feed files), scores
NEWS2 with gold.news2 at every ward observation set and every 5 minutes of an ICU stay, labels each point as
models.deterioration does (the event is the deterioration's peak, within `--horizon-h`; points at or after it left
out) and reports, per seed: NEWS2's AUROC (aggregate score and the >= 5 trigger), the share of deteriorating patients
NEWS2 >= 5 alerts for in time, alert episodes per 100 patient-days, and a gradient-boosted model on the last values
and their 1 h / 4 h / 12 h changes (the signal gold.vitals_features carries) on a seeded patient-level split: its
AUROC, the AUROC difference's 95 % patient-bootstrap interval and its patients caught at NEWS2's alert burden.
Published NEWS/NEWS2 for ward deterioration: AUROC ~0.77 (Churpek 2017), 0.70-0.85 across studies.

Run: .venv/bin/python benchmarks/simulator_realism.py [--patients 600] [--hours 30] [--seeds 7,11,23]
Prints one JSON line: per-seed figures and their medians.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
from _common import emit, median, temp_config

HOUR = 3600
ICU_STEP_S = 300
WINDOWS_H = (1, 4, 12)
VITALS = ("hr", "rr", "spo2", "sbp", "temp", "fio2", "o2flow", "acvpu")


def points(spark, cfg, seed: int, patients: int, hours: int) -> pd.DataFrame:
    """One row per scoring point: visit_no, t, the vital signs, the peak time (NaN: no deterioration)."""
    from pipelines.simulator.clinical import WARD_KEYS
    from pipelines.simulator.observations import Draw, read_values, ward_rounds
    from pipelines.simulator.params import resolve_params
    from pipelines.simulator.population import build_census, person_draws

    params = resolve_params(cfg.simulator, cfg.root / f"sim-{seed}", patients=patients, hours=hours, seed=seed,
                            force=True)
    census = build_census([r.asDict() for r in person_draws(spark, params).collect()], params)
    draws = []
    for enc in census.active:
        draws += ward_rounds(enc, params)
        for stay in (s for s in enc.stays if s.icu):
            start, end = max(stay.start_s, 0), min(stay.end_s, params.window_s)
            draws += [Draw(enc.visit_no, t, "vitals", WARD_KEYS) for t in range(start, end, ICU_STEP_S)]
    values = read_values(spark, census, params, draws)
    peak = {e.visit_no: e.deterioration.peak_s for e in census.active if e.deterioration is not None}
    rows = [{"visit_no": v, "t": t, **vals, "peak_s": peak.get(v, np.nan)} for (v, t), vals in values.items()]
    return pd.DataFrame(rows).sort_values(["visit_no", "t"], kind="stable").reset_index(drop=True)


def score(frame: pd.DataFrame, horizon_h: float) -> pd.DataFrame:
    """NEWS2 (scale 1: the simulator records no hypercapnic target), trend features, the label; post-event cut."""
    from gold.news2 import news2_arrays, on_oxygen_array
    from pipelines.simulator.clinical import acvpu_letter

    f = frame.copy()
    on_o2 = on_oxygen_array(f["fio2"].to_numpy(), f["o2flow"].fillna(0).to_numpy())
    letters = np.array([acvpu_letter(a) for a in f["acvpu"]], dtype=object)
    f["news2_score"] = news2_arrays(f["rr"], f["spo2"], on_o2, f["sbp"], f["hr"], letters, f["temp"],
                                    np.zeros(len(f), bool))["news2_score"]
    for key in ("hr", "rr", "spo2", "sbp", "temp", "news2_score"):
        for w in WINDOWS_H:
            past = f[["visit_no", "t", key]].copy()
            past["t"] = past["t"] + w * HOUR
            got = pd.merge_asof(f[["t", "visit_no"]].reset_index().sort_values("t", kind="stable"),
                                past.sort_values("t", kind="stable"), on="t", by="visit_no",
                                direction="backward").set_index("index")[key]
            f[f"{key}_change_{w}h"] = f[key] - got.reindex(f.index)
    f = f[f["peak_s"].isna() | (f["t"] < f["peak_s"])].copy()
    f["label"] = ((f["peak_s"] - f["t"]) <= horizon_h * HOUR).astype("int8")
    f["patient_key"] = f["visit_no"].astype(str)
    f["scored_at"] = pd.to_datetime(f["t"], unit="s", utc=True).astype("datetime64[us, UTC]")
    f["onset_at"] = pd.to_datetime(f["peak_s"], unit="s", utc=True).astype("datetime64[us, UTC]")
    return f.sort_values(["patient_key", "scored_at"], kind="stable").reset_index(drop=True)


def figures(f: pd.DataFrame, seed: int) -> dict:
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import roc_auc_score

    from models.deterioration import MODEL_PARAMS, NEWS2_ALERT, Timeline, choose_threshold, evaluate

    y, news2 = f["label"].to_numpy(), f["news2_score"].to_numpy()
    out = {"points": len(f), "positive_points": int(y.sum()),
           "deteriorating_patients": int(f.loc[y == 1, "patient_key"].nunique()),
           "patients": int(f["patient_key"].nunique()),
           "news2_auroc": round(float(roc_auc_score(y, news2)), 3),
           "news2_ge5_auroc": round(float(roc_auc_score(y, news2 >= NEWS2_ALERT)), 3),
           "share_of_negative_points_news2_ge5": round(float((news2[y == 0] >= NEWS2_ALERT).mean()), 3)}
    patients = np.array(sorted(f["patient_key"].unique()))
    positive = set(f.loc[y == 1, "patient_key"])
    rng = np.random.default_rng(seed)
    test = set()
    for group in (sorted(positive), sorted(set(patients) - positive)):
        test |= set(rng.permutation(np.array(group, dtype=object))[:round(0.3 * len(group))])
    is_test = f["patient_key"].isin(test).to_numpy()
    features = [c for c in f.columns if c.endswith("h") and "_change_" in c] + [*VITALS[:5], "news2_score"]
    train, held = f[~is_test], f[is_test].reset_index(drop=True)
    model = HistGradientBoostingClassifier(**MODEL_PARAMS, random_state=seed).fit(train[features], train["label"])
    risk_train = model.predict_proba(train[features])[:, 1]
    risk = model.predict_proba(held[features])[:, 1]
    burden = Timeline(train.reset_index(drop=True)).rate(train["news2_score"].to_numpy() >= NEWS2_ALERT)
    threshold = choose_threshold(train.reset_index(drop=True), risk_train, burden)
    n = evaluate(held, held["news2_score"].to_numpy(), held["news2_score"].to_numpy() >= NEWS2_ALERT, "news2")
    m = evaluate(held, risk, risk >= threshold, "model")
    diffs = []
    keys = held["patient_key"].to_numpy()
    by = {k: np.flatnonzero(keys == k) for k in np.unique(keys)}
    names = np.array(list(by))
    for _ in range(200):
        idx = np.concatenate([by[k] for k in rng.choice(names, len(names))])
        yy = held["label"].to_numpy()[idx]
        if 0 < yy.sum() < len(yy):
            diffs.append(roc_auc_score(yy, risk[idx]) - roc_auc_score(yy, held["news2_score"].to_numpy()[idx]))
    out.update({
        "test_news2_auroc": round(n["news2_auroc"], 3), "test_model_auroc": round(m["model_auroc"], 3),
        "auroc_difference_ci95": [round(float(np.quantile(diffs, q)), 3) for q in (0.025, 0.975)],
        "test_news2_patients_caught": round(n["news2_detected_fraction"], 3),
        "test_model_patients_caught": round(m["model_detected_fraction"], 3),
        "test_news2_alerts_per_100_patient_days": round(n["news2_alerts_per_100_patient_days"], 1),
        "test_model_alerts_per_100_patient_days": round(m["model_alerts_per_100_patient_days"], 1),
        "test_deteriorating_patients": int(held.loc[held["label"] == 1, "patient_key"].nunique()),
    })
    return out


def main() -> None:
    import os

    from pipelines.spark import create_spark

    ap = argparse.ArgumentParser()
    ap.add_argument("--patients", type=int, default=600)
    ap.add_argument("--hours", type=int, default=30)
    ap.add_argument("--seeds", default="7,11,23")
    ap.add_argument("--horizon-h", type=float, default=12.0)
    a = ap.parse_args()
    cfg = temp_config()
    spark = create_spark(cfg.spark)
    runs = {}
    started = time.monotonic()
    for seed in (int(s) for s in a.seeds.split(",")):
        runs[seed] = figures(score(points(spark, cfg, seed, a.patients, a.hours), a.horizon_h), seed)
    keys = [k for k, v in next(iter(runs.values())).items() if isinstance(v, float)]
    emit({"benchmark": "simulator_realism", "patients": a.patients, "hours": a.hours, "horizon_h": a.horizon_h,
          "seeds": runs, "median": {k: round(median([r[k] for r in runs.values()]), 3) for k in keys},
          "seconds": round(time.monotonic() - started, 1), "load_average": os.getloadavg()[0]})


if __name__ == "__main__":
    main()
