"""FHIR R4 resources into silver rows: a fast structural check, full validation, and clinical extraction.

Three steps, each a pure function of one parsed resource (a dict, as `parse_payload` returns it):

- `check(resource)`: the fast structural check of what silver reads (JSON types, required elements,
  code values, one value[x] and one effective[x], timestamps that parse). Cheap enough to run on
  every resource.
- `validate(resource)`: full structural validation with fhir.resources 8.1.0. That release ships
  R5 at the top level and `R4B` (FHIR 4.3.0) and `STU3` subpackages, no R4 package. R4B is used: it
  is the R4 technical correction, and the resources silver extracts (Patient, Encounter,
  Observation, ServiceRequest, ImagingStudy) and all data types they use are unchanged from R4.
  R4-only resource types that R4B replaced (MedicinalProduct* and friends) have no model and are
  reported as such. Stricter than `check`: a dateTime with a time but no offset fails here, while
  `extract` reads it in the default time zone.
- `extract(resource, default_tz=...)`: the rows silver keeps, as an `Extracted` of plain dicts whose
  keys are listed in PATIENT_KEYS, MERGE_KEYS, ENCOUNTER_KEYS, OBSERVATION_KEYS,
  SERVICE_REQUEST_KEYS, IMAGING_STUDY_KEYS and ISSUE_KEYS. Timestamps are timezone-aware UTC
  datetimes; a partial date (`2020`, `2020-03`) is the start of that period in the default time zone
  with its precision kept alongside where it matters (effective time, birth date).

A problem inside a resource never loses the other values: it becomes an issue (code, detail, element
path) on the Extracted. `FhirParseError` is raised only for a resource that is unusable as a whole.
Reason codes (REASON_CODES), stable and shared with `bronze.fhir_split` parse statuses:

    invalid_utf8, invalid_json, not_a_resource, missing_resource_type   the payload is no resource
    validation_failed    check or validate found problems (the caller's quarantine reason)
    bad_timestamp        a date, dateTime or instant that does not parse (the value is None)
    bad_quantity         a valueQuantity without a numeric value (a numeric string is read, and noted)
    bad_element          an element silver reads has the wrong JSON type (it is skipped)
    missing_subject      an Observation, Encounter, ServiceRequest or ImagingStudy without subject
    missing_code         an Observation or component without a code or text
    missing_value        an Observation or component with neither value[x] nor dataAbsentReason
    missing_effective    an Observation without an effective time silver can use

Speed, one core, Observations of ~750 bytes (CPU time on the shared 2-core dev box): `check` ~55,000/s,
`extract` ~50,000/s, `validate` ~6,000/s; with bronze's split and `parse_payload`, ~18,000/s end to end
without `validate` and ~5,000/s with it. So `check` is meant to run always and `validate` where a
configuration asks for it (or on a sample).

Pure Python (no Spark, no I/O): silver jobs call it from mapInArrow on every resource.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, timezone, tzinfo
from functools import lru_cache
from typing import Any

from bronze.fhir_split import PayloadError, load_resource, require_resource

LOINC = "http://loinc.org"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
DICOM_UID = "urn:dicom:uid"
RFC_3986 = "urn:ietf:rfc:3986"
# IHE Radiology Imaging Diagnostic Report (IDR): communications of critical results and actionable findings.
IDR_COMMUNICATION = "https://profiles.ihe.net/RAD/IDR/StructureDefinition/idrCommunication"

INVALID_UTF8 = "invalid_utf8"
INVALID_JSON = "invalid_json"
NOT_A_RESOURCE = "not_a_resource"
MISSING_RESOURCE_TYPE = "missing_resource_type"
VALIDATION_FAILED = "validation_failed"
BAD_TIMESTAMP = "bad_timestamp"
BAD_QUANTITY = "bad_quantity"
BAD_ELEMENT = "bad_element"
MISSING_SUBJECT = "missing_subject"
MISSING_CODE = "missing_code"
MISSING_VALUE = "missing_value"
MISSING_EFFECTIVE = "missing_effective"
REASON_CODES = (INVALID_UTF8, INVALID_JSON, NOT_A_RESOURCE, MISSING_RESOURCE_TYPE, VALIDATION_FAILED,
                BAD_TIMESTAMP, BAD_QUANTITY, BAD_ELEMENT, MISSING_SUBJECT, MISSING_CODE, MISSING_VALUE,
                MISSING_EFFECTIVE)

_ROW_HEAD = ("id", "version_id", "last_updated")
_SUBJECT = ("subject_reference", "subject_identifier_system", "subject_identifier_value")
PATIENT_KEYS = (*_ROW_HEAD, "source_system", "mrn", "identifiers", "family", "given", "birth_date",
                "birth_date_precision", "gender", "address_lines", "city", "state", "postal_code", "country",
                "phone", "deceased", "deceased_at", "active", "links")
MERGE_KEYS = (*_ROW_HEAD, "link_type", "surviving_reference", "surviving_identifier_system",
              "surviving_identifier_value", "prior_reference", "prior_identifier_system", "prior_identifier_value")
ENCOUNTER_KEYS = (*_ROW_HEAD, "identifiers", "status", "class_code", "class_system", *_SUBJECT, "period_start",
                  "period_end", "locations", "service_type_code", "service_type_system", "service_type_display")
OBSERVATION_KEYS = (*_ROW_HEAD, "status", "category_codes", *_SUBJECT, "encounter_reference", "effective_at",
                    "effective_precision", "effective_source", "panel_code", "component_index", "code",
                    "code_system", "code_display", "alt_codes", "value_type", "value_num", "value_unit",
                    "value_unit_code", "value_unit_system", "value_comparator", "value_code", "value_code_system",
                    "value_text", "value_bool", "value_datetime", "missing_value", "absent_reason")
SERVICE_REQUEST_KEYS = (*_ROW_HEAD, "identifiers", "status", "intent", "priority", "category_codes", "code",
                        "code_system", "code_display", "alt_codes", *_SUBJECT, "encounter_reference",
                        "authored_at", "requisition_system", "requisition_value", "accession_system", "accession",
                        "reason_codes", "reason_text", "reason_references", "location_codes", "location_display")
DIAGNOSTIC_REPORT_KEYS = (*_ROW_HEAD, "identifiers", "status", "category_codes", "code", "code_system",
                          "code_display", "alt_codes", *_SUBJECT, "encounter_reference", "effective_at", "issued_at",
                          "based_on", "accession_system", "accession", "interpreter_id", "interpreter_name",
                          "study_uids", "conclusion", "conclusion_codes", "communicated_at")
IMAGING_STUDY_KEYS = (*_ROW_HEAD, "identifiers", "status", *_SUBJECT, "encounter_reference", "started_at",
                      "study_uid", "accession_system", "accession", "modalities", "number_of_series",
                      "number_of_instances", "based_on")
ISSUE_KEYS = ("code", "detail", "path")
# Nested lists: identifiers, links, locations, alt_codes hold dicts with these keys.
IDENTIFIER_KEYS = ("system", "value", "type_code", "use")
LINK_KEYS = ("type", "other_reference", "other_identifier_system", "other_identifier_value")
LOCATION_KEYS = ("reference", "display", "status", "period_start", "period_end")
CODING_KEYS = ("system", "code", "display")


class FhirParseError(ValueError):
    """A payload or object that is not a usable FHIR resource; `code` is one of REASON_CODES."""

    def __init__(self, code: str, detail: str):
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class Extracted:
    """The silver rows read from one resource, and the problems met while reading it."""

    patients: list[dict[str, Any]] = field(default_factory=list)
    merges: list[dict[str, Any]] = field(default_factory=list)  # Patient.link replaces / replaced-by (HL7 A40)
    encounters: list[dict[str, Any]] = field(default_factory=list)
    observations: list[dict[str, Any]] = field(default_factory=list)  # one per measured value
    service_requests: list[dict[str, Any]] = field(default_factory=list)  # all ServiceRequests; category kept
    imaging_studies: list[dict[str, Any]] = field(default_factory=list)
    diagnostic_reports: list[dict[str, Any]] = field(default_factory=list)
    issues: list[dict[str, Any]] = field(default_factory=list)


def parse_payload(raw: bytes) -> dict[str, Any]:
    """The resource in a bronze payload; raises FhirParseError when it is not one."""
    try:
        return load_resource(raw)
    except PayloadError as exc:
        raise FhirParseError(exc.status, exc.detail) from None


# --- FHIR date, dateTime and instant -------------------------------------------------------------

_DATETIME = re.compile(
    r"(?P<year>\d{4})(?:-(?P<month>\d{2})(?:-(?P<day>\d{2})"
    r"(?:T(?P<hour>\d{2}):(?P<minute>\d{2}):(?P<second>\d{2})(?:\.(?P<fraction>\d+))?"
    r"(?P<tz>Z|[+-](?:[01]\d|2[0-3]):[0-5]\d)?)?)?)?"
)


def parse_datetime(text: str, *, default_tz: tzinfo) -> tuple[datetime, str]:
    """A FHIR date, dateTime or instant as a UTC datetime and its precision; raises ValueError.

    Precision is year, month, day, second or millisecond (any fraction of a second). A partial date
    is the start of its period in `default_tz`, as is a time sent without an offset.
    """
    local, precision, offset = _local_datetime(text)
    return local.replace(tzinfo=offset or default_tz).astimezone(UTC), precision


def parse_date(text: str) -> tuple[date, str]:
    """A FHIR date (YYYY, YYYY-MM or YYYY-MM-DD) as its first day and its precision; raises ValueError."""
    local, precision, _ = _local_datetime(text)
    if precision not in ("year", "month", "day"):
        raise ValueError(f"{text!r} is not a FHIR date")
    return local.date(), precision


def _local_datetime(text: str) -> tuple[datetime, str, tzinfo | None]:
    """The naive start of a FHIR date or dateTime, its precision and the offset it was sent with."""
    match = _DATETIME.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"{text!r} is not a FHIR date or dateTime")
    year, month, day, hour, minute, second, fraction, tz = match.groups()
    leap = second == "60"  # a leap second is the first instant of the next minute
    try:
        local = datetime(int(year), int(month or 1), int(day or 1), int(hour or 0), int(minute or 0),
                         59 if leap else int(second or 0), int(fraction[:6].ljust(6, "0")) if fraction else 0)
    except ValueError as exc:
        raise ValueError(f"{text!r} is not a valid date or time: {exc}") from None
    if hour is None:
        return local, "day" if day else "month" if month else "year", None
    if leap:
        local += timedelta(seconds=1)
    return local, "millisecond" if fraction else "second", _offset(tz) if tz else None


@lru_cache(maxsize=64)
def _offset(tz: str) -> tzinfo:
    if tz == "Z":
        return UTC
    sign = -1 if tz[0] == "-" else 1
    return timezone(sign * timedelta(hours=int(tz[1:3]), minutes=int(tz[4:6])))


# --- fast structural check ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Leaf:
    test: Callable[[Any], bool]
    what: str  # what the test expects, for the message


@dataclass(frozen=True)
class _Field:
    kind: _Leaf | frozenset[str] | _Type  # a frozenset holds the allowed codes
    many: bool = False


@dataclass(frozen=True)
class _Type:
    fields: dict[str, _Field]
    required: tuple[str, ...] = ()
    choices: tuple[str, ...] = ()  # choice-element prefixes (value, effective): at most one may be present
    rule: Callable[[dict[str, Any], str], Iterator[str]] | None = None


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _matches(pattern: str) -> Callable[[Any], bool]:
    compiled = re.compile(pattern)
    return lambda value: type(value) is str and compiled.fullmatch(value) is not None


def _timestamp_test(*, needs_time: bool) -> Callable[[Any], bool]:
    def test(value: Any) -> bool:
        try:
            return _local_datetime(value)[1] in ("second", "millisecond") or not needs_time
        except ValueError:
            return False
    return test


def _is_date(value: Any) -> bool:
    try:
        parse_date(value)
    except ValueError:
        return False
    return True


def _is_int(value: Any, low: int, high: int) -> bool:
    return type(value) is int and low <= value < high


_STRING = _Leaf(lambda v: type(v) is str and v != "", "a non-empty string")
_URI = _Leaf(_matches(r"\S+"), "a URI")
_CODE = _Leaf(_matches(r"\S+( \S+)*"), "a code")
_ID = _Leaf(_matches(r"[A-Za-z0-9\-.]{1,64}"), "an id")
_BOOLEAN = _Leaf(lambda v: type(v) is bool, "a boolean")
_DECIMAL = _Leaf(lambda v: type(v) is float or type(v) is int, "a number")
_INTEGER = _Leaf(lambda v: _is_int(v, -2**31, 2**31), "an integer")
_UNSIGNED = _Leaf(lambda v: _is_int(v, 0, 2**31), "an unsignedInt")
_DATE = _Leaf(_is_date, "a date (YYYY, YYYY-MM or YYYY-MM-DD)")
_DATETIME_CHECK = _Leaf(_timestamp_test(needs_time=False), "a dateTime")
_INSTANT = _Leaf(_timestamp_test(needs_time=True), "an instant (a dateTime to the second)")


def _one(kind: Any) -> _Field:
    return _Field(kind)


def _many(kind: Any) -> _Field:
    return _Field(kind, many=True)


def _codes(*codes: str) -> frozenset[str]:
    return frozenset(codes)


_CODING = _Type({"system": _one(_URI), "code": _one(_CODE), "display": _one(_STRING)})
_CODEABLE = _Type({"coding": _many(_CODING), "text": _one(_STRING)})
_IDENTIFIER = _Type({"use": _one(_codes("usual", "official", "temp", "secondary", "old")),
                     "type": _one(_CODEABLE), "system": _one(_URI), "value": _one(_STRING)})
_REFERENCE = _Type({"reference": _one(_STRING), "identifier": _one(_IDENTIFIER), "display": _one(_STRING)})
_PERIOD = _Type({"start": _one(_DATETIME_CHECK), "end": _one(_DATETIME_CHECK)})
_QUANTITY = _Type({"value": _one(_DECIMAL), "comparator": _one(_codes("<", "<=", ">=", ">")),
                   "unit": _one(_STRING), "system": _one(_URI), "code": _one(_CODE)})
_RESOURCE = {"id": _one(_ID), "meta": _one(_Type({"versionId": _one(_ID), "lastUpdated": _one(_INSTANT)}))}


def _absent_only_without_value(obj: dict[str, Any], path: str) -> Iterator[str]:
    """obs-6: dataAbsentReason only when there is no value[x]."""
    if "dataAbsentReason" in obj and any(_is_choice(key, "value") for key in obj):
        yield f"{path}.dataAbsentReason: present together with a value[x]"


_OBSERVATION_VALUE = {
    "valueQuantity": _one(_QUANTITY), "valueCodeableConcept": _one(_CODEABLE), "valueString": _one(_STRING),
    "valueBoolean": _one(_BOOLEAN), "valueInteger": _one(_INTEGER), "valueDateTime": _one(_DATETIME_CHECK),
    "dataAbsentReason": _one(_CODEABLE),
}
_COMPONENT = _Type({"code": _one(_CODEABLE), **_OBSERVATION_VALUE}, ("code",), ("value",),
                   _absent_only_without_value)
_SPECS: dict[str, _Type] = {
    "Observation": _Type({
        **_RESOURCE,
        "status": _one(_codes("registered", "preliminary", "final", "amended", "corrected", "cancelled",
                              "entered-in-error", "unknown")),
        "category": _many(_CODEABLE), "code": _one(_CODEABLE), "subject": _one(_REFERENCE),
        "encounter": _one(_REFERENCE), "effectiveDateTime": _one(_DATETIME_CHECK), "effectivePeriod": _one(_PERIOD),
        "effectiveInstant": _one(_INSTANT), **_OBSERVATION_VALUE, "component": _many(_COMPONENT),
    }, ("status", "code"), ("value", "effective"), _absent_only_without_value),
    "Patient": _Type({
        **_RESOURCE, "identifier": _many(_IDENTIFIER), "active": _one(_BOOLEAN),
        "name": _many(_Type({"use": _one(_CODE), "family": _one(_STRING), "given": _many(_STRING)})),
        "telecom": _many(_Type({"system": _one(_codes("phone", "fax", "email", "pager", "url", "sms", "other")),
                                "value": _one(_STRING), "use": _one(_CODE)})),
        "gender": _one(_codes("male", "female", "other", "unknown")), "birthDate": _one(_DATE),
        "deceasedBoolean": _one(_BOOLEAN), "deceasedDateTime": _one(_DATETIME_CHECK),
        "address": _many(_Type({"use": _one(_CODE), "line": _many(_STRING), "city": _one(_STRING),
                                "state": _one(_STRING), "postalCode": _one(_STRING), "country": _one(_STRING)})),
        "link": _many(_Type({"other": _one(_REFERENCE),
                             "type": _one(_codes("replaced-by", "replaces", "refer", "seealso"))},
                            ("other", "type"))),
    }, (), ("deceased",)),
    "Encounter": _Type({
        **_RESOURCE, "identifier": _many(_IDENTIFIER),
        "status": _one(_codes("planned", "arrived", "triaged", "in-progress", "onleave", "finished", "cancelled",
                              "entered-in-error", "unknown")),
        "class": _one(_CODING), "subject": _one(_REFERENCE), "period": _one(_PERIOD),
        "serviceType": _one(_CODEABLE),
        "location": _many(_Type({"location": _one(_REFERENCE), "period": _one(_PERIOD),
                                 "status": _one(_codes("planned", "active", "reserved", "completed"))},
                                ("location",))),
    }, ("status", "class")),
    "ServiceRequest": _Type({
        **_RESOURCE, "identifier": _many(_IDENTIFIER), "requisition": _one(_IDENTIFIER),
        "status": _one(_codes("draft", "active", "on-hold", "revoked", "completed", "entered-in-error", "unknown")),
        "intent": _one(_codes("proposal", "plan", "directive", "order", "original-order", "reflex-order",
                              "filler-order", "instance-order", "option")),
        "priority": _one(_codes("routine", "urgent", "asap", "stat")), "category": _many(_CODEABLE),
        "code": _one(_CODEABLE), "subject": _one(_REFERENCE), "encounter": _one(_REFERENCE),
        "authoredOn": _one(_DATETIME_CHECK), "reasonCode": _many(_CODEABLE), "reasonReference": _many(_REFERENCE),
        "locationCode": _many(_CODEABLE), "locationReference": _many(_REFERENCE),
    }, ("status", "intent", "subject")),
    "DiagnosticReport": _Type({
        **_RESOURCE, "identifier": _many(_IDENTIFIER), "basedOn": _many(_REFERENCE),
        "status": _one(_codes("registered", "partial", "preliminary", "final", "amended", "corrected", "appended",
                              "cancelled", "entered-in-error", "unknown")),
        "category": _many(_CODEABLE), "code": _one(_CODEABLE), "subject": _one(_REFERENCE),
        "encounter": _one(_REFERENCE), "effectiveDateTime": _one(_DATETIME_CHECK), "effectivePeriod": _one(_PERIOD),
        "issued": _one(_INSTANT), "resultsInterpreter": _many(_REFERENCE), "imagingStudy": _many(_REFERENCE),
        "conclusion": _one(_STRING), "conclusionCode": _many(_CODEABLE),
    }, ("status", "code"), ("effective",)),
    "ImagingStudy": _Type({
        **_RESOURCE, "identifier": _many(_IDENTIFIER),
        "status": _one(_codes("registered", "available", "cancelled", "entered-in-error", "unknown")),
        "subject": _one(_REFERENCE), "encounter": _one(_REFERENCE), "started": _one(_DATETIME_CHECK),
        "modality": _many(_CODING), "numberOfSeries": _one(_UNSIGNED), "numberOfInstances": _one(_UNSIGNED),
        "basedOn": _many(_REFERENCE),
        "series": _many(_Type({"uid": _one(_ID), "modality": _one(_CODING), "numberOfInstances": _one(_UNSIGNED)},
                              ("uid", "modality"))),
    }, ("status", "subject")),
}
_OTHER = _Type(_RESOURCE)


def check(resource: dict[str, Any]) -> list[str]:
    """Problems with the elements silver reads, as `path: problem` messages; empty when usable.

    Elements silver does not read, and resource types it does not extract beyond id and meta, are
    not looked into: `validate` is the full check. A time without an offset passes (extract reads it
    in the default time zone).
    """
    try:
        require_resource(resource)
    except PayloadError as exc:
        return [f"{exc.status}: {exc.detail}"]
    resource_type = resource["resourceType"]
    problems: list[str] = []
    _check_object(resource, _SPECS.get(resource_type, _OTHER), resource_type, problems)
    return problems


def _is_choice(key: str, prefix: str) -> bool:
    return key.startswith(prefix) and key[len(prefix):len(prefix) + 1].isupper()


def _check_object(obj: dict[str, Any], spec: _Type, path: str, problems: list[str]) -> None:
    fields = spec.fields
    for name, value in obj.items():
        element = fields.get(name)
        if element is None or value is None:
            continue
        if not element.many:
            kind = element.kind
            if type(kind) is not _Leaf or not kind.test(value):  # a passing leaf, the common case, costs no call
                _check_value(value, kind, path, name, problems)
        elif type(value) is not list:
            problems.append(f"{path}.{name}: expected an array, got {_json_type(value)}")
        else:
            for index, item in enumerate(value):
                _check_value(item, element.kind, path, f"{name}[{index}]", problems)
    for name in spec.required:
        if obj.get(name) is None:
            problems.append(f"{path}.{name}: required element missing")
    for prefix in spec.choices:
        present = [key for key in obj if _is_choice(key, prefix)]
        if len(present) > 1:
            problems.append(f"{path}.{prefix}[x]: only one allowed, got {', '.join(present)}")
    if spec.rule:
        problems.extend(spec.rule(obj, path))


def _check_value(value: Any, kind: Any, path: str, name: str, problems: list[str]) -> None:
    """Check one value of element `name` of the object at `path` (the path is built only for a problem)."""
    if type(kind) is _Leaf:
        if not kind.test(value):
            got = repr(value) if type(value) is str else _json_type(value)
            problems.append(f"{path}.{name}: expected {kind.what}, got {got}")
    elif type(kind) is _Type:
        if type(value) is dict:
            _check_object(value, kind, f"{path}.{name}", problems)
        else:
            problems.append(f"{path}.{name}: expected an object, got {_json_type(value)}")
    elif type(value) is not str or value not in kind:
        got = repr(value) if type(value) is str else _json_type(value)
        problems.append(f"{path}.{name}: expected one of {', '.join(sorted(kind))}, got {got}")


# --- full validation ------------------------------------------------------------------------------


def validate(resource: dict[str, Any]) -> list[str]:
    """Structural validation with the fhir.resources R4B models, as `path: problem` messages; empty = valid."""
    try:
        require_resource(resource)
    except PayloadError as exc:
        return [f"{exc.status}: {exc.detail}"]
    resource_type = resource["resourceType"]
    model = _model(resource_type)
    if model is None:
        return [f"{resource_type}: no FHIR R4B model for this resource type"]
    try:
        model.model_validate(resource)
    except ValueError as exc:  # pydantic.ValidationError is a ValueError
        errors = getattr(exc, "errors", None)
        if errors is None:
            return [f"{resource_type}: {exc}"]
        return [_error_message(resource_type, error) for error in errors()]
    return []


@lru_cache(maxsize=256)
def _model(resource_type: str) -> Any:
    """The fhir.resources R4B model class for a resource type, or None (imported on first use)."""
    from fhir.resources.R4B import get_fhir_model_class

    try:
        return get_fhir_model_class(resource_type)
    except ValueError:
        return None


def _error_message(resource_type: str, error: dict[str, Any]) -> str:
    path = resource_type
    for part in error.get("loc", ()):
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return f"{path}: {' '.join(str(error.get('msg', 'invalid')).split())}"


# --- extraction ----------------------------------------------------------------------------------


class _Reader:
    """Reads elements of one resource leniently, noting an issue for each one it cannot use."""

    def __init__(self, resource: dict[str, Any], default_tz: tzinfo):
        self.resource = resource
        self.path = resource["resourceType"]
        self.default_tz = default_tz
        self.issues: list[dict[str, Any]] = []

    def issue(self, code: str, detail: str, path: str) -> None:
        self.issues.append({"code": code, "detail": detail, "path": path})

    def obj(self, parent: dict[str, Any], key: str, path: str) -> dict[str, Any]:
        """parent[key] when it is an object; {} when absent or (with an issue) of another type."""
        value = parent.get(key)
        if value is None or isinstance(value, dict):
            return value or {}
        self.issue(BAD_ELEMENT, f"expected an object, got {_json_type(value)}", f"{path}.{key}")
        return {}

    def objs(self, parent: dict[str, Any], key: str, path: str) -> list[tuple[int, dict[str, Any]]]:
        """(index, item) for the objects in the array parent[key]; other items noted as issues."""
        value = parent.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            self.issue(BAD_ELEMENT, f"expected an array, got {_json_type(value)}", f"{path}.{key}")
            return []
        items = []
        for index, item in enumerate(value):
            if isinstance(item, dict):
                items.append((index, item))
            else:
                self.issue(BAD_ELEMENT, f"expected an object, got {_json_type(item)}", f"{path}.{key}[{index}]")
        return items

    def text(self, parent: dict[str, Any], key: str, path: str) -> str | None:
        """parent[key] when it is a string; None when absent or (with an issue) of another type."""
        value = parent.get(key)
        if value is None or isinstance(value, str):
            return value
        self.issue(BAD_ELEMENT, f"expected a string, got {_json_type(value)}", f"{path}.{key}")
        return None

    def flag(self, parent: dict[str, Any], key: str, path: str) -> bool | None:
        """parent[key] when it is a boolean; None when absent or (with an issue) of another type."""
        value = parent.get(key)
        if value is None or isinstance(value, bool):
            return value
        self.issue(BAD_ELEMENT, f"expected a boolean, got {_json_type(value)}", f"{path}.{key}")
        return None

    def time(self, parent: dict[str, Any], key: str, path: str) -> tuple[datetime | None, str | None]:
        """parent[key] as a UTC datetime and its precision; (None, None) when absent or unreadable."""
        value = parent.get(key)
        if value is None:
            return None, None
        try:
            return parse_datetime(value, default_tz=self.default_tz)
        except ValueError as exc:
            self.issue(BAD_TIMESTAMP, str(exc), f"{path}.{key}")
            return None, None

    def head(self) -> dict[str, Any]:
        """id, version_id and last_updated of the resource."""
        meta = self.obj(self.resource, "meta", self.path)
        return {"id": self.text(self.resource, "id", self.path),
                "version_id": self.text(meta, "versionId", f"{self.path}.meta"),
                "last_updated": self.time(meta, "lastUpdated", f"{self.path}.meta")[0]}

    def subject(self, key: str = "subject") -> dict[str, Any]:
        """subject_reference and, for identifier or contained references, the identifier."""
        reference = self.obj(self.resource, key, self.path)
        if not reference:
            self.issue(MISSING_SUBJECT, f"{self.path} has no {key}", f"{self.path}.{key}")
        text = self.text(reference, "reference", f"{self.path}.{key}")
        identifier = self.obj(reference, "identifier", f"{self.path}.{key}")
        if not identifier and text and text.startswith("#"):
            identifier = _chosen_identifier(self.contained(text[1:]).get("identifier"))
        return {"subject_reference": text, "subject_identifier_system": _str(identifier.get("system")),
                "subject_identifier_value": _str(identifier.get("value"))}

    def contained(self, local_id: str) -> dict[str, Any]:
        """The contained resource with this local id, or {}."""
        contained = self.resource.get("contained")
        for item in contained if isinstance(contained, list) else ():
            if isinstance(item, dict) and item.get("id") == local_id:
                return item
        return {}

    def reference(self, key: str) -> str | None:
        """The reference string of the Reference element `key`."""
        return self.text(self.obj(self.resource, key, self.path), "reference", f"{self.path}.{key}")


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _coding_dict(coding: dict[str, Any]) -> dict[str, Any]:
    return {"system": _str(coding.get("system")), "code": _str(coding.get("code")),
            "display": _str(coding.get("display"))}


def _concept(concept: Any, prefer: str | None = LOINC) -> tuple[dict[str, Any] | None, list[dict[str, Any]], Any]:
    """A CodeableConcept's chosen coding (system `prefer`, else the first with a code), the others, its text."""
    if not isinstance(concept, dict):
        return None, [], None
    codings = [c for c in _dicts(concept.get("coding")) if isinstance(c.get("code"), str)]
    chosen = next((c for c in codings if c.get("system") == prefer), codings[0] if codings else None)
    others = [_coding_dict(c) for c in codings if c is not chosen]
    return chosen, others, _str(concept.get("text"))


