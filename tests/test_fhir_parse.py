"""FHIR splitting (bronze), structural checks, validation and extraction (silver): pure, no Spark."""

from __future__ import annotations

import json
import time
from collections import Counter
from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo

import pytest

from bronze.fhir_split import PayloadError, Unit, is_ndjson, load_resource, request_target, split_resources
from silver.fhir_parse import (
    ENCOUNTER_KEYS,
    IMAGING_STUDY_KEYS,
    MERGE_KEYS,
    OBSERVATION_KEYS,
    PATIENT_KEYS,
    SERVICE_REQUEST_KEYS,
    V2_0203,
    Extracted,
    FhirParseError,
    check,
    extract,
    parse_date,
    parse_datetime,
    parse_payload,
    validate,
)

BERLIN = ZoneInfo("Europe/Berlin")
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
VITALS = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def dumps(obj: object) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode()


# --- bronze: splitting ----------------------------------------------------------------------------


def test_bundle_entries_are_byte_exact_after_non_ascii_text():
    patient = '{"resourceType": "Patient", "id": "p1", "name": [{"family": "Müller", "given": ["Zoë"]}]}'
    observation = ('{"resourceType": "Observation", "id": "o1", "meta": {"versionId": "2", '
                   '"lastUpdated": "2024-05-01T10:00:00Z"}, "note": [{"text": "日本語 ✓"}]}')
    body = ('{"resourceType": "Bundle", "id": "b1", "type": "transaction", "meta": {"tag": [{"display": "Ärzte"}]},\n'
            ' "entry": [\n'
            f'  {{"fullUrl": "urn:uuid:1", "resource": {patient},\n'
            '   "request": {"method": "PUT", "url": "Patient/p1"}},\n'
            f'  {{"fullUrl": "urn:uuid:2", "request": {{"method": "POST", "url": "Observation"}}, '
            f'"resource":\t{observation} }}\n'
            ']}\n').encode()
    units = split_resources(body, "application/fhir+json; charset=utf-8")
    bundle = {"bundle_id": "b1", "bundle_type": "transaction"}
    assert units == [
        Unit(body.index(patient.encode()), len(patient.encode()), "Patient", "p1", **bundle, entry_index=0,
             full_url="urn:uuid:1", request_method="PUT", request_url="Patient/p1"),
        Unit(body.index(observation.encode()), len(observation.encode()), "Observation", "o1", "2",
             "2024-05-01T10:00:00Z", **bundle, entry_index=1, full_url="urn:uuid:2", request_method="POST",
             request_url="Observation"),
    ]
    assert [u.payload(body).decode() for u in units] == [patient, observation]


def test_delete_entry_has_no_payload_and_a_nested_bundle_stays_one_resource():
    nested = '{"resourceType": "Bundle", "type": "collection", "entry": [{"resource": {"resourceType": "Patient"}}]}'
    body = ('{"resourceType": "Bundle", "type": "batch", "entry": ['
            '{"request": {"method": "DELETE", "url": "http://h/fhir/Observation/o9/_history/3"}}, '
            f'{{"resource": {nested}, "request": {{"method": "POST", "url": "Bundle"}}}}, '
            '{"request": {"method": "DELETE", "url": "Patient?identifier=urn:mrn|7"}}, '
            '42, '
            '{"fullUrl": "urn:uuid:x", "request": {"method": "POST", "url": "Patient"}}, '
            '{"resource": {"id": "no-type"}}]}').encode()
    batch = {"bundle_id": None, "bundle_type": "batch"}
    no_resource = '{"fullUrl": "urn:uuid:x", "request": {"method": "POST", "url": "Patient"}}'
    assert split_resources(body, None) == [
        Unit(body.index(b'{"request": {"method": "DELETE", "url": "http'), 0, "Observation", "o9", **batch,
             entry_index=0, request_method="DELETE", request_url="http://h/fhir/Observation/o9/_history/3"),
        Unit(body.index(nested.encode()), len(nested), "Bundle", None, **batch, entry_index=1,
             request_method="POST", request_url="Bundle"),
        Unit(body.index(b'{"request": {"method": "DELETE", "url": "Patient?'), 0, "Patient", None, **batch,
             entry_index=2, request_method="DELETE", request_url="Patient?identifier=urn:mrn|7"),
        Unit(body.index(b"42"), 2, None, None, **batch, entry_index=3, parse_status="not_a_resource",
             parse_detail="Bundle.entry[3] is not an object"),
        Unit(body.index(no_resource.encode()), len(no_resource), None, None, **batch, entry_index=4,
             full_url="urn:uuid:x", request_method="POST", request_url="Patient", parse_status="not_a_resource",
             parse_detail="Bundle.entry[4] has no resource"),
        Unit(body.index(b'{"id": "no-type"}'), 17, None, None, **batch, entry_index=5,
             parse_status="missing_resource_type", parse_detail="object has no resourceType"),
    ]


