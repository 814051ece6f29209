"""POST /x12: interchanges land byte for byte after the fsync (202), bodies that are not X12 are refused and kept,
and bronze.claim_files reads the gateway's landing segments like dropped files."""

from __future__ import annotations

import pytest

from pipelines.gateway.http import BadBody, check_x12
from tests.gatewayproc import GatewayProcess, landed
from tests.test_claims_x12 import claim_837p, interchange
from tests.test_gateway import _post


@pytest.fixture
def gateway(tmp_path):
    with GatewayProcess(tmp_path / "lake") as gw:
        yield gw


def test_check_x12_counts_interchanges_and_warns_of_a_missing_trailer():
    two = (interchange("000000201", [claim_837p("G1")]) + "\n" + interchange("000000202", [claim_837p("G2")])).encode()
    assert check_x12(two, "application/edi-x12").count == 2
    cut = interchange("000000203", [claim_837p("G3")]).split("GE*")[0].encode()
    checked = check_x12(cut, "application/edi-x12")
    assert checked.count == 1 and "lack their IEA trailer" in checked.warnings[0]
    for body, content_type, status in [(b"hello", "text/plain", 400), (two, "application/json", 415),
                                       (two.replace(b"CLINIC", "CLÍNIC".encode()), "application/edi-x12", 400)]:
        with pytest.raises(BadBody) as err:
            check_x12(body, content_type)
        assert err.value.status == status


def test_x12_bodies_land_after_fsync_and_bad_ones_are_kept_as_rejects(gateway, spark):
    from pyspark.sql import functions as F

    from bronze.claim_files import claim_files
    from pipelines.runner import LANDING_FILE_SCHEMA

    body = (interchange("000000211", [claim_837p("H1")]) + interchange("000000212", [claim_837p("H2")])).encode()
    status, doc = _post(f"{gateway.http}/x12", body, "application/edi-x12")
    assert status == 202 and "landed 2 interchange(s)" in doc["issue"][0]["diagnostics"]
    refused = _post(f"{gateway.http}/x12", b"DML_IND|BENE_ID\n", "text/plain")
    assert refused[0] == 400 and "not X12" in refused[1]["issue"][0]["diagnostics"]
    gateway.stop()
    (record,) = [r for _, r in landed(gateway.root, "x12")]
    assert record.body == body and record.header["content_type"] == "application/edi-x12"
    assert [r.body for _, r in landed(gateway.root, "x12", rejected=True)] == [b"DML_IND|BENE_ID\n"]
    files = spark.read.format("binaryFile").schema(LANDING_FILE_SCHEMA).load(str(gateway.root / "landing" / "x12"))
    (row,) = claim_files(files, ingest_batch_id="t").where(F.col("parse_status") == "ok").collect()
    assert (row["feed"], row["format"], row["document_type"], row["payload"]) == ("x12", "x12", "837", body)
