"""silver.imaging_reports: HL7 ORU radiology reports and FHIR DiagnosticReports, versions, critical results."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from silver.imaging_reports import REPORTS, imaging_reports
from tests.test_silver_imaging_orders import applier
from tests.test_silver_patients import OPTS, SECRET, mrn_key, pid, pv1, quarantined

ACCESSION_SYSTEM = "http://carelake.example/fhir/sid/accession"
ALIASES = {**OPTS, "system_aliases": (*OPTS["system_aliases"], (ACCESSION_SYSTEM, "CARELAKE"))}


def at(hour: int, minute: int = 0) -> datetime:
    return datetime(2026, 11, 21, hour, minute, tzinfo=UTC)


def oru(control_id: str, sent: str, *, status: str = "F", section: str = "RAD", flag: str = "",
        comm: str = "", accession: str = "ACC1", extra: tuple[str, ...] = ()) -> bytes:
    """A radiology ORU: OBR (accession, results time = sent, section, status, interpreter), findings OBX."""
    obr = ("OBR|1|ORD1|FIL1|70450^CT head without contrast^C4|||20261121080000" + "|" * 11 + accession
           + "||||" + sent + "||" + section + "|" + status + "|||||||RAD7&Okafor&Ada")
    obx = [f"OBX|1|TX|18782-3^Radiology findings^LN||Hyperdense lesion left basal ganglia||||||{status}",
           f"OBX|2|TX|19005-8^Impression^LN||Acute haemorrhage.|||{flag}|||{status}",
           f"OBX|3|HD|113014^DICOM Study^DCM||1.2.3.4||||||{status}"]
    if comm:
        obx.append(f"OBX|4|DTM|CRITCOMM^Critical result communicated^99CARELAKE||{comm}||||||{status}")
    head = f"MSH|^~\\&|RIS|HOSP|LAKE|HOSP|{sent}||ORU^R01|{control_id}|P|2.5"
    return "\r".join([head, pid(), pv1(), obr, *obx, *extra, ""]).encode()


def diagnostic_report(version: str = "1", status: str = "final", critical: bool = True, **extra) -> dict:
    report = {
        "resourceType": "DiagnosticReport", "id": "dr-acc1", "status": status,
        "meta": {"versionId": version, "lastUpdated": f"2026-11-21T1{version}:00:00Z"},
        "identifier": [{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                             "code": "ACSN"}]}, "system": ACCESSION_SYSTEM, "value": "ACC1"}],
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD"}]}],
        "code": {"coding": [{"system": "http://www.ama-assn.org/go/cpt", "code": "70450"}]},
        "subject": {"identifier": {"system": "http://carelake.example/fhir/sid/mrn", "value": "M1"}},
        "issued": f"2026-11-21T1{version}:00:00Z", "conclusion": "Acute haemorrhage.",
        "resultsInterpreter": [{"identifier": {"value": "RAD7"}, "display": "Okafor, Ada"}],
        "imagingStudy": [{"identifier": {"system": "urn:dicom:uid", "value": "urn:oid:1.2.3.4"}}],
        "contained": [{"resourceType": "Communication", "id": "c1", "status": "completed",
                       "sent": "2026-11-21T10:05:00Z"}],
        "extension": [{"url": "https://profiles.ihe.net/RAD/IDR/StructureDefinition/idrCommunication",
                       "valueReference": {"reference": "#c1"}}], **extra}
    if critical:
        report["conclusionCode"] = [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/"
                                                           "v3-ObservationInterpretation", "code": "AA"}]}]
    return report


@pytest.fixture
def apply(spark, cfg, store):
    return applier(spark, cfg, store, REPORTS, "report_key", imaging_reports, ALIASES)


def test_hl7_preliminary_then_final_with_critical_result_communicated(apply):
    table = apply(oru("C1", "20261121090000", status="P", flag="AA"))
    [key] = table
    first = table[key]
    expected = {"identity_kind": "accession", "accession_number": "ACC1", "order_number": "ORD1",
                "filler_order_number": "FIL1", "study_instance_uid": "1.2.3.4", "patient_key": mrn_key("M1"),
                "status": "preliminary", "read_at": at(9), "reader": "RAD7", "reader_name": "Okafor, Ada",
                "critical": True, "critical_communicated_at": None, "conclusion": "Acute haemorrhage.",
                "source_feed": "hl7"}
    assert {k: first[k] for k in expected} == expected
    final = apply(oru("C2", "20261121093000", flag="AA", comm="20261121091500"))[key]
    assert (final["status"], final["read_at"], final["critical_communicated_at"]) == ("final", at(9, 30), at(9, 15))
    assert apply(oru("C1", "20261121090000", status="P", flag="AA"))[key] == final  # late, older: no change
    amended = apply(oru("C3", "20261121110000", status="C"))[key]  # a correction without the notification OBX
    assert (amended["status"], amended["critical"], amended["critical_communicated_at"]) == (
        "corrected", False, at(9, 15))


def test_fhir_report_is_the_same_report_and_reads_critical_and_communication(apply):
    [row] = apply(diagnostic_report()).values()
    expected = {"accession_number": "ACC1", "study_instance_uid": "1.2.3.4", "status": "final", "read_at": at(11),
                "reader": "RAD7", "reader_name": "Okafor, Ada", "critical": True,
                "critical_communicated_at": at(10, 5), "conclusion": "Acute haemorrhage.", "source_feed": "fhir"}
    assert {k: row[k] for k in expected} == expected
    both = apply(oru("C1", "20261121090000", status="P"))  # the HL7 copy, older: same row, and the newer FHIR
    assert both == {row["report_key"]: row}  # version (which replaces the report whole) stays as it is
    assert apply(diagnostic_report()) == both  # a replay changes nothing


def test_non_radiology_results_are_not_reports_and_bad_ones_are_quarantined(apply, store):
    lab = oru("C1", "20261121090000", section="LAB")
    no_ids = oru("C2", "20261121090000", accession="").replace(b"|ORD1|FIL1|", b"|||")
    bad_status = oru("C3", "20261121090000", status="Q", accession="ACC2")
    no_status = oru("C4", "20261121090000", status="", accession="ACC3")
    no_subject = diagnostic_report(subject={"display": "unknown"})
    lab_fhir = {**diagnostic_report(), "id": "dr-lab",
                "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "LAB"}]}]}
    no_obr = b"\r".join([b"MSH|^~\\&|MON|HOSP|LAKE|HOSP|20261121090000||ORU^R01|C5|P|2.5", pid().encode(),
                          b"OBX|1|NM|8867-4^Heart rate^LN||72|/min|||||F", b""])
    assert apply(lab, no_ids, bad_status, no_status, no_subject, lab_fhir, no_obr) == {}
    assert quarantined(store) == [("DiagnosticReport", "missing_patient_id"), ("OBR[3]", "missing_report_identifier"),
                                  ("OBR[3]", "missing_report_status"), ("OBR[3]", "unknown_report_status")]


def test_secret_keyed_identity(apply):
    from silver.identity import identity_key

    [key] = apply(oru("C1", "20261121090000"))
    assert key == identity_key(SECRET, "imaging-report-accession", "CARELAKE", "ACC1")


def test_silver_observations_leaves_imaging_reports_to_this_table_and_quarantines_lab_ones(spark):
    import json

    from tests.test_silver_observations import routed

    lab = {**diagnostic_report(), "id": "dr-lab",
           "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "LAB"}]}]}
    ndjson = (json.dumps(diagnostic_report()) + "\n" + json.dumps(lab) + "\n").encode()
    _, quarantine = routed(spark, fhir=ndjson)
    assert [(q["item"], q["reason"], q["detail"][:60]) for q in quarantine] == [
        ("resource", "not_modelled", "no silver table takes DiagnosticReport resources other than ")]