def test_ndjson_with_crlf_blank_lines_and_bad_lines():
    lines = [b'{"resourceType":"Observation","id":"o1","meta":{"versionId":"1"}}',
             b'{"resourceType":"Observation"}',
             b'{"resourceType":"Encounter","id":',
             b'[1, 2]',
             b'{"resourceType":"Patient","id":"caf\xe9"}',
             b'  {"id":"x"}']
    body = b"\xef\xbb\xbf" + lines[0] + b"\r\n\r\n" + b"\r\n".join(lines[1:]) + b"\r\n"
    units = split_resources(body, "application/fhir+ndjson")
    assert [(u.offset, u.length) for u in units] == [(body.index(line), len(line.strip())) for line in lines[:5]] + [
        (body.index(b'{"id":"x"}'), 10)]
    assert [u.payload(body) for u in units] == [line.strip() for line in lines]
    assert [(u.resource_type, u.id, u.version_id, u.parse_status, u.parse_detail) for u in units] == [
        ("Observation", "o1", "1", "ok", None),
        ("Observation", None, None, "missing_id", "Observation has no id"),
        (None, None, None, "invalid_json", "line 1 column 34: Expecting value"),
        (None, None, None, "not_a_resource", "JSON list is not an object"),
        (None, None, None, "invalid_utf8", "byte 35: invalid continuation byte"),
        (None, None, None, "missing_resource_type", "object has no resourceType"),
    ]


def test_ndjson_is_detected_from_content_type_or_lines():
    two = b'{"resourceType":"Patient","id":"a"}\n{"resourceType":"Patient","id":"b"}\n'
    pretty = json.dumps({"resourceType": "Patient", "id": "a"}, indent=2).encode()
    assert is_ndjson(two, None) and is_ndjson(two, "application/json")
    assert is_ndjson(b"\n\n" + two, None)
    assert is_ndjson(pretty, "application/x-ndjson; charset=utf-8")
    assert not is_ndjson(pretty, None)
    assert not is_ndjson(two.splitlines()[0], None)
    assert [u.id for u in split_resources(two, "application/fhir+json")] == ["a", "b"]


def test_single_resource_and_bodies_that_are_not_resources():
    resource = b'{"resourceType": "Patient", "id": "p1", "meta": {"lastUpdated": "2024-01-01T00:00:00Z"}}'
    body = b"\xef\xbb\xbf  " + resource + b"\n"
    assert split_resources(body, "application/fhir+json") == [
        Unit(5, len(resource), "Patient", "p1", last_updated="2024-01-01T00:00:00Z")]
    assert split_resources(b'{"resourceType": "Patient"}', None) == [
        Unit(0, 27, "Patient", None, parse_status="missing_id", parse_detail="Patient has no id")]
    assert split_resources(b'{"resourceType": "Bundle", "type": "searchset", "entry": []}', None) == [
        Unit(0, 60, "Bundle", None)]
    cases = {
        b"MSH|^~\\&|not json": ("invalid_json", "line 1 column 1: Expecting value"),
        b'{"resourceType": "Patient"} trailing': ("invalid_json", "line 1 column 29: Extra data"),
        b'{"resourceType": "Patient", "x": NaN}': ("invalid_json", "NaN is not a JSON value"),
        b'{"resourceType": "Bundle", "entry": [{"resource": {}} {}]}': (
            "invalid_json", "line 1 column 55: Expecting ',' delimiter"),
        b'"just a string"': ("not_a_resource", "JSON str is not an object"),
        b'{"resourceType": 7}': ("missing_resource_type", "object has no resourceType"),
        b'{"resourceType": "Patient", "name": "\xff"}': ("invalid_utf8", "byte 37: invalid start byte"),
        b"": ("invalid_json", "line 1 column 1: Expecting value"),
    }
    for body, (status, detail) in cases.items():
        assert split_resources(body, None) == [Unit(0, len(body), None, None, parse_status=status,
                                                    parse_detail=detail)], body


def test_request_target_and_load_resource():
    assert request_target("Patient/123") == ("Patient", "123")
    assert request_target("https://h/fhir/Observation/o-1/_history/2") == ("Observation", "o-1")
    assert request_target("Patient?identifier=a|b") == ("Patient", None)
    assert request_target("$process-message") == (None, None)
    assert request_target(None) == (None, None)
    assert load_resource(b'\xef\xbb\xbf{"resourceType": "Patient"}') == {"resourceType": "Patient"}
    with pytest.raises(PayloadError) as caught:
        load_resource(b'{"resourceType": "Patient", "v": Infinity}')
    assert (caught.value.status, caught.value.detail) == ("invalid_json", "Infinity is not a JSON value")


# --- silver: timestamps ---------------------------------------------------------------------------


