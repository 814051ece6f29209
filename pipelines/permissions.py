"""PHI at rest: what a carelake process creates under the lakehouse root is readable by its owner only (or by the
owner and one configured OS group), whatever the caller's umask.

The umask is process-wide and inherited: set before Spark's JVM starts, it also governs the files Spark's
executors and Python workers write in local mode. A cluster's executors run under their own umask: configure the
workers' environment the same way (docs/operations.md).
"""

from __future__ import annotations

import os
from pathlib import Path

from pipelines.errors import ConfigError

OWNER_ONLY = 0o077
GROUP_READ = 0o027


def protect(root: Path, group: str = "") -> None:
    """Set this process's umask for the lakehouse and close an existing root to everyone else (open it to `group`
    if set): a lakehouse created before this ran keeps its older files' modes, but nobody else can enter it."""
    gid = None
    if group:
        import grp

        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ConfigError(f"storage.group {group!r} is not a group on this machine: create it, or set "
                              'storage.group to "" for an owner-only lakehouse') from None
    os.umask(GROUP_READ if group else OWNER_ONLY)
    if not root.is_dir() or root.stat().st_uid != os.geteuid():
        return  # created later under this umask; someone else's root keeps the mode its owner gave it
    if gid is not None:
        try:
            os.chown(root, -1, gid)
        except PermissionError:
            raise ConfigError(f"storage.group {group!r}: this user may not give {root} to that group (it must be "
                              "one of the user's groups)") from None
        os.chmod(root, 0o2750)
    else:
        os.chmod(root, 0o700)
