"""Imaging studies as real DICOM Part 10 files (pydicom): small synthetic images, UIDs derived from the seed."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pipelines.simulator.clinical import IMAGING
from pipelines.simulator.population import Person
from pipelines.simulator.timeline import ImagingOrder

IMAGE_SIZE = 64
INSTANCES = {"CR": 1, "CT": 3, "US": 1, "MR": 2}


@dataclass(frozen=True)
class StudyPlan:
    order: ImagingOrder
    study_uid: str
    series_uid: str
    instance_uids: tuple[str, ...]


def plan_study(order: ImagingOrder, seed: int) -> StudyPlan:
    """Deterministic DICOM UIDs (2.25.<UUID as integer>, a name-based UUID of seed and accession)."""
    import uuid

    def uid(*parts: object) -> str:
        name = "|".join([str(seed), order.accession, *map(str, parts)])
        return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, name).int}"

    count = INSTANCES[IMAGING[order.procedure_key].modality]
    return StudyPlan(order, uid("study"), uid("series"), tuple(uid("instance", n) for n in range(count)))


def write_study(plan: StudyPlan, person: Person, at: datetime, folder: Path) -> list[Path]:
    """dicom/<StudyInstanceUID>/<SOPInstanceUID>.dcm for every instance; returns the files."""
    target = folder / plan.study_uid
    target.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, sop_uid in enumerate(plan.instance_uids):
        ds = _dataset(plan, person, at, n, sop_uid)
        path = target / f"{sop_uid}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _dataset(plan: StudyPlan, person: Person, at: datetime, n: int, sop_uid: str):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    proc = IMAGING[plan.order.procedure_key]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = proc.sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID, ds.SOPInstanceUID = proc.sop_class, sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = at.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = at.strftime("%H%M%S")
    ds.AccessionNumber = plan.order.accession
    ds.Modality = proc.modality
    ds.Manufacturer = "carelake simulator"
    ds.InstitutionName = "General Hospital"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = proc.display
    ds.SeriesDescription = proc.display
    ds.PatientName = f"{person.family}^{person.given}^{person.middle}"
    ds.PatientID = person.mrn
    ds.IssuerOfPatientID = "CARELAKE"
    ds.PatientBirthDate = person.birth_date.strftime("%Y%m%d")
    ds.PatientSex = person.sex
    ds.BodyPartExamined = proc.body_part
    ds.StudyInstanceUID, ds.SeriesInstanceUID = plan.study_uid, plan.series_uid
    ds.StudyID = plan.order.order_no[-8:]
    ds.SeriesNumber, ds.InstanceNumber = 1, n + 1
    ds.PatientOrientation = ["L", "P"] if proc.modality == "CR" else ""
    if proc.modality == "CT":
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SliceThickness = "5"
        ds.ImagePositionPatient = [-160, -160, -5 * n]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [5, 5]
        ds.RescaleIntercept, ds.RescaleSlope, ds.KVP = "-1024", "1", "120"
    _pixels(ds, plan, n)
    return ds


def _pixels(ds, plan: StudyPlan, n: int) -> None:
    """A small seeded phantom: an ellipse of soft tissue with noise, 16-bit unsigned."""
    import numpy as np

    rng = np.random.default_rng(abs(hash_text(plan.order.accession + str(n))) % 2**32)
    y, x = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    c = (IMAGE_SIZE - 1) / 2
    body = ((x - c) / (0.42 * IMAGE_SIZE)) ** 2 + ((y - c) / (0.34 * IMAGE_SIZE)) ** 2 <= 1
    image = np.where(body, 1040 + 60 * n, 24).astype(np.float64) + rng.normal(0, 12, (IMAGE_SIZE, IMAGE_SIZE))
    ds.Rows = ds.Columns = IMAGE_SIZE
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.clip(image, 0, 4095).astype("<u2").tobytes()


def hash_text(text: str) -> int:
    """A stable 64-bit hash (Python's hash() changes between processes)."""
    import hashlib

    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
