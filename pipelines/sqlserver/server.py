"""Start and stop the SQL server: Spark's Thrift server on loopback, the authenticating proxy, the discovery file."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import os
import secrets
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path

from pipelines.config import Config
from pipelines.errors import ConfigError, UsageError
from pipelines.sqlserver.catalog import Catalog, load_views
from pipelines.sqlserver.client import LOCAL_PREFIX, discovery_file
from pipelines.sqlserver.proxy import JvmBackend, Listener, Login
from pipelines.sqlserver.users import Directory, users_file

log = logging.getLogger("carelake.sqlserver")
BACKEND_HOST = "127.0.0.1"


def spark_settings(cfg: Config) -> dict[str, str]:
    """What the server's SparkSession adds: Spark's Thrift server on loopback, a free port, dirs under the root."""
    return {
        "spark.hive.server2.thrift.bind.host": BACKEND_HOST,
        "spark.hive.server2.thrift.port": "0",
        "spark.sql.warehouse.dir": str(cfg.path("_sqlserver", "warehouse")),
        "spark.sql.catalogImplementation": "in-memory",
        # The views are the only tables: a statement never reads files by path (the guard refuses those too).
        "spark.sql.runSQLOnFiles": "false",
        # ${env:X} / ${system:x} in a statement stay text: substitution would put the server's environment (and
        # secrets in it) into a query after the guard has read it.
        "spark.sql.variable.substitute": "false",
        # Many users' statements share the driver: a long aggregate does not hold a point query behind it (FIFO).
        "spark.scheduler.mode": "FAIR",
    }


def views_dir(cfg: Config) -> Path:
    return Path(cfg.sql_server.views_dir) if cfg.sql_server.views_dir else cfg.conf_dir.parent / "sql" / "views"


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class GroupCommit:
    """Audit events from many connections, appended to ops.audit_log together: each caller waits until the commit
    holding its event is done (nothing answered is unrecorded), and concurrent callers share one commit."""

    def __init__(self, store):
        self.store = store
        self._cond = threading.Condition()
        self._pending = _Batch()
        self._committing = False

    def write(self, row) -> None:
        import pyarrow as pa

        from pipelines.audit_log import AUDIT_LOG

        with self._cond:
            batch = self._pending
            batch.append(row)
            while not batch.done and (self._committing or batch is not self._pending):
                self._cond.wait()
            if batch.done:  # another caller committed the batch holding this event
                if batch.error is not None:
                    raise batch.error
                return
            self._pending, self._committing = _Batch(), True
        try:
            self.store.append(AUDIT_LOG, pa.concat_tables(batch), metadata={"carelake.op": "audit.query"})
        except Exception as exc:
            batch.error = exc
            raise
        finally:
            with self._cond:
                batch.done, self._committing = True, False
                self._cond.notify_all()


class _Batch(list):
    """Events committed together."""

    done: bool = False
    error: Exception | None = None


class SqlServer:
    """One running server: its Spark, catalog, users, listener and audit log."""

    def __init__(self, cfg: Config, spark, store, *, no_auth: bool):
        self.cfg, self.spark, self.store, self.no_auth = cfg, spark, store, no_auth
        self.users = Directory(users_file(cfg))
        self.token = secrets.token_urlsafe(32)
        values = {"mask_date_unit": cfg.sql_server.mask_date_unit}
        self.catalog = Catalog(spark, store, load_views(views_dir(cfg), values))
        self._thrift = None
        self._listener: Listener | None = None
        self._audit = GroupCommit(store)
        self._stopping = threading.Event()

    def login(self, user: str, password: str) -> Login | None:
        """The login's role, or None when the credentials are wrong."""
        if user.startswith(LOCAL_PREFIX):
            ok = secrets.compare_digest(password.encode(), self.token.encode())
            return Login(user, "auditor", user) if ok else None
        if self.no_auth:
            return Login(user or "anonymous", "auditor", f"{user or 'anonymous'} (no-auth)")
        role = self.users.login(user, password)
        return None if role is None else Login(user, role, user)

    def audit(self, actor: str, statement: str | None, reads, rows: int | None, outcome: str, detail: str | None,
              action: str = "query") -> None:
        """Record one event in ops.audit_log; returns once it is committed."""
        from pipelines.audit_log import event

        row = event(actor=actor, action=action, outcome=outcome, statement=statement, tables=list(reads), rows=rows,
                    detail=detail)
        try:
            self._audit.write(row)
        except Exception:  # the statement has run; the failure must be seen, not hidden
            log.exception("could not record a %s by %s in ops.audit_log", action, actor)

    def start(self, host: str, port: int) -> str:
        """Start serving; the JDBC URL."""
        self._create_views()
        self.catalog.warm(self._stopping)
        jvm = self.spark._jvm  # noqa: SLF001 - Spark's Thrift server has no Python API
        # Its execution Hive boots an embedded Derby (in the JVM's scratch folder), whose log defaults to the CWD.
        log_dir = self.cfg.path("_sqlserver")
        log_dir.mkdir(parents=True, exist_ok=True)
        jvm.java.lang.System.setProperty("derby.stream.error.file", str(log_dir / "derby.log"))
        self._thrift = jvm.org.apache.spark.sql.hive.thriftserver.HiveThriftServer2.startWithContext(
            self.spark._jsparkSession.sqlContext())  # noqa: SLF001
        self._listener = Listener(self, host, port, JvmBackend(self.spark, self._close_backend_port()),
                                  self.cfg.sql_server.max_connections)
        self._listener.start()
        shown = BACKEND_HOST if host in ("0.0.0.0", "::", "") else host
        self._write_discovery(shown, self._listener.port)
        return f"jdbc:hive2://{shown}:{self._listener.port}/default"

    def _close_backend_port(self):
        """Stop the Thrift service's own listener (the proxy calls the service in-process), wait until its port
        refuses connections, and refuse to serve if anyone opened a session on it in the meantime."""
        import socket
        import time

        service = next(s for s in self._thrift.getServices() if s.getName() == "ThriftBinaryCLIService")
        port = service.getPortNumber()
        service.stop()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection((BACKEND_HOST, port), timeout=1).close()
            except OSError:
                break
            time.sleep(0.05)
        else:
            raise ConfigError(f"Spark's Thrift service kept listening on {BACKEND_HOST}:{port} after it was stopped")
        cli = next(s for s in self._thrift.getServices() if s.getName() == "CLIService")
        if cli.getSessionManager().getOpenSessionCount():
            raise ConfigError(f"a client opened a session on Spark's internal port {port} before it closed: "
                              "another user on this machine may be probing it; not serving")
        return service

    def _create_views(self) -> None:
        """Register the repository's views now, so a bad definition fails the start, not an analyst's query."""
        from pipelines.errors import TableNotFound

        for name in self.catalog.views:
            try:
                self.catalog.resolve(f"SELECT * FROM {name}")
            except TableNotFound as exc:
                log.warning("view %s waits for its tables: %s", name, exc)
            except Exception as exc:
                raise ConfigError(f"view {name} ({views_dir(self.cfg) / (name + '.sql')}) does not work: "
                                  f"{str(exc).splitlines()[0]}") from exc

    def _write_discovery(self, host: str, port: int) -> None:
        path = discovery_file(self.cfg)
        path.parent.mkdir(parents=True, exist_ok=True)
        info = {"url": f"jdbc:hive2://{host}:{port}/default", "host": host, "port": port, "pid": os.getpid(),
                "token": self.token, "started_at": datetime.now(UTC).isoformat()}
        temp = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(info, f)
        os.replace(temp, path)

    def stop(self) -> None:
        self._stopping.set()
        path = discovery_file(self.cfg)
        try:
            if json.loads(path.read_text(encoding="utf-8")).get("pid") == os.getpid():
                path.unlink()
        except (OSError, ValueError):
            pass
        if self._listener is not None:
            self._listener.stop()
        if self._thrift is not None:
            self._thrift.stop()


