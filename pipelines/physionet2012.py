"""`carelake import physionet2012`: PhysioNet/CinC Challenge 2012 ICU stays sent through the lakehouse like live data.

A record file (`<RecordID>.txt`, lines `Time,Parameter,Value`, `Time` = HH:MM since ICU admission) becomes:

- a FHIR Patient whose MRN (identifier type MR, system = silver.mrn_system, as device readings' patient_mrn) is
  the RecordID, with gender and a
  birth date derived from Age (a birth date exactly Age years before admission: the record holds no more);
- a FHIR Encounter, class IMP (v3 ActCode has no ICU class), located in the ICU type the record gives;
- device readings (the `devices` feed's JSON lines) for every parameter silver has a LOINC code for.

All of it is written to temporary files and landed through `pipelines.landing.ingest`, so it flows landing ->
bronze -> silver -> gold exactly as a feed does. Values are sent as the record holds them, `-1` and impossible
values included: silver's own validation quarantines them (silver.vitals), nothing is filtered here.

Admission time: `anchor` (default 2020-01-01T00:00:00Z) plus a per-record offset of
sha256("physionet2012|<RecordID>") mod 525,600 minutes (under 365 days), so stays spread over a year and the same
record always lands at the same time. Outcomes (Outcomes-a.txt) go to `silver.outcomes`, keyed by patient_key.
See docs/physionet2012.md for the parameter map and the GCS -> ACVPU rule.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.errors import UsageError

if TYPE_CHECKING:
    from pipelines.config import Config
    from pipelines.store import TableStore

SOURCE = "physionet2012"
HEADER = "Time,Parameter,Value"
DEFAULT_ANCHOR = datetime(2020, 1, 1, tzinfo=UTC)
OFFSET_MINUTES = 365 * 24 * 60
DESCRIPTORS = ("RecordID", "Age", "Gender", "Height", "ICUType", "Weight")
VISIT_SYSTEM = "http://carelake.example/fhir/sid/physionet2012-stay"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
ICU_TYPES = {"1": "Coronary Care Unit", "2": "Cardiac Surgery Recovery Unit", "3": "Medical ICU",
             "4": "Surgical ICU"}
OUTCOME_COLUMNS = ("RecordID", "SAPS-I", "SOFA", "Length_of_stay", "Survival", "In-hospital_death")
OUTCOMES_TABLE = "silver.outcomes"
RECORDS_PER_FILE = 250  # ~12 MB of device lines per landed file for set-a


@dataclass(frozen=True)
class Param:
    """How one Challenge parameter is sent: LOINC code and the unit the Challenge documents."""

    code: str
    unit: str | None


# Challenge parameter -> LOINC + UCUM (units per https://physionet.org/content/challenge-2012/1.0.0/).
# Invasive (arterial line) and non-invasive (cuff) pressures keep different codes: 76215-0 / 76213-5 / 76214-3
# are LOINC's "Invasive Systolic / Diastolic / Mean blood pressure"; cuff pressures use the method-less codes
# silver already takes from monitors. SaO2 is arterial-blood saturation (2708-6), not pulse oximetry. FiO2 is
# a fraction in the Challenge, sent with UCUM unit "1" so silver converts it to % (0.4 -> 40 %). WBC is
# cells/nL = 10^9/L. GCS is sent as consciousness (67775-7), see gcs_to_acvpu.
PARAMS: Mapping[str, Param] = {
    "HR": Param("8867-4", "/min"),
    "RespRate": Param("9279-1", "/min"),
    "SaO2": Param("2708-6", "%"),
    "SysABP": Param("76215-0", "mm[Hg]"),
    "DiasABP": Param("76213-5", "mm[Hg]"),
    "MAP": Param("76214-3", "mm[Hg]"),
    "NISysABP": Param("8480-6", "mm[Hg]"),
    "NIDiasABP": Param("8462-4", "mm[Hg]"),
    "NIMAP": Param("8478-0", "mm[Hg]"),
    "Temp": Param("8310-5", "Cel"),
    "FiO2": Param("3150-0", "1"),
    "GCS": Param("67775-7", None),
    "Weight": Param("29463-7", "kg"),
    "Lactate": Param("2524-7", "mmol/L"),
    "WBC": Param("6690-2", "10*9/L"),
    "Creatinine": Param("2160-0", "mg/dL"),
    # Labs, blood gases and charting, in the Challenge's units. K and Na are documented in mEq/L, which is mmol/L
    # for a monovalent ion. Platelets are cells/nL = 10^9/L (silver converts to 10*3/uL, the same number).
    "BUN": Param("3094-0", "mg/dL"),
    "Urine": Param("9187-6", "mL"),
    "pH": Param("2744-1", "[pH]"),
    "PaO2": Param("2703-7", "mm[Hg]"),
    "PaCO2": Param("2019-8", "mm[Hg]"),
    "HCO3": Param("1960-4", "mmol/L"),
    "Platelets": Param("777-3", "10*9/L"),
    "Bilirubin": Param("1975-2", "mg/dL"),
    "Glucose": Param("2345-7", "mg/dL"),
    "K": Param("2823-3", "mmol/L"),
    "Na": Param("2951-2", "mmol/L"),
    "HCT": Param("4544-3", "%"),
    "Albumin": Param("1751-7", "g/dL"),
    "ALT": Param("1742-6", "U/L"),
    "AST": Param("1920-8", "U/L"),
    "ALP": Param("6768-6", "U/L"),
}
# A parameter also sent as a second observation: GCS as its number too (the ACVPU letter keeps only 15-or-not for
# NEWS2; a mortality model needs the score itself).
ALSO: Mapping[str, Param] = {"GCS": Param("9269-2", "{score}")}


def gcs_to_acvpu(value: str) -> str:
    """A GCS total (3-15) as an ACVPU letter; anything else is returned as sent, for silver to quarantine.

    15 -> A; 13-14 -> C (NEWS2 treats a new GCS below 15 as new confusion, RCP 2017); 9-12 -> V; 7-8 -> P;
    3-6 -> U (AVPU levels' mean GCS: V 13, P 8, U 6, McNarry & Goldhill, Anaesthesia 2004;59:34-7; P ~8,
    U ~3, Kelly et al., Emerg Med J 2004;21:441-3). NEWS2 scores C, V, P and U alike (3).
    """
    try:
        number = float(value)
    except ValueError:
        return value
    if not number.is_integer() or not 3 <= number <= 15:
        return value
    g = int(number)
    return "A" if g == 15 else "C" if g >= 13 else "V" if g >= 9 else "P" if g >= 7 else "U"


@dataclass
class Record:
    """One parsed record file: descriptors and the measurement rows (time in minutes, parameter, value text)."""

    path: Path
    record_id: str
    descriptors: dict[str, str] = field(default_factory=dict)
    rows: list[tuple[int, str, str]] = field(default_factory=list)


_TIME = re.compile(r"^(\d{1,2}):(\d{2})$")


def _minutes(text: str, path: Path, line_no: int) -> int:
    m = _TIME.match(text)
    if not m:
        raise UsageError(f"{path}:{line_no}: time {text!r} is not HH:MM; is this a PhysioNet 2012 record file?")
    return int(m[1]) * 60 + int(m[2])


def parse_record(path: Path) -> Record:
    """A record file -> Record; a file that is not one raises UsageError naming the line and the fix."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (UnicodeDecodeError, OSError) as exc:
        raise UsageError(f"{path} cannot be read as a text record ({exc}); pass a folder of PhysioNet 2012 "
                         "record files such as set-a/") from None
    if not lines or lines[0].strip() != HEADER:
        raise UsageError(f"{path} is not a PhysioNet 2012 record: first line must be '{HEADER}'; pass a folder "
                         "holding only record files (set-a/), and the outcomes file with --outcomes")
    rec = Record(path, "")
    for no, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.split(",")
        if len(parts) != 3:
            raise UsageError(f"{path}:{no}: expected 3 comma-separated fields (Time,Parameter,Value), found "
                             f"{len(parts)}; is this a PhysioNet 2012 record file?")
        t, name, value = (p.strip() for p in parts)
        minute = _minutes(t, path, no)
        if minute == 0 and name in DESCRIPTORS and name not in rec.descriptors:
            rec.descriptors[name] = value
            if name != "Weight":
                continue
        rec.rows.append((minute, name, value))
    rec.record_id = rec.descriptors.get("RecordID", "")
    if not rec.record_id.isdigit():
        raise UsageError(f"{path} has no RecordID descriptor at 00:00; PhysioNet 2012 records start with "
                         "'00:00,RecordID,<number>'")
    return rec


