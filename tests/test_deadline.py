"""Deadlines and cancellation: the caller's deadline (or the default) bounds downstream work,
and a call that ends early cancels the shard and encoder work it started."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from clipsearch.errors import DeadlineExceeded
from clipsearch.settings import IndexSettings
from clipsearch.types import DocRecord, Modality, ShardHits
from clipsearch.v1 import search_pb2, search_pb2_grpc
from gateway.backends import call_remote, cancel_remote
from gateway.coordinator import Coordinator, SearchQuery
from index_service.actor import ShardActor
from index_service.shard import Shard
from tests.fakes import HashEncoder, LocalShard
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
    """grpc cancels the handler at the client's deadline (the gateway sets no timer of its
    own then); the call still counts as DEADLINE_EXCEEDED, not CANCELLED, and leaves."""
    slow = SlowShard(1, delay_s=60)
    async with gateway(shards=[LocalShard(Shard(0, DIM)), slow]) as (port, health):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = search_pb2_grpc.SearchServiceStub(channel)
            started = time.monotonic()
            assert await code_of(stub.Search(_request(), timeout=0.2)) == (
                grpc.StatusCode.DEADLINE_EXCEEDED
            )
            assert time.monotonic() - started < 5
            await asyncio.wait_for(slow.cancelled.wait(), 5)
            assert slow.finished == 0
        metrics = health.observability.metrics
        labels = {"method": "/clipsearch.v1.SearchService/Search"}
        for _ in range(100):  # the handler's cleanup runs just after the client's error
            if metrics.in_flight.labels("read")._value.get() == 0:
                break
            await asyncio.sleep(0.02)
        assert metrics.in_flight.labels("read")._value.get() == 0
        total = metrics.registry.get_sample_value
        assert total("clipsearch_rpc_total", {**labels, "code": "DEADLINE_EXCEEDED"}) == 1
        assert total("clipsearch_rpc_total", {**labels, "code": "CANCELLED"}) is None


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


class QueuedActorShard(LocalShard):
    """A real ShardActor behind a one-thread queue, as in a sync Ray actor: a call it has
    taken cannot be cancelled (shielded), so only the deadline it carries can stop it."""

    def __init__(self, actor: ShardActor) -> None:
        super().__init__(actor._shard)
        self.actor = actor
        self.pool = ThreadPoolExecutor(1)

    async def search(self, *args: Any) -> Any:
        future = self.pool.submit(self.actor.search, *args)
        return await asyncio.shield(asyncio.wrap_future(future))


async def test_a_search_the_shard_takes_after_the_deadline_is_skipped(tmp_path: Path) -> None:
    actor = ShardActor(0, DIM, IndexSettings(), str(tmp_path), "m")
    shard = QueuedActorShard(actor)
    busy = threading.Event()
    shard.pool.submit(busy.wait, 30)  # the shard is slowed on purpose: its queue is held
    try:
        async with gateway(shards=[shard]) as (port, _):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = search_pb2_grpc.SearchServiceStub(channel)
                started = time.monotonic()
                code = await code_of(stub.Search(_request(), timeout=0.3))
                assert code == grpc.StatusCode.DEADLINE_EXCEEDED
                assert time.monotonic() - started < 5
    finally:
        busy.set()
        shard.pool.shutdown(wait=True)
        actor.close()
    assert actor.skipped() == 1  # the queued search ran after the deadline and did nothing


def test_the_shard_actor_refuses_an_expired_deadline_and_serves_a_live_one(
    tmp_path: Path,
) -> None:
    actor = ShardActor(0, DIM, IndexSettings(), str(tmp_path), "m")
    try:
        query = np.ones(DIM, dtype=np.float32) / np.sqrt(DIM)
        with pytest.raises(DeadlineExceeded):
            actor.search(Modality.IMAGE, query, 1, None, None, time.time() - 1)
        assert actor.skipped() == 1
        hits = actor.search(Modality.IMAGE, query, 1, None, None, time.time() + 60)
        assert hits.exhausted and actor.skipped() == 1
    finally:
        actor.close()


class _NeverExact(LocalShard):
    """Answers that never prove the decayed top-k exact, so recency keeps fetching."""

    def __init__(self) -> None:
        super().__init__(Shard(0, DIM))
        self.rounds = 0
        self.deadlines: list[float | None] = []

    async def search(self, *args: Any) -> ShardHits:
        self.rounds += 1
        self.deadlines.append(args[5])
        record = DocRecord(f"d{self.rounds}", 0.0, has_image=True)
        return ShardHits(np.array([0.9], dtype=np.float32), (record,), exhausted=False)


async def test_recency_rounds_stop_at_the_deadline_and_the_shards_get_it() -> None:
    shard = _NeverExact()
    coord = Coordinator(HashEncoder(DIM), [shard])
    deadline = time.time() - 0.001  # passed by the time the first round answers
    query = SearchQuery(
        Modality.IMAGE, 2, vector=np.ones(DIM, np.float32), alpha=1.0, deadline=deadline
    )
    with pytest.raises(DeadlineExceeded):
        await coord.search(query)
    assert shard.rounds == 1 and shard.deadlines == [deadline]


async def test_the_callers_deadline_reaches_the_shards() -> None:
    shard = _NeverExact()
    shard.search = _exhausted(shard)  # type: ignore[method-assign]
    async with gateway(shards=[shard]) as (port, _):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = search_pb2_grpc.SearchServiceStub(channel)
            before = time.time()
            await stub.Search(_request(), timeout=20)  # not the gateway's default of 30 s
    (deadline,) = shard.deadlines
    # gRPC keeps the deadline on its own clock and the gateway turns `time_remaining()` back
    # into wall time: the two clocks may drift apart during the call (one CI run: 0.098 s).
    clock_slack_s = 0.5
    assert deadline is not None and before + 15 < deadline <= time.time() + 20 + clock_slack_s


def _exhausted(shard: _NeverExact) -> Any:
    async def search(*args: Any) -> ShardHits:
        shard.deadlines.append(args[5])
        return ShardHits(np.zeros(0, dtype=np.float32), (), exhausted=True)

    return search


async def test_a_call_without_a_deadline_sends_the_default_one_to_the_shards() -> None:
    shard = _NeverExact()
    shard.search = _exhausted(shard)  # type: ignore[method-assign]
    async with gateway(shards=[shard], default_timeout_s=7) as (port, _):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = search_pb2_grpc.SearchServiceStub(channel)
            before = time.time()
            await stub.Search(_request())  # no client deadline
    (deadline,) = shard.deadlines
    assert deadline is not None and before + 5 < deadline <= time.time() + 7
