"""silver.imaging_studies: studies recomputed whole from their instances, times in UTC, the patient key every feed
shares, resends counted once, unusable instances quarantined."""

from __future__ import annotations

from datetime import UTC, datetime
from io import BytesIO

import pytest
from pydicom.uid import generate_uid

from bronze.dicom_instances import dicom_instances
from bronze.records import FILE_MAGIC, encode_record
from pipelines.runner import LANDING_FILE_SCHEMA
from silver.identity import PATIENT, identity_key
from silver.imaging_studies import STUDIES, imaging_studies
from silver.quarantine import QUARANTINE
from tests.test_gateway_dicom import ct_slice

SECRET = "test-secret"
AT = datetime(2026, 12, 6, 5, 0, tzinfo=UTC)


def instance(study: str, series: str, *, modality="CT", body_part="CHEST", **attrs) -> bytes:
    ds = ct_slice(8, 8)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality, ds.BodyPartExamined = study, series, modality, body_part
    ds.PatientID, ds.IssuerOfPatientID, ds.AccessionNumber = "MRN1001", "CARELAKE", "ACC-77"
    ds.StudyDate, ds.StudyTime, ds.ReferringPhysicianName = "20261206", "031500.25", "Grey^Meredith"
    for name, value in attrs.items():
        setattr(ds, name, value)
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def bronze(spark, *records: tuple[str, bytes]):
    """A gateway segment per (received_at, instance) and the bronze rows of them all."""
    rows = []
    for i, (received, body) in enumerate(records):
        seg = FILE_MAGIC + encode_record({"received_at": received, "protocol": "dimse", "calling_ae": "CT1"}, body)
        rows.append((f"file:/l/dicom/{i:03d}.clrec", AT.replace(tzinfo=None), len(seg), seg))
    return dicom_instances(spark.createDataFrame(rows, LANDING_FILE_SCHEMA), ingest_batch_id="b")


def run(spark, table, changes=None):
    """Silver over `changes` with bronze holding `table` (None: bronze not written yet, as in a fused first batch)."""
    changes = table if changes is None else changes
    out = imaging_studies(changes, read_table=lambda name: table, table_version=lambda name: None if table is None
                          else 0, processed_at=AT, secret=SECRET, timezone="UTC", mrn_system="CARELAKE",
                          system_aliases=(("urn:oid:1.2.3", "CARELAKE"),))
    return ({r.study_instance_uid: r for r in out[STUDIES].collect()},
            sorted((r.reason, r.detail is not None) for r in out[QUARANTINE].collect()))


def test_a_study_from_instances_of_several_series_with_a_resend_and_a_broken_instance(spark):
    study, s1, s2 = generate_uid(), generate_uid(), generate_uid()
    first = instance(study, s1)
    table = bronze(spark, ("2026-12-06T04:00:00Z", first), ("2026-12-06T04:00:01Z", first),  # a resend
                   ("2026-12-06T04:00:02Z", instance(study, s1)),
                   ("2026-12-06T04:00:03Z", instance(study, s2, modality="SR", body_part="")),
                   ("2026-12-06T04:00:04Z", b"not dicom at all"))
    got, quarantine = run(spark, table)
    row = got[study]
    assert (row.series_count, row.instance_count) == (2, 3)
    assert (row.modality, row.modalities, row.body_part) == ("CT", ["CT", "SR"], "CHEST")
    assert row.study_time_utc == datetime(2026, 12, 6, 3, 15, 0, 250000)
    assert (row.accession_number, row.referring_physician) == ("ACC-77", "Grey^Meredith")
    assert row.patient_key == identity_key(SECRET, PATIENT, "CARELAKE", "MRN1001")  # as HL7/FHIR key the MRN
    assert row.first_received_at == datetime(2026, 12, 6, 4, 0) and row.last_received_at == datetime(2026, 12, 6, 4, 0,
                                                                                                     3)
    assert row.source_record.landing_file == "file:/l/dicom/003.clrec" and row.source_feed == "dicom"
    assert quarantine == [("dicom_not_dicom", True)]


def test_a_later_batch_recomputes_the_touched_study_whole(spark):
    study, series = generate_uid(), generate_uid()
    early = bronze(spark, ("2026-12-06T04:00:00Z", instance(study, series)))
    late = bronze(spark, ("2026-12-06T04:10:00Z", instance(study, generate_uid(), AccessionNumber="ACC-78")))
    whole = early.unionByName(late)
    got, _ = run(spark, whole, changes=late)  # the batch holds only the new instance; bronze holds both
    assert (got[study].series_count, got[study].instance_count, got[study].accession_number) == (2, 2, "ACC-78")
    again, _ = run(spark, whole, changes=late)  # a replay computes the same row
    assert again[study].asDict() == got[study].asDict()
    # Inside a fused bronze batch the new instance is not in bronze yet: the same row from the batch + bronze.
    fused, _ = run(spark, early, changes=late)
    assert fused[study].asDict() == got[study].asDict()
    first, _ = run(spark, None, changes=whole)  # the first fused batch: bronze does not exist yet
    assert first[study].asDict() == got[study].asDict()


def test_study_time_in_the_sent_offset_or_the_hospital_zone(spark):
    cases = [("20261206", "0315", "+0100", datetime(2026, 12, 6, 2, 15)),
             ("20261206", "03:15:30", "", datetime(2026, 12, 6, 3, 15, 30)),  # ACR-NEMA style time
             ("20261206", "", "-0500", datetime(2026, 12, 6, 5, 0)),
             ("2026120", "031500", "", None)]  # a broken date: no time rather than a wrong one
    studies, records = [], []
    for date, time, offset, _expected in cases:
        attrs = {"StudyDate": date, "StudyTime": time, **({"TimezoneOffsetFromUTC": offset} if offset else {})}
        studies.append(generate_uid())
        records.append(("2026-12-06T04:00:00Z", instance(studies[-1], generate_uid(), **attrs)))
    got, _ = run(spark, bronze(spark, *records))
    assert [got[s].study_time_utc for s in studies] == [expected for *_, expected in cases]


@pytest.mark.realdata
def test_unusable_instances_are_quarantined_with_their_reason(spark, realdata):
    names = ["MR_truncated.dcm", "fo-dicom/CR-MONO1-10-chest", "test1.json", "fo-dicom/DICOMDIR", "CT_small.dcm"]
    table = bronze(spark, *(("2026-12-06T04:00:00Z", (realdata / "dicom" / n).read_bytes()) for n in names))
    got, quarantine = run(spark, table)
    assert [r for r, _ in quarantine] == ["dicom_missing_uids", "dicom_no_file_meta", "dicom_not_dicom",
                                          "dicom_truncated"]
    assert all(has_detail for _, has_detail in quarantine)
    assert len(got) == 1  # CT_small's study
