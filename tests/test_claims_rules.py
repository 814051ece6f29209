"""gold.claims_fraud_scores' rules beyond one claim: upcoding against peers, service after death, the exclusion
list and the bill against the chart; each a feature value with a threshold, and the model's features."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest

from gold.claims_fraud import FEATURES, Rules, claims_fraud_scores
from pipelines.errors import ConfigError
from pipelines.exclusions import COLUMNS, parse_exclusions, read_exclusions
from silver.claims import LINES_SCHEMA, MEMBERS_SCHEMA, PROVIDERS_SCHEMA, SCHEMA
from silver.encounters import SCHEMA as ENCOUNTERS_SCHEMA
from silver.imaging_studies import SCHEMA as STUDIES_SCHEMA
from silver.observations import SCHEMA as OBSERVATIONS_SCHEMA
from silver.patients import SCHEMA as PATIENTS_SCHEMA
from tests.conftest import REPO, make_config
from tests.test_claims_fraud import AT, DAY, claim, line

EXCLUDED = "1000009997"  # conf/leie_sample.csv: excluded 2024-03-15, not reinstated
REINSTATED = "1000009989"  # excluded 2023-01-01, reinstated 2025-06-01


@pytest.fixture(scope="module")
def rules(tmp_path_factory):
    cfg = make_config(tmp_path_factory.mktemp("rules"), **{"claims.upcoding_min_lines": 4})
    return Rules.of(cfg.claims, read_exclusions(cfg.claims.exclusion_list, cfg.conf_dir))


def row(schema, **values) -> dict:
    out = {f.name: None for f in schema.fields}
    out.update(values)
    return out


def champion():
    """A registered-champion stand-in: a real model fitted on two claims, version 7."""
    import pandas as pd
    from sklearn.tree import DecisionTreeClassifier

    from models.deterioration import Champion

    x = pd.DataFrame([[0.0] * len(FEATURES), [1.0] * len(FEATURES)], columns=list(FEATURES))
    return Champion("7", 0.5, FEATURES, DecisionTreeClassifier().fit(x, [0, 1]))


def run(spark, rules, claims, lines, model=None, **tables) -> dict[str, dict]:
    frames = {"silver.claims": spark.createDataFrame(claims, SCHEMA),
              "silver.claim_lines": spark.createDataFrame(lines, LINES_SCHEMA)}
    schemas = {"silver.members": MEMBERS_SCHEMA, "silver.providers": PROVIDERS_SCHEMA,
               "silver.patients": PATIENTS_SCHEMA, "silver.encounters": ENCOUNTERS_SCHEMA,
               "silver.observations": OBSERVATIONS_SCHEMA, "silver.imaging_studies": STUDIES_SCHEMA}
    for name, rows in tables.items():
        table = f"silver.{name}"
        frames[table] = spark.createDataFrame(rows, schemas[table])
    keys = [c["claim_key"] for c in claims]
    changes = spark.createDataFrame([(k, "insert") for k in keys], "claim_key string, _change_type string")
    out = claims_fraud_scores(changes, processed_at=AT, read_table=lambda name, **_: frames[name],
                              table_version=lambda name: 1 if name in frames else None, rules=rules, model=model)
    return {r["claim_key"]: r.asDict(recursive=True) for r in out.collect()}


def reasons(row: dict) -> dict[str, tuple[str, list[int]]]:
    return {r["code"]: (r["detail"], r["lines"]) for r in row["reasons"] or []}


PEERS = ["1245319599", "1003000126", "1003000134"]
UPCODER = "1003000118"
SOURCE = {"table": "bronze.hl7_messages", "landing_file": "f", "landing_position": 0, "sha256": "0"}
ADMITTED, DISCHARGED = datetime(2026, 1, 6, 14, tzinfo=UTC), datetime(2026, 1, 8, 10, tzinfo=UTC)
BEFORE = date(2026, 1, 3)


def _patient(key: str, **more) -> dict:
    return row(PATIENTS_SCHEMA, patient_key=key, identity_kind="patient", ingested_at=AT, **more)


def _stay(key: str, patient: str) -> dict:
    return row(ENCOUNTERS_SCHEMA, encounter_key=key, identity_kind="encounter", patient_key=patient,
               status="finished", admitted_at=ADMITTED, discharged_at=DISCHARGED, ingested_at=AT)


def _observation(key: str, patient: str, at: datetime) -> dict:
    return row(OBSERVATIONS_SCHEMA, observation_id=key, patient_key=patient, status="final", effective_at=at,
               source_feed="hl7", source_version="1", source_record=SOURCE, ingested_at=AT)


def _upcoding_case() -> tuple[list, list, list]:
    """Peers bill the top level (99233) on 1 of 4 lines each; the upcoder on 4 of 4."""
    claims, lines = [], []
    for p in [*PEERS, UPCODER]:
        for n in range(4):
            key = f"{p}-{n}"
            claims.append(claim(key, member=f"m{key}", provider=p, rendering=p))
            lines.append(line(key, 1, "99233" if p == UPCODER or n == 0 else "99232", rendering=p))
    providers = [row(PROVIDERS_SCHEMA, provider_key=p, npi=p, taxonomy="207RH0003X", source_version="1",
                     ingested_at=AT) for p in [*PEERS, UPCODER]]
    return claims, lines, providers


@pytest.fixture(scope="module")
def scores(spark, rules) -> dict[str, dict]:
    """One batch holding a case of every rule (one Spark plan for the module)."""
    claims, lines, providers = _upcoding_case()
    claims += [claim("late", member="dead"), claim("same", member="dead2"),
               {**claim("chartdeath", member="m"), "patient_key": "p-old"},
               claim("x", member="a", rendering=EXCLUDED), claim("r", member="b", provider=REINSTATED),
               claim("old", member="c", provider=EXCLUDED),
               {**claim("ok", member="m1"), "patient_key": "p1"}, {**claim("ph", member="m2"), "patient_key": "p2"},
               {**claim("nochart", member="m3"), "patient_key": "p3"}, {**claim("early", member="m1b"),
                                                                         "patient_key": "p1"}]
    lines += [line("late", 1, "85025"), {**line("late", 2, "85025"), "service_from": date(2026, 1, 10)},
              line("same", 1, "85025"), line("chartdeath", 1, "85025"),
              line("x", 1, "85025", rendering=EXCLUDED), line("r", 1, "85025"),
              {**line("old", 1, "85025"), "service_from": date(2024, 3, 14)},  # the day before the exclusion
              line("ok", 1, "99232"), line("ok", 2, "99291"), line("ok", 3, "71250"), line("ok", 4, "85025"),
              line("ph", 1, "99232"), line("ph", 2, "99291"), {**line("ph", 3, "71250"), "service_from": BEFORE},
              {**line("ph", 4, "85025"), "service_from": BEFORE}, line("nochart", 1, "99291"),
              {**line("early", 1, "99291"), "service_from": date(2026, 1, 6)}]
    members = [row(MEMBERS_SCHEMA, member_key="dead", death_date=date(2026, 1, 6), source_version="1",
                   ingested_at=AT),
               row(MEMBERS_SCHEMA, member_key="dead2", death_date=DAY, source_version="1", ingested_at=AT)]
    patients = [_patient("p-old", merged_into="p"), _patient("p1"), _patient("p2"),
                _patient("p", deceased=True, deceased_at=datetime(2026, 1, 5, 23, tzinfo=UTC))]
    study = row(STUDIES_SCHEMA, study_instance_uid="1.2", patient_key="p1", series_count=1, instance_count=1,
                study_time_utc=datetime(2026, 1, 7, 11, tzinfo=UTC), first_received_at=AT, last_received_at=AT,
                source_feed="dicom", source_record=SOURCE, ingested_at=AT)
    model = champion()
    return run(spark, rules, claims, lines, lambda: model, providers=providers, members=members, patients=patients,
               encounters=[_stay("e1", "p1"), _stay("e2", "p2")], imaging_studies=[study],
               observations=[_observation("o1", "p1", datetime(2026, 1, 7, 9, tzinfo=UTC)),
                             _observation("o2", "p2", datetime(2026, 1, 6, 20, tzinfo=UTC)),
                             _observation("o3", "p2", datetime(2026, 1, 8, 8, tzinfo=UTC))])


def test_upcoding_flags_a_provider_far_above_its_peers_and_feeds_the_same_value_to_the_model(scores):
    flagged = {k for k, r in scores.items() if "upcoding" in reasons(r)}
    assert flagged == {f"{UPCODER}-{n}" for n in range(4)}
    detail, where = reasons(scores[f"{UPCODER}-0"])["upcoding"]
    assert detail == (f"provider {UPCODER} billed the top level 99233 on 100% of its 4 subsequent_hospital lines "
                      "(99231-99233); peers of taxonomy 207RH0003X: 25% of 12")
    assert where == [1]
    assert scores[f"{UPCODER}-0"]["features"]["rule_upcoding"] == pytest.approx(0.75)
    assert scores[f"{UPCODER}-0"]["score"] == 30
    assert scores[f"{UPCODER}-0"]["provider_npi"] == UPCODER
    # A peer's top-level claim carries its (negative) excess as a feature, below the threshold: no reason.
    assert scores[f"{PEERS[0]}-0"]["features"]["rule_upcoding"] == pytest.approx(0.25 - 6 / 12)
    assert reasons(scores[f"{PEERS[0]}-0"]) == {}
    assert list(scores[f"{PEERS[0]}-0"]["features"]) == list(FEATURES)
    assert scores[f"{PEERS[0]}-0"]["features"]["em_top_share"] == 1.0


def test_the_champion_scores_every_row_and_names_its_version(scores):
    assert {r["model_version"] for r in scores.values()} == {"7"}
    assert all(0.0 <= r["model_probability"] <= 1.0 for r in scores.values())


def test_service_after_the_members_death_but_not_on_the_death_day(scores):
    assert reasons(scores["late"])["after_death"] == (
        "2 line(s) serviced after the member's death on 2026-01-06 (silver.members), the latest on 2026-01-10, "
        "4 days after", [1, 2])
    assert scores["late"]["features"]["rule_after_death"] == 4
    assert reasons(scores["same"]) == {}


def test_a_patient_death_in_the_chart_counts_through_a_merge(scores):
    assert reasons(scores["chartdeath"])["after_death"][0].startswith(
        "1 line(s) serviced after the member's death on 2026-01-05 (silver.patients)")


def test_excluded_providers_between_exclusion_and_reinstatement(scores):
    assert reasons(scores["x"])["excluded_provider"] == (
        "rendering provider NPI 1000009997 (ALEX J SAMPLE) is on the exclusion list (1128a1) from 2024-03-15, not "
        "reinstated; service on 2026-01-07", [1])
    assert reasons(scores["r"]) == {}  # reinstated 2025-06-01, service in 2026
    assert reasons(scores["old"]) == {}


def test_the_bill_against_the_chart_names_the_missing_evidence(scores):
    assert reasons(scores["ok"]) == {}
    detail, where = reasons(scores["ph"])["phantom_service"]
    assert detail == ("billed without the chart's evidence: 99291 on 2026-01-07: no vital signs in "
                      "silver.observations that day; 71250 on 2026-01-03: no stay in silver.encounters covering the "
                      "day")  # p2's vitals span 01-06..01-08 (checked); no imaging studies at all (not checked); labs
    # are never checked
    assert where == [2, 3]
    assert scores["ph"]["features"]["rule_phantom_service"] == 2
    assert reasons(scores["nochart"]) == {}  # p3 is not in silver.patients: no chart to hold the bill against
    assert reasons(scores["early"]) == {}  # before p1's first vital sign: outside what the chart covers


def test_the_exclusion_file_is_checked_with_messages_that_name_the_fix(tmp_path):
    header = ",".join(COLUMNS)
    good = "A,B,,,,,,1000009997,,,,,,1128a1,20240315,,,"
    assert [e.npi for e in parse_exclusions(f"{header}\n{good}\n", "x.csv")] == ["1000009997"]
    with pytest.raises(ConfigError, match="the header must be the LEIE columns"):
        parse_exclusions("NPI,NAME\n1,2\n", "x.csv")
    with pytest.raises(ConfigError, match="line 2: EXCLDATE '2024-03-15' is not a date in LEIE's YYYYMMDD form"):
        parse_exclusions(f"{header}\n{good.replace('20240315', '2024-03-15')}\n", "x.csv")
    with pytest.raises(ConfigError, match="line 3: 17 fields, the LEIE layout has 18"):
        parse_exclusions(f"{header}\n{good}\n{good[:-1]}\n", "x.csv")
    with pytest.raises(ConfigError, match="NPI '12345' is not 10 digits"):
        parse_exclusions(f"{header}\n{good.replace('1000009997', '12345')}\n", "x.csv")
    with pytest.raises(ConfigError, match="cannot be read .* or set it to \"\" to turn the exclusion check off"):
        read_exclusions("missing.csv", tmp_path)
    assert read_exclusions("", tmp_path) == ()
    sample = read_exclusions("leie_sample.csv", REPO / "conf")
    assert [(e.npi, e.reinstated_on) for e in sample] == [("1000009997", None), ("1000009989", date(2025, 6, 1))]
