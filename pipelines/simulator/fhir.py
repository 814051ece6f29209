"""FHIR R4 resources and Bundles as plain dicts (json.dumps-ready, keys in a fixed order for reproducibility)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pipelines.simulator.clinical import ACVPU, BP_PANEL, BY_KEY, ImagingProcedure, Indication
from pipelines.simulator.population import Encounter, Person, Stay

BASE_URL = "http://carelake.example/fhir"
MRN_SYSTEM = "http://carelake.example/fhir/sid/mrn"
VISIT_SYSTEM = "http://carelake.example/fhir/sid/visit"
ORDER_SYSTEM = "http://carelake.example/fhir/sid/placer-order"
ACCESSION_SYSTEM = "http://carelake.example/fhir/sid/accession"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
CPT = "http://www.ama-assn.org/go/cpt"
ICD10 = "http://hl7.org/fhir/sid/icd-10-cm"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
Resource = dict[str, Any]


def instant(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


def patient_id(mrn: str) -> str:
    return f"pat-{mrn.lower()}"


def reference(resource_type: str, rid: str) -> dict[str, str]:
    return {"reference": f"{resource_type}/{rid}"}


def _meta(version: int, at: datetime) -> dict[str, str]:
    return {"versionId": str(version), "lastUpdated": instant(at)}


def _coding(system: str, code: str, display: str) -> dict[str, str]:
    return {"system": system, "code": code, "display": display}


def patient(p: Person, *, version: int, at: datetime, replaced_by: str | None = None) -> Resource:
    """Patient; a merged duplicate record is inactive and links to the surviving one."""
    r: Resource = {
        "resourceType": "Patient", "id": patient_id(p.mrn), "meta": _meta(version, at),
        "identifier": [{"use": "usual", "type": {"coding": [_coding(V2_0203, "MR", "Medical record number")]},
                        "system": MRN_SYSTEM, "value": p.mrn}],
        "active": replaced_by is None,
        "name": [{"use": "official", "family": p.family, "given": [g for g in (p.given, p.middle) if g]}],
        "gender": {"F": "female", "M": "male"}[p.sex],
        "birthDate": p.birth_date.isoformat(),
        "address": [{"use": "home", "line": [p.street], "city": p.city, "state": p.state, "postalCode": p.zip,
                     "country": "USA"}],
    }
    if p.phone:
        r["telecom"] = [{"system": "phone", "value": p.phone, "use": "home"}]
    if replaced_by is not None:
        r["link"] = [{"other": reference("Patient", patient_id(replaced_by)), "type": "replaced-by"}]
    return r


def encounter(enc: Encounter, mrn: str, stay: Stay | None, *, status: str, version: int, at: datetime,
              start: datetime, end: datetime | None = None) -> Resource:
    period = {"start": instant(start), **({"end": instant(end)} if end else {})}
    r: Resource = {
        "resourceType": "Encounter", "id": f"enc-{enc.visit.lower()}", "meta": _meta(version, at),
        "identifier": [{"system": VISIT_SYSTEM, "value": enc.visit}], "status": status,
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP",
                  "display": "inpatient encounter"},
        "subject": reference("Patient", patient_id(mrn)), "period": period,
        "reasonCode": [{"coding": [_coding(ICD10, *enc.diagnosis)]}],
    }
    if stay is not None:
        r["location"] = [{"location": {"display": f"{stay.unit} room {stay.room} bed {stay.bed}"},
                          "status": "completed" if end else "active"}]
    return r


def _quantity(value: float, unit: str) -> dict[str, Any]:
    return {"value": value, "unit": unit, "system": UCUM, "code": unit}


def observation(oid: str, *, mrn: str, visit: str, key: str, at: datetime, category: str,
                value: float | None = None, unit: str = "", diastolic: float | None = None,
                systolic: float | None = None, letter: str | None = None) -> Resource:
    """A vital sign or lab; blood pressure as the 85354-9 panel, consciousness as a coded value."""
    code = BP_PANEL if key == "bp" else (BY_KEY[key].loinc, BY_KEY[key].display)
    r: Resource = {
        "resourceType": "Observation", "id": oid, "meta": _meta(1, at), "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                  "code": category}]}],
        "code": {"coding": [_coding(LOINC, *code)]},
        "subject": reference("Patient", patient_id(mrn)),
        "encounter": reference("Encounter", f"enc-{visit.lower()}"),
        "effectiveDateTime": instant(at),
    }
    if key == "bp":
        r["component"] = [_bp_component("sbp", systolic), _bp_component("dbp", diastolic)]
    elif letter is not None:
        display = dict(ACVPU)[letter]
        r["valueCodeableConcept"] = {"coding": [_coding("http://carelake.example/fhir/CodeSystem/acvpu", letter,
                                                        display)], "text": display}
    elif value is not None:
        r["valueQuantity"] = _quantity(value, unit)
    return r


def _bp_component(key: str, value: float | None) -> dict[str, Any]:
    m = BY_KEY[key]
    out: dict[str, Any] = {"code": {"coding": [_coding(LOINC, m.loinc, m.display)]}}
    if value is not None:
        out["valueQuantity"] = _quantity(value, m.unit)
    return out


ROLE_CODES = {"ED": "ER", "ICU": "ICU", "WARD": "HU", "OUTPATIENT": "OF"}  # v3 RoleCode of each location class
V3_ROLE_CODE = "http://terminology.hl7.org/CodeSystem/v3-RoleCode"
IDR_COMMUNICATION = "https://profiles.ihe.net/RAD/IDR/StructureDefinition/idrCommunication"
V3_INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"


def _subject(mrn: str) -> dict[str, Any]:
    """A Patient reference by id, with the MRN as its identifier (the patient's key needs no lookup)."""
    return {**reference("Patient", patient_id(mrn)), "identifier": {"system": MRN_SYSTEM, "value": mrn}}


def service_request(order_no: str, accession: str, *, mrn: str, visit: str, procedure: ImagingProcedure,
                    priority: str, at: datetime, indication: Indication, location: tuple[str, str | None],
                    status: str = "active", version: int = 1, updated: datetime | None = None) -> Resource:
    """An imaging ServiceRequest (authored at `at`); a later version (`updated`) may revoke it."""
    location_class, unit = location
    return {
        "resourceType": "ServiceRequest", "id": f"sr-{order_no.lower()}", "meta": _meta(version, updated or at),
        "identifier": [
            {"type": {"coding": [_coding(V2_0203, "PLAC", "Placer Identifier")]}, "system": ORDER_SYSTEM,
             "value": order_no},
            {"type": {"coding": [_coding(V2_0203, "ACSN", "Accession ID")]}, "system": ACCESSION_SYSTEM,
             "value": accession}],
        "status": status, "intent": "order", "priority": priority,
        "category": [{"coding": [_coding("http://snomed.info/sct", "363679005", "Imaging")]}],
        "code": {"coding": [_coding(CPT, procedure.cpt, procedure.display)]},
        "subject": _subject(mrn),
        "encounter": reference("Encounter", f"enc-{visit.lower()}"),
        "authoredOn": instant(at),
        "locationCode": [{"coding": [_coding(V3_ROLE_CODE, ROLE_CODES[location_class], location_class.title())],
                          **({"text": unit} if unit else {})}],
        "reasonCode": [{"coding": [_coding(ICD10, indication.code, indication.text)], "text": indication.text}],
    }


def diagnostic_report(read: Any, *, mrn: str, visit: str) -> Resource:
    """The final radiology report of a read (hl7.Read): conclusion, AA conclusionCode when critical, and the IHE
    IDR communication extension pointing at a contained Communication when it was phoned through."""
    reader_id, family, given = read.reader
    r: Resource = {
        "resourceType": "DiagnosticReport", "id": f"dr-{read.accession.lower()}", "meta": _meta(1, read.read_at),
        "identifier": [
            {"type": {"coding": [_coding(V2_0203, "ACSN", "Accession ID")]}, "system": ACCESSION_SYSTEM,
             "value": read.accession},
            {"type": {"coding": [_coding(V2_0203, "PLAC", "Placer Identifier")]}, "system": ORDER_SYSTEM,
             "value": read.order_no}],
        "basedOn": [reference("ServiceRequest", f"sr-{read.order_no.lower()}")], "status": "final",
        "category": [{"coding": [_coding("http://terminology.hl7.org/CodeSystem/v2-0074", "RAD", "Radiology")]}],
        "code": {"coding": [_coding(CPT, read.procedure.cpt, read.procedure.display)]},
        "subject": _subject(mrn), "encounter": reference("Encounter", f"enc-{visit.lower()}"),
        "effectiveDateTime": instant(read.study_at), "issued": instant(read.read_at),
        "resultsInterpreter": [{"identifier": {"value": reader_id}, "display": f"{family}, {given}"}],
        "imagingStudy": [{"identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{read.study_uid}"}}],
        "conclusion": read.impression,
    }
    if read.finding:
        r["conclusionCode"] = [{"coding": [_coding(V3_INTERPRETATION, "AA", "Critical abnormal")],
                                "text": read.finding}]
    if read.communicated_at is not None:
        r["contained"] = [{"resourceType": "Communication", "id": "critical-result", "status": "completed",
                           "sent": instant(read.communicated_at)}]
        r["extension"] = [{"url": IDR_COMMUNICATION, "valueReference": {"reference": "#critical-result"}}]
    return r


