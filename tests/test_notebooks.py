"""Notebooks execute: their scripts run in-process with tiny parameters (joining the session's SparkSession), and
`./dev notebooks` runs them on a kernel of this interpreter, writing .ipynb files with outputs."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import pytest

from pipelines.errors import UsageError
from pipelines.notebooks import (
    FOLDER,
    NotebookFailed,
    execute,
    notebook_paths,
    parse_setting,
    read,
    run_in_process,
    tidy,
    with_parameters,
)

TOUR, MODEL, MORTALITY, AUDIT, IMAGING, CLAIMS = (FOLDER / f"{n}.py" for n in (
    "01_lakehouse_tour", "02_deterioration_model", "03_icu_mortality_physionet2012", "04_audit_time_travel",
    "05_imaging_worklist", "06_claims_fraud"))
# One hospital for every notebook, small enough for the suite: enough deteriorations for a patient split to hold
# both outcomes, fraud common enough for a provider split, a lighter imaging day.
FRAUD = ("duplicate_billing", "upcoding", "unbundling", "phantom_services", "impossible_volume")
TINY_HOSPITAL = {"ENV": "test", "PATIENTS": 24, "HOURS": 8, "SEED": 7,
                 "SETTINGS": {"simulator.icu_cadence_min_s": 60, "simulator.icu_cadence_max_s": 60,
                              "simulator.deterioration_fraction": 0.45, "simulator.ed_imaging_per_day": 40,
                              "simulator.outpatient_imaging_per_day": 20, "imaging.clock": "data",
                              **{f"simulator.fraud.{p}": 0.1 for p in FRAUD}}}


def _run(path: Path, params: dict) -> tuple[dict, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        namespace = run_in_process(path, params)
    return namespace, out.getvalue()


# -- parameters and selection ------------------------------------------------------------------------------------
def test_every_notebook_has_a_parameters_cell_and_overrides_land_after_it():
    assert [p.stem for p in notebook_paths()] == [p.stem for p in (TOUR, MODEL, MORTALITY, AUDIT, IMAGING, CLAIMS)]
    nb = with_parameters(read(MODEL), {"PATIENTS": 3, "ROOT": "/tmp/x"})
    first = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    injected = nb.cells[first + 1]
    assert injected.metadata["tags"] == ["injected-parameters"]
    assert "PATIENTS = 3" in injected.source and "ROOT = '/tmp/x'" in injected.source


def test_unknown_parameter_and_unknown_notebook_are_named():
    with pytest.raises(UsageError, match=r"unknown notebook parameter\(s\) \['PATIENT'\]: this notebook takes "
                                         r"ROOT, ENV, PATIENTS, HOURS, SEED, SETTINGS"):
        with_parameters(read(MODEL), {"PATIENT": 3})
    with pytest.raises(UsageError, match="no notebook '07': choose from 01_lakehouse_tour, 02_deterioration_model"):
        notebook_paths(["07"])
    assert notebook_paths(["03", "01_lakehouse_tour"]) == [MORTALITY, TOUR]


def test_settings_are_python_literals_or_words():
    assert parse_setting("PATIENTS=40") == ("PATIENTS", 40)
    assert parse_setting("ROOT=/tmp/lake") == ("ROOT", "/tmp/lake")
    assert parse_setting("SETTINGS={'a': 1}") == ("SETTINGS", {"a": 1})
    with pytest.raises(UsageError, match="--set expects NAME=VALUE"):
        parse_setting("PATIENTS")


def test_mortality_notebook_says_its_data_is_absent_and_stops(tmp_path):
    namespace, out = _run(MORTALITY, {"DATA": str(tmp_path / "nowhere")})
    assert namespace["stopped"] == out.strip()
    assert f"not found at {tmp_path / 'nowhere'}: set DATA to the folder holding set-a/ and Outcomes-a.txt" in out
    assert "spark" not in namespace  # it stopped before starting anything


def test_tidy_drops_the_jvm_log_lines_and_keeps_carelake_messages():
    import nbformat

    cell = nbformat.v4.new_code_cell("run()")
    cell.outputs = [
        nbformat.v4.new_output("stream", name="stderr", text="WARNING: Using incubator modules: jdk.incubator\n"),
        nbformat.v4.new_output("stream", name="stderr", text="08:31:16 WARN BlockManager: Block rdd_21_0 exists\n"
                               "silver.encounters: data quality warning: dq_x\n08:31:17 ERROR Executor: lost\n"),
        nbformat.v4.new_output("stream", name="stdout", text="08:31:18 WARN kept on stdout\n")]
    nb = tidy(nbformat.v4.new_notebook(cells=[cell]))
    assert [(o["name"], o["text"]) for o in nb.cells[0].outputs] == [
        ("stderr", "silver.encounters: data quality warning: dq_x\n08:31:17 ERROR Executor: lost\n"),
        ("stdout", "08:31:18 WARN kept on stdout\n")]


# -- on a Jupyter kernel ------------------------------------------------------------------------------------------
SCRIPT = '''# %% [markdown]
# A tiny notebook.

# %% tags=["parameters"]
WHAT = "nothing"

# %%
import sys
print(sys.executable, WHAT)

# %%
from pipelines.notebooks import NotebookStop
if WHAT == "stop":
    raise NotebookStop("the data is absent: set WHAT")
raise ValueError("boom")

# %%
print("after")
'''


@pytest.mark.slow
def test_kernel_is_this_interpreter_and_a_stop_ends_the_run_cleanly(tmp_path):
    script = tmp_path / "09_tiny.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out" / "09_tiny.ipynb"
    assert execute(script, out, {"WHAT": "stop"}) == "the data is absent: set WHAT"
    nb = json.loads(out.read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert "".join(code[2]["outputs"][0]["text"]) == f"{sys.executable} stop\n"  # the project's .venv Python
    stop = [(o["name"], "".join(o["text"])) for o in code[3]["outputs"]]
    assert stop == [("stdout", "the data is absent: set WHAT\n")]
    assert code[4]["outputs"] == [] and code[4]["execution_count"] is None  # never ran

    with pytest.raises(NotebookFailed, match=r"09_tiny.py, cell \d+: ValueError: boom"):
        execute(script, tmp_path / "out" / "failed.ipynb")


# -- the notebooks themselves, on one tiny lakehouse ---------------------------------------------------------------
@pytest.fixture(scope="module")
def lake(spark, tmp_path_factory):
    """The hospital every notebook reads: simulated, landed in two arrivals and run through every job, once."""
    from pipelines import notebooks as nbk

    root = tmp_path_factory.mktemp("nb-lake") / "lake"
    with contextlib.redirect_stdout(io.StringIO()):
        nbk.lakehouse(root, "test", TINY_HOSPITAL["SETTINGS"], patients=TINY_HOSPITAL["PATIENTS"],
                      hours=TINY_HOSPITAL["HOURS"], seed=TINY_HOSPITAL["SEED"], arrivals=1)  # one run of the jobs
    return {**TINY_HOSPITAL, "ROOT": str(root)}


@pytest.fixture(scope="module")
def model_run(lake):
    namespace, out = _run(MODEL, lake)
    return Path(lake["ROOT"]), namespace, out


@pytest.mark.slow
def test_deterioration_notebook_trains_decides_and_shows_the_card(model_run):
    root, ns, out = model_run
    result = ns["result"]
    assert "stopped" not in ns
    assert f"lakehouse at {root} (engine delta-rs, as found)" in out
    assert f"{len(ns['truth'])} deterioration(s) among" in out and len(ns["truth"]) > 0
    assert f"Decision: {result.decision}" in out
    assert result.decision.startswith(("champion: AUROC difference", "not champion: AUROC difference"))
    assert ("NEWS2 >= 5 stays the alerting rule." in out) != result.champion
    m = result.metrics
    assert (f"AUROC difference (model - NEWS2): {m['model_auroc'] - m['news2_auroc']:+.3f}, 95% CI "
            f"{m['model_minus_news2_auroc_ci_low']:+.3f} to {m['model_minus_news2_auroc_ci_high']:+.3f}") in out
    # the card shown is the one MLflow holds for the run, with the decision in it
    assert ns["card"] == result.card and f"## Decision\n{result.decision}." in ns["card"]
    assert f"AUROC recomputed {m['model_auroc']:.3f} (logged {m['model_auroc']:.3f})" in out
    table = ns["table"]
    assert list(table["held-out patients"])[:2] == ["AUROC", "AUPRC"]
    assert table.loc[0, "95% CI (model)"] == f"{m['model_auroc_ci_low']:.3f}-{m['model_auroc_ci_high']:.3f}"
    assert ns["held_out"]["patient_key"].nunique() == result.counts["test_patients"]


@pytest.mark.slow
def test_tour_notebook_reads_layers_travels_in_time_and_traces_a_score(lake):
    ns, out = _run(TOUR, lake)
    tables = set(ns["tables"]["name"])
    assert {"bronze.hl7_messages", "silver.observations", "silver.quarantine", "gold.early_warning_scores",
            "gold.imaging_worklist", "gold.claims_fraud_scores"} <= tables  # every feed went through
    as_of = ns["as_of"]
    assert as_of["version"].tolist() == ns["earlier"] and as_of["score rows"].iloc[0] <= as_of["score rows"].iloc[-1]
    row, inputs = ns["row"], ns["inputs"]
    assert len(inputs) == len(row["input_observation_ids"]) > 0  # every input found in the version it read
    assert f"{len(inputs)} of its {len(inputs)} input observation(s) found in that version" in out
    assert ns["chain"]["verdict"] == "verified" and "audit explain " in out and ": verified" in out
    assert row["patient_key"] not in out  # pseudonymous keys are shortened in what is shown


@pytest.mark.slow
def test_audit_notebook_answers_as_of_explains_an_alert_diffs_and_restores_a_copy(lake):
    from pipelines.store.deltars import DeltaRsStore
    from tests.conftest import make_config

    live = DeltaRsStore(make_config(Path(lake["ROOT"])))
    alerts_version = live.version("gold.deterioration_alerts")
    ns, out = _run(AUDIT, lake)
    assert "stopped" not in ns
    alert, chain = ns["alert"], ns["chain"]
    assert chain["verdict"] == "verified" and chain["alert"]["alert_id"] == alert["alert_id"]
    assert f"verdict: verified; model version: {ns['model']}" in out
    assert len(chain["observations"]) > 0 and all(o["landing"]["status"] == "verified" for o in chain["observations"])
    # as of each commit: the versions in order, and the alert's own version read as it was then
    assert ns["known"]["version"].tolist() == sorted(ns["known"]["version"].tolist())
    assert f"when the alert was raised (gold.early_warning_scores v{ns['then']}, committed" in out
    summary = ns["changes"].summary()
    assert f"v{ns['since']} -> v{live.version('gold.early_warning_scores')} by patient_key" in out
    assert len(ns["listed"]) == summary["added"] + summary["changed"] + summary["removed"]
    # the restore: a commit with the reason, one allowed audit row, the alert gone from the copy, the lake untouched
    assert ns["restore_commit"].metadata["carelake.reason"] == ns["REASON"]
    log = ns["log"]
    assert log[["action", "outcome"]].values.tolist() == [["restore", "allowed"]]
    assert ns["REASON"] in log["detail"].iloc[0]
    assert alert["alert_id"] not in ns["scratch"].read_arrow("gold.deterioration_alerts",
                                                            columns=["alert_id"]).column(0).to_pylist()
    assert ns["undone"]["removed"] >= 1
    assert live.version("gold.deterioration_alerts") == alerts_version and not live.exists("ops.audit_log")
    assert alert["patient_key"] not in out and alert["alert_id"] not in out


@pytest.mark.slow
def test_imaging_notebook_shows_the_worklist_the_model_and_the_replay(lake):
    ns, out = _run(IMAGING, lake)
    assert "stopped" not in ns
    snapshot = ns["snapshot"]
    assert len(snapshot) > 0 and snapshot["rank"].tolist() == sorted(snapshot["rank"].tolist())
    assert list(ns["points"].index) == [f"#{r}" for r in snapshot["rank"]]
    # each row's points add up to its score
    assert ns["points"].sum(axis=1).round(1).tolist() == snapshot["score"].round(1).tolist()
    result = ns["result"]
    if result is None:
        assert "critical-finding model not trained: the patient split left a set without both outcomes" in out
    else:
        assert f"held-out AUROC: model {result.metrics['model_auroc']:.3f}" in out
    table, figures = ns["table"], ns["figures"]
    assert set(table["policy"]) == {"FIFO", "order priority only", "carelake worklist"}
    assert len(table) == 3 * len(figures["loads"]) and figures["studies"][0] > 0
    assert f"{figures['studies'][0]} studies ({figures['critical_studies'][0]} with a critical finding)" in out


@pytest.mark.slow
def test_claims_notebook_flags_with_reasons_evaluates_trains_and_shows_provider_months(lake):
    ns, out = _run(CLAIMS, lake)
    assert "stopped" not in ns
    flagged = ns["flagged"]
    assert len(flagged) > 0 and all(len(r) > 0 for r in flagged["reasons"])
    report = ns["report"]
    assert "false-positive rate on clean claims: " in out
    assert set(report["patterns"]) == set(FRAUD) and report["clean"]["claims"] > 0
    assert sum(p["labelled"] for p in report["patterns"].values()) > 0
    result = ns["result"]
    if result is None:
        assert "claims model not trained: " in out
    else:
        m = result.metrics
        assert ns["comparison"].loc["AUPRC", "rules"] == round(m["rules_auprc"], 3)
        assert ("as champion: AUPRC difference" in out) == result.champion and result.decision in out
    risk = ns["risk"]
    assert len(risk) > 0 and risk["provider_npi"].nunique() == ns["scores"]["provider_npi"].nunique()
    assert not any(k in out for k in ns["scores"]["member_key"].dropna())  # member keys only shortened


@pytest.mark.slow
@pytest.mark.realdata
def test_mortality_notebook_on_a_sample_of_set_a(spark, realdata, tmp_path):
    ns, out = _run(MORTALITY, {"DATA": str(realdata / "physionet2012"), "SAMPLE": 30, "FOLDS": 3, "ENV": "test",
                               "ROOT": str(tmp_path / "lake")})
    assert "stopped" not in ns
    assert "imported 30 record(s): 60 FHIR resources" in out
    assert "records: 30 imported -> 30 patients with their RecordID as MRN" in out
    challenge = ns["challenge"].set_index("predictor")
    assert list(challenge.index) == ["carelake model", "SAPS-I", "SOFA", "max NEWS2 (carelake)"]
    m = ns["result"].metrics
    assert challenge.loc["SAPS-I", "Event 1"] == m["saps_i_event1"] and 0 <= m["saps_i_event1"] <= 1
    assert "in-hospital mortality, 3-fold cross-validation on 30 ICU stays" in out
    assert f"AUROC recomputed {m['model_auroc']:.3f}" in out
