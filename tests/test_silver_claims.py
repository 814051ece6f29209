"""silver.claims and its side tables through the transform and the job's MERGE: replacements, voids, remittances,
quarantine, members linked to patients, and a replay that changes nothing."""

from __future__ import annotations

from datetime import datetime

import pytest
from pyspark.sql import functions as F

from bronze.claim_files import claim_files
from pipelines.jobs import builtin_jobs
from pipelines.runner import LANDING_FILE_SCHEMA
from pipelines.store.deltars import DeltaRsStore
from silver import claim_codes
from silver.claims import CLAIM_LINES, CLAIMS, MEMBERS, PROVIDERS, claims
from silver.identity import PATIENT, identity_key
from tests.test_claims_x12 import BILLING, claim_837p, interchange
from tests.test_silver_patients import OPTS, PROCESSED_AT, SECRET, quarantined, rows, write

CLAIM_OPTS = {**OPTS, "x12_versions": ("005010X222A1", "005010X222A2", "005010X223A3", "005010X221A1"),
              "x12_validation": "envelope", "part2": claim_codes.Part2Codes.of(["F10", "F11"], ["H0020"], ["894"])}


@pytest.fixture
def store(cfg, spark):
    return DeltaRsStore(cfg, spark)


def bronze(spark, *files: tuple[str, bytes], received: datetime = datetime(2026, 12, 1, 3, 0)):
    """bronze.claim_files change rows for (feed, bytes) files landed under that feed's folder."""
    landed = [(f"file:/lake/landing/{feed}/f{i}", received, len(body), body) for i, (feed, body) in enumerate(files)]
    return claim_files(spark.createDataFrame(landed, LANDING_FILE_SCHEMA), ingest_batch_id="t").withColumn(
        "_change_type", F.lit("insert"))


def job(cfg):
    return next(j for j in builtin_jobs(cfg) if j.name == CLAIMS)


@pytest.fixture
def apply(spark, cfg, store):
    def run(*batches):
        for files in batches:
            write(store, job(cfg), claims(bronze(spark, *files), processed_at=PROCESSED_AT, **CLAIM_OPTS))
        return rows(store, CLAIMS, "claim_key")
    return run


def x12(control: str, *transactions: list[str]) -> tuple[str, bytes]:
    return "x12", interchange(control, list(transactions)).encode()


def lines_of(store, claim_key: str) -> list[tuple]:
    """The claim's current lines (a replacement's or void's withdrawn line numbers stay as `removed` rows)."""
    found = [r for r in store.read_arrow(CLAIM_LINES).to_pylist()
             if r["claim_key"] == claim_key and r["line_status"] != "removed"]
    return sorted((r["line_number"], r["line_status"], r["procedure_code"]) for r in found)


def key(claim_id: str, billing: str = BILLING) -> str:
    return identity_key(SECRET, "claim", billing, claim_id)


def test_a_replacement_and_a_void_leave_one_current_claim_each(apply, store):
    original = x12("000000101", claim_837p("R1", lines=(("99213", "80"), ("87070", "15"), ("85025", "24"))),
                   claim_837p("V1", lines=(("99214", "120"),)))
    replaced = x12("000000102", claim_837p("R1", frequency="7", ref_f8="PCN-1", bht_time="1300",
                                           lines=(("99214", "120"), ("87070", "15"))))
    voided = x12("000000103", claim_837p("V1", frequency="8", ref_f8="PCN-2", bht_time="1300",
                                         lines=(("99214", "120"),)))
    table = apply([original], [replaced, voided])
    assert len(table) == 2
    r1, v1 = table[key("R1")], table[key("V1")]
    assert (r1["status"], r1["frequency_code"], str(r1["billed_amount"]), r1["payer_claim_id"], r1["line_count"]) == (
        "active", "7", "135.00", "PCN-1", 2)
    assert lines_of(store, key("R1")) == [(1, "active", "99214"), (2, "active", "87070")]  # line 3 removed
    removed = [r for r in store.read_arrow(CLAIM_LINES).to_pylist() if r["line_status"] == "removed"]
    assert len(removed) == 2 * 50 - 2 - 1 and (3, "85025") in {(r["line_number"], r["procedure_code"])
                                                              for r in removed}
    assert (v1["status"], v1["frequency_code"]) == ("void", "8")
    assert lines_of(store, key("V1")) == [(1, "void", "99214")]


def test_an_original_arriving_after_its_replacement_changes_nothing(apply, store):
    original = x12("000000111", claim_837p("L1", lines=(("99213", "80"), ("87070", "15"))))
    replaced = x12("000000112", claim_837p("L1", frequency="7", bht_time="1300", lines=(("99215", "200"),)))
    table = apply([replaced], [original])
    row = table[key("L1")]
    assert (row["frequency_code"], str(row["billed_amount"])) == ("7", "200.00")
    assert lines_of(store, key("L1")) == [(1, "active", "99215")]