def _code_fields(concept: Any, prefer: str | None = LOINC) -> dict[str, Any]:
    """code, code_system, code_display (the coding's display, else the concept's text) and alt_codes."""
    chosen, others, text = _concept(concept, prefer)
    chosen = chosen or {}
    return {"code": _str(chosen.get("code")), "code_system": _str(chosen.get("system")),
            "code_display": _str(chosen.get("display")) or text, "alt_codes": others}


def _category_codes(resource: dict[str, Any]) -> list[str]:
    return [c["code"] for concept in _dicts(resource.get("category")) for c in _dicts(concept.get("coding"))
            if isinstance(c.get("code"), str)]


def _has_type(identifier: dict[str, Any], code: str) -> bool:
    """True when Identifier.type has v2-0203 `code` (a coding without a system counts)."""
    concept = identifier.get("type")
    return isinstance(concept, dict) and any(
        c.get("code") == code and c.get("system") in (V2_0203, None) for c in _dicts(concept.get("coding")))


def _chosen_identifier(identifiers: Any, type_code: str = "MR") -> dict[str, Any]:
    """The identifier of v2-0203 type `type_code` with a value, else the first with a value, else {}."""
    candidates = [i for i in _dicts(identifiers) if isinstance(i.get("value"), str)]
    return next((i for i in candidates if _has_type(i, type_code)), candidates[0] if candidates else {})


