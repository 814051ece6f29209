"""The imaging worklist's ranking: one definition, used by the gold job (gold.imaging_worklist) and the queue replay.

A study's score is the sum of the points of its factors (conf/base.yaml `imaging:`); every factor is listed on the
row with the value it read and the points it gave, so a radiologist can see why a study ranks where it does.

| factor           | value read                                       | points                                |
|------------------|--------------------------------------------------|---------------------------------------|
| `priority`       | the matched order's priority (STAT/ASAP/ROUTINE) | points_priority; none: points_no_order |
| `exam`           | the study's modality/body part                   | the first exam_points entry that fits |
| `indication`     | categories (stroke, pe, bleed, trauma) of the    | the highest category's points         |
|                  | order's codes (prefix) or text (whole words)     |                                       |
| `location`       | the order's location class (ED, ICU, WARD, ...)  | points_location                       |
| `news2_band`     | the patient's current NEWS2 band                 | points_news2_band                     |
| `open_alert`     | the patient's open deterioration alert levels    | points_open_alert when any            |
| `waited`         | time since the study (study time, else arrival)  | points_per_sla x waited / SLA, at     |
|                  | against the SLA of its priority                  | most sla_cap SLAs                     |
| `critical_model` | the critical-finding champion's probability      | points_model x probability; none: 0   |

Ties rank by SLA due time, then study UID, so the order is total and the same on every run.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipelines.config import ImagingConfig

PRIORITY_ORDER = ("STAT", "ASAP", "ROUTINE")  # order priority ranking alone (the replay's policy b)
NO_MODEL = "no model registered"


@dataclass(frozen=True)
class Category:
    name: str
    points: int
    codes: tuple[str, ...]  # prefixes, dots removed, upper case
    words: re.Pattern[str] | None


@dataclass(frozen=True)
class Ranking:
    """The ranking's settings: the configured points (`points`, pipelines.config.ImagingConfig), and what is
    derived from them once (SLAs in ms, exam rules, indication patterns)."""

    points: ImagingConfig
    sla_ms: Mapping[str, int]
    no_order_sla_ms: int
    exams: tuple[tuple[str, str, int], ...]
    categories: tuple[Category, ...]

    @classmethod
    def of(cls, c: ImagingConfig) -> Ranking:
        from pipelines.config import IMAGING_PRIORITIES, INDICATION_CATEGORIES

        return cls(c, {p: c.sla_ms(p) for p in IMAGING_PRIORITIES}, c.sla_ms(None), c.exams(),
                   tuple(_category(name, c.indication(name)) for name in INDICATION_CATEGORIES))

    def sla(self, priority: str | None) -> timedelta:
        return timedelta(milliseconds=self.sla_ms.get(priority or "", self.no_order_sla_ms))


def _category(name: str, rule: Any) -> Category:
    words = sorted({w.strip().lower() for w in rule.words if w.strip()}, key=len, reverse=True)
    pattern = re.compile(r"\b(?:" + "|".join(re.escape(w).replace(r"\ ", r"\s+") for w in words) + r")\b",
                         re.IGNORECASE) if words else None
    return Category(name, rule.points, tuple(_code(c) for c in rule.codes), pattern)


def _code(value: str) -> str:
    """A code as compared: the part after the last `|` (system|code), dots and spaces removed, upper case."""
    return re.sub(r"[.\s]", "", value.rsplit("|", 1)[-1]).upper()


def indication_categories(codes: Iterable[str] | None, text: str | None, ranking: Ranking) -> list[str]:
    """The indication categories an order's codes or text fall in (in configuration order)."""
    plain = [_code(c) for c in codes or () if c]
    found = []
    for cat in ranking.categories:
        by_code = any(code.startswith(prefix) for code in plain for prefix in cat.codes)
        if by_code or (cat.words is not None and text and cat.words.search(text)):
            found.append(cat.name)
    return found


@dataclass(frozen=True)
class Scored:
    score: float
    sla_due_at: datetime | None
    factors: list[dict[str, Any]]
    indication_category: str | None


def _factor(name: str, value: Any, points: float) -> dict[str, Any]:
    return {"factor": name, "value": "" if value is None else str(value), "points": round(float(points), 1)}


