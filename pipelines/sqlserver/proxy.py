"""The HiveServer2 protocol in front of Spark's Thrift server: login, roles, statement checks, audit.

Clients (JDBC/ODBC drivers, beeline, PyHive) connect here with SASL PLAIN (username and password); each
connection gets its own connection to the Spark Thrift server, which listens on 127.0.0.1 only. Every Thrift
call is forwarded unchanged except:

- OpenSession: the client's session settings (`set:hiveconf:...`) are dropped; only `use:database` passes;
- ExecuteStatement: the statement's lakehouse names are checked against the user's role (policy), rewritten onto
  the catalog's views at the versions read (catalog), checked to read nothing else (guard), then forwarded; a
  refusal answers an error naming the reason and is recorded in ops.audit_log;
- FetchResults counts the rows returned; CloseOperation/CloseSession (or the connection ending) records the
  statement with its tables, versions and rows in ops.audit_log;
- catalog browsing (GetTables, GetColumns) answers from the empty `default` schema: the server's views are
  internal names; write SQL against gold.x, silver.x, ...
"""

from __future__ import annotations

import logging
import re
import socket
import struct
import threading
from dataclasses import dataclass, field

from thrift.protocol import TBinaryProtocol
from thrift.transport import TSocket, TTransport

from pipelines.errors import CarelakeError
from pipelines.sqlrefs import rewrite
from pipelines.sqlserver.guard import StatementRefused, check_statement
from pipelines.sqlserver.policy import refusal

log = logging.getLogger("carelake.sqlserver")
START, OK, BAD, ERROR, COMPLETE = 1, 2, 3, 4, 5
# Drivers send `USE default` on connect (PyHive, some ODBC drivers): passed on, reads nothing, not audited.
_USE_DEFAULT = re.compile(r"^\s*use\s+`?default`?\s*;?\s*$", re.IGNORECASE)
MAX_FRAME = 256 * 1024 * 1024


class SaslPlainServerTransport(TTransport.TTransportBase):
    """Thrift's SASL transport, server side, PLAIN mechanism only (no wrapping: the QOP is auth)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._rbuf = memoryview(b"")
        self._wbuf: list[bytes] = []

    def _exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise TTransport.TTransportException(TTransport.TTransportException.END_OF_FILE, "client went away")
            out += chunk
        return bytes(out)

    def _message(self) -> tuple[int, bytes]:
        status, length = struct.unpack(">BI", self._exact(5))
        if length > 64 * 1024:
            raise TTransport.TTransportException(message="SASL message too long")
        return status, self._exact(length)

    def send_status(self, status: int, payload: bytes = b"") -> None:
        self.sock.sendall(struct.pack(">BI", status, len(payload)) + payload)

    def handshake(self) -> tuple[str, str]:
        """(username, password) from the client's PLAIN exchange; the caller answers COMPLETE or BAD."""
        status, mech = self._message()
        if status != START:
            raise TTransport.TTransportException(message="not a SASL client (connect with a username/password)")
        if mech != b"PLAIN":
            self.send_status(BAD, b"carelake sql-server: use SASL PLAIN (username and password)")
            raise TTransport.TTransportException(message=f"SASL mechanism {mech!r} refused")
        status, payload = self._message()
        if status not in (OK, COMPLETE):
            raise TTransport.TTransportException(message="SASL exchange broken off")
        parts = payload.split(b"\0")
        if len(parts) != 3:
            self.send_status(BAD, b"malformed PLAIN credentials")
            raise TTransport.TTransportException(message="malformed PLAIN credentials")
        return parts[1].decode("utf-8", "replace"), parts[2].decode("utf-8", "replace")

    def isOpen(self) -> bool:  # noqa: N802 - Thrift's names
        return True

    def read(self, sz: int) -> bytes:
        if not len(self._rbuf):
            (length,) = struct.unpack(">I", self._exact(4))
            if length > MAX_FRAME:
                raise TTransport.TTransportException(message=f"frame of {length} bytes refused")
            self._rbuf = memoryview(self._exact(length))
        out, self._rbuf = self._rbuf[:sz], self._rbuf[sz:]
        return bytes(out)

    def write(self, buf: bytes) -> None:
        self._wbuf.append(bytes(buf))

    def flush(self) -> None:
        data = b"".join(self._wbuf)
        self._wbuf = []
        self.sock.sendall(struct.pack(">I", len(data)) + data)

    def close(self) -> None:
        self.sock.close()


