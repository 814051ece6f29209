"""Time parsing shared by time travel, the CLI and the runner (naive times are UTC); a batch's step timings."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from pipelines.errors import UsageError


def parse_timestamp(value: datetime | str) -> datetime:
    """An aware UTC datetime from a datetime or ISO-8601 text ('2026-11-21T03:00:00Z', '2026-11-21 03:00')."""
    if isinstance(value, datetime):
        when = value
    else:
        text = str(value).strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            when = datetime.fromisoformat(text)
        except ValueError as exc:
            raise UsageError(
                f"{value!r} is not a timestamp: use ISO-8601 such as 2026-11-21T03:00:00Z (UTC if no offset)"
            ) from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(tz=UTC)


class Steps:
    """Seconds per step of a batch, for the log line that says where its time went."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def done(self, step: str) -> None:
        now = time.perf_counter()
        self.seconds[step] = self.seconds.get(step, 0.0) + now - self._t
        self._t = now

    def line(self) -> str:
        return ", ".join(f"{k} {v:.3f}" for k, v in self.seconds.items())
