"""Every real X12 and claims file, and the simulator's claims, through `carelake ingest` + `carelake run all`: each
file lands in bronze.claim_files once, each ends in silver or in quarantine with a reason, and a replay (the run
again, and the same files landed a second time) changes nothing in silver."""

from __future__ import annotations

import json

import pytest

from tests.test_cli import run_cli

CLAIMS_JOBS = ("bronze.claim_files", "silver.claims")
_OUTCOMES = (
    "select 'files' as what, feed as k, count(*) as n from bronze.claim_files group by feed "
    "union all select 'claims', source_format, count(*) from silver.claims group by source_format "
    "union all select 'claims:void', status, count(*) from silver.claims where status = 'void' group by status "
    "union all select 'claims:part2', cast(part2 as string), count(*) from silver.claims where part2 group by part2 "
    "union all select 'lines', line_status, count(*) from silver.claim_lines group by line_status "
    "union all select 'members', member_system, count(*) from silver.members group by member_system "
    "union all select 'providers', 'all', count(*) from silver.providers "
    "union all select 'quarantine', reason, count(*) from silver.quarantine group by reason "
    "order by what, k")


def _sql(root, query: str) -> list[dict]:
    out = run_cli(root, "sql", query, "--format", "json").stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def _files_without_outcome(root) -> list[str]:
    """bronze.claim_files rows that no silver row and no quarantine row points at, and whose claims and members are
    not in silver either (a file superseded by a newer one about the same claims or people: a Blue Button EOB of a
    RIF claim, a later beneficiary extract)."""
    from pipelines.secrets import key_secret
    from pipelines.store.deltars import DeltaRsStore
    from silver.claim_docs import ClaimDoc, Enrollment
    from silver.claims import Settings, claim_key, member_key, read_file
    from tests.conftest import make_config

    cfg = make_config(root)
    store, secret = DeltaRsStore(cfg), key_secret(cfg)
    stored = {t: set(store.read_arrow(t).column(k).to_pylist()) for t, k in (("silver.claims", "claim_key"),
                                                                             ("silver.members", "member_key"))}
    settings = Settings(cfg.claims.x12_versions, cfg.claims.x12_validation, None)
    missing = []
    for r in _unpointed(root):
        docs = list(read_file(r, open(r["landing_file"].removeprefix("file:"), "rb").read(), settings))
        found = [claim_key(secret, d) in stored["silver.claims"] if isinstance(d, ClaimDoc) else
                 member_key(secret, d.member) in stored["silver.members"] if isinstance(d, Enrollment) else False
                 for d in docs]
        if not found or not all(found):
            missing.append(r["landing_file"])
    return missing


def _unpointed(root) -> list[dict]:
    points = " and ".join(f"not exists (select 1 from {t} x where x.{col} = b.landing_file)" for t, col in (
        ("silver.quarantine", "landing_file"), ("silver.claims", "source_record.landing_file"),
        ("silver.claim_lines", "source_record.landing_file"), ("silver.members", "source_record.landing_file")))
    return _sql(root, f"select b.landing_file, b.format, b.parse_detail from bronze.claim_files b where {points}")


def _silver(root) -> dict[str, list]:
    """The silver claims tables' business content (lineage and ingestion time left out)."""
    keep = {"silver.claims": "claim_key, status, frequency_code, billed_amount, paid_amount, line_count, part2",
            "silver.claim_lines": "claim_key, line_number, line_status, procedure_code, paid_amount",
            "silver.members": "member_key, member_id, birth_date, patient_key",
            "silver.providers": "provider_key, npi, name"}
    return {t: sorted(json.dumps(r, sort_keys=True) for r in _sql(root, f"select {cols} from {t}"))
            for t, cols in keep.items()}