def _identifier_dicts(reader: _Reader) -> list[dict[str, Any]]:
    rows = []
    for index, identifier in reader.objs(reader.resource, "identifier", reader.path):
        path = f"{reader.path}.identifier[{index}]"
        chosen, _, _ = _concept(identifier.get("type"), V2_0203)
        rows.append({"system": reader.text(identifier, "system", path), "value": reader.text(identifier, "value", path),
                     "type_code": _str((chosen or {}).get("code")), "use": reader.text(identifier, "use", path)})
    return rows


def _accession(identifiers: Any) -> dict[str, Any]:
    """accession_system and accession: the identifier of v2-0203 type ACSN."""
    found = next((i for i in _dicts(identifiers) if _has_type(i, "ACSN")), {})
    return {"accession_system": _str(found.get("system")), "accession": _str(found.get("value"))}


def extract(resource: dict[str, Any], *, default_tz: tzinfo) -> Extracted:
    """The silver rows of one resource; types silver does not keep give an empty Extracted.

    `default_tz` is where times sent without an offset (and partial dates) are taken to be.
    Raises FhirParseError only when `resource` is not an object with a resourceType.
    """
    if not isinstance(default_tz, tzinfo):
        raise TypeError(f"default_tz must be a tzinfo such as zoneinfo.ZoneInfo('Europe/Berlin'), got {default_tz!r}")
    try:
        require_resource(resource)
    except PayloadError as exc:
        raise FhirParseError(exc.status, exc.detail) from None
    extractor = _EXTRACTORS.get(resource["resourceType"])
    if extractor is None:
        return Extracted()
    reader = _Reader(resource, default_tz)
    rows = extractor(reader)
    return Extracted(**rows, issues=reader.issues)


