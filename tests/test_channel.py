"""The direct search channel: a shard actor answers searches on its socket exactly as its
actor method does, errors keep their class, and a dropped connection fails its callers with
Unavailable instead of hanging them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clipsearch.errors import DeadlineExceeded, Unavailable
from clipsearch.settings import IndexSettings
from clipsearch.types import DocRecord, DocWrite, Modality, SearchFilter, ShardHits
from gateway.backends import RayShard
from gateway.coordinator import Coordinator, SearchQuery
from index_service import channel, wire
from index_service.actor import ShardActor
from index_service.channel import ChannelClient, ChannelServer
from tests.fakes import HashEncoder, unit_vectors

pytestmark = pytest.mark.skipif(not channel.supported(), reason="Linux only")

DIM = 16


@pytest.fixture
def actor(tmp_path: Path) -> Iterator[ShardActor]:
    a = ShardActor(0, DIM, IndexSettings(), str(tmp_path), "m")
    vecs = unit_vectors(60, DIM, seed=1)
    a.upsert(
        [
            DocWrite(DocRecord(f"d{i}", float(i), {"g": str(i % 3)}), image_vector=vecs[i])
            for i in range(60)
        ]
    )
    yield a
    a.close()


def _request(i: int, deadline: float | None = None, flt: SearchFilter | None = None) -> tuple:
    query = unit_vectors(1, DIM, seed=100 + i)[0]
    return wire.pack_request(Modality.IMAGE, query, 5, flt, None, deadline)


def _send(client: ChannelClient, requests: list[Any]) -> asyncio.Future[list[Any]]:
    """The batch's answers as they arrive (the shard backend turns them into hits there)."""
    return client.send(requests, list)


def _address(actor: ShardActor) -> str:
    assert actor._channel is not None  # on by default
    return actor._channel.address


@pytest.fixture
async def client(actor: ShardActor) -> AsyncIterator[ChannelClient]:
    """The gateway's end of `actor`'s channel."""
    c = await ChannelClient.connect(_address(actor), "shard 0")
    yield c
    c.close()


async def test_channel_answers_what_the_actor_method_answers(
    actor: ShardActor, client: ChannelClient
) -> None:
    requests = [
        _request(i, flt=SearchFilter((("g", "1"),), 3.0, 50.0) if i % 2 else None) for i in range(6)
    ]
    got = await _send(client, requests)
    want = [actor.search_packed(r) for r in requests]
    assert [wire.unpack_hits(g).records for g in got] == [wire.unpack_hits(w).records for w in want]
    for g, w in zip(got, want, strict=True):  # alike searches in one call are scored as a
        # batch (one matrix product), a lone one by per-vector sums: equal to float rounding
        np.testing.assert_allclose(
            wire.unpack_hits(g).similarities, wire.unpack_hits(w).similarities, rtol=0, atol=1e-6
        )
    assert all(len(wire.unpack_hits(g).records) == 5 for g in got)
    assert all(r.metadata["g"] == "1" for r in wire.unpack_hits(got[1]).records)


async def test_an_item_past_its_deadline_fails_alone_with_its_own_error_class(
    actor: ShardActor, client: ChannelClient
) -> None:
    late = _request(0, deadline=time.time() - 1)
    live = _request(1, deadline=time.time() + 60)
    answers = await _send(client, [live, late, live])
    assert isinstance(answers[1], DeadlineExceeded)
    assert "deadline" in str(answers[1])
    assert len(wire.unpack_hits(answers[0]).records) == 5
    assert answers[0] == answers[2]
    assert actor.skipped() == 1


async def test_many_concurrent_calls_each_get_their_own_answer(
    actor: ShardActor, client: ChannelClient
) -> None:
    requests = [_request(i) for i in range(50)]
    got = await asyncio.gather(*(_send(client, [r]) for r in requests))
    assert [g[0] for g in got] == [actor.search_packed(r) for r in requests]


