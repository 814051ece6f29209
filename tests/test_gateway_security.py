"""Gateway TLS and sender authentication: MLLP over TLS, HTTPS, bearer tokens, mutual TLS, MSH-4 allow-list.

Certificates are made here, at test time, with `cryptography`: a CA, the gateway's certificate (127.0.0.1), a client
certificate the CA signed, and a stranger CA nobody trusts.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from bronze.hl7_wire import frame, segments
from pipelines.errors import ConfigError
from tests.conftest import make_config
from tests.gatewayproc import GatewayProcess, landed, mllp_exchange

TOKEN = "s3cr3t-ward-7-token"


def _name(cn: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(folder: Path, stem: str, cn: str, issuer=None, *, ca: bool = False, server: bool = False):
    """Write STEM.pem and STEM.key (signed by issuer=(cert, key), or self-signed); return (cert, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(cn))
               .issuer_name(issuer[0].subject if issuer else _name(cn)).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
            decipher_only=False), critical=True)
        builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    else:
        builder = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer[1].public_key()), critical=False)
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
    cert = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
    (folder / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / f"{stem}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
    (folder / f"{stem}.key").chmod(0o600)
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pki")
    ca = _cert(folder, "ca", "carelake test CA", ca=True)
    _cert(folder, "server", "127.0.0.1", ca, server=True)
    _cert(folder, "ward7", "ward7-interface", ca)
    stranger = _cert(folder, "stranger-ca", "someone else", ca=True)
    _cert(folder, "stranger", "stranger", stranger)
    return folder


def oru(control_id: str, facility: str = "ICU") -> bytes:
    return (f"MSH|^~\\&|MONITOR|{facility}|||20261121030000+0000||ORU^R01^ORU_R01|{control_id}|P|2.5\r"
            "PID|1||MRN1001^^^HOSP^MR\rOBX|1|NM|8867-4^Heart rate^LN||92|/min\r").encode()


def tls_exchange(address, message: bytes, ctx: ssl.SSLContext) -> bytes:
    return mllp_exchange(address, message, tls=ctx)[0]


def msa(reply: bytes) -> list[str]:
    return next(s for s in segments(reply) if s.startswith(b"MSA")).decode("latin-1").split("|")


def client(pki: Path, *, ca: str | None = "ca", cert: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / f"{ca}.pem") if ca else None)
    if cert:
        ctx.load_cert_chain(pki / f"{cert}.pem", pki / f"{cert}.key")
    return ctx


def metric(gw: GatewayProcess, ctx: ssl.SSLContext | None, name: str, until: dict[str, float]) -> dict[str, float]:
    """The series of one metric, read again (for up to 10 s) until `until` holds: a refused handshake is counted
    when the gateway reads the client's alert, which can be after the client has given up."""
    import time

    deadline = time.monotonic() + 10
    while True:
        with urllib.request.urlopen(gw.http + "/metrics", context=ctx, timeout=10) as resp:
            lines = resp.read().decode().splitlines()
        got = {ln.split(" ")[0]: float(ln.split(" ")[1]) for ln in lines if ln.startswith(name + "{")}
        if all(got.get(k) == v for k, v in until.items()) or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def tls_env(pki: Path, **more: str) -> dict[str, str]:
    return {"CARELAKE_GATEWAY__SECURITY__TLS_CERT": str(pki / "server.pem"),
            "CARELAKE_GATEWAY__SECURITY__TLS_KEY": str(pki / "server.key"), **more}


