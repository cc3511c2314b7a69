"""An in-process gateway (real grpc.aio server, fake encoder, real Shard engines, no Ray)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc

from clipsearch.settings import load_settings
from gateway.coordinator import Coordinator
from gateway.server import create_server, drain
from index_service.shard import Shard
from tests.fakes import HashEncoder, LocalShard

DIM = 16


@asynccontextmanager
async def gateway(
    shards: list[Any] | None = None, encoder: Any = None, **gateway_settings: Any
) -> AsyncIterator[tuple[int, Any]]:
    """Yields (port, health) of a started gateway on 127.0.0.1 with the given settings."""
    settings = load_settings(gateway={"port": 0, "health_timeout_s": 0.5, **gateway_settings})
    coordinator = Coordinator(
        encoder or HashEncoder(DIM),
        shards or [LocalShard(Shard(0, DIM)), LocalShard(Shard(1, DIM))],
    )
    server, port, health = await create_server(coordinator, settings)
    try:
        yield port, health
    finally:
        await drain(server, health, 0)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def code_of(call: Any) -> grpc.StatusCode:
    """The status code a call ends with (OK when it returns)."""
    try:
        await call
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK
