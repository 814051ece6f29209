"""`carelake simulate`: build the hospital, write each requested feed, then the truth, manifest and summary."""

from __future__ import annotations

import csv
import json
import logging
import shutil
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.simulator import claims as claims_mod
from pipelines.simulator import dicom
from pipelines.simulator.dirt import Delivery, DirtRecord, fhir_deliveries, hl7_deliveries
from pipelines.simulator.fhir import imaging_study
from pipelines.simulator.observations import read_values, schedule
from pipelines.simulator.params import SimParams
from pipelines.simulator.population import Census, build_census, person_draws
from pipelines.simulator.timeline import FhirEvent, Timeline, build_timeline, report_events

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger("carelake.simulate")
OUTPUTS = ("hl7", "fhir", "devices", "dicom", "claims", "truth", "manifest.json")
DIRT_COLUMNS = ("feed", "kind", "file", "position", "identifier", "detail")


@dataclass
class Summary:
    params: SimParams
    counts: dict[str, Any] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    device_seconds: float = 0.0

    @property
    def readings(self) -> int:
        return self.counts.get("devices", {}).get("lines_written", 0)

    def text(self) -> str:
        c, p = self.counts, self.params
        pop = c["population"]
        lines = [f"simulated {p.patients} patients over {p.hours} h from {p.start.isoformat()} (seed {p.seed}) "
                 f"into {p.out}",
                 f"  population: {pop['encounters']} admissions, {pop['admissions_cancelled']} cancelled, "
                 f"{pop['merges']} merges, {pop['icu_beds']} ICU beds",
                 "  deterioration: " + (", ".join(f"{k} {v}" for k, v in pop["deteriorations"].items()) or "none")
                 + f" ({pop['recovered_in_window']} recovered in the window)"]
        for feed in p.feeds:
            lines.append(f"  {feed:8s} {self.files.get(feed, 0):6,} files  " + _feed_line(feed, c.get(feed, {})))
        fraud = c.get("claims", {}).get("fraud_lines", {})
        if fraud:
            lines.append("  fraud labels: " + ", ".join(f"{k} {v}" for k, v in sorted(fraud.items())))
        lines.append("  dirt injected: " + (", ".join(f"{k} {v}" for k, v in sorted(c["dirt"].items())) or "none"))
        rate = f", {self.readings / self.device_seconds:,.0f} readings/s" if self.device_seconds else ""
        lines.append(f"  took {self.seconds:.1f} s (device readings {self.device_seconds:.1f} s{rate}); "
                     f"ground truth in {p.out / 'truth'}")
        return "\n".join(lines)


def _feed_line(feed: str, c: dict) -> str:
    if feed == "hl7":
        return f"{c['messages_written']:,} messages ({c['messages_clean']:,} clean, distinct)"
    if feed == "fhir":
        return (f"{c['bundles_written']:,} bundles, {c['resources_written']:,} resources "
                f"({c['resources_clean']:,} clean); NDJSON {sum(c['ndjson'].values()):,} resources")
    if feed == "devices":
        return f"{c['lines_written']:,} readings ({c['readings_clean']:,} clean, distinct)"
    if feed == "dicom":
        return f"{c['studies']:,} studies, {c['instances']:,} instances"
    return f"{c['claims']:,} claims, {c['claim_lines']:,} lines, {c['eobs']:,} EOBs"


def simulate(spark: SparkSession, params: SimParams) -> Summary:
    """Write the feeds, truth/ and manifest.json under params.out; return the counts."""
    began = time.perf_counter()
    _prepare(params.out)
    summary = Summary(params)
    log.info("drawing %d people (dbldatagen, seed %d)", params.patients, params.seed)
    rows = [r.asDict() for r in person_draws(spark, params).collect()]
    census = build_census(rows, params)
    draws = schedule(census, params)
    log.info("%d encounters; reading %d ward/lab observation sets", len(census.encounters), len(draws))
    values = read_values(spark, census, params, draws)
    timeline = build_timeline(census, params, draws, values)
    studies = _add_imaging_studies(timeline, params)
    claims, fraud = claims_mod.build_claims(census, params, draws, timeline.orders)
    dirt_rows: list[tuple] = []
    counts = summary.counts
    if "hl7" in params.feeds:
        counts["hl7"], dirt_rows_hl7 = _write_hl7(timeline, params, summary)
        dirt_rows += dirt_rows_hl7
    if "fhir" in params.feeds:
        counts["fhir"], dirt_rows_fhir = _write_fhir(timeline, params, summary)
        dirt_rows += dirt_rows_fhir
    if "devices" in params.feeds:
        counts["devices"], dirt_rows_dev = _write_devices(spark, census, params, summary)
        dirt_rows += dirt_rows_dev
    if "dicom" in params.feeds:
        counts["dicom"] = _write_dicom(studies, params, summary)
    if "claims" in params.feeds:
        counts["claims"] = _write_claims(claims, fraud, params, summary)
    counts["population"] = _population_counts(census, params)
    counts["dirt"] = dict(sorted(Counter(f"{r[0]}.{r[1]}" for r in dirt_rows).items()))
    _write_truth(params, census, fraud, dirt_rows, timeline, studies, counts)
    summary.seconds = time.perf_counter() - began
    _write_manifest(params, summary)
    return summary