def test_fhir_datetimes_become_utc_with_their_precision():
    cases = {
        "2024": (utc(2023, 12, 31, 23), "year"),
        "2024-03": (utc(2024, 2, 29, 23), "month"),
        "2024-07-15": (utc(2024, 7, 14, 22), "day"),
        "2024-03-10T08:15:00+01:00": (utc(2024, 3, 10, 7, 15), "second"),
        "2024-03-10T08:15:00-05:30": (utc(2024, 3, 10, 13, 45), "second"),
        "2024-03-10T08:15:00.1234567Z": (utc(2024, 3, 10, 8, 15, 0, 123456), "millisecond"),
        "2024-07-01T12:00:00": (utc(2024, 7, 1, 10), "second"),  # no offset: the default zone (summer time)
        "2016-12-31T23:59:60Z": (utc(2017, 1, 1), "second"),
    }
    assert {text: parse_datetime(text, default_tz=BERLIN) for text in cases} == cases
    for bad in ("2024-13-01", "2024-02-30", "2024-03-10T25:00:00Z", "2024-03-10T08:15Z", "24-03-10", "", 2024,
                "2024-03-10T08:15:00+24:00", "2024-03-10 08:15:00Z"):
        with pytest.raises(ValueError):
            parse_datetime(bad, default_tz=BERLIN)
    assert parse_date("1974-12") == (date(1974, 12, 1), "month")
    with pytest.raises(ValueError):
        parse_date("1974-12-01T00:00:00Z")


# --- silver: extraction ---------------------------------------------------------------------------

PATIENT = {
    "resourceType": "Patient", "id": "p1", "meta": {"versionId": "3", "lastUpdated": "2024-05-01T10:00:00.123+02:00"},
    "identifier": [
        {"type": {"coding": [{"system": V2_0203, "code": "SS"}]}, "system": "http://hl7.org/fhir/sid/us-ssn",
         "value": "999-11-2222"},
        {"use": "usual", "type": {"coding": [{"system": V2_0203, "code": "MR"}]}, "system": "urn:oid:1.2.36.146",
         "value": "12345"},
    ],
    "active": False,
    "name": [{"use": "usual", "given": ["Jim"]},
             {"use": "official", "family": "Chalmers", "given": ["Peter", "James"]}],
    "telecom": [{"system": "email", "value": "p@example.org"}, {"system": "phone", "value": "(03) 5555 6473"}],
    "gender": "male", "birthDate": "1974-12", "deceasedBoolean": False,
    "address": [{"use": "work", "city": "Elsewhere"},
                {"use": "home", "line": ["534 Erewhon St"], "city": "PleasantVille", "state": "Vic",
                 "postalCode": "3999", "country": "AU"}],
    "link": [{"other": {"reference": "Patient/p0"}, "type": "replaces"},
             {"other": {"identifier": {"system": "urn:mrn", "value": "777"}}, "type": "replaced-by"},
             {"other": {"reference": "RelatedPerson/r1"}, "type": "seealso"}],
}


def test_patient_with_mrn_official_name_and_merges():
    head = {"id": "p1", "version_id": "3", "last_updated": utc(2024, 5, 1, 8, 0, 0, 123000)}
    assert extract(PATIENT, default_tz=BERLIN) == Extracted(patients=[{
        **head, "source_system": "urn:oid:1.2.36.146", "mrn": "12345",
        "identifiers": [
            {"system": "http://hl7.org/fhir/sid/us-ssn", "value": "999-11-2222", "type_code": "SS", "use": None},
            {"system": "urn:oid:1.2.36.146", "value": "12345", "type_code": "MR", "use": "usual"}],
        "family": "Chalmers", "given": ["Peter", "James"], "birth_date": date(1974, 12, 1),
        "birth_date_precision": "month", "gender": "male", "address_lines": ["534 Erewhon St"],
        "city": "PleasantVille", "state": "Vic", "postal_code": "3999", "country": "AU", "phone": "(03) 5555 6473",
        "deceased": False, "deceased_at": None, "active": False,
        "links": [
            {"type": "replaces", "other_reference": "Patient/p0", "other_identifier_system": None,
             "other_identifier_value": None},
            {"type": "replaced-by", "other_reference": None, "other_identifier_system": "urn:mrn",
             "other_identifier_value": "777"},
            {"type": "seealso", "other_reference": "RelatedPerson/r1", "other_identifier_system": None,
             "other_identifier_value": None}],
    }], merges=[
        {**head, "link_type": "replaces",
         "surviving_reference": "Patient/p1", "surviving_identifier_system": "urn:oid:1.2.36.146",
         "surviving_identifier_value": "12345",
         "prior_reference": "Patient/p0", "prior_identifier_system": None, "prior_identifier_value": None},
        {**head, "link_type": "replaced-by",
         "surviving_reference": None, "surviving_identifier_system": "urn:mrn", "surviving_identifier_value": "777",
         "prior_reference": "Patient/p1", "prior_identifier_system": "urn:oid:1.2.36.146",
         "prior_identifier_value": "12345"},
    ])


