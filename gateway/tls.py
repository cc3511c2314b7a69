"""TLS and mutual TLS for the gateway port.

With `gateway.tls.cert_file` and `key_file` the port speaks only TLS; with `client_ca_file`
as well, a client must present a certificate signed by that CA (mTLS), or its handshake
fails (the client sees UNAVAILABLE). Kubernetes' gRPC probe speaks plaintext only, so a
TLS deployment sets `gateway.health_port`: a second, plaintext port that serves
grpc.health.v1 and nothing else (gateway/server.py).
"""

from __future__ import annotations

from pathlib import Path

import grpc

from clipsearch.settings import TlsSettings


def enabled(tls: TlsSettings) -> bool:
    """Whether the settings ask for TLS (a certificate and key, both or neither)."""
    if (tls.cert_file is None) != (tls.key_file is None):
        raise ValueError("gateway.tls needs both cert_file and key_file")
    if tls.client_ca_file is not None and tls.cert_file is None:
        raise ValueError("gateway.tls.client_ca_file (mTLS) needs cert_file and key_file")
    return tls.cert_file is not None


def server_credentials(tls: TlsSettings) -> grpc.ServerCredentials | None:
    """Credentials for `add_secure_port`, or None for plaintext."""
    if not enabled(tls):
        return None
    assert tls.cert_file is not None and tls.key_file is not None
    key = Path(tls.key_file).read_bytes()
    chain = Path(tls.cert_file).read_bytes()
    ca = Path(tls.client_ca_file).read_bytes() if tls.client_ca_file is not None else None
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=ca, require_client_auth=ca is not None
    )
