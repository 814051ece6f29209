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
- catalog browsing (GetSchemas, GetTables, GetColumns) answers with the lakehouse names the user's role may
  read (pipelines.sqlserver.metadata), never the server's internal view names.
"""

from __future__ import annotations

import logging
import re
import socket
import struct
import threading
from dataclasses import dataclass, field

from thrift.protocol import TBinaryProtocol
from thrift.transport import TTransport

from pipelines.errors import CarelakeError, TableNotFound
from pipelines.sqlrefs import rewrite
from pipelines.sqlserver.guard import StatementRefused, check_statement
from pipelines.sqlserver.policy import refusal

log = logging.getLogger("carelake.sqlserver")
START, OK, BAD, ERROR, COMPLETE = 1, 2, 3, 4, 5
# Drivers send `USE default` on connect (PyHive, some ODBC drivers): passed on, reads nothing, not audited.
_USE_DEFAULT = re.compile(r"^\s*use\s+`?default`?\s*;?\s*$", re.IGNORECASE)
MAX_FRAME = 256 * 1024 * 1024
LOGIN_TIMEOUT_S = 30


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


class JvmBackend:
    """Spark's Thrift service called inside its own JVM through py4j: each request crosses as Thrift bytes, is
    decoded there into Hive's request class, handled by the same code a network client reaches, and the response
    comes back as bytes. Spark's Thrift server then needs no open port (the server closes it after start)."""

    def __init__(self, spark, service):
        self._jvm = spark._jvm  # noqa: SLF001 - py4j is the only way into Spark's Thrift service
        self._service = service
        self._local = threading.local()

    def _codec(self):
        """A serializer and deserializer for this thread (Thrift's are not thread-safe)."""
        codec = getattr(self._local, "codec", None)
        if codec is None:
            thrift = self._jvm.org.apache.thrift
            factory = thrift.protocol.TBinaryProtocol.Factory()
            codec = self._local.codec = (thrift.TSerializer(factory), thrift.TDeserializer(factory))
        return codec

    def __getattr__(self, name: str):
        if not name[:1].isupper():
            raise AttributeError(name)
        from TCLIService import ttypes

        def call(req):
            serializer, deserializer = self._codec()
            buf = TTransport.TMemoryBuffer()
            req.write(TBinaryProtocol.TBinaryProtocol(buf))
            jreq = getattr(self._jvm.org.apache.hive.service.rpc.thrift, f"T{name}Req")()
            deserializer.deserialize(jreq, bytearray(buf.getvalue()))
            out = serializer.serialize(getattr(self._service, name)(jreq))
            resp = getattr(ttypes, f"T{name}Resp")()
            resp.read(TBinaryProtocol.TBinaryProtocol(TTransport.TMemoryBuffer(bytes(out))))
            return resp

        return call


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
    sessions: dict[bytes, object] = field(default_factory=dict)  # open session handles, closed if the client leaves

    def __getattr__(self, name: str):
        return getattr(self.backend, name)

    def OpenSession(self, req):  # noqa: N802 - Thrift's names
        req.username, req.password = self.login.user, "-"
        req.configuration = {k: v for k, v in (req.configuration or {}).items() if k == "use:database"}
        resp = self.backend.OpenSession(req)
        if resp.sessionHandle is not None:
            self.sessions[resp.sessionHandle.sessionId.guid] = resp.sessionHandle
        return resp

    def ExecuteStatement(self, req):  # noqa: N802
        from TCLIService import ttypes

        statement = req.statement or ""
        if _USE_DEFAULT.match(statement):
            req.confOverlay = {}
            return self.backend.ExecuteStatement(req)
        try:
            resolved = self._admit(statement)
        except Exception as exc:  # refused, or the tables could not be resolved: answered and recorded either way
            outcome = "refused" if isinstance(exc, StatementRefused) else "failed"
            if not isinstance(exc, CarelakeError):
                log.exception("resolving a statement failed")
            message = str(exc) if isinstance(exc, CarelakeError) else f"internal error: {type(exc).__name__}: " + (
                str(exc).splitlines() or [""])[0]
            self.server.audit(self.login.actor, statement, (), None, outcome, message)
            return ttypes.TExecuteStatementResp(status=_error_status(f"carelake: {message}"))
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
        self._finish_operations()
        self.sessions.pop(req.sessionHandle.sessionId.guid, None)
        return self.backend.CloseSession(req)

    def GetSchemas(self, req):  # noqa: N802
        from TCLIService import ttypes

        from pipelines.sqlserver import metadata

        sql = metadata.schemas_query(self._readable(), req.schemaName)
        return self._answer(ttypes.TGetSchemasResp, req.sessionHandle, sql)

    def GetTables(self, req):  # noqa: N802
        from TCLIService import ttypes

        from pipelines.sqlserver import metadata

        sql = metadata.tables_query(self._readable(), self.server.catalog.views, req.schemaName, req.tableName,
                                    req.tableTypes)
        return self._answer(ttypes.TGetTablesResp, req.sessionHandle, sql)

    def GetColumns(self, req):  # noqa: N802
        from TCLIService import ttypes

        from pipelines.sqlserver import metadata

        schema, table = metadata.like(req.schemaName), metadata.like(req.tableName)
        wanted = [t for t in self._readable() if schema.fullmatch(t.split(".")[0]) and table.fullmatch(t.split(".")[1])]
        schemas = {}
        for t in wanted:
            try:
                schemas[t] = self.server.catalog.schema(t)
            except TableNotFound:  # a view whose tables are not written yet
                continue
        return self._answer(ttypes.TGetColumnsResp, req.sessionHandle, metadata.columns_query(schemas, req.columnName))

    def _readable(self) -> list[str]:
        from pipelines.sqlserver.metadata import readable

        return readable(self.login.role, self.server.catalog.names(), self.server.catalog.views)

    def _answer(self, resp_type, session, sql: str):
        """A metadata call answered by running `sql` (rows computed here) on Spark: the client fetches them as usual."""
        from TCLIService import ttypes

        resp = self.backend.ExecuteStatement(ttypes.TExecuteStatementReq(sessionHandle=session, statement=sql,
                                                                         runAsync=False))
        return resp_type(status=resp.status, operationHandle=resp.operationHandle)

    def _record(self, op: Operation) -> None:
        rows = op.rows if op.outcome == "allowed" else None
        self.server.audit(self.login.actor, op.statement, op.reads, rows, op.outcome, op.detail)

    def _finish_operations(self) -> None:
        """Record every statement not yet recorded (the client closed the session or went away)."""
        for key in list(self.ops):
            self._record(self.ops.pop(key))

    def finish(self) -> None:
        """The client went away: record its statements, close the sessions it left open."""
        from TCLIService import ttypes

        self._finish_operations()
        for handle in list(self.sessions.values()):
            try:
                self.backend.CloseSession(ttypes.TCloseSessionReq(sessionHandle=handle))
            except Exception:  # closing what is left is best effort; Spark expires idle sessions too
                log.debug("closing a session the client left failed", exc_info=True)
        self.sessions.clear()