def _prepare(out: Path) -> None:
    """Create the output folder; with --force, remove only what an earlier simulation wrote."""
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def _stamp(params: SimParams, s: int, fmt: str) -> str:
    return (params.start + timedelta(seconds=s)).strftime(fmt)


def _add_imaging_studies(tl: Timeline, params: SimParams) -> list[dicom.StudyPlan]:
    plans = []
    for order in tl.orders:
        if order.study_s is None:
            continue
        plan = dicom.plan_study(order, params.seed)
        plans.append(plan)
        enc = order.enc
        resource = imaging_study(study_uid=plan.study_uid, series_uid=plan.series_uid,
                                 instances=list(plan.instance_uids), accession=order.accession,
                                 order_no=order.order_no, mrn=enc.mrn_at(order.study_s), visit=enc.visit,
                                 procedure=dicom.IMAGING[order.procedure_key],
                                 at=params.start + timedelta(seconds=order.study_s))
        tl.fhir.append(FhirEvent(order.study_s, 10**9 + len(plans), [resource]))
        report_events(tl, order, plan.study_uid, params.start)
    tl.sort()
    return plans


def _place(deliveries: list[Delivery], name_of) -> dict[tuple[str, int], tuple[str, int, int]]:
    """Group deliveries into files; returns (key, copy) -> (file, position (1-based), byte offset)."""
    files: dict[str, list[Delivery]] = defaultdict(list)
    for d in deliveries:
        files[name_of(d)].append(d)
    where = {}
    for name, items in files.items():
        items.sort(key=lambda d: (d.deliver_s, d.seq))
        offset = 0
        for pos, d in enumerate(items, start=1):
            where[(d.key, d.copy)] = (name, pos, offset)
            offset += len(d.data)
    return where


def _write_grouped(folder: Path, deliveries: list[Delivery], name_of) -> dict[tuple[str, int], tuple[str, int, int]]:
    where = _place(deliveries, name_of)
    files: dict[str, list[Delivery]] = defaultdict(list)
    for d in deliveries:
        files[name_of(d)].append(d)
    folder.mkdir(parents=True, exist_ok=True)
    for name, items in sorted(files.items()):
        items.sort(key=lambda d: (d.deliver_s, d.seq))
        (folder / name).write_bytes(b"".join(d.data for d in items))
    return where


def _dirt_rows(records: list[DirtRecord], where: dict, folder: str) -> list[tuple]:
    rows = []
    for r in records:
        file, pos, _ = where[(r.key, 1 if r.kind == "duplicate" else 0)]
        rows.append((r.feed, r.kind, f"{folder}/{file}", pos, r.key, r.detail))
    return rows


