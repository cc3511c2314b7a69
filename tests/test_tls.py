"""TLS and mTLS on the gateway port: handshakes succeed and fail as configured.

Certificates are generated at test time (a CA, a server certificate for 127.0.0.1, a client
certificate from the same CA and one from a stranger CA)."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clipsearch.client import Client
from tests.gateway_harness import gateway

Pem = tuple[bytes, bytes]  # (certificate, key)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(
    cn: str, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None, server: bool
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer[0].subject if issuer else _name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    signer = issuer[1] if issuer else key
    return builder.sign(signer, hashes.SHA256()), key


def _pem(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Pem:
    return (
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    out = tmp_path_factory.mktemp("pki")
    ca = _issue("test CA", None, server=False)
    stranger = _issue("stranger CA", None, server=False)
    files: dict[str, object] = {}
    for label, pem in (
        ("ca", _pem(*ca)),
        ("server", _pem(*_issue("127.0.0.1", ca, server=True))),
        ("client", _pem(*_issue("good client", ca, server=False))),
        ("stranger_client", _pem(*_issue("bad client", stranger, server=False))),
        ("stranger_ca", _pem(*stranger)),
    ):
        (out / f"{label}.crt").write_bytes(pem[0])
        (out / f"{label}.key").write_bytes(pem[1])
        files[label] = pem
        files[f"{label}_path"] = out / f"{label}.crt"
        files[f"{label}_key_path"] = out / f"{label}.key"
    return files


def _tls(pki: dict[str, object], mutual: bool) -> dict[str, object]:
    settings = {"cert_file": str(pki["server_path"]), "key_file": str(pki["server_key_path"])}
    if mutual:
        settings["client_ca_file"] = str(pki["ca_path"])
    return {"tls": settings}


async def _health(channel: grpc.aio.Channel) -> grpc.StatusCode:
    try:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
    except grpc.aio.AioRpcError as err:
        return err.code()
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    return grpc.StatusCode.OK


def _secure(port: int, root: bytes, client: Pem | None = None) -> grpc.aio.Channel:
    creds = grpc.ssl_channel_credentials(
        root, client[1] if client else None, client[0] if client else None
    )
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", creds)


async def test_tls_handshakes(pki: dict[str, object]) -> None:
    ca: Pem = pki["ca"]  # type: ignore[assignment]
    stranger: Pem = pki["stranger_ca"]  # type: ignore[assignment]
    async with gateway(**_tls(pki, mutual=False)) as (port, _):
        async with _secure(port, ca[0]) as channel:
            assert await _health(channel) == grpc.StatusCode.OK
        async with _secure(port, stranger[0]) as channel:  # server not trusted
            assert await _health(channel) == grpc.StatusCode.UNAVAILABLE
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:  # plaintext
            assert await _health(channel) == grpc.StatusCode.UNAVAILABLE


async def test_mtls_requires_a_client_certificate_from_the_ca(pki: dict[str, object]) -> None:
    ca: Pem = pki["ca"]  # type: ignore[assignment]
    async with gateway(**_tls(pki, mutual=True)) as (port, _):
        async with _secure(port, ca[0], pki["client"]) as channel:  # type: ignore[arg-type]
            assert await _health(channel) == grpc.StatusCode.OK
        async with _secure(port, ca[0]) as channel:  # no client certificate
            assert await _health(channel) == grpc.StatusCode.UNAVAILABLE
        async with _secure(port, ca[0], pki["stranger_client"]) as channel:  # type: ignore[arg-type]
            assert await _health(channel) == grpc.StatusCode.UNAVAILABLE


async def test_python_client_speaks_mtls_with_a_token(pki: dict[str, object]) -> None:
    ca: Pem = pki["ca"]  # type: ignore[assignment]
    client: Pem = pki["client"]  # type: ignore[assignment]
    async with gateway(**_tls(pki, mutual=True), auth={"tokens": "admin=t0k"}) as (port, _):
        with Client(
            f"127.0.0.1:{port}",
            timeout=10,
            token="t0k",
            root_certificates=ca[0],
            client_cert=client[0],
            client_key=client[1],
        ) as c:
            stats = await _in_thread(c.stats)
            assert len(stats.shards) == 2


async def _in_thread(fn: object) -> object:
    import asyncio

    return await asyncio.to_thread(fn)  # type: ignore[arg-type]


def test_half_configured_tls_is_refused(tmp_path: Path) -> None:
    from clipsearch.settings import TlsSettings
    from gateway.tls import enabled

    with pytest.raises(ValueError, match="both"):
        enabled(TlsSettings(cert_file=tmp_path / "c"))
    with pytest.raises(ValueError, match="mTLS"):
        enabled(TlsSettings(client_ca_file=tmp_path / "ca"))
    assert not enabled(TlsSettings())