def imaging_study(*, study_uid: str, series_uid: str, instances: list[str], accession: str, order_no: str,
                  mrn: str, visit: str, procedure: ImagingProcedure, at: datetime) -> Resource:
    modality = {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": procedure.modality}
    return {
        "resourceType": "ImagingStudy", "id": f"is-{accession.lower()}", "meta": _meta(1, at),
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}"},
                       {"type": {"coding": [_coding(V2_0203, "ACSN", "Accession ID")]}, "system": ACCESSION_SYSTEM,
                        "value": accession}],
        "status": "available", "modality": [modality],
        "subject": reference("Patient", patient_id(mrn)),
        "encounter": reference("Encounter", f"enc-{visit.lower()}"),
        "started": instant(at), "basedOn": [reference("ServiceRequest", f"sr-{order_no.lower()}")],
        "numberOfSeries": 1, "numberOfInstances": len(instances),
        "procedureCode": [{"coding": [_coding(CPT, procedure.cpt, procedure.display)]}],
        "series": [{"uid": series_uid, "number": 1, "modality": modality, "numberOfInstances": len(instances),
                    "bodySite": {"system": "http://snomed.info/sct", "display": procedure.body_part.title()},
                    "instance": [{"uid": uid, "sopClass": {"system": "urn:ietf:rfc:3986",
                                                           "code": f"urn:oid:{procedure.sop_class}"},
                                  "number": n + 1} for n, uid in enumerate(instances)]}],
    }


def bundle(bundle_id: str, kind: str, resources: list[Resource], at: datetime) -> Resource:
    """A transaction Bundle (PUT by id: replays are idempotent) or a collection Bundle."""
    entries = []
    for r in resources:
        entry: Resource = {"fullUrl": f"{BASE_URL}/{r['resourceType']}/{r['id']}", "resource": r}
        if kind == "transaction":
            entry["request"] = {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}
        entries.append(entry)
    return {"resourceType": "Bundle", "id": bundle_id, "meta": {"lastUpdated": instant(at)}, "type": kind,
            "timestamp": instant(at), "entry": entries}
