"""Gateway TLS and sender authentication: who may send, checked before anything of theirs lands.

- TLS (`gateway.security.tls_cert` / `tls_key`): MLLP over TLS and HTTPS with the same certificate, each listener
  with its own context whose TLS objects count a failed handshake (a sender that does not trust our certificate,
  presents none or a stranger's when one is required, or does not speak TLS):
  `carelake_gateway_auth_failures_total{protocol,reason="tls_handshake"}`, one log line each.
- Mutual TLS (`client_ca`): a sender presenting a certificate the CA signed is authenticated by it (its subject CN is
  recorded as the sender of what it lands); `require_client_cert` refuses connections without one.
- HTTP bearer tokens (`tokens_file`, `tokens_env`): kept as SHA-256 hashes, `NAME:SHA256HEX` per line; a request's
  token is hashed and compared with each in constant time (`hmac.compare_digest`). Once tokens or a client CA are
  configured, an HTTP request with neither a known token nor a verified certificate gets 401 before its body is read.
- MLLP sending facilities (`sending_facilities`): a message whose MSH-4 is not listed is answered AR and kept only
  in the rejects area, never landed.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pipelines.config import GatewaySecurityConfig
from pipelines.errors import ConfigError

log = logging.getLogger("carelake.gateway")

_TOKEN_LINE = re.compile(r"^(?P<name>[^:\s]+):(?P<hash>[0-9a-f]{64})$")


def token_hash(token: str) -> str:
    """What a tokens file holds for a token: its SHA-256, hex."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _read(path: str, key: str) -> str:
    try:
        return Path(path).expanduser().read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"gateway.security.{key}: cannot read {path}: {exc.strerror or exc}") from None


