"""The patients' charted ward observation sets and ICU monitors' hourly sets, and their NEWS2 at any moment: what an
imaging order's ground truth (its critical-finding chance) and the queue replay (the worklist's NEWS2 factor) read of
a patient's acuity. ICU patients are scored from their monitors as gold scores them (no oxygen flow is sent there,
FiO2 is); ED walk-ins and outpatients have nothing charted.

The values are the simulated truth (before the feeds' dirt); NEWS2 is gold.news2's, on the RCP 2017 chart with
SpO2 scale 1, as gold scores a patient without a recorded hypercapnic target.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipelines.simulator.clinical import BY_KEY, acvpu_letter
from pipelines.simulator.observations import Draw
from pipelines.simulator.population import HOUR, Census

VITALS_COLUMNS = ("patient_mrn", "visit_number", "time", "respiratory_rate", "spo2_pct", "fio2_pct", "o2_flow_l_min",
                  "systolic_bp_mmhg", "pulse", "temperature_c", "acvpu")
CURRENT_FOR_S = 24 * HOUR  # a charted set older than this says nothing of the patient now (imaging.news2_current_for)


def news2_band(values: Mapping[str, float | str | None], charts: Any = None) -> str:
    """The NEWS2 band of one observation set in the VITALS_COLUMNS names (gold.news2 on `charts`, default RCP 2017;
    SpO2 scale 1)."""
    from gold.news2 import RCP_2017, news2, on_oxygen

    return news2(values["respiratory_rate"], values["spo2_pct"], on_oxygen(values["fio2_pct"], values["o2_flow_l_min"]),
                 values["systolic_bp_mmhg"], values["pulse"], values["acvpu"], values["temperature_c"],
                 charts=charts or RCP_2017).band


def _row(got: Mapping[str, float]) -> dict[str, float | str | None]:
    def v(key: str) -> float | None:
        return None if key not in got else round(got[key], BY_KEY[key].decimals)

    return {"respiratory_rate": v("rr"), "spo2_pct": v("spo2"), "fio2_pct": v("fio2"), "o2_flow_l_min": v("o2flow"),
            "systolic_bp_mmhg": v("sbp"), "pulse": v("hr"), "temperature_c": v("temp"),
            "acvpu": None if "acvpu" not in got else acvpu_letter(got["acvpu"])}


@dataclass(frozen=True)
class WardCharts:
    """Each visit's charted ward vital-sign sets and ICU monitor hourly sets, in time order: (t, values in
    VITALS_COLUMNS names)."""

    sets: Mapping[int, Sequence[tuple[int, Mapping[str, float | str | None]]]]

    @classmethod
    def of(cls, draws: Sequence[Draw], values: Mapping[tuple[int, int], Mapping[str, float]]) -> WardCharts:
        sets: dict[int, list] = {}
        for d in sorted((d for d in draws if d.kind in ("vitals", "monitor")), key=lambda d: (d.visit_no, d.t)):
            sets.setdefault(d.visit_no, []).append((d.t, _row(values.get((d.visit_no, d.t), {}))))
        return cls(sets)

    def band_at(self, visit_no: int, t: int) -> str | None:
        """The NEWS2 band of the visit's newest set charted at or before t (None: none in the last 24 h)."""
        charted = self.sets.get(visit_no, ())
        at = bisect.bisect_right([s for s, _ in charted], t) - 1
        if at < 0 or t - charted[at][0] > CURRENT_FOR_S:
            return None
        return news2_band(charted[at][1])

    def rows(self, census: Census, iso: Callable[[int], str]) -> Iterator[tuple]:
        """truth/ward_vitals.csv: one row per charted ward set or ICU monitor hourly set (VITALS_COLUMNS)."""
        by_visit = {e.visit_no: e for e in census.active}
        for visit_no, charted in sorted(self.sets.items()):
            enc = by_visit[visit_no]
            for t, values in charted:
                yield (enc.mrn_at(t), enc.visit, iso(t), *(values[c] for c in VITALS_COLUMNS[3:]))