def test_patient_without_mr_uses_first_identifier_and_notes_bad_elements():
    patient = {"resourceType": "Patient", "id": "p2",
               "identifier": [{"value": "no-system"}, {"system": "s", "value": "v"}],
               "birthDate": "1990-02-30", "deceasedDateTime": "2020-01-01T10:00:00Z", "active": "yes", "name": "Smith"}
    extracted = extract(patient, default_tz=BERLIN)
    row = extracted.patients[0]
    assert (row["source_system"], row["mrn"], row["birth_date"], row["deceased"], row["deceased_at"], row["active"],
            row["family"], row["given"]) == (None, "no-system", None, True, utc(2020, 1, 1, 10), None, None, [])
    assert extracted.issues == [
        {"code": "bad_timestamp", "detail": "'1990-02-30' is not a valid date or time: day is out of range for month",
         "path": "Patient.birthDate"},
        {"code": "bad_element", "detail": "expected an array, got a string", "path": "Patient.name"},
        {"code": "bad_element", "detail": "expected a boolean, got a string", "path": "Patient.active"},
    ]


ENCOUNTER = {
    "resourceType": "Encounter", "id": "e1", "meta": {"versionId": "2", "lastUpdated": "2024-05-02T00:00:00Z"},
    "identifier": [{"system": "urn:visit", "value": "V100"}], "status": "in-progress",
    "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"},
    "serviceType": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/service-type", "code": "394802001",
                                "display": "General medicine"}]},
    "subject": {"reference": "Patient/p1"}, "period": {"start": "2024-05-01T22:30:00-04:00"},
    "location": [{"location": {"reference": "Location/icu-1", "display": "ICU bed 1"}, "status": "active",
                  "period": {"start": "2024-05-02T03:00:00Z", "end": "2024-05-03"}}],
}


def test_encounter():
    assert extract(ENCOUNTER, default_tz=BERLIN) == Extracted(encounters=[{
        "id": "e1", "version_id": "2", "last_updated": utc(2024, 5, 2),
        "identifiers": [{"system": "urn:visit", "value": "V100", "type_code": None, "use": None}],
        "status": "in-progress", "class_code": "IMP", "class_system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
        "subject_reference": "Patient/p1", "subject_identifier_system": None, "subject_identifier_value": None,
        "period_start": utc(2024, 5, 2, 2, 30), "period_end": None,
        "locations": [{"reference": "Location/icu-1", "display": "ICU bed 1", "status": "active",
                       "period_start": utc(2024, 5, 2, 3), "period_end": utc(2024, 5, 2, 22)}],
        "service_type_code": "394802001", "service_type_system": "http://terminology.hl7.org/CodeSystem/service-type",
        "service_type_display": "General medicine",
    }])
    assert check(ENCOUNTER) == [] and validate(ENCOUNTER) == []


def observation_row(**values: object) -> dict[str, object]:
    """An Observation row: every key None except the ones given."""
    return {**dict.fromkeys(OBSERVATION_KEYS), **values}


