"""gold.provider_risk: per provider and month, volume against peers, flagged share and trend; a provider-month left
without claims is withdrawn."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest

from gold.claims_fraud import SCHEMA as SCORES_SCHEMA
from gold.provider_risk import WITHDRAWN, provider_risk
from silver.claims import PROVIDERS_SCHEMA

AT = datetime(2026, 3, 1, tzinfo=UTC)


def score(key: str, npi: str, day: date, value: int, probability: float | None = None,
          codes: tuple[str, ...] = ()) -> dict:
    row = {f.name: None for f in SCORES_SCHEMA.fields}
    row.update(claim_key=key, claim_id=key, provider_npi=npi, service_from=day, score=value,
               band="high" if value >= 60 else "medium" if value >= 30 else "low" if value else "none",
               reasons=[{"code": c, "detail": "d", "lines": [1]} for c in codes], model_probability=probability,
               scored_at=AT)
    return row


def test_volumes_against_peers_flagged_share_trend_and_withdrawal(spark):
    jan, feb = date(2026, 1, 10), date(2026, 2, 3)
    rows = [score("a1", "A", jan, 0), score("a2", "A", jan, 60, 0.9, ("duplicate",)),
            score("a3", "A", feb, 30, 0.2, ("upcoding",)), score("a4", "A", feb, 30, 0.7, ("upcoding", "unbundling")),
            score("a5", "A", feb, 0, 0.1), score("a6", "A", feb, 0, 0.1),
            score("b1", "B", feb, 0, 0.1), score("b2", "B", feb, 0, 0.1)]
    tables = {"gold.claims_fraud_scores": spark.createDataFrame(rows, SCORES_SCHEMA),
              "silver.providers": spark.createDataFrame(
                  [{**{f.name: None for f in PROVIDERS_SCHEMA.fields}, "provider_key": p, "taxonomy": "207R00000X",
                    "source_version": "1", "ingested_at": AT} for p in ("A", "B")], PROVIDERS_SCHEMA)}
    # The batch: A's claims changed, and a claim of provider C (its only one, in January) was withdrawn.
    changes = spark.createDataFrame([("A", feb, "insert"), ("C", jan, "delete")],
                                    "provider_npi string, service_from date, _change_type string")
    out = provider_risk(changes, processed_at=AT, read_table=lambda n, **_: tables[n],
                        table_version=lambda n: 1)
    got = {(r["provider_npi"], r["month"].isoformat()): r.asDict() for r in out.collect()}
    assert set(got) == {("A", "2026-01-01"), ("A", "2026-02-01"), ("C", "2026-01-01")}
    a_feb = got[("A", "2026-02-01")]
    assert (a_feb["claims"], a_feb["flagged_claims"], a_feb["flagged_share"], a_feb["high_claims"]) == (4, 2, 0.5, 0)
    assert (a_feb["peer_group"], a_feb["peer_providers"], a_feb["peer_median_claims"]) == ("207R00000X", 2, 3.0)
    assert a_feb["claims_vs_peers"] == pytest.approx(4 / 3)
    assert a_feb["peer_flagged_share"] == pytest.approx(2 / 6)
    assert (a_feb["previous_claims"], a_feb["claims_change"], a_feb["flagged_share_change"]) == (2, 1.0, 0.0)
    assert a_feb["model_flagged_share"] == pytest.approx(0.25)
    assert a_feb["top_reasons"] == "upcoding 2, unbundling 1"
    assert got[("A", "2026-01-01")]["previous_claims"] is None
    assert got[("C", "2026-01-01")]["claims"] == WITHDRAWN
