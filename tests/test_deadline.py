"""Deadlines and cancellation: the caller's deadline (or the default) bounds downstream work,
and a call that ends early cancels the shard and encoder work it started."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import numpy as np
import pytest

from clipsearch.v1 import search_pb2, search_pb2_grpc
from gateway.backends import call_remote, cancel_remote
from index_service.shard import Shard
from tests.fakes import LocalShard
from tests.gateway_harness import DIM, code_of, gateway


class SlowShard(LocalShard):
    """Search takes `delay_s`; records whether its work was cancelled."""

    def __init__(self, number: int, delay_s: float) -> None:
        super().__init__(Shard(number, DIM))
        self.delay_s = delay_s
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.finished = 0

    async def search(self, *args: Any) -> Any:
        self.started.set()
        try:
            await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        self.finished += 1
        return await super().search(*args)


def _request() -> search_pb2.SearchRequest:
    return search_pb2.SearchRequest(vector={"values": np.ones(DIM).tolist()}, top_k=1)


async def test_short_deadline_is_exceeded_promptly_and_the_shard_work_cancelled() -> None:
    slow = SlowShard(1, delay_s=60)
    async with gateway(shards=[LocalShard(Shard(0, DIM)), slow]) as (port, _):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = search_pb2_grpc.SearchServiceStub(channel)
            started = time.monotonic()
            assert await code_of(stub.Search(_request(), timeout=0.2)) == (
                grpc.StatusCode.DEADLINE_EXCEEDED
            )
            assert time.monotonic() - started < 5
            await asyncio.wait_for(slow.cancelled.wait(), 5)
            assert slow.finished == 0


async def test_calls_without_a_deadline_get_the_default() -> None:
    slow = SlowShard(0, delay_s=60)
    async with gateway(shards=[slow], default_timeout_s=0.3) as (port, _):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = search_pb2_grpc.SearchServiceStub(channel)
            started = time.monotonic()
            assert await code_of(stub.Search(_request())) == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - started < 5
            await asyncio.wait_for(slow.cancelled.wait(), 5)


async def test_a_client_that_cancels_mid_call_cancels_the_shard_work() -> None:
    slow = SlowShard(0, delay_s=60)
    async with gateway(shards=[slow]) as (port, health):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = search_pb2_grpc.SearchServiceStub(channel)
            call = stub.Search(_request(), timeout=30)
            await asyncio.wait_for(slow.started.wait(), 5)
            call.cancel()
            await asyncio.wait_for(slow.cancelled.wait(), 5)
            assert slow.finished == 0
            slow.delay_s = 0  # the server still answers afterwards
            assert await code_of(stub.Search(_request(), timeout=10)) == grpc.StatusCode.OK
        assert health.observability.metrics.in_flight.labels("read")._value.get() == 0


async def test_an_already_expired_deadline_never_reaches_the_shards() -> None:
    slow = SlowShard(0, delay_s=60)
    async with gateway(shards=[slow]) as (port, _):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = search_pb2_grpc.SearchServiceStub(channel)
            code = await code_of(stub.Search(_request(), timeout=-1))
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert slow.finished == 0


class _FakeRemote:
    """Stands in for a Serve DeploymentResponse: awaitable, with cancel()."""

    def __init__(self) -> None:
        self.cancelled = False
        self._future: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def __await__(self) -> Any:
        return self._future.__await__()

    def cancel(self) -> None:
        self.cancelled = True


async def test_call_remote_cancels_the_remote_work_when_its_caller_is_cancelled() -> None:
    remote = _FakeRemote()
    task = asyncio.ensure_future(call_remote(remote, "the encoder"))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert remote.cancelled
    cancel_remote(object())  # nothing to cancel: no error


async def test_every_search_response_carries_the_timing_breakdown() -> None:
    async with gateway() as (port, _):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = search_pb2_grpc.SearchServiceStub(channel)
            vec = {"values": np.ones(DIM).tolist()}
            doc = search_pb2.UpsertDocument(id="a", image_vector=vec, text="a red circle")
            await stub.Upsert(search_pb2.UpsertRequest(documents=[doc]), timeout=10)
            plain = await stub.Search(search_pb2.SearchRequest(text="a red", top_k=1), timeout=10)
            recency = search_pb2.SearchRequest(
                text="a red", top_k=1, recency=search_pb2.Recency(decay_per_day=0.5)
            )
            decayed = await stub.Search(recency, timeout=10)
    for resp in (plain, decayed):
        t = resp.timings
        assert min(t.decode_ms, t.encode_ms, t.search_ms, t.merge_ms) > 0
        parts = t.decode_ms + t.encode_ms + t.search_ms + t.merge_ms + t.rerank_ms
        assert t.total_ms >= parts * 0.99
        assert resp.shards_answered == resp.shards_total == 2
    assert plain.timings.rerank_ms == 0 and decayed.timings.rerank_ms > 0