BP_PANEL = {
    "resourceType": "Observation", "id": "bp1", "meta": {"versionId": "1", "lastUpdated": "2024-03-10T07:16:00Z"},
    "status": "final", "category": [VITALS],
    "code": {"coding": [{"system": LOINC, "code": "85354-9", "display": "Blood pressure panel"}]},
    "subject": {"reference": "Patient/p1"}, "encounter": {"reference": "Encounter/e1"},
    "effectiveDateTime": "2024-03-10T08:15:00+01:00",
    "component": [
        {"code": {"coding": [{"system": LOINC, "code": "8480-6", "display": "Systolic blood pressure"}]},
         "valueQuantity": {"value": 142, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"}},
        {"code": {"coding": [{"system": LOINC, "code": "8462-4", "display": "Diastolic blood pressure"}]},
         "valueQuantity": {"value": 88.5, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"}},
    ],
}
BP_PARENT = {"id": "bp1", "version_id": "1", "last_updated": utc(2024, 3, 10, 7, 16), "status": "final",
             "category_codes": ["vital-signs"], "subject_reference": "Patient/p1",
             "encounter_reference": "Encounter/e1",
             "effective_at": utc(2024, 3, 10, 7, 15), "effective_precision": "second",
             "effective_source": "effectiveDateTime", "panel_code": "85354-9", "code_system": LOINC, "alt_codes": [],
             "value_type": "Quantity", "value_unit": "mmHg", "value_unit_code": "mm[Hg]", "value_unit_system": UCUM,
             "missing_value": False}


def test_blood_pressure_panel_gives_one_row_per_component():
    assert extract(BP_PANEL, default_tz=BERLIN) == Extracted(observations=[
        observation_row(**BP_PARENT, component_index=0, code="8480-6", code_display="Systolic blood pressure",
                        value_num=142.0),
        observation_row(**BP_PARENT, component_index=1, code="8462-4", code_display="Diastolic blood pressure",
                        value_num=88.5),
    ])
    assert check(BP_PANEL) == [] and validate(BP_PANEL) == []


def test_component_with_data_absent_reason_and_panel_55284_4():
    panel = {**BP_PANEL, "code": {"coding": [{"system": LOINC, "code": "55284-4"}]},
             "component": [BP_PANEL["component"][0],
                           {"code": {"coding": [{"system": LOINC, "code": "8462-4"}]},
                            "dataAbsentReason": {"coding": [{"code": "error"}]}}]}
    rows = extract(panel, default_tz=BERLIN).observations
    assert [(r["panel_code"], r["code"], r["value_num"], r["missing_value"], r["absent_reason"]) for r in rows] == [
        ("55284-4", "8480-6", 142.0, False, None), ("55284-4", "8462-4", None, True, "error")]


def test_observation_prefers_loinc_and_reads_contained_subject_identifier():
    observation = {
        "resourceType": "Observation", "id": "o2", "status": "amended", "category": [VITALS],
        "contained": [{"resourceType": "Patient", "id": "pt",
                       "identifier": [{"system": "urn:hosp", "value": "H1"},
                                      {"type": {"coding": [{"code": "MR"}]}, "system": "urn:mrn", "value": "M42"}]}],
        "code": {"coding": [{"system": SNOMED, "code": "86290005", "display": "Respiration rate"},
                            {"system": LOINC, "code": "9279-1", "display": "Respiratory rate"}],
                 "text": "RR"},
        "subject": {"reference": "#pt"}, "effectiveInstant": "2024-03-10T08:15:00.250Z",
        "valueQuantity": {"value": 18, "comparator": ">", "unit": "/min", "system": UCUM, "code": "/min"},
    }
    assert extract(observation, default_tz=BERLIN) == Extracted(observations=[observation_row(
        id="o2", status="amended", category_codes=["vital-signs"], subject_reference="#pt",
        subject_identifier_system="urn:mrn", subject_identifier_value="M42",
        effective_at=utc(2024, 3, 10, 8, 15, 0, 250000), effective_precision="millisecond",
        effective_source="effectiveInstant", code="9279-1", code_system=LOINC, code_display="Respiratory rate",
        alt_codes=[{"system": SNOMED, "code": "86290005", "display": "Respiration rate"}], value_type="Quantity",
        value_num=18.0, value_unit="/min", value_unit_code="/min", value_unit_system=UCUM, value_comparator=">",
        missing_value=False)])


def test_value_types_absent_values_and_issues():
    base = {"resourceType": "Observation", "id": "o", "status": "final", "code": {"text": "Note"},
            "subject": {"identifier": {"system": "urn:mrn", "value": "M1"}}, "effectivePeriod": {"start": "2024-03"}}
    acvpu = {"coding": [{"system": SNOMED, "code": "248234008", "display": "Mentally alert"}], "text": "A"}
    cases = [
        ({"valueCodeableConcept": acvpu}, {"value_type": "CodeableConcept", "value_code": "248234008",
                                           "value_code_system": SNOMED, "value_text": "Mentally alert"}),
        ({"valueString": "clear"}, {"value_type": "string", "value_text": "clear"}),
        ({"valueInteger": 3}, {"value_type": "integer", "value_num": 3.0}),
        ({"valueBoolean": False}, {"value_type": "boolean", "value_bool": False}),
        ({"valueDateTime": "2024-03-09T23:00:00Z"}, {"value_type": "dateTime", "value_datetime": utc(2024, 3, 9, 23)}),
        ({"dataAbsentReason": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/data-absent-reason",
                                           "code": "not-performed"}]}},
         {"missing_value": True, "absent_reason": "not-performed"}),
    ]
    common = {"id": "o", "status": "final", "code_display": "Note", "alt_codes": [], "category_codes": [],
              "subject_identifier_system": "urn:mrn", "subject_identifier_value": "M1",
              "effective_at": utc(2024, 2, 29, 23), "effective_precision": "month",
              "effective_source": "effectivePeriod.start", "missing_value": False}
    for value, expected in cases:
        assert extract({**base, **value}, default_tz=BERLIN) == Extracted(
            observations=[observation_row(**{**common, **expected})]), value

    broken = {"resourceType": "Observation", "id": "x", "status": "final", "code": {"coding": [{"system": LOINC}]},
              "effectiveDateTime": "2024-02-30", "valueQuantity": {"value": "7.5", "unit": "mmol/L"}}
    extracted = extract(broken, default_tz=BERLIN)
    assert extracted.observations == [observation_row(
        id="x", status="final", alt_codes=[], category_codes=[], value_type="Quantity", value_num=7.5,
        value_unit="mmol/L", missing_value=False)]
    assert extracted.issues == [
        {"code": "missing_subject", "detail": "Observation has no subject", "path": "Observation.subject"},
        {"code": "bad_timestamp", "detail": "'2024-02-30' is not a valid date or time: day is out of range for month",
         "path": "Observation.effectiveDateTime"},
        {"code": "missing_code", "detail": "no coding with a code and no text", "path": "Observation.code"},
        {"code": "bad_quantity", "detail": "value is the string '7.5'", "path": "Observation.valueQuantity.value"},
    ]
    empty = extract({"resourceType": "Observation", "id": "y", "status": "final", "code": {"text": "t"},
                     "subject": {"reference": "Patient/1"}, "valueRange": {}}, default_tz=BERLIN)
    assert [(r["value_type"], r["missing_value"]) for r in empty.observations] == [("Range", True)]
    assert [i["code"] for i in empty.issues] == ["missing_effective", "missing_value"]
    grouping = {"resourceType": "Observation", "id": "g", "status": "final", "code": {"text": "panel"},
                "subject": {"reference": "Patient/1"}, "effectiveDateTime": "2024", "hasMember": [{"reference": "x"}]}
    assert extract(grouping, default_tz=BERLIN) == Extracted()


def test_service_request_and_imaging_study():
    order = {
        "resourceType": "ServiceRequest", "id": "sr1", "status": "active", "intent": "order", "priority": "stat",
        "category": [{"coding": [{"system": SNOMED, "code": "363679005", "display": "Imaging"}]}],
        "code": {"coding": [{"system": LOINC, "code": "24627-2", "display": "Chest CT"}]},
        "subject": {"reference": "Patient/p1"}, "authoredOn": "2024-03-10T09:00:00+01:00",
        "requisition": {"system": "urn:req", "value": "RQ-9"},
        "identifier": [{"type": {"coding": [{"system": V2_0203, "code": "ACSN"}]}, "system": "urn:acc",
                        "value": "ACC-1"}],
    }
    assert extract(order, default_tz=BERLIN) == Extracted(service_requests=[{
        "id": "sr1", "version_id": None, "last_updated": None,
        "identifiers": [{"system": "urn:acc", "value": "ACC-1", "type_code": "ACSN", "use": None}],
        "status": "active", "intent": "order", "priority": "stat", "category_codes": ["363679005"],
        "code": "24627-2", "code_system": LOINC, "code_display": "Chest CT", "alt_codes": [],
        "subject_reference": "Patient/p1", "subject_identifier_system": None, "subject_identifier_value": None,
        "encounter_reference": None, "authored_at": utc(2024, 3, 10, 8), "requisition_system": "urn:req",
        "requisition_value": "RQ-9", "accession_system": "urn:acc", "accession": "ACC-1",
        "reason_codes": [], "reason_text": None, "reason_references": [], "location_codes": [],
        "location_display": None,
    }])
    study = {
        "resourceType": "ImagingStudy", "id": "is1", "status": "available", "subject": {"reference": "Patient/p1"},
        "started": "2024-03-10T09:30:00Z", "basedOn": [{"reference": "ServiceRequest/sr1"}],
        "identifier": [{"system": "urn:dicom:uid", "value": "urn:oid:1.2.840.99.1"},
                       {"type": {"coding": [{"system": V2_0203, "code": "ACSN"}]}, "value": "ACC-1"}],
        "series": [{"uid": "1.2.840.99.1.1", "modality": {"code": "CT"}, "instance": [{}, {}]},
                   {"uid": "1.2.840.99.1.2", "modality": {"code": "SR"}, "instance": [{}]}],
    }
    assert extract(study, default_tz=BERLIN) == Extracted(imaging_studies=[{
        "id": "is1", "version_id": None, "last_updated": None,
        "identifiers": [{"system": "urn:dicom:uid", "value": "urn:oid:1.2.840.99.1", "type_code": None, "use": None},
                        {"system": None, "value": "ACC-1", "type_code": "ACSN", "use": None}],
        "status": "available", "subject_reference": "Patient/p1", "subject_identifier_system": None,
        "subject_identifier_value": None, "encounter_reference": None, "started_at": utc(2024, 3, 10, 9, 30),
        "study_uid": "1.2.840.99.1", "accession_system": None, "accession": "ACC-1", "modalities": ["CT", "SR"],
        "number_of_series": 2, "number_of_instances": 3, "based_on": ["ServiceRequest/sr1"],
    }])


def test_other_types_give_nothing_and_unusable_objects_raise():
    assert extract({"resourceType": "Condition", "id": "c"}, default_tz=BERLIN) == Extracted()
    for obj, code in (([], "not_a_resource"), ({"id": "x"}, "missing_resource_type")):
        with pytest.raises(FhirParseError) as caught:
            extract(obj, default_tz=BERLIN)
        assert caught.value.code == code
    with pytest.raises(FhirParseError) as caught:
        parse_payload(b"{broken")
    assert (caught.value.code, caught.value.detail) == ("invalid_json",
                                                        "line 1 column 2: Expecting property name enclosed in double "
                                                        "quotes")
    assert parse_payload(dumps(PATIENT)) == PATIENT
    with pytest.raises(TypeError, match="default_tz must be a tzinfo"):
        extract(PATIENT, default_tz="Europe/Berlin")


# --- silver: check and validate --------------------------------------------------------------------


def test_check_reports_what_silver_cannot_use():
    observation = {
        "resourceType": "Observation", "id": "bad id", "meta": {"lastUpdated": "2024-01-01"},
        "status": "done", "category": {"text": "vitals"}, "subject": "Patient/1",
        "effectiveDateTime": "2024-01-01T10:00:00Z", "effectivePeriod": {"start": "yesterday"},
        "valueQuantity": {"value": "12", "comparator": "=="}, "valueString": "12",
        "dataAbsentReason": {"text": "x"},
        "component": [{"valueInteger": True}],
    }
    assert check(observation) == [
        "Observation.id: expected an id, got 'bad id'",
        "Observation.meta.lastUpdated: expected an instant (a dateTime to the second), got '2024-01-01'",
        "Observation.status: expected one of amended, cancelled, corrected, entered-in-error, final, preliminary, "
        "registered, unknown, got 'done'",
        "Observation.category: expected an array, got an object",
        "Observation.subject: expected an object, got a string",
        "Observation.effectivePeriod.start: expected a dateTime, got 'yesterday'",
        "Observation.valueQuantity.value: expected a number, got '12'",
        "Observation.valueQuantity.comparator: expected one of <, <=, >, >=, got '=='",
        "Observation.component[0].valueInteger: expected an integer, got a boolean",
        "Observation.component[0].code: required element missing",
        "Observation.code: required element missing",
        "Observation.value[x]: only one allowed, got valueQuantity, valueString",
        "Observation.effective[x]: only one allowed, got effectiveDateTime, effectivePeriod",
        "Observation.dataAbsentReason: present together with a value[x]",
    ]
    assert check(PATIENT) == []
    assert check({"resourceType": "Patient", "link": [{"type": "merged"}]}) == [
        "Patient.link[0].type: expected one of refer, replaced-by, replaces, seealso, got 'merged'",
        "Patient.link[0].other: required element missing"]
    assert check({"resourceType": "Condition", "id": "c", "anything": [1]}) == []
    assert check([]) == ["not_a_resource: JSON list is not an object"]


def test_validate_with_fhir_resources_r4b():
    assert validate(PATIENT) == []
    problems = validate({"resourceType": "Observation", "status": "final", "unknown": 1,
                         "code": {"coding": [{"system": 7}]}, "component": [{"valueString": "x"}]})
    assert problems == [
        "Observation.code.coding[0].system: Input should be a valid string",
        "Observation.component[0].code: Field required",
        "Observation.unknown: Extra inputs are not permitted",
    ]
    assert validate({"resourceType": "MedicinalProduct", "id": "m"}) == [
        "MedicinalProduct: no FHIR R4B model for this resource type"]
    assert validate({"id": "x"}) == ["missing_resource_type: object has no resourceType"]


# --- real data -------------------------------------------------------------------------------------

VALIDATE_PER_FILE_AND_TYPE = 15
EXTRACTED_TYPES = ("Patient", "Encounter", "Observation", "ServiceRequest", "ImagingStudy")
ROW_KEYS = {"patients": PATIENT_KEYS, "merges": MERGE_KEYS, "encounters": ENCOUNTER_KEYS,
            "observations": OBSERVATION_KEYS, "service_requests": SERVICE_REQUEST_KEYS,
            "imaging_studies": IMAGING_STUDY_KEYS}


@pytest.mark.realdata
def test_every_real_fhir_file_splits_checks_and_extracts(realdata):
    files = sorted(p for p in (realdata / "fhir").rglob("*") if p.suffix in (".json", ".ndjson"))
    assert files
    types, statuses, outcomes, rows = Counter(), Counter(), Counter(), {}
    started = time.perf_counter()
    for path in files:
        body = path.read_bytes()
        units = split_resources(body, "application/fhir+ndjson" if path.suffix == ".ndjson" else "application/json")
        validated = Counter()
        for unit in units:
            statuses[unit.parse_status] += 1
            if unit.parse_status not in ("ok", "missing_id") or unit.length == 0:
                continue
            resource = parse_payload(unit.payload(body))
            assert (resource["resourceType"], resource.get("id")) == (unit.resource_type, unit.id)
            types[unit.resource_type] += 1
            extracted = extract(resource, default_tz=BERLIN)
            for kind, keys in ROW_KEYS.items():
                for row in getattr(extracted, kind):
                    assert tuple(row) == keys
                    rows[(kind, row["id"], row.get("component_index"))] = row
            problems = check(resource)
            outcomes.update(f"issue:{i['code']}" for i in extracted.issues)
            outcomes["check_failed" if problems else "check_ok"] += 1
            if unit.resource_type in EXTRACTED_TYPES and validated[unit.resource_type] < VALIDATE_PER_FILE_AND_TYPE:
                validated[unit.resource_type] += 1
                outcomes["validate_failed" if validate(resource) else "validate_ok"] += 1
        if path.suffix == ".json":  # every Bundle entry's bytes are exactly its resource
            entries = json.loads(body)["entry"]
            assert [json.loads(u.payload(body)) for u in units] == [e["resource"] for e in entries]
    print(f"\n{len(files)} files in {time.perf_counter() - started:.1f} s")
    print("resource types:", dict(types.most_common()))
    print("parse status:", dict(statuses))
    print("outcomes:", dict(sorted(outcomes.items())))

    assert statuses["missing_resource_type"] == 4  # the bulk export's log.ndjson lines are not resources
    assert types["Patient"] >= 13 and types["Observation"] > 1500
    patient = rows[("patients", "129c6ac7-8d06-89de-ad63-0204a93e76c3", None)]
    assert (patient["source_system"], patient["mrn"], patient["birth_date"], patient["gender"], patient["family"],
            patient["phone"], patient["deceased_at"]) == (
        "http://hospital.smarthealthit.org", "129c6ac7-8d06-89de-ad63-0204a93e76c3", date(1927, 5, 21), "female",
        "Medhurst46", "555-810-7203", utc(1989, 5, 10, 0, 35, 22))
    agustin = rows[("patients", "27de96c6-6910-4f0f-8f10-00ce6090f447", None)]
    assert (agustin["given"], agustin["mrn"], agustin["birth_date"]) == (
        ["Agustín"], "cb5696d9-a0de-4f49-94f9-433f96a28eb0", date(1994, 2, 1))
    height = rows[("observations", "a7b38940-3cd3-43b1-bba9-6adb6090d1d3", None)]
    assert (height["code"], height["value_num"], height["value_unit_code"], height["effective_at"]) == (
        "8302-2", 139.9996742575894, "cm", utc(2010, 1, 9, 19, 4, 32))
    diastolic = rows[("observations", "fba16e5e-1b98-484e-8296-43a3995b9f75", 0)]
    assert (diastolic["panel_code"], diastolic["code"], diastolic["value_num"]) == ("55284-4", "8462-4",
                                                                                     74.1167184645281)
    study = rows[("imaging_studies", "adf70108-2b60-4080-863e-86cfadc114f0", None)]
    assert (study["study_uid"], study["modalities"], study["number_of_instances"], study["started_at"]) == (
        "1.2.840.99999999.64756812.1559319190472", ["DX"], 1, utc(1954, 11, 4, 10, 10, 39))


def test_service_request_reasons_and_location():
    order = {"resourceType": "ServiceRequest", "id": "sr2", "status": "active", "intent": "order",
             "subject": {"reference": "Patient/p1"},
             "reasonCode": [{"coding": [{"system": SNOMED, "code": "59282003", "display": "PE"}],
                             "text": "Suspected PE"}, {"text": "dyspnoea"}],
             "reasonReference": [{"reference": "Condition/c1"}],
             "locationCode": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-RoleCode",
                                           "code": "ER"}], "text": "Emergency"}]}
    [got] = extract(order, default_tz=BERLIN).service_requests
    assert (got["reason_codes"], got["reason_text"], got["reason_references"], got["location_codes"],
            got["location_display"]) == ([{"system": SNOMED, "code": "59282003", "display": "PE"}],
                                         "Suspected PE; dyspnoea", ["Condition/c1"], ["ER"], "Emergency")