# Patient


def _patient(reader: _Reader) -> dict[str, list[dict[str, Any]]]:
    resource, path = reader.resource, reader.path
    head = reader.head()
    identifiers = _identifier_dicts(reader)
    mrn = _chosen_identifier(resource.get("identifier"))
    birth_date, birth_precision = _birth_date(reader)
    deceased_at, _ = reader.time(resource, "deceasedDateTime", path)
    deceased = True if "deceasedDateTime" in resource else reader.flag(resource, "deceasedBoolean", path)
    links = _links(reader)
    patient = {
        **head, "source_system": _str(mrn.get("system")), "mrn": _str(mrn.get("value")), "identifiers": identifiers,
        **_name(reader), "birth_date": birth_date, "birth_date_precision": birth_precision,
        "gender": reader.text(resource, "gender", path), **_address(reader), "phone": _phone(reader),
        "deceased": deceased, "deceased_at": deceased_at, "active": reader.flag(resource, "active", path),
        "links": links,
    }
    self_identity = {"reference": f"Patient/{head['id']}" if head["id"] else None,
                     "identifier_system": patient["source_system"], "identifier_value": patient["mrn"]}
    return {"patients": [patient], "merges": [_merge(head, link, self_identity) for link in links
                                              if link["type"] in ("replaced-by", "replaces")]}


