"""A direct encode channel from the gateway to an encoder replica on the same machine.

A Serve handle call cost 5.5-7.6 ms per item at low load (more than the rest of the path
outside the model), and under load every per-item call costs the gateway CPU the model
needs. So each replica also answers encode requests on a Unix socket, served on the event
loop its Serve methods run on: every item goes through the same `encode_text` /
`encode_image` as a handle call (validation, cache, batch queues, histograms, phase log).
Stats, reconfiguration and health still go through Serve; a gateway on another node, or
one that lost the socket, uses the handle.

As in `index_service.channel` (whose framing and error encoding this reuses): an abstract
Unix socket (nothing to clean up after a kill -9), peers of other users refused
(SO_PEERCRED), frames of a 4-byte length and a body of an 8-byte request id + `marshal` of
plain builtins, never pickle.

  request: id | (kind, items)   kind "text": [(text, template | None, long_text | None), ...]
                                kind "image": [encoded image bytes, ...]
                                kind "cancel": None (cancels request `id`; no reply follows)
  reply:   id | [(True, float32 vector bytes) | (False, (error class name, message)), ...]

Requests on one connection run concurrently and replies come back as they finish (a text
must not wait behind an image batch), matched by id.

At low load a call costs ~0.6 ms beyond the replica's own time for its item (a shard's
channel ~0.1 ms), and not in this code: the same client and server in two plain processes
answer in 0.11-0.13 ms when the handler returns at once, and in 0.58-0.66 ms beyond the
handler's own time when it first waits 40-100 ms on a thread (as a forward does). What
costs is resuming after a long idle wait (on this VM), not the framing; a shard's searches
are too short for that.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import marshal
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any, cast

import numpy as np

from clipsearch.errors import ResourceExhausted, Unavailable
from clipsearch.types import TextOptions
from index_service.channel import (
    MAX_FRAME,
    connect_unix,
    decode_answers,
    encode_answers,
    frame,
    supported,
)

__all__ = ["EncodeChannelClient", "EncodeChannelServer", "pack_text", "supported", "unpack_text"]

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">I")
_ID = struct.Struct(">Q")
_PEERCRED = struct.Struct("3i")  # pid, uid, gid
Answer = np.ndarray | BaseException
Handler = Callable[[str, list[Any]], Awaitable[list[Answer]]]


class _Frames:
    """Splits a byte stream into frame bodies."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """The bodies completed by `data`; ValueError for a length no peer of ours sends."""
        buffer = self._buffer
        buffer += data
        bodies, start = [], 0
        while len(buffer) - start >= _HEADER.size:
            (size,) = _HEADER.unpack_from(buffer, start)
            if size > MAX_FRAME or size < _ID.size:
                raise ValueError(f"encode channel: frame of {size} bytes refused")
            end = start + _HEADER.size + size
            if len(buffer) < end:
                break
            bodies.append(bytes(buffer[start + _HEADER.size : end]))
            start = end
        del buffer[:start]
        return bodies


def _message(request_id: int, payload: bytes) -> bytes:
    return frame(_ID.pack(request_id) + payload)


class EncodeChannelServer:
    """Serves `handler(kind, items)` on an abstract Unix socket, on the running event loop.

    Args:
        handler: One answer per item, in order: a vector, or the exception that item raised.
        name: Part of the socket's name (for people reading `ss -xl`).
        max_items: Items in the replica through this server at once; a request past it is
            answered RESOURCE_EXHAUSTED, as Serve answers one past its queue.
    """

    def __init__(self, handler: Handler, name: str, max_items: int) -> None:
        self._handler = handler
        self.max_items = max_items
        self.items = 0  # in the replica now
        self.requests = 0  # answered or being answered since start (observability, tests)
        self.items_total = 0
        # A leading NUL puts the name in the abstract namespace; a random part keeps a
        # restarted replica from meeting a stale peer's expectations.
        self.address = f"\0clipsearch-{name}-{os.getpid()}-{os.urandom(6).hex()}"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.address)
        self._sock.listen(64)  # connections queue here until `start` serves them
        self._sock.setblocking(False)
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        """Accept connections on the running loop (the replica's). If that fails the socket
        closes, so that no gateway waits on a channel nobody serves."""
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_unix_server(lambda: _Connection(self), sock=self._sock)
        except Exception:
            log.exception("encode channel: not served; gateways will use the Serve handle")
            self._sock.close()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        else:
            self._sock.close()

    async def answer(self, kind: str, items: list[Any]) -> bytes:
        """The reply payload for one request (every item failed alone if the call did)."""
        if self.items + len(items) > self.max_items:
            busy = ResourceExhausted("the encoder is overloaded; retry with backoff")
            return encode_answers([busy] * len(items))
        self.items += len(items)
        self.requests += 1
        self.items_total += len(items)
        try:
            answers = await self._handler(kind, items)
        except Exception as exc:  # a bug, or a malformed request: every item fails, loudly
            log.exception("encode channel: a request failed")
            answers = [RuntimeError(str(exc) or type(exc).__name__)] * len(items)
        finally:
            self.items -= len(items)
        wire = [a if isinstance(a, BaseException) else _vector_bytes(a) for a in answers]
        return encode_answers(cast(Any, wire))


class _Connection(asyncio.Protocol):
    """One gateway connection on the replica's side: each request a task of its own."""

    def __init__(self, server: EncodeChannelServer) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._frames = _Frames()
        self._tasks: dict[int, asyncio.Task[None]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        pid, uid, _gid = _PEERCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        )
        if uid != os.getuid():
            log.warning("encode channel: refused a peer running as uid %d (pid %d)", uid, pid)
            transport.close()
            return
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._transport is None:
            return
        try:
            bodies = self._frames.feed(data)
            for body in bodies:
                self._request(_ID.unpack_from(body)[0], marshal.loads(body[_ID.size :]))
        except (ValueError, EOFError, TypeError) as exc:  # not our gateway speaking
            log.warning("encode channel: closing a connection: %s", exc)
            self._transport.close()

    def _request(self, request_id: int, request: tuple[str, Any]) -> None:
        kind, items = request
        if kind == "cancel":
            task = self._tasks.pop(request_id, None)
            if task is not None:
                task.cancel()  # its items leave their batch queues, as on a handle cancel
            return
        if not isinstance(items, list):
            raise TypeError("malformed request")
        task = asyncio.get_running_loop().create_task(self._reply(request_id, kind, items))
        self._tasks[request_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(request_id, None))

    async def _reply(self, request_id: int, kind: str, items: list[Any]) -> None:
        payload = await self._server.answer(kind, items)
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(_message(request_id, payload))

    def connection_lost(self, exc: Exception | None) -> None:
        for task in list(self._tasks.values()):  # the gateway went away: so did its callers
            task.cancel()
        self._tasks.clear()


class EncodeChannelClient(asyncio.Protocol):
    """The gateway's end of one replica's channel.

    `call` sends one request and awaits its answers (a vector, or an exception, per item).
    When the connection drops (the replica died or restarted), every call waiting fails with
    Unavailable and `closed` turns True: the caller may send those items another way
    (encoding is idempotent).
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self.closed = False
        self.in_flight = 0  # items sent and not yet answered (for least-loaded choice)
        self.items_total = 0  # items sent since connecting (observability, tests)
        self._transport: asyncio.Transport | None = None
        self._frames = _Frames()
        self._pending: dict[int, asyncio.Future[bytes]] = {}
        self._ids = itertools.count()

    @classmethod
    async def connect(cls, address: str, what: str) -> EncodeChannelClient:
        return await connect_unix(address, lambda: cls(what))

    async def call(self, kind: str, items: list[Any]) -> list[np.ndarray | BaseException]:
        """One answer per item, in order; Unavailable if the connection is or goes down.
        Cancelling the call cancels its items in the replica."""
        if self.closed or self._transport is None:
            raise Unavailable(f"{self.what} is unavailable; retry shortly")
        request_id = next(self._ids)
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        self._transport.write(_message(request_id, marshal.dumps((kind, items))))
        self.in_flight += len(items)
        self.items_total += len(items)
        try:
            body = await future
        except asyncio.CancelledError:
            if self._pending.pop(request_id, None) is not None and not self.closed:
                self._transport.write(_message(request_id, marshal.dumps(("cancel", None))))
            raise
        finally:
            self.in_flight -= len(items)
        answers = decode_answers(body, self.what)
        return [a if isinstance(a, BaseException) else _vector(a) for a in answers]

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            bodies = self._frames.feed(data)
        except ValueError as exc:  # a broken peer: fail what waits, use another way
            log.warning("%s: %s", self.what, exc)
            self.close()
            return
        for body in bodies:
            future = self._pending.pop(_ID.unpack_from(body)[0], None)
            if future is not None and not future.done():  # else its caller went away
                future.set_result(body[_ID.size :])

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(Unavailable(f"{self.what} is unavailable; retry shortly"))


def pack_text(text: str, options: TextOptions | None) -> tuple[str, str | None, str | None]:
    """A text item as the channel carries it: (text, template, long_text)."""
    if options is None:
        return text, None, None
    return text, options.prompt_template, options.long_text


def unpack_text(item: Any) -> tuple[Any, TextOptions | None]:
    """A channel's text item back into `encode_text`'s arguments."""
    text, template, long_text = item
    options = None if template is None and long_text is None else TextOptions(template, long_text)
    return text, options


def _vector_bytes(vector: np.ndarray) -> bytes:
    return vector.astype(np.float32, copy=False).tobytes()


def _vector(value: Any) -> np.ndarray:
    """A vector's bytes back into a (dim,) float32 array."""
    return np.frombuffer(value, dtype=np.float32)