def test_diagnostic_report_reads_interpreter_study_critical_and_communication():
    report = {
        "resourceType": "DiagnosticReport", "id": "dr1", "status": "final", "subject": {"reference": "Patient/p1"},
        "code": {"coding": [{"system": LOINC, "code": "24725-4", "display": "CT Head"}]},
        "identifier": [{"type": {"coding": [{"system": V2_0203, "code": "ACSN"}]}, "system": "urn:acc", "value": "A1"}],
        "category": [{"coding": [{"code": "RAD"}]}], "effectiveDateTime": "2024-03-10T09:00:00+01:00",
        "issued": "2024-03-10T09:30:00Z", "basedOn": [{"reference": "ServiceRequest/sr1"}],
        "resultsInterpreter": [{"reference": "Practitioner/r7", "display": "Okafor, Ada"}],
        "imagingStudy": [{"identifier": {"system": "urn:dicom:uid", "value": "urn:oid:1.2.3"}}],
        "conclusion": "Bleed.",
        "conclusionCode": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                                        "code": "AA"}]}],
        "contained": [{"resourceType": "Communication", "id": "c1", "sent": "2024-03-10T09:20:00Z"}],
        "extension": [{"url": "https://profiles.ihe.net/RAD/IDR/StructureDefinition/idrCommunication",
                       "valueReference": {"reference": "#c1"}},
                      {"url": "https://profiles.ihe.net/RAD/IDR/StructureDefinition/idrCommunication",
                       "valueDateTime": "2024-03-10T09:25:00Z"}]}
    [got] = extract(report, default_tz=BERLIN).diagnostic_reports
    assert (got["accession"], got["effective_at"], got["issued_at"], got["based_on"], got["interpreter_id"],
            got["interpreter_name"], got["study_uids"], got["conclusion"], got["communicated_at"]) == (
        "A1", utc(2024, 3, 10, 8), utc(2024, 3, 10, 9, 30), ["ServiceRequest/sr1"], "Practitioner/r7", "Okafor, Ada",
        ["1.2.3"], "Bleed.", utc(2024, 3, 10, 9, 20))
    assert [c["code"] for c in got["conclusion_codes"]] == ["AA"] and got["category_codes"] == ["RAD"]
    assert check({**report, "status": "done"}) == [
        "DiagnosticReport.status: expected one of amended, appended, cancelled, corrected, entered-in-error, final, "
        "partial, preliminary, registered, unknown, got 'done'"]
