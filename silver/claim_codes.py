"""Code shapes on claims: NPI (Luhn check digit), ICD-10-CM, CPT/HCPCS, NDC, and the 42 CFR Part 2 flag.

These check the *shape* a code must have (a payer's front-end edit), not that it is in this year's code set: the
code-set files (AMA CPT, CMS ICD-10-CM) are licensed or yearly and are not shipped. A value that fails its shape is
not usable as that code; silver quarantines the claim or line with the reason named here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

# ICD-10-CM: a letter (not U, reserved), a digit, a digit or letter, then up to 4 characters; written with or
# without the dot after the category.
_ICD10 = re.compile(r"^[A-TV-Z][0-9][0-9A-Z](?:\.?[0-9A-Z]{1,4})?$")
# CPT: 4 digits and a digit (Category I) or F (Category II) or T (Category III) or U (PLA); HCPCS Level II: a letter
# A-V and 4 digits.
_PROCEDURE = re.compile(r"^(?:[0-9]{4}[0-9FTU]|[A-V][0-9]{4})$")
_MODIFIER = re.compile(r"^[0-9A-Z]{2}$")
_REVENUE = re.compile(r"^[0-9]{4}$")
_NDC_DASHED = re.compile(r"^([0-9]{4,5})-([0-9]{3,4})-([0-9]{1,2})$")
_DIGITS = re.compile(r"^[0-9]+$")

BAD_NPI = "claim_bad_npi"
BAD_DIAGNOSIS = "claim_bad_diagnosis_code"
BAD_PROCEDURE = "claim_line_bad_procedure_code"
BAD_NDC = "claim_line_bad_ndc"


def npi_valid(npi: str | None) -> bool:
    """A 10-digit NPI whose last digit is the Luhn check digit of the other nine with the 80840 prefix."""
    if not npi or len(npi) != 10 or not npi.isdigit():
        return False
    total = 0
    for i, ch in enumerate(reversed("80840" + npi)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def icd10(code: str | None) -> str | None:
    """The ICD-10-CM code written with its dot (E11.9), or None when it is not shaped like one."""
    if not code:
        return None
    c = code.strip().upper()
    if not _ICD10.match(c):
        return None
    bare = c.replace(".", "")
    return bare if len(bare) == 3 else f"{bare[:3]}.{bare[3:]}"


def procedure_valid(code: str | None) -> bool:
    """CPT (Category I-III, PLA) or HCPCS Level II shape."""
    return bool(code) and bool(_PROCEDURE.match(code))


def modifier_valid(code: str) -> bool:
    return bool(_MODIFIER.match(code))


def revenue_valid(code: str | None) -> bool:
    return bool(code) and bool(_REVENUE.match(code))


def ndc11(code: str | None) -> str | None:
    """An NDC as its 11-digit billing form (5-4-2), or None when it is not shaped like one.

    Dashed 10-digit forms (4-4-2, 5-3-2, 5-4-1) are padded in the short segment, as CMS bills them; a bare
    11-digit value is taken as it is. An all-zero value (RIF's "no NDC") is no NDC."""
    if not code:
        return None
    c = code.strip()
    if m := _NDC_DASHED.match(c):
        labeler, product, package = m.groups()
        if len(labeler) + len(product) + len(package) != 10:
            return None
        out = labeler.zfill(5) + product.zfill(4) + package.zfill(2)
    elif _DIGITS.match(c) and len(c) == 11:
        out = c
    else:
        return None
    return None if set(out) == {"0"} else out


@dataclass(frozen=True)
class Part2Codes:
    """What marks a claim as 42 CFR Part 2 (substance-use disorder treatment): conf claims.part2_*."""

    diagnosis_prefixes: tuple[str, ...]
    procedure_codes: frozenset[str]
    drgs: frozenset[str]

    @classmethod
    def of(cls, diagnosis_prefixes: Iterable[str], procedure_codes: Iterable[str], drgs: Iterable[str]
           ) -> Part2Codes:
        return cls(tuple(p.replace(".", "") for p in diagnosis_prefixes), frozenset(procedure_codes), frozenset(drgs))

    def flags(self, diagnoses: Iterable[str], procedures: Iterable[str], drg: str | None) -> bool:
        if drg and drg.zfill(3) in self.drgs:
            return True
        if any(p in self.procedure_codes for p in procedures):
            return True
        return any(d.replace(".", "").startswith(self.diagnosis_prefixes) for d in diagnoses)