@pytest.mark.slow
def test_mllp_over_tls_refuses_clients_without_the_ca_and_facilities_not_allowed(tmp_path, pki):
    env = tls_env(pki, CARELAKE_GATEWAY__SECURITY__SENDING_FACILITIES="ICU,ED")
    with GatewayProcess(tmp_path / "lake", "--mllp-port", "0", "--http-port", "0", **env) as gw:
        assert gw.http.startswith("https://")
        with pytest.raises(ssl.SSLCertVerificationError):  # a client that does not trust the gateway's CA
            tls_exchange(gw.mllp, oru("NO-CA"), client(pki, ca="stranger-ca"))
        with socket.create_connection(gw.mllp, timeout=10) as plain:  # MLLP without TLS: no answer, closed
            plain.sendall(frame(oru("PLAIN")))
            assert plain.recv(100) == b""
        assert msa(tls_exchange(gw.mllp, oru("TLS-1"), client(pki)))[1:3] == ["AA", "TLS-1"]
        refused = tls_exchange(gw.mllp, oru("ELSE-1", facility="ELSEWHERE^1.2.3^ISO"), client(pki))
        assert msa(refused)[1] == "AR" and "sending facility ELSEWHERE is not allowed" in refused.decode()
        # `carelake send` with the CA is acknowledged; without it nothing is delivered.
        from pipelines.send import send

        (tmp_path / "in.hl7").write_bytes(oru("SEND-1", facility="ED"))
        cfg = make_config(tmp_path / "lake", **{"gateway.send_retries": "0", "gateway.ack_timeout": "5s"})
        to = f"{gw.mllp[0]}:{gw.mllp[1]}"
        assert send(cfg, to, [str(tmp_path / "in.hl7")], tls_ca=str(pki / "ca.pem")).answers == {"AA": 1}
        assert send(cfg, to, [str(tmp_path / "in.hl7")], tls_ca=str(pki / "stranger-ca.pem")).failed
        # Counted: the client that sent an "unknown CA" alert, and the one that spoke no TLS. asyncio's client (send)
        # hangs up without an alert: the gateway sees a closed connection, not a failed handshake.
        expected = {'carelake_gateway_auth_failures_total{protocol="mllp",reason="tls_handshake"}': 2,
                    'carelake_gateway_auth_failures_total{protocol="mllp",reason="facility_not_allowed"}': 1}
        assert metric(gw, client(pki), "carelake_gateway_auth_failures_total", expected) == expected
    assert [r.body for _, r in landed(gw.root, "hl7")] == [oru("TLS-1"), oru("SEND-1", facility="ED")]
    (kept,) = [r for _, r in landed(gw.root, "hl7", rejected=True)]
    assert kept.header["reason"].startswith("sending facility ELSEWHERE is not allowed")


@pytest.mark.slow
def test_http_without_a_token_gets_401_and_nothing_lands(tmp_path, pki):
    from pipelines.gateway.security import token_hash

    env = tls_env(pki, CARELAKE_GATEWAY__SECURITY__CLIENT_CA=str(pki / "ca.pem"),
                  CARELAKE_GATEWAY_TOKENS=f"ward7:{token_hash(TOKEN)}")
    reading = b'{"device_id":"m1","patient_mrn":"MRN1","time":"2026-11-21T03:00:00Z","code":"8867-4","value":92}\n'

    def post(gw, *, token: str | None = None, cert: str | None = None) -> int:
        req = urllib.request.Request(gw.http + "/devices", data=reading, method="POST",
                                     headers={"Content-Type": "application/x-ndjson",
                                              **({"Authorization": f"Bearer {token}"} if token else {})})
        try:
            with urllib.request.urlopen(req, context=client(pki, cert=cert), timeout=10) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            assert exc.status != 401 or exc.headers["WWW-Authenticate"] == 'Bearer realm="carelake"'
            return exc.status

    with GatewayProcess(tmp_path / "lake", "--mllp-port", "0", "--http-port", "0", **env) as gw:
        assert post(gw) == 401
        assert post(gw, token="guessed") == 401
        assert post(gw, token=TOKEN) == 202
        assert post(gw, cert="ward7") == 202  # mutual TLS instead of a token
        from pipelines.send import send

        (tmp_path / "r.jsonl").write_bytes(reading)
        (tmp_path / "token").write_text(TOKEN + "\n")
        cfg = make_config(tmp_path / "lake", **{"gateway.send_retries": "0"})
        ok = send(cfg, gw.http, [str(tmp_path / "r.jsonl")], tls_ca=str(pki / "ca.pem"),
                  token_file=str(tmp_path / "token"))
        assert ok.answers == {"HTTP 202": 1}
        assert send(cfg, gw.http, [str(tmp_path / "r.jsonl")], tls_ca=str(pki / "ca.pem")).answers == {
            "HTTP 401": 1}
        expected = {'carelake_gateway_auth_failures_total{protocol="http",reason="unauthenticated"}': 3}
        assert metric(gw, client(pki), "carelake_gateway_auth_failures_total", expected) == expected
    bodies = [(r.body, r.header.get("sender")) for _, r in landed(gw.root, "devices")]
    assert bodies == [(reading, "ward7"), (reading, "ward7-interface"), (reading, "ward7")]
    assert not landed(gw.root, "devices", rejected=True)  # a refused sender's body is not even kept aside