def _birth_date(reader: _Reader) -> tuple[date | None, str | None]:
    value = reader.resource.get("birthDate")
    if value is None:
        return None, None
    try:
        return parse_date(value)
    except ValueError as exc:
        reader.issue(BAD_TIMESTAMP, str(exc), f"{reader.path}.birthDate")
        return None, None


def _name(reader: _Reader) -> dict[str, Any]:
    """family and given of the official name, else of the first name."""
    names = reader.objs(reader.resource, "name", reader.path)
    index, name = next(((i, n) for i, n in names if n.get("use") == "official"), names[0] if names else (0, {}))
    path = f"{reader.path}.name[{index}]"
    given = name.get("given")
    return {"family": reader.text(name, "family", path),
            "given": [g for g in given if isinstance(g, str)] if isinstance(given, list) else []}


def _address(reader: _Reader) -> dict[str, Any]:
    """The home address, else the first one."""
    addresses = reader.objs(reader.resource, "address", reader.path)
    index, address = next(((i, a) for i, a in addresses if a.get("use") == "home"),
                          addresses[0] if addresses else (0, {}))
    path = f"{reader.path}.address[{index}]"
    lines = address.get("line")
    return {"address_lines": [line for line in lines if isinstance(line, str)] if isinstance(lines, list) else [],
            "city": reader.text(address, "city", path), "state": reader.text(address, "state", path),
            "postal_code": reader.text(address, "postalCode", path), "country": reader.text(address, "country", path)}


