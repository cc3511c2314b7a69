"""Admission control: past the in-flight bound of a class, calls fail fast with
RESOURCE_EXHAUSTED; other classes and later calls are unaffected."""

from __future__ import annotations

import asyncio
from collections import Counter

import grpc
import numpy as np
import pytest

from clipsearch.errors import ResourceExhausted
from clipsearch.v1 import search_pb2, search_pb2_grpc
from gateway.admission import Admission
from index_service.shard import Shard
from tests.fakes import LocalShard
from tests.gateway_harness import DIM, code_of, gateway

LIMIT = 8
BEYOND = 1000


class GatedShard(LocalShard):
    """A shard whose searches wait for a gate (so admitted calls stay in flight)."""

    def __init__(self, number: int) -> None:
        super().__init__(Shard(number, DIM))
        self.gate = asyncio.Event()
        self.gate.set()

    async def search(self, *args: object) -> object:  # type: ignore[override]
        await self.gate.wait()
        return await super().search(*args)  # type: ignore[arg-type]


async def test_1000_calls_beyond_the_limit_fail_fast_and_the_admitted_ones_finish() -> None:
    shards = [GatedShard(0), GatedShard(1)]
    async with gateway(shards=shards, admission={"read": LIMIT, "write": 4}) as (port, health):
        for s in shards:
            s.gate.clear()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = search_pb2_grpc.SearchServiceStub(channel)
            vec = {"values": np.ones(DIM).tolist()}
            request = search_pb2.SearchRequest(vector=vec, top_k=3)
            tasks = [
                asyncio.ensure_future(code_of(stub.Search(request, timeout=60)))
                for _ in range(LIMIT + BEYOND)
            ]
            loop = asyncio.get_running_loop()
            until = loop.time() + 60
            while sum(t.done() for t in tasks) < BEYOND and loop.time() < until:
                await asyncio.sleep(0.05)
            refused = Counter(t.result() for t in tasks if t.done())
            assert refused == {grpc.StatusCode.RESOURCE_EXHAUSTED: BEYOND}
            # another class is not starved while reads are full
            upsert = search_pb2.UpsertRequest(
                documents=[search_pb2.UpsertDocument(id="w", image_vector=vec)]
            )
            assert await code_of(stub.Upsert(upsert, timeout=10)) == grpc.StatusCode.OK
            for s in shards:
                s.gate.set()
            codes = Counter(await asyncio.gather(*tasks))
            assert codes == {
                grpc.StatusCode.OK: LIMIT,
                grpc.StatusCode.RESOURCE_EXHAUSTED: BEYOND,
            }
            # every slot came back: a full class's worth of calls is admitted again
            again = await asyncio.gather(
                *(code_of(stub.Search(request, timeout=30)) for _ in range(LIMIT))
            )
            assert set(again) == {grpc.StatusCode.OK}
        metrics = health.observability.metrics
        assert metrics.rejected.labels("read")._value.get() == BEYOND
        assert metrics.in_flight.labels("read")._value.get() == 0


async def test_refusal_names_the_limit() -> None:
    shard = GatedShard(0)
    async with gateway(shards=[shard], admission={"read": 1}) as (port, health):
        shard.gate.clear()
        in_flight = health.observability.metrics.in_flight.labels("read")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = search_pb2_grpc.SearchServiceStub(channel)
            request = search_pb2.SearchRequest(vector={"values": np.ones(DIM).tolist()}, top_k=1)
            first = asyncio.ensure_future(stub.Search(request, timeout=30))
            for _ in range(600):
                if in_flight._value.get() == 1:
                    break
                await asyncio.sleep(0.05)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Search(request, timeout=30)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "limit 1" in err.value.details() and "read" in err.value.details()
            shard.gate.set()
            await first


def test_counters() -> None:
    adm = Admission({"read": 2, "write": 0})
    assert adm.enter("read") and adm.enter("read")
    with pytest.raises(ResourceExhausted):
        adm.enter("read")
    adm.leave("read")
    assert adm.enter("read")
    assert adm.enter("write") is False  # 0 = unbounded: nothing to give back
    assert adm.rejected == {"read": 1, "write": 0}