async def test_a_caller_that_goes_away_does_not_shift_the_next_answer(
    actor: ShardActor, client: ChannelClient
) -> None:
    first = asyncio.ensure_future(_send(client, [_request(0)]))
    second = asyncio.ensure_future(_send(client, [_request(1)]))
    await asyncio.sleep(0)
    first.cancel()
    assert (await second)[0] == actor.search_packed(_request(1))
    assert (await _send(client, [_request(2)]))[0] == actor.search_packed(_request(2))


async def test_a_handler_bug_fails_every_item_and_the_channel_keeps_serving() -> None:
    calls = 0

    def handler(requests: object) -> list[object]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise KeyError("boom")
        return [(b"", (), True)] * len(requests)  # type: ignore[arg-type]

    server = ChannelServer(handler, "test")
    client = await ChannelClient.connect(server.address, "shard 9")
    try:
        answers = await _send(client, [_request(0), _request(1)])
        assert all(isinstance(a, RuntimeError) and "shard 9 failed" in str(a) for a in answers)
        assert await _send(client, [_request(0)]) == [(b"", (), True)]
    finally:
        client.close()
        server.close()


async def test_a_dropped_connection_fails_waiting_calls_with_unavailable() -> None:
    started = asyncio.Event()
    loop = asyncio.get_running_loop()

    def handler(requests: object) -> list[object]:
        loop.call_soon_threadsafe(started.set)
        time.sleep(0.2)
        return [(b"", (), True)]

    server = ChannelServer(handler, "test")
    client = await ChannelClient.connect(server.address, "shard 3")
    call = asyncio.ensure_future(_send(client, [_request(0)]))
    await asyncio.wait_for(started.wait(), 5)
    client._transport.abort()  # type: ignore[union-attr]  # as when the shard's process dies
    with pytest.raises(Unavailable, match="shard 3 is unavailable"):
        await asyncio.wait_for(call, 5)
    assert client.closed
    with pytest.raises(Unavailable):
        await _send(client, [_request(0)])
    server.close()


async def test_a_closed_server_refuses_new_connections() -> None:
    server = ChannelServer(lambda r: [], "test")
    server.close()
    with pytest.raises(OSError):
        await ChannelClient.connect(server.address, "shard 0")


async def test_a_peer_of_another_user_is_refused() -> None:
    server = ChannelServer(lambda r: [(b"", (), True)] * len(r), "test")  # type: ignore[arg-type]
    server._uid = -1  # as if the server ran as another user than this client
    client = await ChannelClient.connect(server.address, "shard 0")
    try:
        with pytest.raises(Unavailable):
            await asyncio.wait_for(_send(client, [_request(0)]), 5)
    finally:
        client.close()
        server.close()


def test_the_channel_is_off_when_the_settings_say_so(tmp_path: Path) -> None:
    a = ShardActor(0, DIM, IndexSettings(search_channel=False), str(tmp_path), "m")
    try:
        assert a._channel is None and a.search_channel() is None
    finally:
        a.close()


@pytest.fixture
async def backend(client: ChannelClient) -> RayShard:
    """The gateway's shard backend with `client` as its open channel."""
    shard = RayShard(object(), 0)
    shard._channel = client
    return shard


def _search(backend: RayShard, i: int, deadline: float | None = None) -> asyncio.Future[ShardHits]:
    return backend.search(
        Modality.IMAGE, unit_vectors(1, DIM, seed=100 + i)[0], 5, None, None, deadline
    )


async def test_shard_searches_started_together_answer_as_the_actor_does(
    actor: ShardActor, backend: RayShard
) -> None:
    started = [_search(backend, i) for i in range(12)]
    assert backend.channel_calls == 2  # two on the wire before anything was awaited
    got = await asyncio.gather(*started)
    want = [wire.unpack_hits(actor.search_packed(_request(i))) for i in range(12)]
    assert [g.records for g in got] == [w.records for w in want]
    # two went alone; the rest waited for the first answer and went as one batch
    assert (backend.searches.alone, backend.searches.batches) == (2, {10: 1})
    assert backend.channel_calls == 3


