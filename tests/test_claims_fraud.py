"""gold.claims_fraud_scores: duplicate, unbundling and impossible-volume rules with their reasons; void and Part 2
claims get no score; a batch rescores the claims sharing a rule's group with the ones it changed."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal

import pytest

from gold.claims_fraud import SCHEMA as SCORES_SCHEMA
from gold.claims_fraud import STORED, WITHDRAWN, Rules, claims_fraud_scores
from silver.claims import LINES_SCHEMA, SCHEMA
from tests.conftest import make_config

DAY = date(2026, 1, 7)
AT = datetime(2026, 1, 20, tzinfo=UTC)


@pytest.fixture(scope="module")
def rules(tmp_path_factory):
    return Rules.of(make_config(tmp_path_factory.mktemp("fraud")).claims)


def claim(key: str, *, member: str = "m1", provider: str = "1234567893", version: str = "2026-01-08|1|a",
          status: str = "active", part2: bool = False, rendering: str | None = None) -> dict:
    row = {f.name: None for f in SCHEMA.fields}
    row.update(claim_key=key, claim_id=key.upper(), status=status, member_key=member, billing_provider_key=provider,
               billing_npi=provider, rendering_npi=rendering, service_from=DAY, service_to=DAY, part2=part2,
               claim_version=version, billed_amount=Decimal("100.00"), ingested_at=AT)
    return row


def line(key: str, n: int, code: str, units: float = 1.0, rendering: str | None = None) -> dict:
    row = {f.name: None for f in LINES_SCHEMA.fields}
    row.update(claim_key=key, line_number=n, line_status="active", procedure_code=code, units=float(units),
               service_from=DAY, service_to=DAY, rendering_npi=rendering, claim_version="v", ingested_at=AT)
    return row


def run(spark, rules, claims: list[dict], lines: list[dict], changed: list[str]) -> dict[str, dict]:
    tables = {"silver.claims": spark.createDataFrame(claims, SCHEMA),
              "silver.claim_lines": spark.createDataFrame(lines, LINES_SCHEMA)}
    changes = spark.createDataFrame([(k, "update_postimage") for k in changed], "claim_key string, _change_type string")
    tables["gold.claims_fraud_scores"] = spark.createDataFrame([(k, None, None, None) for k in changed], STORED)
    out = claims_fraud_scores(changes, processed_at=AT, read_table=lambda name, **_: tables[name],
                              table_version=lambda name: 3 if name in tables else None, rules=rules)
    return {r["claim_key"]: r.asDict(recursive=True) for r in out.collect()}


def codes(row: dict) -> list[str]:
    return sorted(r["code"] for r in row["reasons"] or [])


def test_each_rule_fires_with_its_reason_and_clean_claims_score_zero(spark, rules):
    claims = [claim("a"), claim("a2", version="2026-01-20|1|b"),  # a2 repeats a, submitted later
              claim("u", member="m2"), claim("v", member="m3", rendering="1245319599"), claim("ok", member="m4")]
    lines = [line("a", 1, "99223"), line("a", 2, "85025"), line("a2", 1, "99223"), line("a2", 2, "85025"),
             line("u", 1, "99232"), line("u", 2, "85027"), line("u", 3, "85004"),
             line("v", 1, "99291", rendering="1245319599"), line("v", 2, "99292", units=50, rendering="1245319599"),
             line("ok", 1, "99232")]
    scores = run(spark, rules, claims, lines, ["a", "a2", "u", "v", "ok"])
    assert {k: codes(r) for k, r in scores.items()} == {"a": [], "a2": ["duplicate"], "u": ["unbundling"],
                                                        "v": ["impossible_volume"], "ok": []}
    assert (scores["a2"]["score"], scores["a2"]["band"]) == (60, "high")
    assert scores["a2"]["reasons"][0]["detail"].startswith("duplicate of claim A:")
    assert scores["a2"]["reasons"][0]["lines"] == [1, 2]
    assert (scores["u"]["score"], scores["u"]["band"]) == (30, "medium")
    assert scores["u"]["reasons"][0]["detail"] == "85004 + 85027 billed on 2026-01-07: together they are 85025 " \
                                                  "(comprehensive code)"
    assert scores["u"]["reasons"][0]["lines"] == [2, 3]
    assert "1,574 minutes" in scores["v"]["reasons"][0]["detail"]  # 74 + 50 x 30
    assert (scores["ok"]["score"], scores["ok"]["band"], scores["ok"]["silver_claims_version"]) == (0, "none", 3)


def test_void_and_part2_claims_are_withdrawn_and_neighbours_rescored(spark, rules):
    claims = [claim("x", status="void"), claim("p", part2=True, member="m9"),
              claim("d1", member="m5", rendering="1245319599"), claim("d2", member="m6", rendering="1245319599")]
    lines = [line("x", 1, "99232"), line("p", 1, "H0020"),
             line("d1", 1, "99292", units=30, rendering="1245319599"),
             line("d2", 1, "99292", units=20, rendering="1245319599")]
    scores = run(spark, rules, claims, lines, ["x", "p", "d2"])
    assert {k: r["band"] for k, r in scores.items() if r["band"] == WITHDRAWN} == {"x": WITHDRAWN, "p": WITHDRAWN}
    # d2 pushed the provider's day to 1,500 minutes: d1, unchanged in this batch, is rescored with it.
    assert {k: codes(r) for k, r in scores.items() if r["band"] != WITHDRAWN} == {
        "d1": ["impossible_volume"], "d2": ["impossible_volume"]}


def test_removed_lines_do_not_count(spark, rules):
    removed = {**line("r", 2, "85004"), "line_status": "removed"}
    scores = run(spark, rules, [claim("r")], [line("r", 1, "85027"), removed], ["r"])
    assert codes(scores["r"]) == []


def test_scores_merge_into_the_table_and_a_void_withdraws_its_row(spark, rules, cfg):
    from pipelines.jobs import load_registry
    from pipelines.store.deltars import DeltaRsStore

    job, store = load_registry(cfg).get("gold.claims_fraud_scores"), DeltaRsStore(cfg, spark)

    def write(claims, changed):
        tables = {"silver.claims": spark.createDataFrame(claims, SCHEMA),
                  "silver.claim_lines": spark.createDataFrame([line("a", 1, "85027"), line("a", 2, "85004"),
                                                               line("b", 1, "99232")], LINES_SCHEMA)}
        changes = spark.createDataFrame([(k, "insert") for k in changed], "claim_key string, _change_type string")
        if store.exists(job.name):
            tables[job.name] = store.read(job.name)
        store.merge(job.name, claims_fraud_scores(changes, processed_at=AT, read_table=lambda n, **_: tables[n],
                                                  table_version=lambda n: store.version(n) if store.exists(n)
                                                  else None, rules=rules).toArrow(), job.merge)
        return {r["claim_key"]: (r["band"], [x["code"] for x in r["reasons"] or []])
                for r in store.read_arrow(job.name).to_pylist()}

    # The first batch voids a claim that was never scored: nothing to withdraw (and no invalid row for the merge).
    assert write([claim("a"), claim("b", member="m2"), claim("x", status="void")], ["a", "b", "x"]) == {
        "a": ("medium", ["unbundling"]), "b": ("none", [])}
    assert write([claim("a", status="void"), claim("b", member="m2")], ["a"]) == {"b": ("none", [])}
    # A batch whose claims have no reason at all (Spark's Arrow for an all-null list column made delta-rs panic).
    assert write([claim("a", status="void"), claim("b", member="m2")], ["b"]) == {"b": ("none", [])}


PEER_T = "207RH0003X"
UPCODER, PEER1, PEER2 = "1003000118", "1003000126", "1003000134"


def _em(key: str, provider: str, codes: list[str], member: str | None = None) -> tuple[dict, list[dict]]:
    """A claim of `provider` (its rendering NPI on every line) billing the E/M `codes`."""
    return (claim(key, member=member or f"m-{key}", provider=provider, rendering=provider),
            [line(key, n, code, rendering=provider) for n, code in enumerate(codes, 1)])


def _batches() -> list[tuple[list[dict], list[dict]]]:
    """Three batches of silver claims and lines. 1: the upcoder bills 99233 (the top of 99231-99233) on 2 of its 3
    lines, its peers on 1 of 4; a claim, one half of an unbundled CBC, one half of an impossible day; clean claims.
    2: the duplicate of `a`, the other half of the CBC. 3: `a` voided (its duplicate stands alone), the other half of
    the day, and a peer's claim of four 99233 lines: the peers' top share jumps, the upcoder no longer stands out
    (its claims, untouched, flip) and that peer now does (its earlier claim flips)."""
    one = [_em("ua", UPCODER, ["99233"]), _em("ub", UPCODER, ["99233", "99232"]), _em("q1a", PEER1, ["99232"]),
           _em("q1b", PEER1, ["99232"]), _em("q2a", PEER2, ["99233"]), _em("q2b", PEER2, ["99232"]),
           (claim("a"), [line("a", 1, "99223"), line("a", 2, "85025")]),
           (claim("u1", member="m2"), [line("u1", 1, "85027")]),
           (claim("v1", member="m3", rendering="1245319599"), [line("v1", 1, "99292", 30, "1245319599")]),
           *[(claim(f"f{k}", member=f"mf{k}"), [line(f"f{k}", 1, "85025")]) for k in range(14)]]
    two = [(claim("a2", version="2026-01-20|1|b"), [line("a2", 1, "99223"), line("a2", 2, "85025")]),
           (claim("u2", member="m2"), [line("u2", 1, "85004")])]
    three = [({**claim("a"), "status": "void", "claim_version": "2026-01-21|1|c"},
              [{**line("a", n, code), "line_status": "removed"} for n, code in ((1, "99223"), (2, "85025"))]),
             (claim("v2", member="m4", rendering="1245319599"), [line("v2", 1, "99292", 20, "1245319599")]),
             _em("q2c", PEER2, ["99233"] * 4)]
    return [([c for c, _ in b], [x for _, ls in b for x in ls]) for b in (one, two, three)]


def test_incremental_batches_equal_one_recompute_and_peer_shifts_rescore_flipped_claims(spark, cfg):
    """Batches scored as they arrive (each reading silver by keys) end where one recompute of everything ends; a
    claim whose upcoding outcome the peers' new claims flip gets a new score row (the old one kept in history)."""
    from pipelines.jobs import load_registry
    from pipelines.store.deltars import DeltaRsStore
    from silver.claims import PROVIDERS_SCHEMA

    peer_rules = Rules.of(make_config(cfg.root / "rules", **{"claims.upcoding_min_lines": 2}).claims)
    job, store = load_registry(cfg).get("gold.claims_fraud_scores"), DeltaRsStore(cfg, spark)
    providers = spark.createDataFrame([{**{f.name: None for f in PROVIDERS_SCHEMA.fields}, "provider_key": p,
                                        "npi": p, "taxonomy": PEER_T, "source_version": "1", "ingested_at": AT}
                                       for p in (UPCODER, PEER1, PEER2)], PROVIDERS_SCHEMA)
    claims_by_key: dict[str, dict] = {}
    lines_by_key: dict[tuple, dict] = {}

    def score(changed: list[str], at: datetime, stored: bool):
        tables = {"silver.claims": spark.createDataFrame(list(claims_by_key.values()), SCHEMA),
                  "silver.claim_lines": spark.createDataFrame(list(lines_by_key.values()), LINES_SCHEMA),
                  "silver.providers": providers}
        if stored and store.exists(job.name):
            tables[job.name] = store.read(job.name)
        changes = spark.createDataFrame([(k, "insert") for k in changed], "claim_key string, _change_type string")
        return claims_fraud_scores(changes, processed_at=at, read_table=lambda n, **_: tables[n],
                                   table_version=lambda n: 1 if n in tables else None, rules=peer_rules)

    def outcome(rows) -> dict[str, tuple]:
        return {r["claim_key"]: (r["score"], r["band"], sorted(x["code"] for x in r["reasons"] or []))
                for r in rows if r["band"] != WITHDRAWN}

    versions = []
    for day, (claims, lines) in enumerate(_batches()):
        claims_by_key.update({c["claim_key"]: c for c in claims})
        lines_by_key.update({(x["claim_key"], x["line_number"]): x for x in lines})
        at = datetime(2026, 1, 20 + day, tzinfo=UTC)
        versions.append(store.merge(job.name, score([c["claim_key"] for c in claims], at, True).toArrow(),
                                    job.merge).version)
    incremental = store.read_arrow(job.name).to_pylist()
    recompute = outcome(score(list(claims_by_key), AT, False).collect())
    assert outcome(incremental) == recompute
    flagged = {k: codes for k, (_, _, codes) in recompute.items() if codes}
    assert flagged == {"u1": ["unbundling"], "u2": ["unbundling"], "v1": ["impossible_volume"],
                       "v2": ["impossible_volume"], "q2a": ["upcoding"], "q2c": ["upcoding"]}
    assert "a" not in recompute and outcome(store.read_arrow(job.name, version=versions[1]).to_pylist())["a2"][2] \
        == ["duplicate"]  # a duplicate until `a` was voided
    before = outcome(store.read_arrow(job.name, version=versions[1]).to_pylist())
    assert before["ua"][2] == before["ub"][2] == ["upcoding"] and before["q2a"][2] == []
    rescored = {r["claim_key"]: r["scored_at"].day for r in incremental}
    assert [rescored[k] for k in ("ua", "ub", "q2a", "a2", "v1")] == [22] * 5  # flipped or beside a change
    # Beside batch 3's claims: q2b (q2c's provider-day), f0 and u1 (the voided a's provider-day); the other peer's
    # claims, untouched and unflipped, stay as batch 1 scored them.
    assert [rescored[k] for k in ("q2b", "f0", "u1", "q1a", "q1b")] == [22, 22, 22, 20, 20]


