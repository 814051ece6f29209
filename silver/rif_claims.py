"""CMS RIF extracts (pipe-delimited, as the Beneficiary FHIR Data pipeline loads them) and the simulator's CSV.

A RIF claim file has one row per claim line with the claim's columns repeated (CLM_ID groups them; Part D events are
one row each, PDE_ID); a beneficiary file one row per beneficiary (and per history entry). The layout is told by its
header (bronze.claim_files.RIF_LAYOUTS). Columns are read by name, so BFD's column order and added columns do not
matter. DML_IND UPDATE is a replacement of the claim and DELETE a void; dates are DD-MON-YYYY.

These are adjudicated records (CMS paid or denied them): a bad NPI is quarantined as a part and the claim kept.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from datetime import date, datetime

from silver.claim_docs import ClaimDoc, Enrollment, Line, Member, Party, Problem, money, number

LAYOUT_UNKNOWN = "claims_unknown_layout"
ROW_SHAPE = "claims_row_shape"
CMS_SCOPE, BENE = "CMS-CLM_ID", "CMS-BENE_ID"
_SETTING = {"carrier": ("professional", "carrier"), "dme": ("professional", "dme"), "pde": ("pharmacy", "pde"),
            "inpatient": ("institutional", "inpatient"), "outpatient": ("institutional", "outpatient"),
            "snf": ("institutional", "snf"), "hha": ("institutional", "hha"), "hospice": ("institutional", "hospice")}
_DML = {"UPDATE": "7", "DELETE": "8"}
_SEX = {"1": "male", "2": "female", "0": "unknown"}


def rif_date(text: str | None) -> date | None:
    """DD-MON-YYYY (27-OCT-1999, 17-Mar-1981) or CCYYMMDD; None when absent or impossible."""
    if not text or not text.strip():
        return None
    for fmt in ("%d-%b-%Y", "%Y%m%d", "%Y-%m-%d"):
        try:
            return datetime.strptime(text.strip(), fmt).date()
        except ValueError:
            continue
    return None


def _rows(text: str, delimiter: str) -> Iterator[tuple[int, dict[str, str] | Problem]]:
    """(row number, {column: value}) for each data row; a row with more values than the header (other than empty
    trailing ones) is a Problem."""
    reader = csv.reader(io.StringIO(text), delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "|" else
                        csv.QUOTE_MINIMAL)
    header = [h.strip() for h in next(reader, [])]
    for n, values in enumerate(reader, start=2):
        if not any(v.strip() for v in values):
            continue
        extra = values[len(header):]
        if any(v.strip() for v in extra) or len(values) < len(header):
            yield n, Problem(f"row {n}", ROW_SHAPE, f"{len(values)} values under a header of {len(header)} columns; "
                                                    "the extract is cut or shifted: export it again")
            continue
        yield n, {h: v.strip() for h, v in zip(header, values, strict=False)}


def read_delimited(payload: bytes, fmt: str) -> Iterator[ClaimDoc | Enrollment | Problem]:
    """Every claim (or beneficiary) of a RIF extract or a carelake claims CSV."""
    text = payload.decode("utf-8-sig", errors="replace")
    header = text.split("\n", 1)[0]
    if fmt == "csv":
        if header.startswith("claim_id,line,"):
            yield from _carelake_csv(text)
            return
        yield Problem("file", LAYOUT_UNKNOWN, f"CSV layout {header[:80]!r} is not read into silver claims (DE-SynPUF "
                                              "and other layouts need their own reader); carelake reads RIF and its "
                                              "own claims CSV")
        return
    from bronze.claim_files import RIF_LAYOUTS

    columns = set(header.strip().split("|"))
    layout = next((name for col, name in RIF_LAYOUTS if col in columns), None)
    if layout == "beneficiary":
        yield from _beneficiaries(text)
    elif layout is None:
        yield Problem("file", LAYOUT_UNKNOWN, f"no RIF layout has the header {header[:80]!r}")
    else:
        yield from _claims(text, layout)


def _beneficiaries(text: str) -> Iterator[Enrollment | Problem]:
    for n, row in _rows(text, "|"):
        if isinstance(row, Problem):
            yield row
            continue
        member = Member(system=BENE, member_id=row.get("BENE_ID", ""), family_name=row.get("BENE_SRNM_NAME") or None,
                        given_name=row.get("BENE_GVN_NAME") or None, birth_date=rif_date(row.get("BENE_BIRTH_DT")),
                        sex=_SEX.get(row.get("BENE_SEX_IDENT_CD", "")), postal_code=row.get("BENE_ZIP_CD") or None,
                        state=row.get("STATE_CODE") or None, death_date=rif_date(row.get("DEATH_DT")),
                        relationship="self", payer_name="Medicare")
        at = rif_date(row.get("EFCTV_BGN_DT"))
        yield Enrollment(f"row {n}", member, datetime(at.year, at.month, at.day) if at else None,
                         f"{row.get('RFRNC_YR', '')}|{n:08d}")


def _claims(text: str, layout: str) -> Iterator[ClaimDoc | Problem]:
    """Rows grouped by claim (in file order; BFD writes a claim's lines together)."""
    claim: ClaimDoc | None = None
    for n, row in _rows(text, "|"):
        if isinstance(row, Problem):
            yield row
            continue
        claim_id = row.get("PDE_ID") if layout == "pde" else row.get("CLM_ID")
        if claim is None or claim.claim_id != claim_id:
            if claim is not None:
                yield claim
            claim = _claim(row, layout, n)
        claim.lines.append(_line(row, layout, len(claim.lines) + 1))
    if claim is not None:
        yield claim


def _npi(value: str | None) -> str | None:
    """An NPI column: RIF writes 0000000000 (or blanks) for none."""
    return value if value and set(value) != {"0"} else None


def _claim(row: dict[str, str], layout: str, n: int) -> ClaimDoc:
    claim_type, setting = _SETTING[layout]
    pde = layout == "pde"
    claim_id = (row.get("PDE_ID") if pde else row.get("CLM_ID")) or ""
    billing = _billing(row, layout)
    frequency = _DML.get(row.get("DML_IND", ""), row.get("CLM_FREQ_CD") or "1")
    processed = rif_date(row.get("NCH_WKLY_PROC_DT") or row.get("PD_DT") or row.get("FI_CLM_PROC_DT"))
    member = Member(system=BENE, member_id=row.get("BENE_ID", ""), relationship="self", payer_name="Medicare")
    parties = [Party(role, npi=_npi(row.get(col))) for role, col in
               (("attending", "AT_PHYSN_NPI"), ("operating", "OP_PHYSN_NPI"), ("referring", "RFR_PHYSN_NPI"),
                ("prescriber", "PRSCRBR_ID")) if _npi(row.get(col))]
    doc = ClaimDoc(
        item=f"row {n}/CLM_ID {claim_id}", source_format=f"rif-{layout}", claim_id=claim_id, billing=billing,
        version_at=datetime(processed.year, processed.month, processed.day) if processed else None,
        version_tiebreak=f"{row.get('DML_IND', '')}|{n:08d}", key_scope=CMS_SCOPE, adjudicated=True,
        payer_claim_id=row.get("CARR_CLM_CNTL_NUM") or row.get("FI_DOC_CLM_CNTL_NUM") or None,
        claim_type=claim_type, setting=setting, frequency_code=frequency,
        status="void" if frequency == "8" else "active",
        adjudication_status="paid" if row.get("FINAL_ACTION") == "F" else "pended",
        payer_id="CMS", payer_name="Medicare", parties=parties, member=member,
        bill_type=_bill_type(row), service_from=rif_date(row.get("CLM_FROM_DT") or row.get("SRVC_DT")),
        service_to=rif_date(row.get("CLM_THRU_DT") or row.get("SRVC_DT")),
        admitted_on=rif_date(row.get("CLM_ADMSN_DT")), discharged_on=rif_date(row.get("NCH_BENE_DSCHRG_DT")),
        discharge_status=row.get("PTNT_DSCHRG_STUS_CD") or None, drg=row.get("CLM_DRG_CD") or None,
        billed=money(row.get("NCH_CARR_CLM_SBMTD_CHRG_AMT") or row.get("CLM_TOT_CHRG_AMT")
                     or row.get("TOT_RX_CST_AMT")),
        allowed=money(row.get("NCH_CARR_CLM_ALOWD_AMT")),
        paid=money(row.get("CVRD_D_PLAN_PD_AMT") if pde else row.get("CLM_PMT_AMT")))
    _diagnoses(doc, row)
    doc.procedures = [row[f"ICD_PRCDR_CD{i}"] for i in range(1, 26) if row.get(f"ICD_PRCDR_CD{i}")]
    return doc


def _billing(row: dict[str, str], layout: str) -> Party:
    if layout == "pde":
        qualifier, provider = row.get("SRVC_PRVDR_ID_QLFYR_CD"), row.get("SRVC_PRVDR_ID") or None
        return Party("billing", npi=provider if qualifier == "01" else None,
                     other_id=None if qualifier == "01" else provider, entity="organization")
    npi = _npi(row.get("CARR_CLM_BLG_NPI_NUM")) or _npi(row.get("ORG_NPI_NUM"))
    return Party("billing", npi=npi, other_id=row.get("PRVDR_NUM") or row.get("CARR_NUM") or None,
                 entity="organization", state=row.get("PRVDR_STATE_CD") or None)


def _bill_type(row: dict[str, str]) -> str | None:
    parts = (row.get("CLM_FAC_TYPE_CD"), row.get("CLM_SRVC_CLSFCTN_TYPE_CD"), row.get("CLM_FREQ_CD"))
    return "".join(parts) if all(parts) else None


def _diagnoses(doc: ClaimDoc, row: dict[str, str]) -> None:
    """Principal first, then ICD_DGNS_CD1..25 not already listed; version code 9 means ICD-9-CM."""
    found: list[str] = []
    for col in ["PRNCPAL_DGNS_CD", *(f"ICD_DGNS_CD{i}" for i in range(1, 26))]:
        code = row.get(col)
        if code and code not in found:
            found.append(code)
    doc.diagnoses = found
    if row.get("PRNCPAL_DGNS_VRSN_CD") == "9" or row.get("ICD_DGNS_VRSN_CD1") == "9":
        doc.diagnosis_system = "ICD-9-CM"


def _line(row: dict[str, str], layout: str, fallback: int) -> Line:
    raw = row.get("LINE_NUM") or row.get("CLM_LINE_NUM")
    if layout == "pde":
        return Line(number=1, ndc=row.get("PROD_SRVC_ID") or None, units=number(row.get("QTY_DSPNSD_NUM")),
                    service_from=rif_date(row.get("SRVC_DT")), service_to=rif_date(row.get("SRVC_DT")),
                    billed=money(row.get("TOT_RX_CST_AMT")), paid=money(row.get("CVRD_D_PLAN_PD_AMT")),
                    procedure_system="NDC")
    mods = [row.get(c) for c in ("HCPCS_1ST_MDFR_CD", "HCPCS_2ND_MDFR_CD", "HCPCS_3RD_MDFR_CD")]
    first = rif_date(row.get("LINE_1ST_EXPNS_DT") or row.get("REV_CNTR_DT"))
    return Line(
        number=int(raw) if raw and raw.isdigit() else fallback, procedure_code=row.get("HCPCS_CD") or None,
        procedure_system="CPT/HCPCS" if row.get("HCPCS_CD") else None, modifiers=[m for m in mods if m],
        revenue_code=row.get("REV_CNTR") or None, ndc=row.get("LINE_NDC_CD") or None,
        units=number(row.get("LINE_SRVC_CNT") or row.get("REV_CNTR_UNIT_CNT")),
        service_from=first, service_to=rif_date(row.get("LINE_LAST_EXPNS_DT")) or first,
        diagnoses=[row["LINE_ICD_DGNS_CD"]] if row.get("LINE_ICD_DGNS_CD") else [],
        billed=money(row.get("LINE_SBMTD_CHRG_AMT") or row.get("REV_CNTR_TOT_CHRG_AMT")),
        allowed=money(row.get("LINE_ALOWD_CHRG_AMT")),
        paid=money(row.get("LINE_NCH_PMT_AMT") or row.get("REV_CNTR_PMT_AMT_AMT")),
        rendering_npi=_npi(row.get("PRF_PHYSN_NPI") or row.get("RNDRNG_PHYSN_NPI")),
        place_of_service=row.get("LINE_PLACE_OF_SRVC_CD") or None)


def _carelake_csv(text: str) -> Iterator[ClaimDoc | Problem]:
    """The simulator's claims CSV (pipelines.simulator.claims.CSV_COLUMNS): one row per line, a claim together."""
    claim: ClaimDoc | None = None
    for n, row in _rows(text, ","):
        if isinstance(row, Problem):
            yield row
            continue
        if claim is None or claim.claim_id != row["claim_id"]:
            if claim is not None:
                yield claim
            claim = _csv_claim(row, n)
        day = rif_date(row.get("service_date"))
        claim.lines.append(Line(number=int(row["line"]) if row.get("line", "").isdigit() else len(claim.lines) + 1,
                                procedure_code=row.get("procedure_code") or None, procedure_system="CPT/HCPCS",
                                units=number(row.get("units")), unit_type="UN", service_from=day, service_to=day,
                                billed=money(row.get("line_charge")), rendering_npi=row.get("rendering_npi") or None,
                                diagnosis_pointers=[1]))
        claim.service_from = min(filter(None, [claim.service_from, day]), default=None)
        claim.service_to = max(filter(None, [claim.service_to, day]), default=None)
        claim.billed = sum((ln.billed for ln in claim.lines if ln.billed is not None), money("0"))
    if claim is not None:
        yield claim


def _csv_claim(row: dict[str, str], n: int) -> ClaimDoc:
    submitted = rif_date(row.get("submitted_date"))
    bill_type = row.get("bill_type") or None
    frequency = bill_type[-1] if bill_type else "1"
    member = Member(system=row.get("payer") or "unknown-payer", member_id=row.get("patient_mrn") or "",
                    mrn=row.get("patient_mrn") or None, relationship="self", payer_name=row.get("payer") or None)
    return ClaimDoc(item=f"row {n}/claim {row['claim_id']}", source_format="csv-carelake", claim_id=row["claim_id"],
                    billing=Party("billing", npi=row.get("billing_npi") or None, entity="organization"),
                    version_at=datetime(submitted.year, submitted.month, submitted.day) if submitted else None,
                    version_tiebreak=row["claim_id"], claim_type="institutional",
                    setting="inpatient" if bill_type and bill_type.startswith("11") else "institutional",
                    frequency_code=frequency, status="void" if frequency == "8" else "active",
                    payer_id=row.get("payer") or None, payer_name=row.get("payer") or None, member=member,
                    bill_type=bill_type, diagnoses=[row["diagnosis_code"]] if row.get("diagnosis_code") else [])