@pytest.mark.slow
@pytest.mark.realdata
def test_real_claims_files_end_in_silver_or_quarantine_and_replay_changes_nothing(tmp_path, realdata):
    root = tmp_path / "lake"
    run_cli(root, "ingest", str(realdata / "x12"), "--feed", "x12")
    run_cli(root, "ingest", str(realdata / "claims"), "--feed", "claims")
    run_cli(root, "run", "all", "--available-now")
    outcomes = _sql(root, _OUTCOMES)
    print("outcomes:", json.dumps(outcomes))
    files = {r["k"]: r["n"] for r in outcomes if r["what"] == "files"}
    expected = {"x12": len([p for p in (realdata / "x12").rglob("*") if p.is_file()]),
                "claims": len([p for p in (realdata / "claims").rglob("*") if p.is_file()])}
    assert files == expected
    assert _files_without_outcome(root) == []
    got = {(r["what"], r["k"]): r["n"] for r in outcomes}
    assert got[("quarantine", "x12_unsupported_version")] == 1  # the 4010 837I
    assert got[("quarantine", "x12_unsupported_transaction")] == 4  # 834s and their 999s
    assert got[("quarantine", "x12_interchange_error")] == 4  # the cut 999 files (no IEA)
    assert got[("quarantine", "unrecognized_format")] == 1  # export_summary.csv
    assert got[("claims", "x12-837P")] == 2 and got[("claims", "rif-carrier")] >= 37
    assert got[("claims:part2", "true")] >= 1  # the SAMHSA sample's H0005.. lines
    before = _silver(root)

    run_cli(root, "run", "all", "--available-now")
    run_cli(root, "ingest", str(realdata / "x12"), "--feed", "x12")
    run_cli(root, "ingest", str(realdata / "claims"), "--feed", "claims")
    run_cli(root, "run", *CLAIMS_JOBS, "--available-now")
    assert _silver(root) == before


RULE_OF = {"duplicate_billing": "duplicate", "unbundling": "unbundling", "impossible_volume": "impossible_volume"}


@pytest.mark.slow
def test_the_simulators_claims_ingest_with_one_row_per_claim_and_the_rules_find_their_patterns(tmp_path):
    import csv

    sim, root = tmp_path / "sim", tmp_path / "lake"
    # Upcoding is judged per provider against its peers: 40 patients give its one upcoder too few lines to be judged
    # (the demo's 120 do), so none is injected here and no clean claim shares an upcoder's flag.
    rates = [x for p in ("duplicate_billing", "unbundling", "impossible_volume") for x in
             ("--set", f"simulator.fraud.{p}=0.2")] + ["--set", "simulator.fraud.upcoding=0"]
    run_cli(root, *rates, "simulate", "--out", str(sim), "--patients", "40", "--hours", "48", "--feeds", "claims")
    counts = json.loads((sim / "manifest.json").read_text())["counts"]["claims"]
    run_cli(root, "ingest", str(sim / "claims"), "--feed", "claims")
    run_cli(root, "run", *CLAIMS_JOBS, "gold.claims_fraud_scores", "--available-now")
    (row,) = _sql(root, "select (select count(*) from silver.claims) as claims, (select count(*) from "
                        "silver.claim_lines where line_status = 'active') as lines, (select count(*) from "
                        "silver.quarantine) as quarantined, (select count(*) from silver.claims where patient_key "
                        "is null or paid_amount is null) as unlinked")
    assert row == {"claims": counts["claims"], "lines": counts["claim_lines"], "quarantined": 0, "unlinked": 0}
    found = {r["claim_id"]: set(r["codes"]) for r in _sql(root, "select claim_id, transform(coalesce(reasons, "
                                                                 "array()), r -> r.code) as codes from "
                                                                 "gold.claims_fraud_scores")}
    assert len(found) == counts["claims"]
    labelled: dict[str, set[str]] = {}
    with open(sim / "truth" / "fraud_labels.csv", newline="") as fh:
        for label in csv.DictReader(fh):
            labelled.setdefault(label["claim_id"], set()).add(label["pattern"])
    recall = {}
    for pattern, code in RULE_OF.items():
        claims = [c for c, patterns in labelled.items() if pattern in patterns]
        recall[pattern] = (sum(code in found[c] for c in claims), len(claims))
    clean = [c for c in found if c not in labelled]
    false_positive = sum(bool(found[c]) for c in clean)
    print("recall per pattern (found, labelled):", recall, "false positives:", false_positive, "of", len(clean))
    assert all(n > 0 and hit == n for hit, n in recall.values()), recall
    # A clean claim is flagged only beside a labelled one: it shares the provider-day whose timed minutes are
    # impossible in sum (the rule names every claim of that day, for the analyst to look at together).
    assert all(found[c] <= {"impossible_volume"} for c in clean if found[c])
    assert false_positive <= len(clean) // 5
