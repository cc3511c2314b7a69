"""Deep health: real canaries per service, refreshed in the background; NOT_SERVING while
draining or when the encoder or a shard is stuck."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from index_service.shard import Shard
from tests.fakes import HashEncoder, LocalShard
from tests.gateway_harness import DIM, code_of, gateway

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SEARCH, ENCODER, ADMIN = (
    "clipsearch.v1.SearchService",
    "clipsearch.v1.EncoderService",
    "clipsearch.v1.AdminService",
)


class StuckableEncoder(HashEncoder):
    """Stuck while `unstuck` is clear; the next `slow_calls` calls hang until cancelled."""

    def __init__(self) -> None:
        super().__init__(DIM)
        self.unstuck = asyncio.Event()
        self.unstuck.set()
        self.texts_seen: list[str] = []
        self.slow_calls = 0

    async def encode_texts(self, texts: Any, options: Any = None) -> np.ndarray:
        self.texts_seen.extend(texts)
        await _hang_if(self)
        await self.unstuck.wait()
        return await super().encode_texts(texts)


class StuckableShard(LocalShard):
    """Stuck while `unstuck` is clear, failing at once while `dead`; the next `slow_calls`
    searches hang until cancelled."""

    def __init__(self, number: int) -> None:
        super().__init__(Shard(number, DIM))
        self.unstuck = asyncio.Event()
        self.unstuck.set()
        self.slow_calls = 0
        self.searches = 0
        self.dead = False

    async def search(self, *args: Any) -> Any:
        self.searches += 1
        if self.dead:
            raise RuntimeError("the shard's actor died")
        await _hang_if(self)
        await self.unstuck.wait()
        return await super().search(*args)


async def _hang_if(part: Any) -> None:
    if part.slow_calls > 0:
        part.slow_calls -= 1
        await asyncio.Event().wait()  # never set: only the canary's timeout ends it


async def _statuses(port: int) -> dict[str, int]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        out = {}
        for name in ("", SEARCH, ENCODER, ADMIN):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            out[name] = reply.status
        return out


async def test_stuck_encoder_or_shard_turns_the_right_services_not_serving() -> None:
    encoder, shards = StuckableEncoder(), [StuckableShard(0), StuckableShard(1)]
    async with gateway(shards=shards, encoder=encoder, health_timeout_s=0.3) as (port, health):
        assert set((await _statuses(port)).values()) == {SERVING}
        encoder.unstuck.clear()
        await health.check_once()
        assert await _statuses(port) == {
            "": NOT_SERVING,
            SEARCH: NOT_SERVING,
            ENCODER: NOT_SERVING,
            ADMIN: NOT_SERVING,
        }
        encoder.unstuck.set()
        shards[1].unstuck.clear()
        await health.check_once()
        assert await _statuses(port) == {
            "": NOT_SERVING,
            SEARCH: NOT_SERVING,
            ENCODER: SERVING,
            ADMIN: NOT_SERVING,
        }
        shards[1].unstuck.set()
        await health.check_once()
        assert set((await _statuses(port)).values()) == {SERVING}
        canaries = [t for t in encoder.texts_seen if t.startswith("health canary")]
        assert len(set(canaries)) == len(canaries) >= 4  # never the same text: no cache hits


async def test_background_checks_notice_a_stuck_encoder_and_its_recovery() -> None:
    encoder = StuckableEncoder()
    settings = {"health_interval_s": 0.05, "health_timeout_s": 0.2}
    async with gateway(encoder=encoder, **settings) as (port, _):
        encoder.unstuck.clear()
        for _ in range(200):
            if (await _statuses(port))[""] == NOT_SERVING:
                break
            await asyncio.sleep(0.05)
        assert (await _statuses(port))[ENCODER] == NOT_SERVING
        encoder.unstuck.set()
        for _ in range(200):
            if (await _statuses(port))[""] == SERVING:
                break
            await asyncio.sleep(0.05)
        assert set((await _statuses(port)).values()) == {SERVING}


async def test_draining_is_not_serving_for_good_and_refuses_new_calls() -> None:
    from clipsearch.v1 import search_pb2, search_pb2_grpc

    async with gateway(health_interval_s=0.05) as (port, health):
        await health.enter_graceful_shutdown()
        await asyncio.sleep(0.2)  # background checks must not flip it back
        assert set((await _statuses(port)).values()) == {NOT_SERVING}
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = search_pb2_grpc.SearchServiceStub(channel)
            call = stub.Search(search_pb2.SearchRequest(text="x", top_k=1), timeout=5)
            assert await code_of(call) == grpc.StatusCode.UNAVAILABLE


def _canaries(encoder: StuckableEncoder) -> int:
    return sum(t.startswith("health canary") for t in encoder.texts_seen)


QUIET = {"health_interval_s": 600, "health_timeout_s": 0.2}  # checks run only when called


async def test_one_slow_canary_flips_nothing() -> None:
    """A canary that misses its timeout once (a busy machine) is tried again at once; the
    second answers, so every service stays SERVING."""
    encoder, shards = StuckableEncoder(), [StuckableShard(0), StuckableShard(1)]
    async with gateway(shards=shards, encoder=encoder, **QUIET) as (port, health):
        before = _canaries(encoder)
        encoder.slow_calls = shards[1].slow_calls = 1
        assert set((await health.check_once()).values()) == {True}
        assert set((await _statuses(port)).values()) == {SERVING}
        assert _canaries(encoder) - before == 2  # the slow one, then one that answered
        assert encoder.slow_calls == shards[1].slow_calls == 0


async def test_a_dead_shard_or_stuck_encoder_flips_after_the_set_number_of_tries() -> None:
    encoder, shards = StuckableEncoder(), [StuckableShard(0), StuckableShard(1)]
    settings = {**QUIET, "health_failures": 3}
    async with gateway(shards=shards, encoder=encoder, **settings) as (port, health):
        shards[1].dead = True
        before = shards[1].searches
        await health.check_once()
        assert shards[1].searches - before == 3
        assert await _statuses(port) == {
            "": NOT_SERVING,
            SEARCH: NOT_SERVING,
            ENCODER: SERVING,
            ADMIN: NOT_SERVING,
        }
        shards[1].dead = False
        await health.check_once()  # the first canary that answers turns it back
        assert set((await _statuses(port)).values()) == {SERVING}
        encoder.unstuck.clear()
        before = _canaries(encoder)
        await health.check_once()
        assert _canaries(encoder) - before == 3
        assert (await _statuses(port))[ENCODER] == NOT_SERVING
        encoder.unstuck.set()


async def test_background_checks_notice_a_dead_shard() -> None:
    shards = [StuckableShard(0), StuckableShard(1)]
    async with gateway(shards=shards, health_interval_s=0.05, health_timeout_s=0.1) as (port, _):
        shards[0].dead = True
        for _ in range(200):
            if (await _statuses(port))[""] == NOT_SERVING:
                break
            await asyncio.sleep(0.05)
        assert (await _statuses(port))[SEARCH] == NOT_SERVING


async def test_with_one_failure_allowed_one_slow_canary_flips_health() -> None:
    """`health_failures: 1` is the strict setting: the first missed canary counts."""
    encoder = StuckableEncoder()
    async with gateway(encoder=encoder, health_failures=1, **QUIET) as (port, health):
        encoder.slow_calls = 1
        await health.check_once()
        assert (await _statuses(port))[ENCODER] == NOT_SERVING
        await health.check_once()
        assert (await _statuses(port))[ENCODER] == SERVING
