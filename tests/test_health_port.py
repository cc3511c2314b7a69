"""The plaintext health-only port (`gateway.health_port`) beside a TLS API port: what
Kubernetes' gRPC probe, which speaks neither TLS nor tokens, can reach."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clipsearch.v1 import search_pb2, search_pb2_grpc
from tests.gateway_harness import code_of, gateway
from tests.test_tls import Pem, _secure, _tls, pki  # noqa: F401  (pki is a fixture)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _status(channel: grpc.aio.Channel, service: str = "") -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=5
    )
    return int(reply.status)


async def test_plaintext_health_port_beside_tls(pki: dict[str, object]) -> None:  # noqa: F811
    ca: Pem = pki["ca"]  # type: ignore[assignment]
    settings = {**_tls(pki, mutual=True), "health_port": 0}
    async with gateway(**settings) as (port, health):
        assert health.health_port not in (None, 0, port)
        plain = f"127.0.0.1:{health.health_port}"
        async with grpc.aio.insecure_channel(plain) as channel:
            for service in ("", "clipsearch.v1.SearchService", "clipsearch.v1.EncoderService"):
                assert await _status(channel, service) == SERVING
            # the API is not served there, not even its health-exempt parts
            search = search_pb2_grpc.SearchServiceStub(channel).Search(
                search_pb2.SearchRequest(text="a red circle", top_k=1), timeout=5
            )
            assert await code_of(search) == grpc.StatusCode.UNIMPLEMENTED
        # the API port itself still wants TLS and a client certificate
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert await code_of(_status(channel)) == grpc.StatusCode.UNAVAILABLE
        async with _secure(port, ca[0], pki["client"]) as channel:  # type: ignore[arg-type]
            assert await _status(channel) == SERVING
        # draining shows on the probe port too
        await health.enter_graceful_shutdown()
        async with grpc.aio.insecure_channel(plain) as channel:
            assert await _status(channel) == NOT_SERVING


async def test_health_port_is_off_by_default() -> None:
    async with gateway() as (_port, health):
        assert health.health_port is None and health.health_server is None
