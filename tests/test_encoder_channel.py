"""The encoder's direct channel on its own (no Ray): framing, ids, errors, cancel, overload,
a dropped connection, and the gateway's choice among replicas' channels."""

from __future__ import annotations

import asyncio
import marshal
import os
import socket
import struct
from typing import Any

import numpy as np
import pytest

from clipsearch.errors import InvalidArgument, ResourceExhausted, Unavailable
from clipsearch.types import TextOptions
from encoder_service.channel import (
    EncodeChannelClient,
    EncodeChannelServer,
    _Frames,
    pack_text,
    supported,
    unpack_text,
)
from encoder_service.channel_pool import ChannelPool

pytestmark = [
    pytest.mark.skipif(not supported(), reason="abstract Unix sockets are Linux's"),
    pytest.mark.timeout(30),
]


class FakeReplica:
    """Answers like a replica: text "slow ..." waits for `release`, "bad" is invalid."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.cancelled = 0
        self.seen: list[tuple[str, list[Any]]] = []

    async def handle(self, kind: str, items: list[Any]) -> list[np.ndarray | BaseException]:
        self.seen.append((kind, items))
        answers: list[np.ndarray | BaseException] = []
        for item in items:
            text = unpack_text(item)[0] if kind == "text" else item.decode()
            if text.startswith("slow"):
                try:
                    await self.release.wait()
                except asyncio.CancelledError:
                    self.cancelled += 1
                    raise
            if text == "bad":
                answers.append(InvalidArgument("text is empty or only whitespace"))
            else:
                answers.append(np.full(4, len(text), dtype=np.float32))
        return answers


async def serve(replica: FakeReplica, max_items: int = 100) -> EncodeChannelServer:
    server = EncodeChannelServer(replica.handle, "test", max_items)
    await server.start()
    return server


async def test_items_round_trip_with_their_errors_in_place() -> None:
    server = await serve(FakeReplica())
    client = await EncodeChannelClient.connect(server.address, "the encoder")
    answers = await client.call("text", [pack_text("ab", None), pack_text("bad", None)])
    assert answers[0].dtype == np.float32 and answers[0].tolist() == [2.0] * 4
    assert isinstance(answers[1], InvalidArgument)
    assert str(answers[1]) == "text is empty or only whitespace"
    (image,) = await client.call("image", [b"xyz"])
    assert image.tolist() == [3.0] * 4
    assert (server.requests, server.items_total, server.items) == (2, 3, 0)
    client.close()
    server.close()


def test_text_options_cross_as_plain_values() -> None:
    assert unpack_text(pack_text("t", None)) == ("t", None)
    options = TextOptions("a photo of {}", "reject")
    assert unpack_text(marshal.loads(marshal.dumps(pack_text("t", options)))) == ("t", options)


async def test_a_fast_reply_overtakes_a_slow_one_on_the_same_connection() -> None:
    replica = FakeReplica()
    server = await serve(replica)
    client = await EncodeChannelClient.connect(server.address, "the encoder")
    slow = asyncio.ensure_future(client.call("text", [pack_text("slow one", None)]))
    fast = await client.call("text", [pack_text("fast", None)])
    assert fast[0][0] == 4.0 and not slow.done()
    replica.release.set()
    assert (await slow)[0][0] == 8.0
    server.close()


async def test_a_cancelled_call_cancels_its_items_and_leaves_the_connection_usable() -> None:
    replica = FakeReplica()
    server = await serve(replica)
    client = await EncodeChannelClient.connect(server.address, "the encoder")
    slow = asyncio.ensure_future(client.call("text", [pack_text("slow", None)]))
    await asyncio.sleep(0.05)
    assert server.items == 1
    slow.cancel()
    for _ in range(100):  # bounded: the cancel frame reaches the replica's loop
        if replica.cancelled:
            break
        await asyncio.sleep(0.01)
    assert replica.cancelled == 1 and server.items == 0
    assert client.in_flight == 0
    assert (await client.call("text", [pack_text("after", None)]))[0][0] == 5.0
    server.close()


async def test_items_past_the_limit_are_resource_exhausted() -> None:
    replica = FakeReplica()
    server = await serve(replica, max_items=2)
    client = await EncodeChannelClient.connect(server.address, "the encoder")
    held = asyncio.ensure_future(client.call("text", [pack_text("slow", None)] * 2))
    await asyncio.sleep(0.05)
    (refused,) = await client.call("text", [pack_text("one more", None)])
    assert isinstance(refused, ResourceExhausted)
    assert str(refused) == "the encoder is overloaded; retry with backoff"
    replica.release.set()
    assert len(await held) == 2
    server.close()


async def test_a_dropped_connection_fails_waiting_calls_as_unavailable() -> None:
    loop = asyncio.get_running_loop()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    address = f"\0clipsearch-test-drop-{os.getpid()}-{os.urandom(4).hex()}"
    listener.bind(address)
    listener.listen(1)
    listener.setblocking(False)
    client = await EncodeChannelClient.connect(address, "the encoder")
    conn, _ = await loop.sock_accept(listener)
    waiting = asyncio.ensure_future(client.call("text", [pack_text("x", None)]))
    assert await loop.sock_recv(conn, 4)  # the request left; the "replica" dies
    conn.close()
    listener.close()
    with pytest.raises(Unavailable, match="the encoder is unavailable"):
        await waiting
    assert client.closed and client.in_flight == 0
    with pytest.raises(Unavailable):
        await client.call("text", [pack_text("x", None)])


async def test_a_malformed_frame_closes_only_that_connection() -> None:
    server = await serve(FakeReplica())
    loop = asyncio.get_running_loop()
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.setblocking(False)
    await loop.sock_connect(raw, server.address)
    body = struct.pack(">Q", 1) + b"\xff not marshal"
    await loop.sock_sendall(raw, struct.pack(">I", len(body)) + body)
    assert await asyncio.wait_for(loop.sock_recv(raw, 16), 5) == b""  # closed by the server
    raw.close()
    client = await EncodeChannelClient.connect(server.address, "the encoder")
    assert (await client.call("image", [b"ok"]))[0][0] == 2.0
    server.close()


def test_frames_split_across_reads_and_oversize_lengths_refused() -> None:
    frames = _Frames()
    body = struct.pack(">Q", 7) + b"payload"
    stream = struct.pack(">I", len(body)) + body
    assert frames.feed(stream[:3]) == [] and frames.feed(stream[3:9]) == []
    assert frames.feed(stream[9:] + stream) == [body, body]
    with pytest.raises(ValueError, match="refused"):
        frames.feed(struct.pack(">I", 2**31))


async def test_the_pool_picks_the_least_loaded_channel_and_follows_the_replica_set() -> None:
    replicas = [FakeReplica(), FakeReplica()]
    servers = [await serve(r) for r in replicas]
    addresses = {s.address for s in servers}
    pool = ChannelPool(lambda: _answer(sorted(addresses)), "the encoder")
    assert await pool.refresh() == 2
    first = pool.pick()
    assert first is not None
    held = asyncio.ensure_future(first.call("text", [pack_text("slow", None)]))
    await asyncio.sleep(0.05)
    second = pool.pick()
    assert second is not None and second is not first
    # The busy replica drops out of an answer: its channel stays while in use.
    addresses -= {a for a, c in pool._clients.items() if c is first}
    assert await pool.refresh() == 2
    for replica in replicas:
        replica.release.set()
    assert (await held)[0][0] == 4.0
    assert await pool.refresh() == 1 and pool.pick() is second
    for server in servers:
        server.close()
    pool.close()


async def test_the_pool_opens_channels_in_the_background_and_survives_a_dead_address() -> None:
    server = await serve(FakeReplica())
    gone = f"\0clipsearch-gone-{os.getpid()}"
    pool = ChannelPool(lambda: _answer([gone, server.address]), "the encoder")
    assert pool.pick() is None  # nothing open yet: the caller uses the handle
    for _ in range(100):
        if pool.open_channels:
            break
        await asyncio.sleep(0.01)
    client = pool.pick()
    assert client is not None and (await client.call("image", [b"abc"]))[0][0] == 3.0
    server.close()
    pool.close()


async def _answer(value: list[str]) -> list[str]:
    return value
