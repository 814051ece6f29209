"""The simulator's resolved settings: conf/base.yaml's `simulator` section, flags applied, plus the output folder."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipelines.config import SimulatorConfig
from pipelines.errors import ConfigError, UsageError


@dataclass(frozen=True)
class SimParams:
    """SimulatorConfig's settings (read through) with the output folder and the parsed start time."""

    sim: SimulatorConfig
    out: Path

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sim, name)

    @property
    def start(self) -> datetime:
        return datetime.fromisoformat(self.sim.start.replace("Z", "+00:00")).astimezone(UTC)

    @property
    def start_epoch(self) -> int:
        return int(self.start.timestamp())

    @property
    def window_s(self) -> int:
        return self.sim.hours * 3600

    def describe(self) -> dict[str, Any]:
        """Every setting that shapes the output, for manifest.json."""
        out = {f.name: getattr(self.sim, f.name) for f in dataclasses.fields(self.sim)}
        return {k: dict(v) if hasattr(v, "items") else list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def resolve_params(sim: SimulatorConfig, out: str | Path, *, force: bool = False, **flags: Any) -> SimParams:
    """Apply command-line flags (None = not given) over the configuration and check the output folder."""
    given = {k: v for k, v in flags.items() if v is not None}
    if isinstance(given.get("feeds"), str):
        given["feeds"] = tuple(f.strip() for f in given["feeds"].split(",") if f.strip())
    try:
        sim = dataclasses.replace(sim, **given)
    except ConfigError as exc:
        raise UsageError(str(exc)) from exc
    folder = Path(out).expanduser().resolve()
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--out {folder} is a file; give a folder (it is created if missing)")
    if folder.is_dir() and any(folder.iterdir()) and not force:
        raise UsageError(f"--out {folder} is not empty; choose an empty or new folder, or add --force to "
                         "replace an earlier simulation there (only hl7/ fhir/ devices/ dicom/ claims/ truth/ and "
                         "manifest.json are removed)")
    return SimParams(sim, folder)