def _phone(reader: _Reader) -> str | None:
    """The first telecom with system phone."""
    telecoms = reader.objs(reader.resource, "telecom", reader.path)
    return next((t["value"] for _, t in telecoms if t.get("system") == "phone" and isinstance(t.get("value"), str)),
                None)


def _links(reader: _Reader) -> list[dict[str, Any]]:
    links = []
    for index, link in reader.objs(reader.resource, "link", reader.path):
        path = f"{reader.path}.link[{index}]"
        other = reader.obj(link, "other", path)
        identifier = reader.obj(other, "identifier", f"{path}.other")
        links.append({"type": reader.text(link, "type", path), "other_reference": reader.text(other, "reference", path),
                      "other_identifier_system": _str(identifier.get("system")),
                      "other_identifier_value": _str(identifier.get("value"))})
    return links


def _merge(head: dict[str, Any], link: dict[str, Any], self_identity: dict[str, Any]) -> dict[str, Any]:
    """A merge like HL7 A40: replaced-by means the other patient survives, replaces means this one does."""
    other = {"reference": link["other_reference"], "identifier_system": link["other_identifier_system"],
             "identifier_value": link["other_identifier_value"]}
    surviving, prior = (other, self_identity) if link["type"] == "replaced-by" else (self_identity, other)
    return {**head, "link_type": link["type"],
            **{f"surviving_{key}": value for key, value in surviving.items()},
            **{f"prior_{key}": value for key, value in prior.items()}}


# Encounter


def _encounter(reader: _Reader) -> dict[str, list[dict[str, Any]]]:
    resource, path = reader.resource, reader.path
    klass = reader.obj(resource, "class", path)
    period = reader.obj(resource, "period", path)
    service, _, service_text = _concept(resource.get("serviceType"), None)
    service = service or {}
    return {"encounters": [{
        **reader.head(), "identifiers": _identifier_dicts(reader), "status": reader.text(resource, "status", path),
        "class_code": reader.text(klass, "code", f"{path}.class"),
        "class_system": reader.text(klass, "system", f"{path}.class"), **reader.subject(),
        "period_start": reader.time(period, "start", f"{path}.period")[0],
        "period_end": reader.time(period, "end", f"{path}.period")[0], "locations": _locations(reader),
        "service_type_code": _str(service.get("code")), "service_type_system": _str(service.get("system")),
        "service_type_display": _str(service.get("display")) or service_text,
    }]}


def _locations(reader: _Reader) -> list[dict[str, Any]]:
    rows = []
    for index, location in reader.objs(reader.resource, "location", reader.path):
        path = f"{reader.path}.location[{index}]"
        reference = reader.obj(location, "location", path)
        period = reader.obj(location, "period", path)
        rows.append({"reference": reader.text(reference, "reference", f"{path}.location"),
                     "display": reader.text(reference, "display", f"{path}.location"),
                     "status": reader.text(location, "status", path),
                     "period_start": reader.time(period, "start", f"{path}.period")[0],
                     "period_end": reader.time(period, "end", f"{path}.period")[0]})
    return rows


# Observation

_VALUE_KEYS = ("value_type", "value_num", "value_unit", "value_unit_code", "value_unit_system", "value_comparator",
               "value_code", "value_code_system", "value_text", "value_bool", "value_datetime", "missing_value",
               "absent_reason")
_NO_VALUE = dict.fromkeys(_VALUE_KEYS)


