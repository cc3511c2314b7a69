"""Coalescing concurrent calls to one remote worker into batched calls.

A Ray actor call costs ~0.5 ms of the gateway's CPU and ~1 ms of round trip whatever it
carries, while a shard answers a query in ~0.1 ms. So under concurrent load the gateway
sends each shard at most `max_in_flight` calls: a request that finds a free slot goes out
alone at once (no added latency at low load); the others wait, and each time a call
returns, everything that waited (up to `max_batch`) goes out as one call. Like Nagle's
algorithm, the batch size follows the load, with no timer.

A caller that goes away while waiting is dropped before its batch is sent; once sent, its
item runs (the remote side refuses items whose deadline passed).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Generic, TypeVar

Req = TypeVar("Req")
Rep = TypeVar("Rep")

SendOne = Callable[[Req], Awaitable[Rep]]
# One answer per request, in order; an item that failed on its own is its exception.
SendMany = Callable[[list[Req]], Awaitable[Sequence[Rep | BaseException]]]
_Waiter = tuple[Req, "asyncio.Future[Rep]"]


class Coalescer(Generic[Req, Rep]):
    """Sends requests through `send_one` when a slot is free, else batched via `send_many`.

    Args:
        send_one: one request, one call (its cancellation cancels the remote work).
        send_many: several requests in one call; a failure of the whole call fails them all.
        max_in_flight: calls outstanding at once (2 keeps a serial worker busy while the
            next batch travels).
        max_batch: most requests in one batched call.

    Either may return a coroutine or a future of a call already sent; a coroutine
    `send_many` runs as a task of its own. Both limits may be changed at run time (a very
    large `max_in_flight` sends every call alone: the benchmark's baseline).
    """

    def __init__(
        self,
        send_one: SendOne[Req, Rep],
        send_many: SendMany[Req, Rep],
        max_in_flight: int = 2,
        max_batch: int = 64,
    ) -> None:
        if max_in_flight < 1 or max_batch < 1:
            raise ValueError("max_in_flight and max_batch must be >= 1")
        self._send_one = send_one
        self._send_many = send_many
        self.max_in_flight = max_in_flight
        self.max_batch = max_batch
        self._in_flight = 0
        self._waiting: list[_Waiter[Req, Rep]] = []  # a cancelled one is skipped when sent
        self._sent: set[asyncio.Future[Sequence[Rep | BaseException]]] = set()  # kept referenced
        self.batches: dict[int, int] = {}  # batch size -> batched calls sent (observability)
        self.alone = 0  # calls sent alone, through send_one (observability)

    async def call(self, request: Req) -> Rep:
        """The answer to `request`, sent alone (from the caller's own task) or with others."""
        if not self._slot_free():
            return await self._wait(request)
        self._take_slot()
        try:
            return await self._send_one(request)
        finally:
            self._done()

    def start(self, request: Req) -> asyncio.Future[Rep]:
        """As `call`, but sent (or queued) now, the answer coming as a future.

        When `send_one` returns a future, nothing here needs a task: a caller can start
        several requests and then await them all (a search's fan-out to its shards). A
        coroutine `send_one` runs as a task. Cancelling the future is leaving: a waiting
        request is dropped, a sent one's future from `send_one` is cancelled.
        """
        if not self._slot_free():
            return self._wait(request)
        self._take_slot()
        try:
            sent = asyncio.ensure_future(self._send_one(request))
        except BaseException:
            self._done()
            raise
        sent.add_done_callback(self._done)
        return sent

    def _slot_free(self) -> bool:
        return self._in_flight < self.max_in_flight and not self._waiting

    def _take_slot(self) -> None:
        self._in_flight += 1
        self.alone += 1

    def _wait(self, request: Req) -> asyncio.Future[Rep]:
        future: asyncio.Future[Rep] = asyncio.get_running_loop().create_future()
        self._waiting.append((request, future))
        return future

    def _done(self, _: object = None) -> None:
        """A call returned: its slot goes to the requests waiting, as batches."""
        self._in_flight -= 1
        while self._waiting and self._in_flight < self.max_in_flight:
            batch = [w for w in self._waiting[: self.max_batch] if not w[1].done()]
            del self._waiting[: self.max_batch]
            if batch:
                self._send_batch(batch)

    def _send_batch(self, batch: list[_Waiter[Req, Rep]]) -> None:
        self._in_flight += 1
        self.batches[len(batch)] = self.batches.get(len(batch), 0) + 1
        sent: asyncio.Future[Sequence[Rep | BaseException]]
        try:
            sent = asyncio.ensure_future(self._send_many([request for request, _ in batch]))
        except Exception as exc:  # sending failed at once: as a failed call
            sent = asyncio.get_running_loop().create_future()
            sent.set_exception(exc)
        self._sent.add(sent)
        sent.add_done_callback(partial(self._answer, batch))

    def _answer(
        self, batch: list[_Waiter[Req, Rep]], sent: asyncio.Future[Sequence[Rep | BaseException]]
    ) -> None:
        """Hands a batched call's answers (or its failure) to its waiters."""
        self._sent.discard(sent)
        self._done()
        if sent.cancelled():  # the loop is closing: so are the waiters
            for _, future in batch:
                future.cancel()
            return
        exc = sent.exception()
        if exc is not None:  # the whole call failed: so did each of its requests
            for _, future in batch:
                if not future.done():
                    future.set_exception(_copy(exc))
            return
        for (_, future), answer in zip(batch, sent.result(), strict=True):
            if future.done():
                continue
            if isinstance(answer, BaseException):
                future.set_exception(answer)
            else:
                future.set_result(answer)


def _copy(exc: BaseException) -> BaseException:
    """A fresh exception per waiter (one raised object must not collect several tracebacks);
    for our own error types, same class and message."""
    try:
        fresh = type(exc)(*exc.args)
    except Exception:
        return exc
    fresh.__cause__ = exc.__cause__
    return fresh