def admission_time(record_id: str, anchor: datetime) -> datetime:
    """anchor + a deterministic per-record offset (whole minutes, under 365 days)."""
    digest = hashlib.sha256(f"{SOURCE}|{record_id}".encode()).hexdigest()
    return anchor + timedelta(minutes=int(digest[:12], 16) % OFFSET_MINUTES)


def _instant(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def patient_resource(rec: Record, admitted: datetime, mrn_system: str) -> dict:
    """The FHIR Patient: MRN = RecordID; gender; birth date Age years before admission when Age is known."""
    r: dict = {"resourceType": "Patient", "id": f"{SOURCE}-{rec.record_id}",
               "meta": {"versionId": "1", "lastUpdated": _instant(admitted)},
               "identifier": [{"use": "usual", "type": {"coding": [{"system": V2_0203, "code": "MR"}]},
                               "system": mrn_system, "value": rec.record_id}],
               "gender": {"0": "female", "1": "male"}.get(rec.descriptors.get("Gender", ""), "unknown")}
    age = rec.descriptors.get("Age", "")
    if re.fullmatch(r"\d+(\.\d*)?", age) and 0 < float(age) < 130:  # day clamped to 28: no Feb 29 problem
        r["birthDate"] = f"{admitted.year - int(float(age)):04d}-{admitted.month:02d}-{min(admitted.day, 28):02d}"
    return r


def encounter_resource(rec: Record, admitted: datetime) -> dict:
    """The FHIR Encounter of the ICU stay: admission at `admitted`, located in the record's ICU type."""
    unit = ICU_TYPES.get(rec.descriptors.get("ICUType", ""), "ICU")
    return {"resourceType": "Encounter", "id": f"{SOURCE}-{rec.record_id}",
            "meta": {"versionId": "1", "lastUpdated": _instant(admitted)},
            "identifier": [{"system": VISIT_SYSTEM, "value": rec.record_id}], "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP",
                      "display": "inpatient encounter"},
            "subject": {"reference": f"Patient/{SOURCE}-{rec.record_id}"},
            "period": {"start": _instant(admitted)},
            "location": [{"location": {"display": unit}, "status": "completed"}]}


