"""Real public HL7 v2 orders/results and FHIR reports through silver.imaging_orders and silver.imaging_reports:
every imaging order and radiology report is a row or quarantined with a reason, and nothing crashes."""

from __future__ import annotations

from zoneinfo import ZoneInfo

import pytest

from bronze.hl7_wire import split_messages
from silver import hl7_parse, imaging_codes
from silver.imaging_orders import ORDERS, imaging_orders
from silver.imaging_reports import REPORTS, imaging_reports
from tests.test_silver_patients import OPTS, PROCESSED_AT, bronze, job, rows, write

# Bundles with DiagnosticReports (all laboratory ones: read past, not kept) and a rich Patient record.
FHIR_SAMPLES = ("Bennie663_Raynor401_46d8cf9a-63e3-43bc-1241-3a01f198fe87.json",)


def _messages(realdata) -> list[bytes]:
    out = []
    for path in sorted(p for p in (realdata / "hl7v2").rglob("*") if p.is_file()):
        data = path.read_bytes()
        out += [data[off:off + n] for off, n in split_messages(data)]
    return out


def _expected(messages: list[bytes]) -> tuple[set[str], set[str]]:
    """Placer numbers of the imaging orders and filler/accession numbers of the radiology reports in the files."""
    from silver.imaging_orders import _is_imaging_hl7

    orders, reports = set(), set()
    for m in messages:
        try:
            x = hl7_parse.extract(m, default_tz=ZoneInfo("UTC"))
        except hl7_parse.Hl7ParseError:
            continue
        orders |= {o["placer_order_number"] or "" for o in x.orders if _is_imaging_hl7(x.header["message_code"], o)}
        reports |= {r["accession_number"] or r["filler_order_number"] or r["placer_order_number"] or ""
                    for r in x.reports if (r["diagnostic_service"] or "").upper() in imaging_codes.RADIOLOGY_SECTIONS}
    return orders, reports


@pytest.mark.realdata
def test_real_orders_and_reports_are_rows_or_quarantined(spark, cfg, store, realdata):
    messages = _messages(realdata)
    bundles = [(realdata / "fhir" / "bundles" / "pathling" / name).read_bytes() for name in FHIR_SAMPLES]
    changes = bronze(spark, *messages, *bundles).cache()
    write(store, job(cfg, ORDERS), imaging_orders(changes, processed_at=PROCESSED_AT, **OPTS))
    write(store, job(cfg, REPORTS), imaging_reports(changes, processed_at=PROCESSED_AT, **OPTS))
    quarantine = list(rows(store, "silver.quarantine", "quarantine_id").values())
    assert all(q["reason"] and q["detail"] for q in quarantine)
    orders, reports = _expected(messages)
    got_orders = {r["order_number"] for r in rows(store, ORDERS, "order_key").values()}
    got_reports = {r["identity_value"] for r in rows(store, REPORTS, "report_key").values()}
    mine = [q for q in quarantine if q["job"] in (ORDERS, REPORTS)]
    assert {"1101", "2203"} <= orders and reports == {"FON_0d70c6c8"}  # CT head, MR brain; a CT report (ORU)
    assert (got_orders, got_reports, mine) == (orders, reports, [])  # every one read; none needed quarantine
    ct_head = next(r for r in rows(store, ORDERS, "order_key").values() if r["procedure_display"] == "CT Head")
    assert (ct_head["modality"], ct_head["body_part"]) == ("CT", "HEAD")  # from the procedure's name (LOINC)
