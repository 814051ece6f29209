"""The landing zone: immutable files under <root>/landing/<feed>/, written durably before anyone is told.

A file appears under its final name only after its bytes and its folder entry are on disk (write to a
hidden temporary name, fsync, rename, fsync the folder). Spark's file source ignores names starting
with '.', so a half-written file is never read; a crash leaves at most a hidden temporary to clean up.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pipelines.config import Config
from pipelines.errors import UsageError

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
TEMP_PREFIX = ".incoming-"


@dataclass(frozen=True)
class LandedFile:
    source: Path
    landed: Path
    bytes: int


def landing_dir(cfg: Config, feed: str) -> Path:
    """The folder of `feed`, refusing feeds the configuration does not list."""
    if feed not in cfg.landing.feeds:
        raise UsageError(f"unknown feed {feed!r}; known feeds: {', '.join(cfg.landing.feeds)} (landing.feeds in conf/)")
    return cfg.path("landing", feed)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _expand(paths: Iterable[str | os.PathLike]) -> Iterator[Path]:
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            yield from sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        elif p.is_file():
            yield p
        else:
            raise UsageError(f"{p} does not exist or is not a file or folder; nothing was ingested")


def land_bytes(folder: Path, name: str, chunks: Iterable[bytes], *, fsync: bool = True) -> tuple[Path, int]:
    """Write `chunks` as a new immutable file in `folder`; return its final path and size."""
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(tz=UTC).strftime("%Y%m%dT%H%M%S%fZ")
    final = folder / f"{stamp}-{uuid.uuid4().hex[:12]}-{_UNSAFE.sub('_', name)[:80]}"
    temp = folder / f"{TEMP_PREFIX}{final.name}"
    size = 0
    with open(temp, "xb") as out:
        for chunk in chunks:
            out.write(chunk)
            size += len(chunk)
        out.flush()
        if fsync:
            os.fsync(out.fileno())
    os.rename(temp, final)
    if fsync:
        _fsync_dir(folder)
    return final, size


def _read_chunks(path: Path, size: int = 1 << 20) -> Iterator[bytes]:
    with open(path, "rb") as src:
        while chunk := src.read(size):
            yield chunk


def ingest(cfg: Config, paths: Iterable[str | os.PathLike], feed: str) -> list[LandedFile]:
    """Copy files (folders recursively) into the feed's landing folder, byte for byte, durably."""
    folder = landing_dir(cfg, feed)
    files = list(_expand(paths))
    if not files:
        raise UsageError("no files to ingest: the paths given hold no (non-hidden) files")
    landed = []
    for f in files:
        final, size = land_bytes(folder, f.name, _read_chunks(f), fsync=cfg.landing.fsync)
        landed.append(LandedFile(f, final, size))
    return landed