def _observation(reader: _Reader) -> dict[str, list[dict[str, Any]]]:
    """One row per value: the Observation's own value[x], then one per component (a panel has no own row)."""
    resource, path = reader.resource, reader.path
    parent = {**reader.head(), "status": reader.text(resource, "status", path),
              "category_codes": _category_codes(resource), **reader.subject(),
              "encounter_reference": reader.reference("encounter"), **_effective(reader)}
    code = _observation_code(reader, resource, path)
    components = reader.objs(resource, "component", path)
    value = _value(reader, resource, path, grouping=bool(components) or "hasMember" in resource)
    rows = [{**parent, "panel_code": None, "component_index": None, **code, **value}] if value else []
    for index, component in components:
        component_path = f"{path}.component[{index}]"
        rows.append({**parent, "panel_code": code["code"], "component_index": index,
                     **_observation_code(reader, component, component_path),
                     **_value(reader, component, component_path, grouping=False)})
    return {"observations": rows}


def _observation_code(reader: _Reader, element: dict[str, Any], path: str) -> dict[str, Any]:
    code = _code_fields(element.get("code"))
    if code["code"] is None and code["code_display"] is None:
        reader.issue(MISSING_CODE, "no coding with a code and no text", f"{path}.code")
    return code


def _effective(reader: _Reader) -> dict[str, Any]:
    """effective_at (UTC), effective_precision and effective_source, from the first effective[x] that reads."""
    resource, path = reader.resource, reader.path
    period = reader.obj(resource, "effectivePeriod", path)
    candidates = ((resource, "effectiveDateTime", path), (resource, "effectiveInstant", path),
                  (period, "start", f"{path}.effectivePeriod"), (period, "end", f"{path}.effectivePeriod"))
    present = [(parent, key, parent_path) for parent, key, parent_path in candidates if key in parent]
    for parent, key, parent_path in present:
        at, precision = reader.time(parent, key, parent_path)
        if at is not None:
            source = key if parent is resource else f"effectivePeriod.{key}"
            return {"effective_at": at, "effective_precision": precision, "effective_source": source}
    if not present:
        reader.issue(MISSING_EFFECTIVE, "no effectiveDateTime, effectiveInstant or effectivePeriod",
                     f"{path}.effective[x]")
    return {"effective_at": None, "effective_precision": None, "effective_source": None}


def _value(reader: _Reader, element: dict[str, Any], path: str, *, grouping: bool) -> dict[str, Any] | None:
    """The value[x] keys of an Observation or component; None for a grouping without a value of its own."""
    for key, read in _VALUE_READERS.items():
        if key in element:
            return {**_NO_VALUE, "missing_value": False, **read(reader, element, key, path)}
    absent = element.get("dataAbsentReason")
    if absent is not None:
        chosen, _, text = _concept(absent, None)
        return {**_NO_VALUE, "missing_value": True, "absent_reason": _str((chosen or {}).get("code")) or text}
    others = [key for key in element if _is_choice(key, "value")]
    if grouping and not others:
        return None
    detail = f"{others[0]} is not read by silver" if others else "no value[x] and no dataAbsentReason"
    reader.issue(MISSING_VALUE, detail, f"{path}.value[x]")
    return {**_NO_VALUE, "value_type": others[0][5:] if others else None, "missing_value": True}


def _quantity(reader: _Reader, element: dict[str, Any], key: str, path: str) -> dict[str, Any]:
    quantity = reader.obj(element, key, path)
    path = f"{path}.{key}"
    return {"value_type": "Quantity", "value_num": _number(reader, quantity.get("value"), f"{path}.value"),
            "value_unit": reader.text(quantity, "unit", path), "value_unit_code": reader.text(quantity, "code", path),
            "value_unit_system": reader.text(quantity, "system", path),
            "value_comparator": reader.text(quantity, "comparator", path)}


