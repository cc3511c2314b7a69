"""Building the grpc.aio server: services, auth, TLS, admission, health, metrics, reflection."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from clipsearch.settings import Settings
from clipsearch.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    encoder_pb2,
    encoder_pb2_grpc,
    search_pb2,
    search_pb2_grpc,
)
from gateway import tls
from gateway.admission import Admission
from gateway.auth import authenticator_for, is_loopback
from gateway.convert import Validator
from gateway.coordinator import Coordinator
from gateway.errors import ErrorInterceptor
from gateway.health import HealthChecker
from gateway.metrics import GatewayMetrics
from gateway.servicers import AdminServicer, EncoderServicer, SearchServicer
from gateway.shard_metrics import ShardCallCollector
from gateway.tracing import tracer_for

log = logging.getLogger("clipsearch.gateway")

SEARCH_SERVICE = search_pb2.DESCRIPTOR.services_by_name["SearchService"].full_name
ENCODER_SERVICE = encoder_pb2.DESCRIPTOR.services_by_name["EncoderService"].full_name
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name
SERVICE_NAMES = (SEARCH_SERVICE, ENCODER_SERVICE, ADMIN_SERVICE)


@dataclass
class Observability:
    """What the gateway exposes besides the API: metrics (and their HTTP port, if any)."""

    metrics: GatewayMetrics
    metrics_port: int | None = None
    metrics_server: Any = None


def check_exposure(settings: Settings, auth_on: bool, tls_on: bool) -> None:
    """Refuse a non-loopback bind with neither auth nor TLS unless explicitly allowed."""
    gw = settings.gateway
    if is_loopback(gw.host) or auth_on or tls_on or gw.allow_insecure:
        return
    raise ValueError(
        f"refusing to bind {gw.host} with neither auth nor TLS: configure gateway.auth "
        "tokens or gateway.tls, or set gateway.allow_insecure (--insecure) to accept it"
    )


async def create_server(
    coordinator: Coordinator, settings: Settings
) -> tuple[grpc.aio.Server, int, HealthChecker]:
    """A started gateway bound to settings.gateway.host:port; returns (server, port, health).

    `health.observability` holds the metrics; `drain(server, health, grace)` stops it all.
    """
    gw = settings.gateway
    authenticator = authenticator_for(gw.auth)
    credentials = tls.server_credentials(gw.tls)
    check_exposure(settings, authenticator is not None, credentials is not None)
    metrics = GatewayMetrics()
    metrics.registry.register(ShardCallCollector(coordinator.shards))
    admission = Admission.from_settings(gw.admission)
    interceptor = ErrorInterceptor(
        gw.default_timeout_s,
        authenticator=authenticator,
        admission=admission,
        metrics=metrics,
        tracer=tracer_for(gw.observability.otlp_endpoint),
    )
    limit = settings.limits.max_message_bytes
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ],
    )
    # The services register through `registrar`, which wraps each unary handler with the
    # interceptor's per-call work once, here: grpc then runs no interceptor chain per call.
    registrar = _Wrapping(server, interceptor)
    validator = Validator(settings.limits, coordinator.encoder.dim, settings.index.factory)
    search_pb2_grpc.add_SearchServiceServicer_to_server(
        SearchServicer(coordinator, validator), registrar
    )
    encoder_pb2_grpc.add_EncoderServiceServicer_to_server(
        EncoderServicer(coordinator, validator), registrar
    )
    admin_pb2_grpc.add_AdminServiceServicer_to_server(
        AdminServicer(coordinator, settings.index.factory), registrar
    )
    servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, registrar)
    reflection.enable_server_reflection(
        (
            *SERVICE_NAMES,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,  # streaming only: nothing to wrap (and it checks for a grpc.aio.Server)
    )
    address = f"{gw.host}:{gw.port}"
    if credentials is not None:
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"cannot bind {address}")
    health = HealthChecker(
        servicer,
        coordinator,
        {SEARCH_SERVICE: "all", ENCODER_SERVICE: "encoder", ADMIN_SERVICE: "all"},
        gw.health_interval_s,
        gw.health_timeout_s,
        metrics,
        failures=gw.health_failures,
    )
    health.on_drain.append(lambda: setattr(interceptor, "draining", True))
    obs = Observability(metrics)
    health.observability = obs
    health.server = server
    health.admission = admission
    await server.start()
    if gw.health_port is not None:
        health.health_server, health.health_port = await _health_only_server(
            servicer, gw.host, gw.health_port
        )
        log.info("plaintext health on %s:%d", gw.host, health.health_port)
    await health.check_once()
    health.start()
    o = gw.observability
    if o.metrics_port is not None:
        obs.metrics_server, obs.metrics_port = metrics.serve(o.metrics_host, o.metrics_port)
        health.on_drain.append(obs.metrics_server.shutdown)
        log.info("metrics on http://%s:%d/metrics", o.metrics_host, obs.metrics_port)
    return server, port, health


class _Wrapping:
    """Stands in for the grpc.aio server while services register their handlers.

    Each unary-unary handler is replaced by `ErrorInterceptor.handler_for`'s wrapped one (auth,
    draining, parsing, admission, deadline, errors, metrics, access log, tracing), built once.
    As an interceptor, the same work cost a chain of coroutines and a handler lookup per call.
    """

    def __init__(self, server: grpc.aio.Server, interceptor: ErrorInterceptor) -> None:
        self._server = server
        self._interceptor = interceptor

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        wrap = self._interceptor.handler_for
        self._server.add_registered_method_handlers(
            service, {name: wrap(f"/{service}/{name}", h) for name, h in handlers.items()}
        )

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self._server.add_generic_rpc_handlers(
            tuple(_WrappedGeneric(h, self._interceptor) for h in handlers)
        )


class _WrappedGeneric(grpc.GenericRpcHandler):
    """A generic handler whose unary-unary answers come wrapped (the fallback grpc uses for
    methods not registered by name)."""

    def __init__(self, inner: grpc.GenericRpcHandler, interceptor: ErrorInterceptor) -> None:
        self._inner = inner
        self._interceptor = interceptor

    def service(self, details: grpc.HandlerCallDetails) -> Any:
        return self._interceptor.handler_for(details.method, self._inner.service(details))


async def _health_only_server(
    servicer: health_aio.HealthServicer, host: str, port: int
) -> tuple[grpc.aio.Server, int]:
    """A plaintext server with grpc.health.v1 alone (the same statuses as the API port).

    Kubernetes' gRPC probe can neither speak TLS nor send a token, so a TLS gateway offers it
    this port; it serves no API method (anything else is UNIMPLEMENTED) and no reflection.
    """
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"cannot bind the health port {host}:{port}")
    await server.start()
    return server, bound


def freeze_startup_heap() -> None:
    """Move everything start-up allocated out of the garbage collector's sight.

    A serving process holds hundreds of thousands of long-lived objects (grpc, Ray, numpy,
    pydantic, the model's Python side); every full collection walks them all, a pause of tens
    of milliseconds (measured: up to 91 ms with the bench gateway's 150,000 objects) that lands
    on whichever calls are in flight. After `gc.freeze()` collections see only what serving
    allocates. Call it once, when the server is up (a process that keeps starting servers,
    like a test run, would keep their garbage forever).
    """
    gc.collect()
    gc.freeze()


async def serve_until_signal(server: grpc.aio.Server, health: Any, grace_s: float) -> None:
    """Serve until SIGTERM or SIGINT, then drain (for embedding the gateway alone)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        await drain(server, health, grace_s)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def drain(server: grpc.aio.Server, health: Any, grace_s: float) -> None:
    """Health NOT_SERVING and new calls refused first, in-flight ones finish within grace_s,
    then stop."""
    await health.enter_graceful_shutdown()
    await server.stop(grace_s)
    health_server = getattr(health, "health_server", None)
    if health_server is not None:  # NOT_SERVING until the API port is gone, then closed
        await health_server.stop(0)
