"""Every real HL7 v2 and FHIR file through `carelake ingest` + `carelake run all`: each record ends in silver or
in quarantine with a reason, nothing crashes, and a second run changes nothing."""

from __future__ import annotations

import json

import pytest

from tests.test_cli import run_cli


def _unaccounted(root) -> list[str]:
    """Bronze records in no silver table and not in quarantine.

    A record is in silver when a silver.observations row points at it, or when the patient / encounter it
    describes is in silver.patients / silver.encounters (those tables keep the latest state per identity, so a
    superseded ADT message is represented by its entity, not by lineage).
    """
    from zoneinfo import ZoneInfo

    from pipelines.secrets import key_secret
    from pipelines.store.deltars import DeltaRsStore
    from silver import hl7_parse
    from silver.identity import FHIR_ENCOUNTER, FHIR_PATIENT, PATIENT, identity_key
    from tests.conftest import make_config

    cfg = make_config(root)
    store, secret = DeltaRsStore(cfg), key_secret(cfg)
    used = {(q["source_table"], q["landing_file"], q["landing_position"])
            for q in store.read_arrow("silver.quarantine").to_pylist()}
    used |= {(r["table"], r["landing_file"], r["landing_position"])
             for r in store.read_arrow("silver.observations").column("source_record").to_pylist()}
    patients = set(store.read_arrow("silver.patients").column("patient_key").to_pylist())
    encounters = set(store.read_arrow("silver.encounters").column("encounter_key").to_pylist())
    missing = []
    for table in ("bronze.hl7_messages", "bronze.fhir_resources"):
        for r in store.read_arrow(table).to_pylist():
            if (table, r["landing_file"], r["landing_position"]) in used:
                continue
            if table == "bronze.hl7_messages":
                found = hl7_parse.extract(r["payload"], default_tz=ZoneInfo(cfg.silver.timezone)).patients
                keys = {identity_key(secret, PATIENT, cfg.silver.canonical_system(x["source_system"]), x["mrn"])
                        for x in found if x["mrn"]}
                ok = bool(keys) and keys <= patients
            elif r["resource_type"] == "Patient":
                ok = identity_key(secret, FHIR_PATIENT, None, r["resource_id"]) in patients
            elif r["resource_type"] == "Encounter":
                ok = identity_key(secret, FHIR_ENCOUNTER, None, r["resource_id"]) in encounters
            else:
                ok = False
            if not ok:
                kind = r.get("message_type") or r.get("resource_type")
                missing.append(f"{table} {r['landing_file']}@{r['landing_position']} ({kind})")
    return missing


def _sql(root, query: str) -> list[dict]:
    out = run_cli(root, "sql", query, "--format", "json").stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


@pytest.mark.slow
@pytest.mark.realdata
def test_real_feeds_end_in_silver_or_quarantine(tmp_path, realdata):
    root = tmp_path / "lake"
    run_cli(root, "ingest", str(realdata / "hl7v2"), "--feed", "hl7")
    run_cli(root, "ingest", str(realdata / "fhir"), "--feed", "fhir")
    run_cli(root, "run", "all", "--available-now")
    # One query (one JVM start) for the landed records and where they ended.
    counts = _sql(root, "select feed, 'bronze' as outcome, count(*) as n from bronze.hl7_messages group by feed "
                        "union all select feed, 'bronze', count(*) from bronze.fhir_resources group by feed "
                        "union all select source_feed, 'silver.observations', count(*) "
                        "from silver.observations group by source_feed union all "
                        "select source_feed, concat('silver.patients:', identity_kind), count(*) "
                        "from silver.patients group by 1, 2 union all "
                        "select source_feed, concat('silver.encounters:', identity_kind), count(*) "
                        "from silver.encounters group by 1, 2 union all "
                        "select feed, concat('quarantine:', reason), count(*) from silver.quarantine "
                        "group by feed, reason order by feed, outcome")
    bronze = [r for r in counts if r["outcome"] == "bronze"]
    outcomes = [r for r in counts if r["outcome"] != "bronze"]
    unaccounted = _unaccounted(root)
    print("bronze:", bronze)
    print("outcomes:", outcomes)
    print("in no silver table and not in quarantine:", unaccounted)
    assert sum(r["n"] for r in bronze) > 10_000
    assert unaccounted == []
    assert any(r["outcome"] == "silver.observations" and r["feed"] == "fhir" and r["n"] > 1000 for r in outcomes)
    observations = sum(r["n"] for r in outcomes if r["outcome"] == "silver.observations")

    # The same input again changes nothing; the issue's own query answers after it.
    run_cli(root, "run", "all", "--available-now")
    table = run_cli(root, "sql", "select code, count(*) from silver.observations group by code").stdout
    lines = table.splitlines()  # header, rule, one line per code, "(N rows)"
    assert lines[0].split() == ["code", "count(1)"] and lines[-1].endswith("rows)")
    codes = {line.split()[0]: int(line.split()[-1]) for line in lines[2:-1]}
    assert sum(codes.values()) == observations and {"8867-4", "8310-5"} & set(codes)