def _write_hl7(tl: Timeline, params: SimParams, summary: Summary) -> tuple[dict, list[tuple]]:
    deliveries, records = hl7_deliveries(tl.hl7, params)
    where = _write_grouped(params.out / "hl7", deliveries,
                           lambda d: _stamp(params, d.deliver_s // 3600 * 3600, "%Y%m%dT%H%MZ") + ".hl7")
    summary.files["hl7"] = len({w[0] for w in where.values()})
    by_type: dict[str, dict[str, int]] = defaultdict(lambda: {"written": 0, "clean": 0})
    for d in deliveries:
        by_type[d.message_type]["written"] += 1
        by_type[d.message_type]["clean"] += int(d.clean and d.copy == 0)
    counts = {"files": summary.files["hl7"], "messages_written": len(deliveries),
              "messages_clean": sum(v["clean"] for v in by_type.values()), "by_type": dict(sorted(by_type.items()))}
    log.info("hl7: %d messages in %d files", len(deliveries), summary.files["hl7"])
    return counts, _dirt_rows(records, where, "hl7")


def _write_fhir(tl: Timeline, params: SimParams, summary: Summary) -> tuple[dict, list[tuple]]:
    deliveries, records = fhir_deliveries(tl.fhir, params)
    where = _write_grouped(params.out / "fhir", deliveries,
                           lambda d: f"{_stamp(params, d.deliver_s, '%Y%m%dT%H%M%SZ')}-{d.seq:07d}.json")
    resource_rows = []
    for r in records:
        if "/" in r.key:  # a resource inside a bundle: point at the bundle that carries it
            bundle = next(e for e in _bundle_of(tl, r.key, params))
            file, pos, _ = where[(bundle, 0)]
            resource_rows.append((r.feed, r.kind, f"fhir/{file}", pos, r.key, r.detail))
    rows = resource_rows + _dirt_rows([r for r in records if "/" not in r.key], where, "fhir")
    ndjson = _write_ndjson(tl, params.out / "fhir" / "ndjson")
    by_type: dict[str, dict[str, int]] = defaultdict(lambda: {"written": 0, "clean": 0})
    index = {f"bundle-{params.seed}-{n + 1:07d}": e for n, e in enumerate(tl.fhir)}
    for d in deliveries:
        for res in index[d.key].resources:
            by_type[res["resourceType"]]["written"] += 1
            by_type[res["resourceType"]]["clean"] += int(d.clean and d.copy == 0)
    summary.files["fhir"] = len(deliveries) + len(ndjson)
    counts = {"files": summary.files["fhir"], "bundles_written": len(deliveries),
              "bundles_clean": sum(1 for d in deliveries if d.clean and d.copy == 0),
              "resources_written": sum(v["written"] for v in by_type.values()),
              "resources_clean": sum(v["clean"] for v in by_type.values()),
              "by_type": dict(sorted(by_type.items())), "ndjson": ndjson}
    log.info("fhir: %d bundles, %d NDJSON files", len(deliveries), len(ndjson))
    return counts, rows


def _bundle_of(tl: Timeline, key: str, params: SimParams):
    rtype, rid, _, version = key.split("/")
    for n, e in enumerate(tl.fhir):
        if any(r["resourceType"] == rtype and r["id"] == rid and r["meta"]["versionId"] == version
               for r in e.resources):
            yield f"bundle-{params.seed}-{n + 1:07d}"


def _write_ndjson(tl: Timeline, folder: Path) -> dict[str, int]:
    """Bulk export at the window's end: the latest version of every resource, one per line, per type."""
    latest: dict[tuple[str, str], dict] = {}
    for e in tl.fhir:
        for r in e.resources:
            latest[(r["resourceType"], r["id"])] = r
    folder.mkdir(parents=True, exist_ok=True)
    by_type: dict[str, list[dict]] = defaultdict(list)
    for (rtype, _), r in sorted(latest.items()):
        by_type[rtype].append(r)
    for rtype, items in by_type.items():
        (folder / f"{rtype}.ndjson").write_text("".join(json.dumps(r) + "\n" for r in items))
    return {k: len(v) for k, v in sorted(by_type.items())}


def _write_devices(spark, census: Census, params: SimParams, summary: Summary) -> tuple[dict, list[tuple]]:
    from pipelines.simulator.devices import write_devices

    log.info("devices: generating ICU monitor readings with Spark (%d partitions)", params.partitions)
    t0 = time.perf_counter()
    out = write_devices(spark, census, params)
    summary.device_seconds = time.perf_counter() - t0
    by_code: Counter = Counter()
    for (_, loinc), n in out.lines.items():
        by_code[loinc] += n
    rows, kinds, copies, broken = [], Counter(), Counter(), Counter()
    for file, line, info in out.dirt:
        labels, device, mrn, at, loinc = info.split("|")
        kind_list = labels.split(",")
        for kind in kind_list:
            kinds[kind] += 1
            rows.append(("devices", kind, f"devices/{file}", line, f"{device}|{mrn}|{at}|{loinc}", ""))
        copies[loinc] += "duplicate" in kind_list
        broken[loinc] += "malformed" in kind_list and "duplicate" not in kind_list
    written = sum(by_code.values())
    summary.files["devices"] = len({f for f, _ in out.lines})
    by = {k: {"written": v, "readings": v - copies[k], "clean": v - copies[k] - broken[k]}
          for k, v in sorted(by_code.items())}
    counts = {"files": summary.files["devices"], "lines_written": written,
              "readings": sum(v["readings"] for v in by.values()),
              "readings_clean": sum(v["clean"] for v in by.values()), "by_code": by,
              "dirt": dict(sorted(kinds.items()))}
    log.info("devices: %d readings in %d files, %.1f s", written, summary.files["devices"], summary.device_seconds)
    return counts, rows


def _write_dicom(plans: list[dicom.StudyPlan], params: SimParams, summary: Summary) -> dict:
    folder = params.out / "dicom"
    folder.mkdir(parents=True, exist_ok=True)
    files = 0
    for plan in plans:
        o = plan.order
        files += len(dicom.write_study(plan, o.enc.person_at(o.study_s), params.start + timedelta(seconds=o.study_s),
                                       folder))
    summary.files["dicom"] = files
    return {"studies": len(plans), "series": len(plans), "instances": files, "files": files}


def _write_claims(claims: list, fraud: list, params: SimParams, summary: Summary) -> dict:
    folder = params.out / "claims"
    folder.mkdir(parents=True, exist_ok=True)
    by_day: dict[str, list] = defaultdict(list)
    for c in claims:
        by_day[c.submitted.strftime("%Y%m%d")].append(c)
    for day, items in sorted(by_day.items()):
        with open(folder / f"claim-lines-{day}.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(claims_mod.CSV_COLUMNS)
            w.writerows(claims_mod.csv_rows(items))
        resources = [r for c in items for r in (claims_mod.claim_resource(c), claims_mod.eob_resource(c))]
        from pipelines.simulator.fhir import bundle

        at = params.start.replace(year=int(day[:4]), month=int(day[4:6]), day=int(day[6:]), hour=0, minute=0)
        (folder / f"claims-{day}.json").write_text(json.dumps(bundle(f"claims-{params.seed}-{day}", "collection",
                                                                     resources, at)) + "\n")
    summary.files["claims"] = 2 * len(by_day)
    return {"files": 2 * len(by_day), "claims": len(claims), "eobs": len(claims),
            "claim_lines": sum(len(c.lines) for c in claims),
            "fraud_lines": dict(sorted(Counter(f.pattern for f in fraud).items()))}


def _population_counts(census: Census, params: SimParams) -> dict:
    active = census.active
    kinds = Counter(e.deterioration.kind for e in active if e.deterioration)
    return {"patients": params.patients,
            "patient_records": params.patients + sum(1 for e in active if e.duplicate is not None),
            "encounters": len(active), "admissions_cancelled": len(census.encounters) - len(active),
            "merges": sum(1 for e in active if e.merge_s is not None),
            "demographic_updates": sum(1 for e in active if e.update_s is not None),
            "discharges": sum(1 for e in active if e.discharge_s is not None),
            "icu_beds": census.icu_beds, "icu_stays": sum(1 for e in active for s in e.stays if s.icu),
            "deteriorations": dict(sorted(kinds.items())),
            "recovered_in_window": sum(1 for e in active if e.deterioration and e.deterioration.recovered_s is not None
                                       and e.deterioration.recovered_s < params.window_s)}


def _csv(path: Path, header: tuple[str, ...], rows) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def _write_truth(params: SimParams, census: Census, fraud: list, dirt_rows: list[tuple], tl: Timeline,
                 studies: list, counts: dict) -> None:
    from pipelines.simulator.truth import write_truth

    write_truth(params, census, fraud, sorted(dirt_rows, key=lambda r: (r[0], r[2], int(r[3]), r[1])), tl, studies,
                counts, _csv)


def _write_manifest(params: SimParams, summary: Summary) -> None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        carelake_version = version("carelake")
    except PackageNotFoundError:
        carelake_version = "unknown"
    files = {}
    for feed in params.feeds:
        folder = params.out / feed
        files[feed] = sorted(str(p.relative_to(params.out)) for p in folder.rglob("*") if p.is_file())
    manifest = {"generator": "carelake simulate", "carelake_version": carelake_version, "seed": params.seed,
                "start": params.start.isoformat().replace("+00:00", "Z"), "hours": params.hours,
                "feeds": list(params.feeds), "parameters": params.describe(), "files": files,
                "counts": summary.counts}
    (params.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