def device_lines(rec: Record, admitted: datetime, counts: Counter) -> list[str]:
    """The record's measurements as device JSON lines, values as sent; counts per parameter (sent or skipped)."""
    out = []
    for minute, name, value in rec.rows:
        p = PARAMS.get(name)
        if p is None:
            counts[f"skipped:{name}"] += 1
            continue
        counts[name] += 1
        at = _instant(admitted + timedelta(minutes=minute))
        if name in ALSO:
            counts[f"{name} as {ALSO[name].code}"] += 1
        for q in (p, ALSO[name]) if name in ALSO else (p,):
            line = {"device_id": f"{SOURCE}-{rec.record_id}", "patient_mrn": rec.record_id, "time": at,
                    "code": q.code}
            if q.unit is None:
                line["value_text"] = gcs_to_acvpu(value)
            else:
                line |= {"value": value, "unit": q.unit}
            out.append(json.dumps(line))
    return out


def record_files(folder: Path) -> list[Path]:
    """The record files of a folder (`*.txt`), refusing a missing or empty folder."""
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder; pass the folder of record files, e.g. "
                         "../shared/realdata/physionet2012/set-a")
    files = sorted(f for f in folder.glob("*.txt") if f.is_file() and not f.name.startswith("."))
    if not files:
        raise UsageError(f"{folder} holds no *.txt record files; pass the folder of PhysioNet 2012 records "
                         "(set-a/), not its parent")
    return files


def _number(text: str) -> float | None:
    """A Challenge number; -1 (unknown) and blanks are None."""
    value = float(text)
    return None if value == -1 else value


def parse_outcomes(path: Path) -> list[dict]:
    """Outcomes-a.txt -> one dict per RecordID; a file that is not one raises UsageError."""
    if not path.is_file():
        raise UsageError(f"--outcomes {path} does not exist or is not a file; pass the Outcomes-a.txt beside set-a/")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    if not lines or tuple(c.strip() for c in lines[0].split(",")) != OUTCOME_COLUMNS:
        raise UsageError(f"--outcomes {path} is not a PhysioNet 2012 outcomes file: the header must be "
                         f"'{','.join(OUTCOME_COLUMNS)}'")
    out = []
    for no, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(",")]
        try:
            if len(parts) != 6 or not parts[0].isdigit() or parts[5] not in ("0", "1"):
                raise ValueError
            saps, sofa, los, survival = (_number(p) for p in parts[1:5])
        except ValueError:
            raise UsageError(f"--outcomes {path}:{no}: expected RecordID and five numbers, in-hospital death "
                             f"0 or 1, found {line!r}") from None
        out.append({"record_id": parts[0], "saps_i": saps, "sofa": sofa, "length_of_stay_days": los,
                    "survival_days": survival, "in_hospital_death": parts[5] == "1"})
    return out


