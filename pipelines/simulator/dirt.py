"""What goes wrong in transit, decided per message with seeded draws and recorded for the truth files.

HL7: resends (same bytes, same MSH-10), late delivery, an OBX without a value, a unit variant, LF segment
terminators, malformed messages (truncated, garbage, missing MSH). FHIR: resent bundles (same resource versions),
late bundles, observations without a value or in another unit, broken JSON.
"""

from __future__ import annotations

import copy
import json
import random
from dataclasses import dataclass, replace

from pipelines.simulator import hl7
from pipelines.simulator.clinical import BY_KEY, unit_variant
from pipelines.simulator.hl7 import Header, Result
from pipelines.simulator.params import SimParams
from pipelines.simulator.population import HOUR
from pipelines.simulator.timeline import FhirEvent, Hl7Event

MALFORMED_KINDS = ("truncated", "garbage", "missing_msh")


@dataclass(frozen=True)
class Delivery:
    """Bytes handed to the feed at `deliver_s`; `key` identifies what they carry (MSH-10 or bundle id)."""

    deliver_s: int
    seq: int
    data: bytes
    key: str
    message_type: str
    clean: bool        # False for malformed bytes (not a message a parser can key)
    copy: int = 0      # 1 for a resend


@dataclass(frozen=True)
class DirtRecord:
    feed: str
    kind: str
    key: str           # MSH-10, Bundle id, or resource type/id/version
    detail: str


def _timing(rng: random.Random, rates: dict, at_s: int) -> tuple[int, bool, bool, int]:
    """(delivery time, late?, duplicate?, resend delay) from three draws, always taken in the same order."""
    late, dup, delay = rng.random() < rates["late"], rng.random() < rates["duplicate"], rng.randint(30, 300)
    late_by = rng.randint(1, 4) * HOUR + rng.randint(0, 59) * 60
    return (at_s + late_by if late else at_s), late, dup, delay


def hl7_deliveries(events: list[Hl7Event], params: SimParams) -> tuple[list[Delivery], list[DirtRecord]]:
    rng = random.Random(f"{params.seed}:dirt:hl7")
    rates = params.dirt
    out: list[Delivery] = []
    dirt: list[DirtRecord] = []
    for n, event in enumerate(events):
        control_id = f"S{params.seed}-{n + 1:08d}"
        header = Header(params.start + _seconds(event.at_s), event.message_type, control_id)
        draws = [rng.random() for _ in range(4)]
        results, notes = _dirty_results(event.results, draws, rates, rng)
        dirt += [DirtRecord("hl7", kind, control_id, detail) for kind, detail in notes]
        lf = draws[2] < rates["lf_terminator"]
        data = hl7.encode(event.build(header, results), "\n" if lf else "\r")
        if lf:
            dirt.append(DirtRecord("hl7", "lf_terminator", control_id, "segments end with LF"))
        clean = True
        if draws[3] < rates["malformed"]:
            how = MALFORMED_KINDS[rng.randrange(len(MALFORMED_KINDS))]
            data, clean = _malform(data, how, rng), False
            dirt.append(DirtRecord("hl7", "malformed", control_id, how))
        deliver_s, late, dup, delay = _timing(rng, rates, event.at_s)
        out.append(Delivery(deliver_s, 2 * n, data, control_id, event.short_type, clean))
        if late:
            dirt.append(DirtRecord("hl7", "late", control_id, f"event {event.at_s}s, delivered {deliver_s}s"))
        if dup:
            out.append(Delivery(deliver_s + delay, 2 * n + 1, data, control_id, event.short_type, clean, copy=1))
            dirt.append(DirtRecord("hl7", "duplicate", control_id, f"resent {delay}s later, same bytes"))
    return out, dirt


def _seconds(s: int):
    from datetime import timedelta

    return timedelta(seconds=s)


def _dirty_results(results: list[Result], draws: list[float], rates: dict,
                   rng: random.Random) -> tuple[list[Result], list[tuple[str, str]]]:
    """An ORU's results with at most one value blanked and one unit changed."""
    results = list(results)
    notes = []
    numeric = [i for i, r in enumerate(results) if r.value is not None and r.coded is None and r.text is None]
    if numeric and draws[0] < rates["missing_value"]:
        i = numeric[rng.randrange(len(numeric))]
        results[i] = replace(results[i], value=None)
        notes.append(("missing_value", f"OBX-{i + 1} {BY_KEY[results[i].key].loinc} has no value"))
    variants = [i for i in numeric if results[i].value is not None and unit_variant(results[i].key, 0) is not None]
    if variants and draws[1] < rates["unit_variant"]:
        i = variants[rng.randrange(len(variants))]
        value, unit = unit_variant(results[i].key, results[i].value)
        notes.append(("unit_variant", f"OBX-{i + 1} {BY_KEY[results[i].key].loinc} {results[i].value} "
                                      f"{results[i].unit} sent as {value} {unit}"))
        results[i] = replace(results[i], value=value, unit=unit)
    return results, notes


