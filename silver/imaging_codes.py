"""The imaging vocabulary silver reads orders and reports with: priorities, where the patient is, procedures,
code systems, radiology sections and critical-result flags. Pure Python lookups, one place for each rule.

- priority. HL7 (TQ1-9 / ORC-7.6 / OBR-27.6 / OBR-5, table 0027): S STAT; A, T (timing critical) ASAP; R, P
  (pre-op), C (callback), PRN ROUTINE; none sent ROUTINE (the standard's default for TQ1-9). FHIR
  ServiceRequest.priority: stat STAT, asap and urgent ASAP, routine ROUTINE; absent ROUTINE.
- location_class. HL7: an intensive-care point of care (PV1-3.1 named ICU, CCU, ITU, HDU, ...) ICU; else PV1-2
  E ED, I WARD, O/R OUTPATIENT; else a point of care named ED/ER/Emergency ED. FHIR: locationCode (v3 RoleCode)
  ER/ETU ED, ICU/CCU/PEDICU/PEDNICU ICU, HU WARD, OF OUTPATIENT; else the location's name as for HL7.
- critical (reports). HL7: an OBX of the report with OBX-8 AA, HH or LL (table 0078: critical abnormal, above
  upper / below lower panic limit). FHIR: a conclusionCode of v3 ObservationInterpretation AA, HH or LL.

A code that is not in a table gives None, and the caller says what to do (quarantine, or unknown).
"""

from __future__ import annotations

import re

STAT, ASAP, ROUTINE = "STAT", "ASAP", "ROUTINE"
ED, ICU, WARD, OUTPATIENT = "ED", "ICU", "WARD", "OUTPATIENT"

_HL7_PRIORITY = {"S": STAT, "STAT": STAT, "A": ASAP, "ASAP": ASAP, "T": ASAP, "R": ROUTINE, "ROUTINE": ROUTINE,
                 "P": ROUTINE, "C": ROUTINE, "PRN": ROUTINE}
_FHIR_PRIORITY = {"stat": STAT, "asap": ASAP, "urgent": ASAP, "routine": ROUTINE}
HL7_PRIORITY_CODES = tuple(_HL7_PRIORITY)
FHIR_PRIORITY_CODES = tuple(_FHIR_PRIORITY)


def hl7_priority(code: str | None) -> str | None:
    """STAT/ASAP/ROUTINE of an HL7 priority code; ROUTINE when none was sent, None when the code is unknown."""
    return _HL7_PRIORITY.get(code.strip().upper()) if code and code.strip() else ROUTINE


def fhir_priority(code: str | None) -> str | None:
    """STAT/ASAP/ROUTINE of ServiceRequest.priority; ROUTINE when absent, None when unknown."""
    return _FHIR_PRIORITY.get(code) if code else ROUTINE


_ICU_NAME = re.compile(r"(^|[^A-Z])([A-Z]{0,3}ICU|CCU|ITU|HDU)([^A-Z]|$)|INTENSIVE|CRITICAL CARE")
_ED_NAME = re.compile(r"(^|[^A-Z])(ED|ER|EMERG\w*|A&E)([^A-Z]|$)|EMERGENCY")
_PATIENT_CLASS = {"E": ED, "I": WARD, "O": OUTPATIENT, "R": OUTPATIENT}
_ROLE_CODES = {"ER": ED, "ETU": ED, "ICU": ICU, "CCU": ICU, "PEDICU": ICU, "PEDNICU": ICU, "HU": WARD,
               "OF": OUTPATIENT}


def _by_name(name: str | None) -> str | None:
    """ICU or ED when a location's name says so."""
    text = (name or "").upper()
    if _ICU_NAME.search(text):
        return ICU
    return ED if _ED_NAME.search(text) else None


def hl7_location_class(patient_class: str | None, point_of_care: str | None) -> str | None:
    """ED/ICU/WARD/OUTPATIENT from PV1-2 and PV1-3.1: an intensive-care unit wins over the class."""
    named = _by_name(point_of_care)
    if named == ICU:
        return ICU
    return _PATIENT_CLASS.get((patient_class or "").strip().upper()) or named


def fhir_location_class(role_codes: list[str], display: str | None) -> str | None:
    """ED/ICU/WARD/OUTPATIENT from ServiceRequest.locationCode codes, else the location's name."""
    for code in role_codes:
        if code.upper() in _ROLE_CODES:
            return _ROLE_CODES[code.upper()]
    return _by_name(display)


# -- procedures: modality and body part ------------------------------------------------------------------------
# CPT codes of common radiology procedures (AMA CPT 70010-79999): (modality, body part). Radiographs say CR;
# matching takes CR and DX (computed and digital radiography) as one.
_CPT = {"71045": ("CR", "CHEST"), "71046": ("CR", "CHEST"), "71047": ("CR", "CHEST"), "71048": ("CR", "CHEST"),
        "71250": ("CT", "CHEST"), "71260": ("CT", "CHEST"), "71275": ("CT", "CHEST"), "70450": ("CT", "HEAD"),
        "70460": ("CT", "HEAD"), "70496": ("CT", "HEAD"), "70498": ("CT", "NECK"), "70551": ("MR", "HEAD"),
        "70553": ("MR", "HEAD"), "72125": ("CT", "CSPINE"), "72131": ("CT", "LSPINE"), "74176": ("CT", "ABDOMEN"),
        "74177": ("CT", "ABDOMEN"), "74178": ("CT", "ABDOMEN"), "74018": ("CR", "ABDOMEN"),
        "76700": ("US", "ABDOMEN"), "76705": ("US", "ABDOMEN"), "76856": ("US", "PELVIS"), "93970": ("US", "LEG"),
        "78582": ("NM", "CHEST"), "73030": ("CR", "SHOULDER"), "73110": ("CR", "WRIST"), "73502": ("CR", "HIP"),
        "73562": ("CR", "KNEE"), "73610": ("CR", "ANKLE")}