def parse_tokens(text: str, origin: str) -> dict[str, str]:
    """{sha256 hex: sender name} from NAME:SHA256HEX lines (blank lines and # comments skipped)."""
    out: dict[str, str] = {}
    for n, raw in enumerate(text.replace(",", "\n").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _TOKEN_LINE.match(line)
        if not m:
            raise ConfigError(f"{origin} line {n}: expected NAME:SHA256HEX (the token's SHA-256, 64 lowercase hex "
                              f"digits: printf %s \"$TOKEN\" | sha256sum), got {line[:20]!r}...")
        out[m["hash"]] = m["name"]
    return out


@dataclass(frozen=True)
class Tokens:
    """The hashes of the bearer tokens HTTP senders may present, by sender name."""

    hashes: Mapping[str, str]

    @classmethod
    def load(cls, sec: GatewaySecurityConfig, environ: Mapping[str, str] | None = None) -> Tokens:
        environ = os.environ if environ is None else environ
        hashes: dict[str, str] = {}
        if sec.tokens_file:
            hashes.update(parse_tokens(_read(sec.tokens_file, "tokens_file"), sec.tokens_file))
        if sec.tokens_env and environ.get(sec.tokens_env):
            hashes.update(parse_tokens(environ[sec.tokens_env], f"environment variable {sec.tokens_env}"))
        return cls(hashes)

    def sender(self, authorization: str | None) -> str | None:
        """The sender named by an `Authorization: Bearer TOKEN` header, or None. Every stored hash is compared (in
        constant time) whatever matches, so the answer's timing does not say how close a guess came."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        presented = token_hash(token.strip())
        found = None
        for stored, name in self.hashes.items():
            if hmac.compare_digest(presented, stored):
                found = name
        return found


def server_context(sec: GatewaySecurityConfig, on_failure=None) -> ssl.SSLContext | None:
    """A listener's TLS context, or None for plain TCP. Bad files fail here, naming the key. `on_failure(exc)` is
    called for each handshake that fails (the context's TLS objects report it before asyncio drops the connection:
    asyncio logs such failures at debug level only)."""
    if not sec.tls_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    if on_failure is not None:
        ctx.sslobject_class = _reporting_sslobject(on_failure)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(Path(sec.tls_cert).expanduser(), Path(sec.tls_key).expanduser())
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"gateway.security.tls_cert/tls_key: cannot load {sec.tls_cert} with {sec.tls_key}: "
                          f"{getattr(exc, 'strerror', None) or exc}") from None
    if sec.client_ca:
        try:
            ctx.load_verify_locations(cafile=str(Path(sec.client_ca).expanduser()))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"gateway.security.client_ca: cannot load {sec.client_ca}: "
                              f"{getattr(exc, 'strerror', None) or exc}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED if sec.require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def _reporting_sslobject(on_failure) -> type[ssl.SSLObject]:
    class Reporting(ssl.SSLObject):
        def do_handshake(self) -> None:
            try:
                super().do_handshake()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                raise
            except ssl.SSLError as exc:
                on_failure(exc)
                raise

    return Reporting


def certificate_sender(peercert: Mapping | None) -> str | None:
    """The subject CN of a verified client certificate (what a mutual-TLS sender is recorded as), or None."""
    for rdn in (peercert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


@dataclass(frozen=True)
class Policy:
    """Who may send: what the listeners and handlers consult."""

    sec: GatewaySecurityConfig
    tokens: Tokens
    client_certs: bool  # a verified client certificate authenticates an HTTP sender
    facilities: frozenset[str]  # MLLP MSH-4 allow-list; empty = any

    @classmethod
    def of(cls, sec: GatewaySecurityConfig, host: str, environ: Mapping[str, str] | None = None) -> Policy:
        server_context(sec)  # the files load, or the gateway does not start
        return cls(sec, Tokens.load(sec, environ), bool(sec.client_ca),
                   frozenset(f.strip() for f in sec.sending_facilities))

    def warn(self, host: str) -> None:
        """Say what is open, once the gateway listens: loudly off the loopback interface."""
        loopback = host in ("127.0.0.1", "localhost", "::1")
        if self.tokens.hashes and not self.tls and not loopback:
            log.warning("gateway: bearer tokens over plain HTTP on %s can be read off the network; set "
                        "gateway.security.tls_cert and tls_key", host)
        if not self.http_auth:
            log.log(logging.INFO if loopback else logging.WARNING,
                    "gateway: HTTP senders are NOT authenticated (no gateway.security.tokens_file, %s or client_ca); "
                    "anyone who can reach %s can land data", self.sec.tokens_env or "tokens_env", host)

    @property
    def tls(self) -> bool:
        return bool(self.sec.tls_cert)

    def context(self, protocol: str, metrics) -> ssl.SSLContext | None:
        """The TLS context of one listener (its handshake failures counted under `protocol`), or None."""
        def failed(exc: ssl.SSLError) -> None:
            metrics.inc("carelake_gateway_auth_failures_total", protocol=protocol, reason="tls_handshake")
            log.warning("%s: TLS handshake failed (%s); connection closed, nothing received", protocol,
                        exc.reason or exc)

        return server_context(self.sec, failed)

    @property
    def http_auth(self) -> bool:
        return bool(self.tokens.hashes) or self.client_certs

    def facility_allowed(self, facility: str | None) -> bool:
        if not self.facilities:
            return True
        namespace = (facility or "").split("^")[0].strip()
        return namespace in self.facilities


OPEN = Policy(GatewaySecurityConfig(), Tokens({}), False, frozenset())  # no TLS, no authentication (tests, local)


def client_context(ca: str | None, cert: str | None, key: str | None) -> ssl.SSLContext:
    """`carelake send`'s TLS: trust `ca` (else the system's CAs), and present `cert`/`key` for mutual TLS."""
    from pipelines.errors import UsageError

    if bool(cert) != bool(key):
        raise UsageError("--tls-cert and --tls-key go together: the client certificate and its private key")
    try:
        ctx = ssl.create_default_context(cafile=str(Path(ca).expanduser()) if ca else None)
        if cert:
            ctx.load_cert_chain(Path(cert).expanduser(), Path(key).expanduser())
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"--tls-ca/--tls-cert/--tls-key: cannot load {exc.filename or ''} "
                         f"{getattr(exc, 'strerror', None) or exc}".replace("  ", " ")) from None
    return ctx


def read_token(path: str) -> str:
    """The bearer token a sender presents: the first non-blank line of --token-file."""
    from pipelines.errors import UsageError

    try:
        lines = [ln.strip() for ln in Path(path).expanduser().read_text(encoding="utf-8").splitlines()]
    except OSError as exc:
        raise UsageError(f"--token-file {path}: {exc.strerror or exc}") from None
    token = next((ln for ln in lines if ln), "")
    if not token:
        raise UsageError(f"--token-file {path} is empty: put the token on its first line")
    return token