def check_start(cfg: Config, host: str, no_auth: bool) -> None:
    """Refuse, before Spark starts, a server nobody could log in to or everyone could read without one."""
    if no_auth and not _is_loopback(host):
        raise UsageError(f"--no-auth serves every table without a login: it listens on loopback only, not {host}; "
                         "drop --no-auth (users: carelake sql-user add) or use --host 127.0.0.1")
    path = users_file(cfg)
    if not no_auth and not path.exists():
        raise ConfigError(f"no users file at {path}: add a user with `carelake sql-user add NAME --role analyst` "
                          "(or set sql_server.users_file), or run with --no-auth on loopback")
    if not no_auth:
        Directory(path).login("", "")  # a malformed or readable-by-others file fails now, naming the fix
    if cfg.sql_server.views_dir and not views_dir(cfg).is_dir():
        raise ConfigError(f"sql_server.views_dir {cfg.sql_server.views_dir!r} is not a folder: point it at the "
                          'analyst views (<layer>.<name>.sql files), or set it to "" for sql/views beside conf/')


def listen(host: str, port: int):
    """A listening socket on (host, port), or an error naming the fix."""
    import socket

    try:
        return socket.create_server((host, port))
    except OSError as exc:
        raise UsageError(f"the SQL server cannot listen on {host}:{port}: {exc.strerror or exc}; choose another "
                         "--port (0 picks a free one) or --host") from None


def serve(cfg: Config, *, host: str | None, port: int | None, no_auth: bool) -> int:
    """`carelake sql-server`: serve until SIGINT/SIGTERM."""
    import signal

    from pipelines.spark import create_spark
    from pipelines.store import open_store

    host = host or cfg.sql_server.host
    port = cfg.sql_server.port if port is None else port
    check_start(cfg, host, no_auth)
    listen(host, port).close()  # a port in use fails now, not after Spark has started
    if no_auth:
        print("carelake sql-server: WARNING: --no-auth: no login; every client reads every table (PHI included) "
              "as auditor. Local development only, never with real patient data.", file=sys.stderr, flush=True)
    spark_cfg = dataclasses.replace(cfg.spark, conf={**cfg.spark.conf, **spark_settings(cfg)})
    spark = create_spark(spark_cfg)
    store = open_store(cfg, spark)
    if store.engine != "delta-rs":
        raise ConfigError("carelake sql-server serves delta-rs tables; with the Delta jars (storage.engine "
                          "delta-spark) use Spark's own Thrift server over the Delta catalog")
    server = SqlServer(cfg, spark, store, no_auth=no_auth)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        url = server.start(host, port)
        print(f"carelake sql-server: {url}", flush=True)
        log.info("serving %d view(s) from %s; users from %s", len(server.catalog.views), views_dir(cfg),
                 server.users.path)
        stop.wait()
    finally:
        server.stop()
    print("carelake sql-server: stopped", file=sys.stderr)
    return 0