def test_a_backlog_rescored_whole_by_its_first_batch_is_not_scored_again(spark, rules):
    """The second batch of a backlog (or a replay) changing a quarter of the claims or more writes nothing when every
    stored row was computed from the silver versions of now and each of its claims is stored; any of the three
    missing, it rescores."""
    tables = {"silver.claims": spark.createDataFrame([claim("a"), claim("b", member="m2"), claim("c", member="m3")],
                                                     SCHEMA),
              "silver.claim_lines": spark.createDataFrame([line("a", 1, "85027"), line("a", 2, "85004"),
                                                           line("b", 1, "99232"), line("c", 1, "99232")],
                                                          LINES_SCHEMA)}

    def batch(changed: list[str], versions: dict[str, int]) -> list[dict]:
        changes = spark.createDataFrame([(k, "insert") for k in changed], "claim_key string, _change_type string")
        return [r.asDict() for r in claims_fraud_scores(changes, processed_at=AT, read_table=lambda n, **_: tables[n],
                                                        table_version=versions.get, rules=rules).collect()]

    now = {"silver.claims": 5, "silver.claim_lines": 7}
    first = batch(["a", "b"], now)  # the store's first batch: everything scored at (5, 7)
    assert sorted((r["claim_key"], r["silver_claims_version"], r["silver_claim_lines_version"]) for r in first) == [
        ("a", 5, 7), ("b", 5, 7), ("c", 5, 7)]
    tables["gold.claims_fraud_scores"] = spark.createDataFrame(first, SCORES_SCHEMA)
    stored = {**now, "gold.claims_fraud_scores": 1}
    assert batch(["c"], stored) == []
    assert sorted(r["claim_key"] for r in batch(["c"], {**stored, "silver.claim_lines": 8})) == ["a", "b", "c"]
    tables["gold.claims_fraud_scores"] = spark.createDataFrame([r for r in first if r["claim_key"] != "c"],
                                                               SCORES_SCHEMA)
    assert sorted(r["claim_key"] for r in batch(["c"], stored)) == ["a", "b", "c"]
