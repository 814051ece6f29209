"""Ground truth under DIR/truth/: what really happened, in CSV/JSON with headers, never mixed into the feeds."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta

from pipelines.simulator.acuity import VITALS_COLUMNS
from pipelines.simulator.params import SimParams
from pipelines.simulator.population import Census, Encounter
from pipelines.simulator.timeline import Timeline

DETERIORATION_COLUMNS = ("patient_mrn", "visit_number", "kind", "onset_time", "peak_time", "recovered",
                         "recovery_start_time", "recovered_time", "recovered_in_window", "location_at_onset",
                         "icu_transfer_time", "speed", "severity")
ENCOUNTER_COLUMNS = ("visit_number", "patient_mrn", "admitted_as_mrn", "admit_time", "discharge_time", "cancelled",
                     "cancel_time", "diagnosis_code", "vitals_feed", "icu_device_ids", "first_unit", "phenotypes",
                     "episode_kind", "episode_onset_time", "episode_resolved_time")
MERGE_COLUMNS = ("surviving_mrn", "merged_mrn", "visit_number", "merge_time")
FRAUD_COLUMNS = ("claim_id", "line", "pattern", "detail")
DIRT_COLUMNS = ("feed", "kind", "file", "position", "identifier", "detail")
IMAGING_COLUMNS = ("order_number", "accession_number", "visit_number", "patient_mrn", "procedure_code", "priority",
                   "ordered_time", "study_time", "study_instance_uid", "indication_code", "indication_text",
                   "location_class", "critical_finding", "finding", "read_time", "reader", "cancelled_time")


def write_truth(params: SimParams, census: Census, fraud: list, dirt_rows: list[tuple], tl: Timeline, studies: list,
                counts: dict, write_csv: Callable) -> None:
    folder = params.out / "truth"
    folder.mkdir(parents=True, exist_ok=True)
    iso = _iso(params)
    write_csv(folder / "deteriorations.csv", DETERIORATION_COLUMNS,
              [_deterioration_row(e, params, iso) for e in census.active if e.deterioration])
    write_csv(folder / "encounters.csv", ENCOUNTER_COLUMNS, [_encounter_row(e, iso) for e in census.encounters])
    write_csv(folder / "merges.csv", MERGE_COLUMNS,
              [(e.person.mrn, e.duplicate.mrn, e.visit, iso(e.merge_s)) for e in census.active
               if e.merge_s is not None])
    write_csv(folder / "fraud_labels.csv", FRAUD_COLUMNS,
              sorted((f.claim_id, f.line, f.pattern, f.detail) for f in fraud))
    write_csv(folder / "dirt.csv", DIRT_COLUMNS, dirt_rows)
    uids = {p.order.order_no: p.study_uid for p in studies}
    write_csv(folder / "imaging.csv", IMAGING_COLUMNS,
              [_imaging_row(o, uids, iso) for o in tl.orders])
    write_csv(folder / "ward_vitals.csv", VITALS_COLUMNS, list(tl.charts.rows(census, iso)))
    (folder / "expected_counts.json").write_text(json.dumps(counts, indent=2, sort_keys=True) + "\n")


def _imaging_row(o, uids: dict[str, str], iso) -> tuple:
    from pipelines.simulator.clinical import IMAGING, INDICATIONS

    indication = INDICATIONS[o.indication]
    return (o.order_no, o.accession, o.enc.visit, o.enc.mrn_at(o.at_s), IMAGING[o.procedure_key].cpt, o.priority,
            iso(o.at_s), iso(o.study_s), uids.get(o.order_no, ""), indication.code, indication.text, o.location_class,
            int(o.critical), o.finding, iso(o.read_s), o.reader[0] if o.reader and o.read_s is not None else "",
            iso(o.cancelled_s))


def _iso(params: SimParams) -> Callable[[int | None], str]:
    def iso(s: int | None) -> str:
        return "" if s is None else (params.start + timedelta(seconds=s)).strftime("%Y-%m-%dT%H:%M:%SZ")

    return iso


def _deterioration_row(e: Encounter, params: SimParams, iso) -> tuple:
    d = e.deterioration
    at_onset = e.stay_at(d.onset_s)
    icu = next((s.start_s for s in e.stays if s.icu and s.start_s >= d.onset_s), None)
    in_window = d.recovered_s is not None and d.recovered_s < params.window_s
    return (e.mrn_at(d.onset_s), e.visit, d.kind, iso(d.onset_s), iso(d.peak_s), "yes" if d.recovers else "no",
            iso(d.recovery_start_s), iso(d.recovered_s), "yes" if in_window else "no",
            at_onset.unit if at_onset else "", iso(icu), d.speed, d.severity)


def _encounter_row(e: Encounter, iso) -> tuple:
    devices = sorted({s.device_id for s in e.stays if s.icu})
    return (e.visit, e.person.mrn, e.duplicate.mrn if e.duplicate else e.person.mrn, iso(e.admit_s),
            iso(e.discharge_s), "yes" if e.cancelled_s is not None else "no", iso(e.cancelled_s), e.diagnosis[0],
            "fhir" if e.fhir_vitals else "hl7", " ".join(devices), e.stays[0].unit if e.stays else "",
            " ".join(e.phenotypes), *_episode_cells(e, iso))


def _episode_cells(e: Encounter, iso) -> tuple[str, str, str]:
    """The transient, unlabelled episode (population.Episode): kind, onset, resolved; blank without one."""
    ep = e.episode
    return ("", "", "") if ep is None else (ep.kind, iso(ep.onset_s), iso(ep.resolved_s))