def _malform(data: bytes, how: str, rng: random.Random) -> bytes:
    if how == "truncated":  # cut short mid-segment, then a terminator: the next message in the file stays whole
        return data[: max(8, len(data) * rng.randint(30, 70) // 100)].rstrip(b"\r\n") + b"\r"
    if how == "missing_msh":
        cut = min(i for i in (data.find(b"\r"), data.find(b"\n")) if i >= 0)
        return data[cut + 1:]
    garbage = bytes(rng.randrange(32, 127) for _ in range(rng.randint(40, 160)))
    return garbage.replace(b"MSH", b"MSX") + b"\r"


def fhir_deliveries(events: list[FhirEvent], params: SimParams) -> tuple[list[Delivery], list[DirtRecord]]:
    """One transaction Bundle per event (observation dirt applied), resends and late bundles as extra files."""
    from pipelines.simulator.fhir import bundle

    rng = random.Random(f"{params.seed}:dirt:fhir")
    rates = params.dirt
    out: list[Delivery] = []
    dirt: list[DirtRecord] = []
    for n, event in enumerate(events):
        bundle_id = f"bundle-{params.seed}-{n + 1:07d}"
        draws = [rng.random() for _ in range(3)]
        resources, notes = _dirty_observations(event.resources, draws, rates, rng)
        dirt += [DirtRecord("fhir", kind, key, detail) for kind, key, detail in notes]
        data = (json.dumps(bundle(bundle_id, "transaction", resources, params.start + _seconds(event.at_s)))
                + "\n").encode()
        clean = True
        if draws[2] < rates["malformed"]:
            data, clean = data[: len(data) * rng.randint(30, 80) // 100], False
            dirt.append(DirtRecord("fhir", "malformed", bundle_id, "bundle JSON cut short"))
        deliver_s, late, dup, delay = _timing(rng, rates, event.at_s)
        out.append(Delivery(deliver_s, 2 * n, data, bundle_id, "Bundle", clean))
        if late:
            dirt.append(DirtRecord("fhir", "late", bundle_id, f"event {event.at_s}s, delivered {deliver_s}s"))
        if dup:
            out.append(Delivery(deliver_s + delay, 2 * n + 1, data, bundle_id, "Bundle", clean, copy=1))
            dirt.append(DirtRecord("fhir", "duplicate", bundle_id, f"resent {delay}s later: same resource versions"))
    return out, dirt


def _dirty_observations(resources: list[dict], draws: list[float], rates: dict,
                        rng: random.Random) -> tuple[list[dict], list[tuple[str, str, str]]]:
    numeric = [i for i, r in enumerate(resources) if r["resourceType"] == "Observation" and "valueQuantity" in r]
    if not numeric:
        return resources, []
    resources = list(resources)
    notes = []
    if draws[0] < rates["missing_value"]:
        i = numeric.pop(rng.randrange(len(numeric)))
        resources[i] = {k: v for k, v in resources[i].items() if k != "valueQuantity"}
        notes.append(("missing_value", _rkey(resources[i]), "valueQuantity removed"))
    variants = [i for i in numeric if _measure_key(resources[i]) is not None]
    if variants and draws[1] < rates["unit_variant"]:
        i = variants[rng.randrange(len(variants))]
        r = copy.deepcopy(resources[i])
        q = r["valueQuantity"]
        value, unit = unit_variant(_measure_key(r), q["value"])
        notes.append(("unit_variant", _rkey(r), f"{q['value']} {q['code']} sent as {value} {unit}"))
        q.update(value=value, unit=unit, code=unit)
        resources[i] = r
    return resources, notes


def _measure_key(r: dict) -> str | None:
    loinc = r["code"]["coding"][0]["code"]
    key = next((k for k, m in BY_KEY.items() if m.loinc == loinc), None)
    return key if key is not None and unit_variant(key, 0) is not None else None


def _rkey(r: dict) -> str:
    return f"{r['resourceType']}/{r['id']}/_history/{r['meta']['versionId']}"
