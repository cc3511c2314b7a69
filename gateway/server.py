"""Building the grpc.aio server: services, health, reflection, limits."""

from __future__ import annotations

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
from gateway.convert import Validator
from gateway.coordinator import Coordinator
from gateway.errors import ErrorInterceptor
from gateway.servicers import AdminServicer, EncoderServicer, SearchServicer

SERVICE_NAMES = (
    search_pb2.DESCRIPTOR.services_by_name["SearchService"].full_name,
    encoder_pb2.DESCRIPTOR.services_by_name["EncoderService"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
)


async def create_server(
    coordinator: Coordinator, settings: Settings
) -> tuple[grpc.aio.Server, int, health_aio.HealthServicer]:
    """A started gateway bound to settings.gateway.host:port; returns (server, port, health)."""
    limit = settings.limits.max_message_bytes
    server = grpc.aio.server(
        interceptors=[ErrorInterceptor(settings.gateway.default_timeout_s)],
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),
        ],
    )
    validator = Validator(settings.limits, coordinator.encoder.dim)
    search_pb2_grpc.add_SearchServiceServicer_to_server(
        SearchServicer(coordinator, validator), server
    )
    encoder_pb2_grpc.add_EncoderServiceServicer_to_server(
        EncoderServicer(coordinator, validator), server
    )
    admin_pb2_grpc.add_AdminServiceServicer_to_server(
        AdminServicer(coordinator, settings.index.factory), server
    )
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (
            *SERVICE_NAMES,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    port = server.add_insecure_port(f"{settings.gateway.host}:{settings.gateway.port}")
    if port == 0:
        raise RuntimeError(f"cannot bind {settings.gateway.host}:{settings.gateway.port}")
    await server.start()
    for name in ("", *SERVICE_NAMES):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, port, health


async def drain(server: grpc.aio.Server, health: health_aio.HealthServicer, grace_s: float) -> None:
    """Stop taking calls (health NOT_SERVING first), let in-flight ones finish, then stop."""
    await health.enter_graceful_shutdown()
    await server.stop(grace_s)
