"""A direct search channel from the gateway to a shard actor on the same machine.

A Ray actor call costs the gateway ~0.5 ms of Python to submit and 1.5-2 ms of round trip,
while a shard answers an ANN query in ~0.1-0.5 ms: on the served search path the call, not
Faiss, was most of the cost. So a shard actor also answers searches on a Unix socket, and a
gateway on the same node sends them there (~0.1 ms round trip); everything else (writes,
stats, recovery, restarts) still goes through Ray, and a gateway on another node, or one
that lost the socket, uses the actor call.

The socket lives in Linux's abstract namespace (no file to clean up after a kill -9) and
the server accepts only peers running as its own user (SO_PEERCRED), who could read the
shard's files anyway. Frames are a 4-byte big-endian length and a `marshal` body of plain
builtins, never pickle: no bytes a peer sends can run code.

  request:  [SearchRequest, ...]             (index_service.wire)
  reply:    [(True, SearchReply) | (False, (error class name, message)), ...]

Each connection is served by one thread, in order, so replies come back in request order.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import marshal
import os
import socket
import struct
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from clipsearch import errors
from clipsearch.errors import ClipsearchError, Unavailable
from index_service import wire

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">I")
MAX_FRAME = 256 * 1024 * 1024  # far above any real batch; a larger length is a broken peer
_PEERCRED = struct.Struct("3i")  # pid, uid, gid
_ERRORS: dict[str, type[ClipsearchError]] = {
    cls.__name__: cls
    for cls in vars(errors).values()
    if isinstance(cls, type) and issubclass(cls, ClipsearchError)
}

Answer = wire.SearchReply | Exception
Handler = Callable[[Sequence[wire.SearchRequest]], Sequence[Answer]]


def supported() -> bool:
    """Abstract Unix sockets and SO_PEERCRED are Linux's."""
    return sys.platform.startswith("linux")


def encode_answers(answers: Sequence[Answer]) -> bytes:
    """A reply frame body."""
    items = [
        (False, (type(a).__name__, str(a))) if isinstance(a, BaseException) else (True, a)
        for a in answers
    ]
    return marshal.dumps(items)


def decode_answers(body: bytes, what: str) -> list[wire.SearchReply | BaseException]:
    """A reply frame body back into answers; a remote error is raised again as its class."""
    answers: list[wire.SearchReply | BaseException] = []
    for ok, value in marshal.loads(body):
        if ok:
            answers.append(value)
        else:
            name, message = value
            cls = _ERRORS.get(name)
            answers.append(cls(message) if cls else RuntimeError(f"{what} failed: {message}"))
    return answers


def frame(body: bytes) -> bytes:
    return _HEADER.pack(len(body)) + body


class ChannelServer:
    """Serves `handler` on an abstract Unix socket, one thread per connection."""

    def __init__(self, handler: Handler, name: str) -> None:
        self._handler = handler
        # A leading NUL puts the name in the abstract namespace; a random part keeps a
        # restarted actor from meeting a stale peer's expectations.
        self.address = f"\0clipsearch-{name}-{os.getpid()}-{os.urandom(6).hex()}"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.address)
        self._sock.listen(64)
        self._closed = False
        self._uid = os.getuid()
        threading.Thread(target=self._accept, name=f"channel-{name}", daemon=True).start()

    def close(self) -> None:
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            pid, uid, _gid = _PEERCRED.unpack(
                conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            )
            if uid != self._uid:
                log.warning("search channel: refused a peer running as uid %d (pid %d)", uid, pid)
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    header = _recv_exact(conn, _HEADER.size)
                    if header is None:
                        return  # the gateway closed the connection
                    (size,) = _HEADER.unpack(header)
                    if size > MAX_FRAME:
                        log.warning("search channel: frame of %d bytes refused", size)
                        return
                    body = _recv_exact(conn, size)
                    if body is None:
                        return
                    conn.sendall(frame(self._answer(body)))
                except OSError:
                    return

    def _answer(self, body: bytes) -> bytes:
        try:
            requests = marshal.loads(body)
        except (EOFError, ValueError, TypeError):
            log.warning("search channel: a malformed frame")
            return encode_answers([RuntimeError("malformed search frame")])
        try:
            return encode_answers(self._handler(requests))
        except Exception as exc:  # a bug: every item of the batch fails, loudly
            log.exception("search channel: a batch failed")
            return encode_answers([RuntimeError(str(exc) or type(exc).__name__)] * len(requests))


def _recv_exact(conn: socket.socket, size: int) -> bytes | None:
    """Exactly `size` bytes, or None if the peer closed first."""
    chunks = []
    while size:
        chunk = conn.recv(min(size, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


P = TypeVar("P", bound=asyncio.Protocol)
R = TypeVar("R")
Then = Callable[[list[wire.SearchReply | BaseException]], R]
_Pending = tuple["asyncio.Future[R]", Then[R]]


async def connect_unix(address: str, protocol_factory: Callable[[], P]) -> P:
    """A protocol connected to the (abstract) Unix socket `address` on the running loop."""
    loop = asyncio.get_running_loop()
    # Connected here, not by the loop: uvloop (libuv) cannot name an abstract address.
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await loop.sock_connect(sock, address)
        _, protocol = await loop.create_unix_connection(protocol_factory, sock=sock)
    except BaseException:
        sock.close()
        raise
    return protocol


class ChannelClient(asyncio.Protocol):
    """The gateway's end: `send` writes a batch at once and returns a future of its answers.

    When the connection drops (the shard died or restarted), every call waiting fails with
    Unavailable, as an actor call to a dead actor does, and `closed` turns True.
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self.closed = False
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._pending: collections.deque[_Pending[Any]] = collections.deque()

    @classmethod
    async def connect(cls, address: str, what: str) -> ChannelClient:
        return await connect_unix(address, lambda: cls(what))

    def send(self, requests: list[wire.SearchRequest], then: Then[R]) -> asyncio.Future[R]:
        """Writes the batch now; the future gets `then(answers)`, or what `then` raises.

        `then` runs as the reply is read (no task, no extra step of the event loop: a caller
        turns the answers into what it needs right there). A closed channel fails the
        future with Unavailable. Cancelling the future leaves its place in the queue
        (replies come back in order); the shard still answers it.
        """
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        if self.closed or self._transport is None:
            future.set_exception(Unavailable(f"{self.what} is unavailable; retry shortly"))
            return future
        self._pending.append((future, then))
        self._transport.write(frame(marshal.dumps(requests)))
        return future

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        while len(buffer) - start >= _HEADER.size:
            (size,) = _HEADER.unpack_from(buffer, start)
            end = start + _HEADER.size + size
            if len(buffer) < end:
                break
            body = bytes(buffer[start + _HEADER.size : end])
            start = end
            future, then = self._pending.popleft()
            if future.done():
                continue  # its caller went away
            try:
                future.set_result(then(decode_answers(body, self.what)))
            except Exception as exc:  # a reply this end cannot read, or an answer an error
                future.set_exception(exc)
        del buffer[:start]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        while self._pending:
            future, _ = self._pending.popleft()
            if not future.done():
                future.set_exception(Unavailable(f"{self.what} is unavailable; retry shortly"))
