"""The exclusion list (claims.exclusion_list): a CSV file in the OIG LEIE layout, read and checked.

LEIE (List of Excluded Individuals/Entities, oig.hhs.gov/exclusions, the monthly UPDATED.csv) columns, in order:
LASTNAME, FIRSTNAME, MIDNAME, BUSNAME, GENERAL, SPECIALTY, UPIN, NPI, DOB, ADDRESS, CITY, STATE, ZIP, EXCLTYPE,
EXCLDATE, REINDATE, WAIVERDATE, WVRSTATE. Dates are YYYYMMDD; an empty date (or LEIE's 00000000) is none. Rows
without an NPI (LEIE's 0000000000: most older exclusions) cannot be matched to claims by NPI and are counted, not
used.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path

from pipelines.errors import ConfigError

COLUMNS = ("LASTNAME", "FIRSTNAME", "MIDNAME", "BUSNAME", "GENERAL", "SPECIALTY", "UPIN", "NPI", "DOB", "ADDRESS",
           "CITY", "STATE", "ZIP", "EXCLTYPE", "EXCLDATE", "REINDATE", "WAIVERDATE", "WVRSTATE")
_NO_NPI = "0000000000"


@dataclass(frozen=True)
class Exclusion:
    """One excluded provider with an NPI: who, the exclusion type (e.g. 1128a1) and the dates it applies."""

    npi: str
    name: str
    excl_type: str
    excluded_on: date
    reinstated_on: date | None


def _date(value: str, column: str, where: str) -> date | None:
    value = value.strip()
    if value in ("", "00000000"):
        return None
    try:
        return datetime.strptime(value, "%Y%m%d").date()
    except ValueError:
        raise ConfigError(f"{where}: {column} {value!r} is not a date in LEIE's YYYYMMDD form; fix the row or "
                          "download the list again") from None


def _row(row: dict[str, str], where: str) -> Exclusion | None:
    npi = (row["NPI"] or "").strip()
    if npi in ("", _NO_NPI):
        return None
    if not (npi.isdigit() and len(npi) == 10):
        raise ConfigError(f"{where}: NPI {npi!r} is not 10 digits (empty or 0000000000 when the provider has none)")
    excluded = _date(row["EXCLDATE"], "EXCLDATE", where)
    if excluded is None:
        raise ConfigError(f"{where}: EXCLDATE is empty; every LEIE row has the date the exclusion took effect")
    name = row["BUSNAME"].strip() or " ".join(p.strip() for p in (row["FIRSTNAME"], row["MIDNAME"], row["LASTNAME"])
                                              if p.strip())
    return Exclusion(npi, name, row["EXCLTYPE"].strip(), excluded, _date(row["REINDATE"], "REINDATE", where))


def parse_exclusions(text: str, source: str) -> tuple[Exclusion, ...]:
    """The rows of an LEIE-layout CSV text that carry an NPI; ConfigError naming the line for anything malformed."""
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None or tuple(h.strip().upper() for h in header) != COLUMNS:
        raise ConfigError(f"claims.exclusion_list {source}: the header must be the LEIE columns "
                          f"{','.join(COLUMNS)}; found {','.join(header or []) or '(an empty file)'}")
    out = []
    for n, values in enumerate(reader, start=2):
        if not any(v.strip() for v in values):
            continue
        where = f"claims.exclusion_list {source} line {n}"
        if len(values) != len(COLUMNS):
            raise ConfigError(f"{where}: {len(values)} fields, the LEIE layout has {len(COLUMNS)}; quote fields that "
                              "contain commas")
        found = _row(dict(zip(COLUMNS, values, strict=True)), where)
        if found is not None:
            out.append(found)
    return tuple(out)


def read_exclusions(path: str, conf_dir: Path) -> tuple[Exclusion, ...]:
    """claims.exclusion_list read (relative to the conf folder); () when it is empty (no exclusion check)."""
    if not path.strip():
        return ()
    file = Path(path).expanduser()
    file = file if file.is_absolute() else conf_dir / file
    try:
        text = file.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ConfigError(f"claims.exclusion_list {file} cannot be read ({exc.strerror}): point it at an LEIE CSV "
                          "file, or set it to \"\" to turn the exclusion check off") from None
    return parse_exclusions(text, str(file))