async def test_a_shard_search_error_or_cancellation_reaches_only_its_own_caller(
    actor: ShardActor, backend: RayShard
) -> None:
    late = _search(backend, 0, deadline=time.time() - 1)
    left_after_sending = _search(backend, 1)
    left_while_waiting = _search(backend, 2)
    kept = _search(backend, 3)
    left_after_sending.cancel()
    left_while_waiting.cancel()
    with pytest.raises(DeadlineExceeded):
        await late
    assert (await kept).records == wire.unpack_hits(actor.search_packed(_request(3))).records
    assert backend.searches.batches == {1: 1}  # the search cancelled while waiting never went
    assert actor.skipped() == 1


async def test_a_shard_whose_channel_drops_mid_search_is_unavailable_or_left_out() -> None:
    started = asyncio.Event()
    loop = asyncio.get_running_loop()

    def empty(requests: Sequence[Any]) -> list[Any]:
        return [(b"", (), True)] * len(requests)

    def slow(requests: Sequence[Any]) -> list[Any]:
        loop.call_soon_threadsafe(started.set)
        time.sleep(0.2)
        return empty(requests)

    servers = [ChannelServer(empty, "up"), ChannelServer(slow, "dying")]
    shards = [RayShard(object(), n) for n in range(2)]
    for n, (shard, server) in enumerate(zip(shards, servers, strict=True)):
        shard._channel = await ChannelClient.connect(server.address, f"shard {n}")
    coordinator = Coordinator(HashEncoder(DIM), shards)
    try:
        for partial in (False, True):
            started.clear()
            query = SearchQuery(
                Modality.IMAGE, 5, vector=np.ones(DIM, np.float32), allow_partial=partial
            )
            search = asyncio.ensure_future(coordinator.search(query))
            await asyncio.wait_for(started.wait(), 5)
            shards[1]._channel._transport.abort()  # type: ignore[union-attr]  # the shard died
            if partial:
                out = await asyncio.wait_for(search, 5)
                assert out.missing_shards == (1,) and out.shards_answered == 1
            else:
                with pytest.raises(Unavailable, match="shard 1 is unavailable"):
                    await asyncio.wait_for(search, 5)
                shards[1]._channel = await ChannelClient.connect(servers[1].address, "shard 1")
    finally:
        for shard in shards:
            shard._channel.close()  # type: ignore[union-attr]
        for server in servers:
            server.close()


class _Remote:
    """An actor method whose `.remote()` returns an awaitable of `value` and counts calls."""

    def __init__(self, value: object) -> None:
        self.value, self.calls = value, 0

    def remote(self, *args: object) -> object:
        self.calls += 1

        async def answer() -> object:
            return self.value

        return answer()


async def test_a_shard_on_another_node_is_searched_by_actor_calls_and_not_asked_each_second(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import ray

    class Context:
        def get_node_id(self) -> str:
            return "this-node"

    monkeypatch.setattr(ray, "get_runtime_context", Context)
    reply = wire.pack_hits(wire.unpack_hits((b"", (), True)))

    class Actor:
        search_channel = _Remote(("other-node", "\0nowhere"))
        search_packed = _Remote(reply)

    backend = RayShard(Actor(), 0)
    assert not await backend.connect()
    monkeypatch.setattr(RayShard, "RECONNECT_S", 0.0)
    for _ in range(5):
        hits = await backend.search(Modality.IMAGE, np.ones(DIM, dtype=np.float32), 5, None)
        assert hits.exhausted
        await asyncio.sleep(0)
    assert Actor.search_packed.calls == 5 and backend.channel_calls == 0
    assert Actor.search_channel.calls == 1  # asked once, not before RECHECK_S
