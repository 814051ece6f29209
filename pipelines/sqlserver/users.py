"""The SQL server's users: one `name:role:hash` line each in a credentials file outside the repository.

Passwords are stored as scrypt hashes (hashlib; n=2^14, r=8, p=1, 16-byte salt), never in clear. The file is
owner-only (0600): the server refuses one others can read. `carelake sql-user add NAME --role R` writes it; the
server reads it again when it changes, so adding or removing a user needs no restart.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import os
import re
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

from pipelines.config import Config
from pipelines.errors import ConfigError, UsageError
from pipelines.sqlserver.policy import ROLES

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.@-]{0,63}$")
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}
MIN_PASSWORD = 12


@dataclass(frozen=True)
class User:
    name: str
    role: str
    hash: str


def users_file(cfg: Config) -> Path:
    """sql_server.users_file, or <root>/_secrets/sql_users."""
    return Path(cfg.sql_server.users_file).expanduser() if cfg.sql_server.users_file else cfg.path("_secrets",
                                                                                                    "sql_users")


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, dklen=32, **_SCRYPT)
    b64 = base64.b64encode
    return f"scrypt${_SCRYPT['n']}${_SCRYPT['r']}${_SCRYPT['p']}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(stored: str, password: str) -> bool:
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        expected = base64.b64decode(digest)
        got = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                             dklen=len(expected))
    except ValueError:
        return False
    return kind == "scrypt" and hmac.compare_digest(got, expected)


def read_users(path: Path) -> dict[str, User]:
    """The users in `path`, checked line by line; a missing file is no users."""
    if not path.exists():
        return {}
    if path.stat().st_mode & 0o077:
        raise ConfigError(f"{path} can be read by other users; it holds password hashes: chmod 600 {path}")
    users = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split(":")
        if len(parts) != 3 or parts[1] not in ROLES or not parts[2].startswith("scrypt$"):
            raise ConfigError(f"{path} line {number}: expected name:role:scrypt$..., role one of {', '.join(ROLES)}; "
                              "write it with `carelake sql-user add NAME --role ROLE`")
        users[parts[0]] = User(*parts)
    return users


def write_users(path: Path, users: dict[str, User]) -> None:
    """Replace the file atomically, owner-only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("# carelake sql-server users: name:role:scrypt hash (carelake sql-user add/remove)\n")
        f.writelines(f"{u.name}:{u.role}:{u.hash}\n" for u in users.values())
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)


def add_user(path: Path, name: str, role: str, password: str) -> bool:
    """Add or replace a user; True when it replaced one."""
    if not _NAME.match(name):
        raise UsageError(f"user name {name!r}: use letters, digits, _ . @ - (starting with a letter), at most 64")
    if role not in ROLES:
        raise UsageError(f"role {role!r}: choose one of {', '.join(ROLES)}")
    if len(password) < MIN_PASSWORD:
        raise UsageError(f"the password must have at least {MIN_PASSWORD} characters")
    users = read_users(path)
    existed = name in users
    users[name] = User(name, role, hash_password(password))
    write_users(path, users)
    return existed


def remove_user(path: Path, name: str) -> None:
    users = read_users(path)
    if name not in users:
        raise UsageError(f"no user {name!r} in {path}; `carelake sql-user list` shows who is there")
    del users[name]
    write_users(path, users)


@functools.cache
def _unknown_user_hash() -> str:
    return hash_password(secrets.token_urlsafe(16))


class Directory:
    """The users file, read again whenever it changes; `login` answers a role or None."""

    def __init__(self, path: Path):
        self.path = path
        self._stamp: tuple | None = None
        self._users: dict[str, User] = {}
        self._lock = threading.Lock()

    def _current(self) -> dict[str, User]:
        with self._lock:
            stat = self.path.stat() if self.path.exists() else None
            stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino) if stat else None
            if stamp != self._stamp:
                self._users, self._stamp = read_users(self.path), stamp
            return self._users

    def login(self, name: str, password: str) -> str | None:
        """The user's role when the password matches, else None."""
        user = self._current().get(name)
        if user is None:
            verify_password(_unknown_user_hash(), password)  # the same cost: no probing for user names by time
            return None
        return user.role if verify_password(user.hash, password) else None