def _number(reader: _Reader, value: Any, path: str) -> float | None:
    """A quantity's value as a float; a numeric string is read with an issue, anything else is an issue."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
        if number is not None and number == number and abs(number) != float("inf"):
            reader.issue(BAD_QUANTITY, f"value is the string {value!r}", path)
            return number
    reader.issue(BAD_QUANTITY, "no value" if value is None else f"value {value!r} is not a number", path)
    return None


def _codeable_value(reader: _Reader, element: dict[str, Any], key: str, path: str) -> dict[str, Any]:
    chosen, _, text = _concept(element.get(key), None)
    chosen = chosen or {}
    if not chosen and text is None:
        reader.issue(MISSING_VALUE, "no coding with a code and no text", f"{path}.{key}")
    return {"value_type": "CodeableConcept", "value_code": _str(chosen.get("code")),
            "value_code_system": _str(chosen.get("system")), "value_text": _str(chosen.get("display")) or text}


def _string_value(reader: _Reader, element: dict[str, Any], key: str, path: str) -> dict[str, Any]:
    return {"value_type": "string", "value_text": reader.text(element, key, path)}


def _integer_value(reader: _Reader, element: dict[str, Any], key: str, path: str) -> dict[str, Any]:
    value = element.get(key)
    if isinstance(value, int) and not isinstance(value, bool):
        return {"value_type": "integer", "value_num": float(value)}
    reader.issue(BAD_ELEMENT, f"expected an integer, got {_json_type(value)}", f"{path}.{key}")
    return {"value_type": "integer"}


def _boolean_value(reader: _Reader, element: dict[str, Any], key: str, path: str) -> dict[str, Any]:
    return {"value_type": "boolean", "value_bool": reader.flag(element, key, path)}


def _datetime_value(reader: _Reader, element: dict[str, Any], key: str, path: str) -> dict[str, Any]:
    return {"value_type": "dateTime", "value_datetime": reader.time(element, key, path)[0]}


_VALUE_READERS: dict[str, Callable[[_Reader, dict[str, Any], str, str], dict[str, Any]]] = {
    "valueQuantity": _quantity, "valueCodeableConcept": _codeable_value, "valueString": _string_value,
    "valueInteger": _integer_value, "valueBoolean": _boolean_value, "valueDateTime": _datetime_value,
}


# ServiceRequest and ImagingStudy


def _service_request(reader: _Reader) -> dict[str, list[dict[str, Any]]]:
    resource, path = reader.resource, reader.path
    requisition = reader.obj(resource, "requisition", path)
    return {"service_requests": [{
        **reader.head(), "identifiers": _identifier_dicts(reader), "status": reader.text(resource, "status", path),
        "intent": reader.text(resource, "intent", path), "priority": reader.text(resource, "priority", path),
        "category_codes": _category_codes(resource), **_code_fields(resource.get("code")), **reader.subject(),
        "encounter_reference": reader.reference("encounter"),
        "authored_at": reader.time(resource, "authoredOn", path)[0],
        "requisition_system": reader.text(requisition, "system", f"{path}.requisition"),
        "requisition_value": reader.text(requisition, "value", f"{path}.requisition"),
        **_accession(resource.get("identifier")), **_reasons(reader), **_request_location(reader),
    }]}


def _codings(concepts: Any) -> list[dict[str, Any]]:
    """Every coding with a code of a list of CodeableConcepts."""
    return [_coding_dict(c) for concept in _dicts(concepts) for c in _dicts(concept.get("coding"))
            if isinstance(c.get("code"), str)]


def _texts(concepts: Any) -> list[str]:
    """Each concept's text, else its first coding's display."""
    out = []
    for concept in _dicts(concepts):
        displays = [c["display"] for c in _dicts(concept.get("coding")) if isinstance(c.get("display"), str)]
        text = _str(concept.get("text")) or (displays[0] if displays else None)
        if text:
            out.append(text)
    return out


def _reasons(reader: _Reader) -> dict[str, Any]:
    """reason_codes (codings), reason_text (texts joined by '; ') and reason_references of a request."""
    resource = reader.resource
    texts = _texts(resource.get("reasonCode"))
    references = [r.get("reference") or r.get("display") for r in _dicts(resource.get("reasonReference"))]
    return {"reason_codes": _codings(resource.get("reasonCode")), "reason_text": "; ".join(texts) or None,
            "reason_references": [r for r in references if isinstance(r, str)]}


def _request_location(reader: _Reader) -> dict[str, Any]:
    """location_codes (ServiceRequest.locationCode codes) and location_display (the first location named)."""
    resource = reader.resource
    names = _texts(resource.get("locationCode")) + [
        r["display"] for r in _dicts(resource.get("locationReference")) if isinstance(r.get("display"), str)]
    return {"location_codes": [c["code"] for c in _codings(resource.get("locationCode"))],
            "location_display": names[0] if names else None}


def _diagnostic_report(reader: _Reader) -> dict[str, list[dict[str, Any]]]:
    resource, path = reader.resource, reader.path
    effective = reader.time(resource, "effectiveDateTime", path)[0] or reader.time(
        reader.obj(resource, "effectivePeriod", path), "start", f"{path}.effectivePeriod")[0]
    interpreters = _dicts(resource.get("resultsInterpreter"))
    first = interpreters[0] if interpreters else {}
    identifier = first.get("identifier") if isinstance(first.get("identifier"), dict) else {}
    return {"diagnostic_reports": [{
        **reader.head(), "identifiers": _identifier_dicts(reader), "status": reader.text(resource, "status", path),
        "category_codes": _category_codes(resource), **_code_fields(resource.get("code")), **reader.subject(),
        "encounter_reference": reader.reference("encounter"), "effective_at": effective,
        "issued_at": reader.time(resource, "issued", path)[0],
        "based_on": [r["reference"] for r in _dicts(resource.get("basedOn")) if isinstance(r.get("reference"), str)],
        **_accession(resource.get("identifier")),
        "interpreter_id": _str(identifier.get("value")) or _str(first.get("reference")),
        "interpreter_name": _str(first.get("display")),
        "study_uids": [uid for ref in _dicts(resource.get("imagingStudy"))
                       if (uid := _study_uid([ref.get("identifier")]))],
        "conclusion": reader.text(resource, "conclusion", path), "conclusion_codes": _codings(
            resource.get("conclusionCode")),
        "communicated_at": _communicated_at(reader),
    }]}


def _communicated_at(reader: _Reader) -> datetime | None:
    """When a critical result was communicated: the earliest IHE IDR communication extension on the report
    (a dateTime, or a Reference to a contained Communication and its `sent`)."""
    times = []
    for index, ext in reader.objs(reader.resource, "extension", reader.path):
        if ext.get("url") != IDR_COMMUNICATION:
            continue
        path = f"{reader.path}.extension[{index}]"
        if "valueDateTime" in ext:
            times.append(reader.time(ext, "valueDateTime", path)[0])
        ref = _str(reader.obj(ext, "valueReference", path).get("reference")) or ""
        if ref.startswith("#"):
            times.append(reader.time(reader.contained(ref[1:]), "sent", f"{path}.valueReference")[0])
    return min((t for t in times if t is not None), default=None)


def _imaging_study(reader: _Reader) -> dict[str, list[dict[str, Any]]]:
    resource, path = reader.resource, reader.path
    uid_value = _study_uid(resource.get("identifier"))
    series = reader.objs(resource, "series", path)
    return {"imaging_studies": [{
        **reader.head(), "identifiers": _identifier_dicts(reader), "status": reader.text(resource, "status", path),
        **reader.subject(), "encounter_reference": reader.reference("encounter"),
        "started_at": reader.time(resource, "started", path)[0],
        "study_uid": uid_value,
        **_accession(resource.get("identifier")), "modalities": _modalities(resource, series),
        "number_of_series": _count(resource.get("numberOfSeries"), len(series) if series else None),
        "number_of_instances": _count(resource.get("numberOfInstances"),
                                      sum(len(_dicts(s.get("instance"))) for _, s in series) if series else None),
        "based_on": [r["reference"] for r in _dicts(resource.get("basedOn")) if isinstance(r.get("reference"), str)],
    }]}


def _study_uid(identifiers: Any) -> str | None:
    """The Study Instance UID: system urn:dicom:uid, else an RFC 3986 `urn:oid:` value (as Synthea sends it)."""
    values = [(i.get("system"), i["value"]) for i in _dicts(identifiers) if isinstance(i.get("value"), str)]
    uid = next((v for system, v in values if system == DICOM_UID), None) or next(
        (v for system, v in values if system == RFC_3986 and v.startswith("urn:oid:")), None)
    return uid.removeprefix("urn:oid:") if uid else None


def _modalities(resource: dict[str, Any], series: list[tuple[int, dict[str, Any]]]) -> list[str]:
    """ImagingStudy.modality codes, else the distinct series modalities in order."""
    codings = _dicts(resource.get("modality")) or [s.get("modality") for _, s in series]
    codes = [c["code"] for c in codings if isinstance(c, dict) and isinstance(c.get("code"), str)]
    return list(dict.fromkeys(codes))


def _count(sent: Any, counted: int | None) -> int | None:
    return sent if isinstance(sent, int) and not isinstance(sent, bool) and sent >= 0 else counted


_EXTRACTORS: dict[str, Callable[[_Reader], dict[str, list[dict[str, Any]]]]] = {
    "Patient": _patient, "Encounter": _encounter, "Observation": _observation,
    "ServiceRequest": _service_request, "ImagingStudy": _imaging_study, "DiagnosticReport": _diagnostic_report,
}