def test_replacement_in_the_same_batch_as_its_original(apply, store):
    original = x12("000000121", claim_837p("S1", lines=(("99213", "80"), ("87070", "15"))))
    replaced = x12("000000122", claim_837p("S1", frequency="7", bht_time="1300", lines=(("99215", "200"),)))
    table = apply([replaced, original])
    assert [r["frequency_code"] for r in table.values()] == ["7"]
    assert lines_of(store, key("S1")) == [(1, "active", "99215")]


REMIT = ("x12", interchange("000000132", [[
    "BPR*I*76*C*ACH", "TRN*1*T1*1", "N1*PR*ACME HEALTH", "REF*2U*PAYER1", f"N1*PE*CLINIC*XX*{BILLING}", "LX*1",
    "CLP*P1*1*95*76**12*PAYERCTL1", "NM1*QC*1*DOE*JANE****MI*M123", "SVC*HC:99213*80*64", "AMT*B6*64",
    "SVC*HC:87070*15*12", "AMT*B6*12"]], version="005010X221A1").replace("ST*837", "ST*835").encode())


@pytest.mark.parametrize("together", [False, True], ids=["later-batch", "same-batch"])
def test_a_remittance_adds_payment_and_never_blanks_the_claim(apply, store, together):
    claim = x12("000000131", claim_837p("P1", lines=(("99213", "80"), ("87070", "15"))))
    table = apply([REMIT, claim]) if together else apply([claim], [REMIT])
    row = table[key("P1")]
    assert (row["status"], row["frequency_code"], str(row["billed_amount"]), row["diagnoses"]) == (
        "active", "1", "95.00", ["E11.9", "I10"])
    assert (str(row["paid_amount"]), str(row["allowed_amount"]), row["adjudication_status"], row["payer_claim_id"],
            row["line_count"]) == ("76.00", "76.00", "paid", "PAYERCTL1", 2)
    paid = {r["line_number"]: (r["procedure_code"], str(r["paid_amount"]), str(r["allowed_amount"]), r["line_status"])
            for r in store.read_arrow(CLAIM_LINES).to_pylist()}
    assert paid == {1: ("99213", "64.00", "64.00", "active"), 2: ("87070", "12.00", "12.00", "active")}
    assert len(rows(store, MEMBERS, "member_key")) == 1


def test_bad_parts_are_quarantined_with_reasons_and_the_rest_flows(apply, store):
    bad_npi = claim_837p("N1", billing="1234567890")
    bad_line = claim_837p("B1", lines=(("99213", "80"), ("9921", "10")))
    broken = interchange("000000142", [claim_837p("E1")], se_count=5).encode()
    table = apply([x12("000000141", bad_npi, bad_line), ("x12", broken), ("claims", b"hello,world\n")])
    assert list(table) == [key("B1")]
    assert lines_of(store, key("B1")) == [(1, "active", "99213")]
    reasons = sorted(reason for _, reason in quarantined(store))
    assert reasons == ["claim_bad_npi", "claim_line_bad_procedure_code", "unrecognized_format",
                       "x12_transaction_error"]
    items = dict((reason, item) for item, reason in quarantined(store))
    assert items["claim_line_bad_procedure_code"] == "ISA 000000141/GS 0141/ST 0002/CLM B1/line 2"


def test_members_link_to_patients_and_part2_is_flagged(apply, store):
    claim = claim_837p("M1", mrn="MRN-7")
    sud = [s.replace("HI*ABK:E119*ABF:I10", "HI*ABK:F1120") for s in claim_837p("M2")]
    table = apply([x12("000000151", claim, sud)])
    m1, m2 = table[key("M1")], table[key("M2")]
    assert m1["patient_key"] == identity_key(SECRET, PATIENT, "CARELAKE", "MRN-7")
    assert (m1["part2"], m2["part2"], m2["diagnoses"]) == (False, True, ["F11.20"])
    (member,) = rows(store, MEMBERS, "member_key").values()
    assert (member["member_id"], member["birth_date"].isoformat(), member["sex"], member["member_system"]) == (
        "M123", "1980-01-01", "female", "PAYER1")
    assert member["member_key"] == m1["member_key"] == m2["member_key"]
    assert set(rows(store, PROVIDERS, "provider_key")) == {BILLING}


def test_replaying_the_same_files_changes_nothing(apply, store):
    files = [x12("000000161", claim_837p("Q1"), claim_837p("Q2", frequency="7")), ("claims", b"nothing,here\n")]
    first = apply(files)
    tables = {t: store.read_arrow(t).to_pylist() for t in (CLAIM_LINES, MEMBERS, PROVIDERS, "silver.quarantine")}
    assert apply(files) == first
    again = {t: store.read_arrow(t).to_pylist() for t in tables}
    for t, before in tables.items():
        assert sorted(map(str, again[t])) == sorted(map(str, before)), t
    assert len(first) == 2 and len(tables["silver.quarantine"]) == 1