def _exam_points(modality: str | None, body_part: str | None, ranking: Ranking) -> int:
    for m, part, points in ranking.exams:
        if m == (modality or "").upper() and part in ("*", (body_part or "").upper()):
            return points
    return 0


def _waited(available_at: datetime | None, priority: str | None, now: datetime, ranking: Ranking
            ) -> tuple[datetime | None, dict[str, Any]]:
    if available_at is None:
        return None, _factor("waited", "study time unknown", 0)
    sla = ranking.sla(priority)
    waited = max(now - available_at, timedelta(0))
    share = min(waited / sla, ranking.points.sla_cap)
    minutes = int(waited.total_seconds() // 60)
    value = f"{minutes} min of {int(sla.total_seconds() // 60)} min SLA"
    return available_at + sla, _factor("waited", value, ranking.points.points_per_sla * share)


def score(item: Mapping[str, Any], ranking: Ranking, now: datetime) -> Scored:
    """One study's score and factors. `item` holds priority (None: no order), modality, body_part,
    indication_codes, indication_text, location_class, news2_band, open_alert_levels, available_at and
    critical_probability (None: no model)."""
    priority = item.get("priority")
    categories = indication_categories(item.get("indication_codes"), item.get("indication_text"), ranking)
    by_name = {c.name: c.points for c in ranking.categories}
    top = max(categories, key=lambda c: by_name[c]) if categories else None
    location, band = item.get("location_class"), item.get("news2_band")
    alerts = sorted(item.get("open_alert_levels") or ())
    probability = item.get("critical_probability")
    due, waited = _waited(item.get("available_at"), priority, now, ranking)
    factors = [
        _factor("priority", priority or "no order",
                ranking.points.points_priority.get(priority, 0) if priority else ranking.points.points_no_order),
        _factor("exam", f"{item.get('modality') or '?'}/{item.get('body_part') or '?'}",
                _exam_points(item.get("modality"), item.get("body_part"), ranking)),
        _factor("indication", ",".join(categories) or "none", by_name[top] if top else 0),
        _factor("location", location or "unknown", ranking.points.points_location.get(location or "", 0)),
        _factor("news2_band", band or "no score", ranking.points.points_news2_band.get(band or "", 0)),
        _factor("open_alert", ",".join(alerts) or "none", ranking.points.points_open_alert if alerts else 0),
        waited,
        _factor("critical_model", NO_MODEL if probability is None else f"{probability:.3f}",
                0 if probability is None else ranking.points.points_model * probability),
    ]
    return Scored(round(sum(f["points"] for f in factors), 1), due, factors, top)


def _tie_break(item: Mapping[str, Any], scored: Scored) -> tuple:
    due = scored.sla_due_at.timestamp() if scored.sla_due_at else float("inf")
    return (-scored.score, due, item.get("study_instance_uid") or "")


def ranked(items: Sequence[Mapping[str, Any]], ranking: Ranking, now: datetime
           ) -> list[tuple[int, Mapping[str, Any], Scored]]:
    """The items in worklist order with their rank (1 = read first) and score."""
    scored = [(item, score(item, ranking, now)) for item in items]
    scored.sort(key=lambda pair: _tie_break(*pair))
    return [(n, item, s) for n, (item, s) in enumerate(scored, start=1)]


def prepare(items: Sequence[dict[str, Any]], ranking: Ranking, model: Any) -> None:
    """Set each item's indication_categories and critical_probability (None without a model), in place: what the
    critical-finding model reads and gives, once per item."""
    for item in items:
        item["indication_categories"] = indication_categories(item.get("indication_codes"),
                                                              item.get("indication_text"), ranking)
        item["critical_probability"] = None
    if model is not None and items:
        for item, p in zip(items, model.predict(items), strict=True):
            item["critical_probability"] = float(p)


def priority_rank(priority: str | None) -> int:
    """Order priority alone: STAT 0, ASAP 1, ROUTINE 2, no order 3."""
    return PRIORITY_ORDER.index(priority) if priority in PRIORITY_ORDER else len(PRIORITY_ORDER)