def serve_connection(server, sock: socket.socket, backend: JvmBackend) -> None:
    """One client connection: SASL login, then Thrift calls until it closes."""
    from TCLIService import TCLIService

    trans = SaslPlainServerTransport(sock)
    handler = None
    try:
        sock.settimeout(LOGIN_TIMEOUT_S)  # a client that connects and says nothing does not hold a thread for long
        user, password = trans.handshake()
        sock.settimeout(None)
        login = server.login(user, password)
        if login is None:  # recorded before the answer, so the client's next step already finds it
            server.audit(user or "(none)", None, (), None, "refused", "login failed: wrong username or password",
                         action="login")
            trans.send_status(BAD, b"carelake sql-server: wrong username or password")
            return
        trans.send_status(COMPLETE)
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
        sock.close()


class Listener(threading.Thread):
    """Accepts clients on (host, port); one thread per connection."""

    def __init__(self, server, host: str, port: int, backend: JvmBackend, max_connections: int):
        super().__init__(name="carelake-sql-listener", daemon=True)
        self.server = server
        self.backend = backend
        self.slots = threading.BoundedSemaphore(max_connections)
        self.max_connections = max_connections
        from pipelines.sqlserver.server import listen

        self.sock = listen(host, port)
        self.port = self.sock.getsockname()[1]
        self._stopping = threading.Event()

    def run(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                break
            if not self.slots.acquire(blocking=False):
                log.warning("refused a connection from %s: %d connections already open (sql_server.max_connections)",
                            conn.getpeername()[0], self.max_connections)
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn,), name="carelake-sql-client", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            serve_connection(self.server, conn, self.backend)
        finally:
            self.slots.release()

    def stop(self) -> None:
        self._stopping.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
