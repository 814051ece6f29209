"""`carelake sql` through a running SQL server: found by its discovery file under the lakehouse root.

The file (owner-only, written by the server, removed when it stops) names the port and a token: whoever can read
the lakehouse root can read its tables anyway, so the token logs `carelake sql` in as local:<OS user> with the
auditor role, and the statement is recorded in ops.audit_log under that name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TextIO

from pipelines.config import Config
from pipelines.errors import UsageError
from pipelines.output import write_records

FETCH_ROWS = 10_000
DISCOVERY = ("_sqlserver", "server.json")
LOCAL_PREFIX = "local:"  # `carelake sql` on the server's machine logs in as local:<os user> with the file's token


def discovery_file(cfg: Config) -> Path:
    return cfg.path(*DISCOVERY)


def _os_user() -> str:
    """The OS user, as ops.audit_log names CLI actors (pipelines.audit_log.os_actor, without loading pyarrow)."""
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid:{os.getuid()}"


def running_server(cfg: Config) -> dict | None:
    """The discovery file's contents when its server process is alive, else None."""
    path = discovery_file(cfg)
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        os.kill(int(info["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return info


def query(info: dict, sql: str, fmt: str, limit: int | None, out: TextIO) -> int:
    """Run `sql` on the server in `info`; write the rows like `carelake sql` does; the number written."""
    from pyhive import exc, hive

    try:
        conn = hive.connect(host=info["host"], port=int(info["port"]), username=LOCAL_PREFIX + _os_user(),
                            password=info["token"], auth="CUSTOM")
    except Exception as e:  # thrift/socket errors: the server went away between the check and the connect
        raise UsageError(f"the SQL server at {info['url']} (pid {info['pid']}) did not answer ({e}); run again, "
                         "or add --local to start Spark here") from e
    try:
        cursor = conn.cursor()
        try:
            cursor.execute(sql)
        except exc.OperationalError as e:
            status = getattr(e.args[0], "status", None) if e.args else None
            message = getattr(status, "errorMessage", None) or str(e)
            raise UsageError(f"SQL error: {message.removeprefix('carelake: ').splitlines()[0]}") from None
        columns = [d[0] for d in cursor.description or []]

        def rows():
            while batch := cursor.fetchmany(FETCH_ROWS):
                yield from batch

        return write_records(columns, rows(), fmt, limit, out)
    finally:
        conn.close()