_MODALITY_WORDS = (("CT", re.compile(r"\bCT\b|\bCTA\b|COMPUTED TOMOGRAPHY")),
                   ("MR", re.compile(r"\bMRI?\b|\bMRA\b|MAGNETIC RESONANCE")),
                   ("US", re.compile(r"\bUS\b|ULTRASOUND|SONOGRA|DOPPLER|DUPLEX")),
                   ("NM", re.compile(r"\bNM\b|NUCLEAR|SCINTI|\bV/?Q\b")), ("PT", re.compile(r"\bPET\b")),
                   ("MG", re.compile(r"MAMMO")), ("RF", re.compile(r"FLUORO")), ("XA", re.compile(r"ANGIOGRAPH")),
                   ("CR", re.compile(r"\bXR\b|X-RAY|XRAY|RADIOGRA|\bFILM\b|\bCXR\b")))
_BODY_WORDS = (("HEAD", r"HEAD|BRAIN|SKULL|CRANI"), ("NECK", r"NECK|CAROTID"),
               ("CSPINE", r"C-SPINE|CERVICAL SPINE"), ("LSPINE", r"L-SPINE|LUMBAR"),
               ("CHEST", r"CHEST|THORA|LUNG|PULMONARY|\bCXR\b"),
               ("ABDOMEN", r"ABDOM|LIVER|KIDNEY|RENAL|GALLBLADDER|APPENDI"), ("PELVIS", r"PELVI"),
               ("LEG", r"\bLEG\b|LOWER EXTREMITY|FEMUR|TIBIA"), ("KNEE", r"KNEE"), ("HIP", r"\bHIP\b"),
               ("SHOULDER", r"SHOULDER"), ("WRIST", r"WRIST"), ("ANKLE", r"ANKLE"))
MODALITIES = frozenset({"CR", "CT", "DX", "MR", "US", "NM", "PT", "MG", "RF", "XA", "OT", "IO", "ES", "XC"})


def procedure_modality(code: str | None, display: str | None) -> str | None:
    """The DICOM modality a procedure is done on: its CPT code, else words in its name."""
    if code in _CPT:
        return _CPT[code][0]
    text = (display or "").upper()
    return next((modality for modality, words in _MODALITY_WORDS if words.search(text)), None)


def procedure_body_part(code: str | None, display: str | None) -> str | None:
    """The DICOM-style body part (upper case) of a procedure: its CPT code, else words in its name."""
    if code in _CPT:
        return _CPT[code][1]
    text = (display or "").upper()
    return next((part for part, words in _BODY_WORDS if re.search(words, text)), None)


# -- code systems ------------------------------------------------------------------------------------------------
ICD10CM, SNOMED = "ICD-10-CM", "SNOMED"
_SYSTEMS = {"I10": ICD10CM, "I10C": ICD10CM, "ICD10": ICD10CM, "ICD10CM": ICD10CM, "ICD-10-CM": ICD10CM,
            "HTTP://HL7.ORG/FHIR/SID/ICD-10-CM": ICD10CM, "HTTP://HL7.ORG/FHIR/SID/ICD-10": ICD10CM,
            "SCT": SNOMED, "SNM": SNOMED, "SNOMED": SNOMED, "SNOMEDCT": SNOMED, "HTTP://SNOMED.INFO/SCT": SNOMED}


def code_text(system: str | None, code: str | None) -> str | None:
    """'system|code' with ICD-10-CM and SNOMED CT under one name each, whatever the sender called them."""
    if not code:
        return None
    name = (system or "").strip()
    return f"{_SYSTEMS.get(name.upper(), name)}|{code.strip()}"


# -- reports -----------------------------------------------------------------------------------------------------
# HL7 table 0074 diagnostic service sections of imaging (RAD radiology, RX radiograph, CT, NMR magnetic resonance,
# NMS nuclear medicine, RUS/OUS/CUS/VUS ultrasound, XRC cineradiograph), and the DICOM modalities some send there.
RADIOLOGY_SECTIONS = frozenset({"RAD", "RX", "CT", "NMR", "NMS", "RUS", "OUS", "CUS", "VUS", "XRC"}) | MODALITIES
CRITICAL_FLAGS = frozenset({"AA", "HH", "LL"})  # HL7 table 0078 and v3 ObservationInterpretation: critical
V3_INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
# HL7 v2 has no standard element for "critical result communicated": carelake reads an OBX with this code
# (a local code, HL7's 99zzz convention), value type DTM/TS: when, OBX-16: to whom.
CRITICAL_COMMUNICATED = ("CRITCOMM", "99CARELAKE")

_HL7_REPORT_STATUS = {"P": "preliminary", "F": "final", "C": "corrected", "A": "amended", "X": "cancelled",
                      "W": "entered-in-error", "D": "entered-in-error", "R": "preliminary", "S": "preliminary",
                      "I": "preliminary"}
_FHIR_REPORT_STATUS = {"registered": "preliminary", "partial": "preliminary", "preliminary": "preliminary",
                       "final": "final", "amended": "amended", "corrected": "corrected", "appended": "amended",
                       "cancelled": "cancelled", "entered-in-error": "entered-in-error"}


def hl7_report_status(code: str | None) -> str | None:
    """OBR-25 (table 0123) as a report status; None when unknown or not sent."""
    return _HL7_REPORT_STATUS.get((code or "").strip().upper())


def fhir_report_status(code: str | None) -> str | None:
    """DiagnosticReport.status as a report status (registered and partial read as preliminary)."""
    return _FHIR_REPORT_STATUS.get(code or "")