def backend_client(host: str, port: int, username: str):
    """A TCLIService client on the Spark Thrift server (SASL PLAIN, as its NONE authentication expects)."""
    import thrift_sasl
    from pyhive.hive import get_installed_sasl
    from TCLIService import TCLIService

    sock = TSocket.TSocket(host, port)
    transport = thrift_sasl.TSaslClientTransport(
        lambda: get_installed_sasl(host=host, sasl_auth="PLAIN", username=username, password="-"), "PLAIN", sock)
    transport.open()
    return TCLIService.Client(TBinaryProtocol.TBinaryProtocol(transport)), transport


@dataclass
class Operation:
    """One forwarded statement, until it is recorded in the audit log."""

    statement: str
    reads: tuple
    names: dict[str, str]  # global view name -> lakehouse name, for error messages
    rows: int = 0
    outcome: str = "allowed"
    detail: str | None = None


@dataclass
class Login:
    user: str
    role: str
    actor: str  # what the audit log records


def _error_status(message: str, sql_state: str = "42000"):
    from TCLIService import ttypes

    return ttypes.TStatus(statusCode=ttypes.TStatusCode.ERROR_STATUS, errorMessage=message, sqlState=sql_state)


def _count_rows(rowset) -> int:
    if rowset is None:
        return 0
    if rowset.columns:
        col = rowset.columns[0]
        for kind in ("boolVal", "byteVal", "i16Val", "i32Val", "i64Val", "doubleVal", "stringVal", "binaryVal"):
            values = getattr(col, kind, None)
            if values is not None:
                return len(values.values)
        return 0
    return len(rowset.rows or [])