@pytest.mark.parametrize("settings, message", [
    ({"tls_cert": "/x.pem"}, "tls_cert and tls_key go together"),
    ({"client_ca": "/ca.pem"}, "client_ca needs TLS"),
    ({"tls_cert": "/x.pem", "tls_key": "/x.key", "require_client_cert": "true"}, "require_client_cert needs"),
    ({"tokens_env": "CARELAKE_TOKENS"}, "not one starting with CARELAKE_"),
    ({"sending_facilities": "[\"A|B\"]"}, "sending_facilities[0] must be an MSH-4 namespace id"),
])
def test_security_settings_are_checked(tmp_path, settings, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        make_config(tmp_path, **{f"gateway.security.{k}": v for k, v in settings.items()})


def test_tokens_are_hashed_at_rest_and_bad_files_are_named(tmp_path, pki):
    from pipelines.gateway.security import Policy, Tokens, token_hash

    (tmp_path / "tokens").write_text(f"# senders\nward7:{token_hash(TOKEN)}\n\nlab:{token_hash('other')}\n")
    cfg = make_config(tmp_path, **{"gateway.security.tokens_file": str(tmp_path / "tokens")})
    tokens = Tokens.load(cfg.gateway.security, environ={})
    assert TOKEN not in (tmp_path / "tokens").read_text()
    assert [tokens.sender(h) for h in (f"Bearer {TOKEN}", "bearer other", "Bearer nope", f"Basic {TOKEN}", None)] == [
        "ward7", "lab", None, None, None]
    (tmp_path / "tokens").write_text(f"ward7:{TOKEN}\n")  # a token written in plain text by mistake
    with pytest.raises(ConfigError, match="line 1: expected NAME:SHA256HEX"):
        Tokens.load(cfg.gateway.security, environ={})
    missing = make_config(tmp_path, **{"gateway.security.tls_cert": str(tmp_path / "none.pem"),
                                       "gateway.security.tls_key": str(pki / "server.key")})
    with pytest.raises(ConfigError, match="gateway.security.tls_cert/tls_key: cannot load"):
        Policy.of(missing.gateway.security, "127.0.0.1", environ={})


@pytest.mark.slow
def test_mutual_tls_required_refuses_an_mllp_sender_without_a_certificate_of_the_ca(tmp_path, pki):
    env = tls_env(pki, CARELAKE_GATEWAY__SECURITY__CLIENT_CA=str(pki / "ca.pem"),
                  CARELAKE_GATEWAY__SECURITY__REQUIRE_CLIENT_CERT="true")
    with GatewayProcess(tmp_path / "lake", "--mllp-port", "0", "--http-port", "0", **env) as gw:
        for cert in (None, "stranger"):  # no certificate; one signed by a CA the gateway does not trust
            with pytest.raises((ssl.SSLError, ConnectionError, AssertionError)):  # AssertionError: closed
                tls_exchange(gw.mllp, oru(f"NO-{cert}"), client(pki, cert=cert))
        assert msa(tls_exchange(gw.mllp, oru("MTLS-1"), client(pki, cert="ward7")))[1:3] == ["AA", "MTLS-1"]
        expected = {'carelake_gateway_auth_failures_total{protocol="mllp",reason="tls_handshake"}': 2}
        assert metric(gw, client(pki, cert="ward7"), "carelake_gateway_auth_failures_total", expected) == expected
    assert [(r.body, r.header["sender"]) for _, r in landed(gw.root, "hl7")] == [(oru("MTLS-1"), "ward7-interface")]


def test_send_credentials_are_checked_before_anything_is_sent(tmp_path, pki):
    from pipelines.errors import UsageError
    from pipelines.send import send

    cfg = make_config(tmp_path / "lake")
    (tmp_path / "a.hl7").write_bytes(oru("A"))
    (tmp_path / "empty").write_text("\n")
    cases = [
        ("localhost:1", {"token_file": str(tmp_path / "empty")}, "--token-file authenticates HTTP senders"),
        ("http://localhost:1", {"token_file": str(tmp_path / "empty")}, "is empty: put the token on its first line"),
        ("http://localhost:1", {"token_file": str(tmp_path / "none")}, "--token-file"),
        ("localhost:1", {"tls_ca": str(pki / "ca.pem"), "tls_cert": str(pki / "ward7.pem")},
         "--tls-cert and --tls-key go together"),
        ("localhost:1", {"tls_ca": str(tmp_path / "none.pem")}, "cannot load"),
        ("dicom://localhost:1/X", {"tls_ca": str(pki / "ca.pem")}, "DICOM senders are allowed by their calling AE"),
    ]
    for to, kw, message in cases:
        with pytest.raises(UsageError, match=message):
            send(cfg, to, [str(tmp_path / "a.hl7")], **kw)