def parse_anchor(text: str | None) -> datetime:
    """--anchor as an aware UTC datetime; the default anchor when None."""
    if text is None:
        return DEFAULT_ANCHOR
    try:
        at = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"--anchor {text!r} is not an ISO-8601 time; use e.g. 2020-01-01T00:00:00Z") from None
    at = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
    if at + timedelta(days=368) > datetime.now(tz=UTC):
        raise UsageError(f"--anchor {text} would put admissions (anchor + up to 365 days + 48 h) in the future; "
                         "pick an anchor more than 368 days ago")
    return at


@dataclass(frozen=True)
class ImportSummary:
    """What an import sent: records, resources, device lines per parameter, outcomes rows."""

    records: int
    resources: int
    lines: dict[str, int]
    outcomes: int
    landed_bytes: int


def _write(folder: Path, name: str, lines: Iterable[str]) -> Path:
    path = folder / name
    with open(path, "w", encoding="utf-8") as out:
        for line in lines:
            out.write(line + "\n")
    return path


def outcome_rows(outcomes: list[dict], *, secret: str, mrn_system: str, imported_at: datetime) -> list[dict]:
    """silver.outcomes rows: the patient key beside the RecordID (an MRN: silver keeps identifiers)."""
    from silver.identity import PATIENT, identity_key

    return [{"patient_key": identity_key(secret, PATIENT, mrn_system, o["record_id"]), "source": SOURCE, **o,
             "imported_at": imported_at} for o in outcomes]


def write_outcomes(store: TableStore, rows: list[dict]) -> None:
    """MERGE outcome labels on patient_key: an import run again updates them, never duplicates."""
    import pyarrow as pa

    from pipelines.store.base import MergeSpec

    schema = pa.schema([("patient_key", pa.string()), ("source", pa.string()), ("record_id", pa.string()),
                        ("saps_i", pa.float64()), ("sofa", pa.float64()), ("length_of_stay_days", pa.float64()),
                        ("survival_days", pa.float64()), ("in_hospital_death", pa.bool_()),
                        ("imported_at", pa.timestamp("us", tz="UTC"))])
    store.merge(OUTCOMES_TABLE, pa.Table.from_pylist(rows, schema=schema), MergeSpec(keys=("patient_key",)))


def import_records(cfg: Config, store: TableStore | None, folder: Path, *, outcomes: Path | None = None,
                   anchor: datetime = DEFAULT_ANCHOR) -> ImportSummary:
    """Parse every record (and the outcomes) first, then land FHIR and device files and merge the outcomes."""
    from pipelines.landing import ingest
    from pipelines.secrets import key_secret

    records = [parse_record(f) for f in record_files(folder)]
    seen = Counter(r.record_id for r in records)
    if dup := [rid for rid, n in seen.items() if n > 1]:
        raise UsageError(f"RecordID {dup[0]} appears in {seen[dup[0]]} files of {folder}; import each record once")
    labels = [o for o in parse_outcomes(outcomes) if o["record_id"] in seen] if outcomes is not None else []
    counts: Counter = Counter()
    resources = 0
    with tempfile.TemporaryDirectory(prefix="carelake-physionet-") as tmp:
        fhir, devices = [], []  # files: devices in chunks of RECORDS_PER_FILE records, so no landed file is huge
        for start in range(0, len(records), RECORDS_PER_FILE):
            chunk = records[start:start + RECORDS_PER_FILE]
            admitted = {r.record_id: admission_time(r.record_id, anchor) for r in chunk}
            fhir.append(_write(Path(tmp), f"{SOURCE}-{start // RECORDS_PER_FILE:04d}-fhir.ndjson", (
                json.dumps(x) for r in chunk for x in (patient_resource(r, admitted[r.record_id],
                                                                        cfg.silver.mrn_system),
                                                       encounter_resource(r, admitted[r.record_id])))))
            resources += 2 * len(chunk)
            lines = (line for r in chunk for line in device_lines(r, admitted[r.record_id], counts))
            devices.append(_write(Path(tmp), f"{SOURCE}-{start // RECORDS_PER_FILE:04d}-devices.jsonl", lines))
        landed = ingest(cfg, fhir, "fhir")
        sent = [f for f in devices if f.stat().st_size]
        landed += ingest(cfg, sent, "devices") if sent else []
    if labels and store is not None:
        write_outcomes(store, outcome_rows(labels, secret=key_secret(cfg),
                                           mrn_system=cfg.silver.mrn_system,
                                           imported_at=datetime.now(tz=UTC)))
    return ImportSummary(len(records), resources, dict(counts), len(labels), sum(f.bytes for f in landed))