@dataclass
class Handler:
    """TCLIService calls of one client connection; unlisted calls go to the Spark server as they are."""

    server: object  # pipelines.sqlserver.server.SqlServer
    backend: object
    login: Login
    ops: dict[bytes, Operation] = field(default_factory=dict)

    def __getattr__(self, name: str):
        return getattr(self.backend, name)

    def OpenSession(self, req):  # noqa: N802 - Thrift's names
        req.username, req.password = self.login.user, "-"
        req.configuration = {k: v for k, v in (req.configuration or {}).items() if k == "use:database"}
        return self.backend.OpenSession(req)

    def ExecuteStatement(self, req):  # noqa: N802
        from TCLIService import ttypes

        statement = req.statement or ""
        if _USE_DEFAULT.match(statement):
            req.confOverlay = {}
            return self.backend.ExecuteStatement(req)
        try:
            resolved = self._admit(statement)
        except CarelakeError as exc:
            outcome = "refused" if isinstance(exc, StatementRefused) else "failed"
            self.server.audit(self.login.actor, statement, (), None, outcome, str(exc))
            return ttypes.TExecuteStatementResp(status=_error_status(f"carelake: {exc}"))
        req.statement, req.confOverlay = resolved.sql, {}
        resp = self.backend.ExecuteStatement(req)
        op = Operation(statement, resolved.reads, dict(resolved.names))
        if resp.status.statusCode == ttypes.TStatusCode.ERROR_STATUS:
            resp.status.errorMessage = self._plain(op, resp.status.errorMessage)
            op.outcome, op.detail = "failed", resp.status.errorMessage
            self._record(op)
        elif resp.operationHandle is not None:
            self.ops[resp.operationHandle.operationId.guid] = op
        return resp

    def _admit(self, statement: str):
        _, refs = rewrite(statement)
        why = refusal(self.login.role, refs, self.server.catalog.views)
        if why:
            raise StatementRefused(why)
        resolved = self.server.catalog.resolve(statement)
        check_statement(self.server.spark, resolved.sql, resolved.views)
        return resolved

    def _plain(self, op: Operation, message: str | None) -> str | None:
        """A Spark error message with the server's view names turned back into the lakehouse names."""
        for view, table in op.names.items():
            message = (message or "").replace(f"`global_temp`.`{view}`", table).replace(f"global_temp.{view}", table)
            message = message.replace(view, table)
        return message

    def GetOperationStatus(self, req):  # noqa: N802
        from TCLIService import ttypes

        resp = self.backend.GetOperationStatus(req)
        op = self.ops.get(req.operationHandle.operationId.guid)
        if op is not None and resp.operationState == ttypes.TOperationState.ERROR_STATE:
            resp.errorMessage = self._plain(op, resp.errorMessage)
            op.outcome, op.detail = "failed", resp.errorMessage
        return resp

    def FetchResults(self, req):  # noqa: N802
        resp = self.backend.FetchResults(req)
        op = self.ops.get(req.operationHandle.operationId.guid)
        if op is not None and not req.fetchType:
            op.rows += _count_rows(resp.results)
        return resp

    def CloseOperation(self, req):  # noqa: N802
        resp = self.backend.CloseOperation(req)
        op = self.ops.pop(req.operationHandle.operationId.guid, None)
        if op is not None:
            self._record(op)
        return resp

    def CloseSession(self, req):  # noqa: N802
        self.finish()
        return self.backend.CloseSession(req)

    def GetTables(self, req):  # noqa: N802
        req.schemaName = "default"
        return self.backend.GetTables(req)

    def GetColumns(self, req):  # noqa: N802
        req.schemaName = "default"
        return self.backend.GetColumns(req)

    def _record(self, op: Operation) -> None:
        rows = op.rows if op.outcome == "allowed" else None
        self.server.audit(self.login.actor, op.statement, op.reads, rows, op.outcome, op.detail)

    def finish(self) -> None:
        """Record every statement not yet recorded (the client closed the session or went away)."""
        for key in list(self.ops):
            self._record(self.ops.pop(key))


def serve_connection(server, sock: socket.socket, backend_host: str, backend_port: int) -> None:
    """One client connection: SASL login, then Thrift calls until it closes."""
    from TCLIService import TCLIService

    trans = SaslPlainServerTransport(sock)
    handler = None
    backend_trans = None
    try:
        user, password = trans.handshake()
        login = server.login(user, password)
        if login is None:  # recorded before the answer, so the client's next step already finds it
            server.audit(user or "(none)", None, (), None, "refused", "login failed: wrong username or password",
                         action="login")
            trans.send_status(BAD, b"carelake sql-server: wrong username or password")
            return
        trans.send_status(COMPLETE)
        backend, backend_trans = backend_client(backend_host, backend_port, login.user)
        handler = Handler(server, backend, login)
        processor = TCLIService.Processor(handler)
        proto = TBinaryProtocol.TBinaryProtocol(trans)
        while True:
            processor.process(proto, proto)
    except (TTransport.TTransportException, ConnectionError, OSError) as exc:
        log.debug("connection ended: %s", exc)
    except Exception:  # one client's failure must not stop the server
        log.exception("SQL server connection failed")
    finally:
        if handler is not None:
            handler.finish()
        if backend_trans is not None:
            backend_trans.close()
        sock.close()


class Listener(threading.Thread):
    """Accepts clients on (host, port); one thread per connection."""

    def __init__(self, server, host: str, port: int, backend: tuple[str, int]):
        super().__init__(name="carelake-sql-listener", daemon=True)
        self.server = server
        self.backend = backend
        self.sock = socket.create_server((host, port), reuse_port=False)
        self.port = self.sock.getsockname()[1]
        self._stopping = threading.Event()

    def run(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                break
            threading.Thread(target=serve_connection, args=(self.server, conn, *self.backend),
                             name="carelake-sql-client", daemon=True).start()

    def stop(self) -> None:
        self._stopping.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
