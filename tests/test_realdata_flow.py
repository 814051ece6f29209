"""Every real HL7 v2 and FHIR file through `carelake ingest` + `carelake run all`: each record ends in silver or
in quarantine with a reason, nothing crashes, and a second run changes nothing."""

from __future__ import annotations

import json

import pytest

from tests.test_cli import run_cli


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
    bronze = _sql(root, "select feed, count(*) as n from bronze.hl7_messages group by feed union all "
                        "select feed, count(*) from bronze.fhir_resources group by feed")
    # Each bronze record is accounted for: a silver observation (HL7 ORU, FHIR Observation), a patient or
    # encounter row (ADT, Patient, Encounter), or a quarantine row naming why.
    unaccounted = _sql(root, """
        with records as (
            select 'bronze.hl7_messages' as t, landing_file, landing_position, message_type as kind
            from bronze.hl7_messages
            union all
            select 'bronze.fhir_resources', landing_file, landing_position, resource_type from bronze.fhir_resources),
        used as (
            select source_record.table as t, source_record.landing_file as landing_file,
                   source_record.landing_position as landing_position from silver.observations
            union all select source_table, landing_file, landing_position from silver.quarantine
            union all select source_record.table, source_record.landing_file, source_record.landing_position
                      from silver.patients where source_record is not null
            union all select link_record.table, link_record.landing_file, link_record.landing_position
                      from silver.patients where link_record is not null
            union all select source_record.table, source_record.landing_file, source_record.landing_position
                      from silver.encounters where source_record is not null
            union all select link_record.table, link_record.landing_file, link_record.landing_position
                      from silver.encounters where link_record is not null)
        select r.t, r.kind, count(*) as n from records r left anti join used u
          on r.t = u.t and r.landing_file = u.landing_file and r.landing_position = u.landing_position
        group by r.t, r.kind order by n desc""")
    outcomes = _sql(root, "select source_feed as feed, 'silver.observations' as outcome, count(*) as n "
                          "from silver.observations group by source_feed union all "
                          "select source_feed, concat('silver.patients:', identity_kind), count(*) "
                          "from silver.patients group by 1, 2 union all "
                          "select source_feed, concat('silver.encounters:', identity_kind), count(*) "
                          "from silver.encounters group by 1, 2 union all "
                          "select feed, concat('quarantine:', reason), count(*) from silver.quarantine "
                          "group by feed, reason order by feed, outcome")
    print("bronze:", bronze)
    print("outcomes:", outcomes)
    print("in no silver table and not in quarantine:", unaccounted)
    assert sum(r["n"] for r in bronze) > 10_000
    assert unaccounted == []
    assert any(r["outcome"] == "silver.observations" and r["feed"] == "fhir" and r["n"] > 1000 for r in outcomes)
    before = _sql(root, "select count(*) as n from silver.observations")
    run_cli(root, "run", "all", "--available-now")
    assert _sql(root, "select count(*) as n from silver.observations") == before
    codes = run_cli(root, "sql", "select code, count(*) from silver.observations group by code").stdout
    assert "8867-4" in codes or "8310-5" in codes
