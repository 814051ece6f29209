"""Secrets the jobs need, from configuration or a per-lakehouse file created once."""

from __future__ import annotations

import os
import secrets

from pipelines.config import Config

SECRET_FILE = ("_secrets", "key_secret")


def key_secret(cfg: Config) -> str:
    """The secret behind patient_key / encounter_key: silver.key_secret, else <root>/_secrets/key_secret.

    The file is created on first use with 256 random bits and mode 0600, so a lakehouse keeps the same
    keys across runs; copy it with the lakehouse (or set CARELAKE_SILVER__KEY_SECRET) to keep them.
    """
    if cfg.silver.key_secret:
        return cfg.silver.key_secret
    path = cfg.path(*SECRET_FILE)
    if path.exists():
        return path.read_text(encoding="ascii").strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    value = secrets.token_hex(32)
    temp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, value.encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(temp, path)  # atomic and exclusive: when two processes race, the first secret wins
    except FileExistsError:
        pass
    finally:
        temp.unlink()
    return path.read_text(encoding="ascii").strip()
