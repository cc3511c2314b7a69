"""Concurrent calls to one worker share calls: alone at once when a slot is free, batched
while the worker is busy, each caller getting its own answer or its own error."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from clipsearch.errors import DeadlineExceeded, Unavailable
from gateway.coalesce import Coalescer


class Worker:
    """Records every call; each call waits for the test to open its gate."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self.gates: list[asyncio.Event] = []
        self.fail_whole_call: Exception | None = None

    async def one(self, request: int) -> str:
        return (await self.many([request]))[0]  # type: ignore[return-value]

    async def many(self, requests: list[int]) -> Sequence[str | BaseException]:
        self.calls.append(list(requests))
        gate = asyncio.Event()
        self.gates.append(gate)
        await gate.wait()
        if self.fail_whole_call is not None:
            raise self.fail_whole_call
        return [DeadlineExceeded(f"late {r}") if r < 0 else f"answer {r}" for r in requests]

    async def open_all(self) -> None:
        """Open gates (including those of calls the opening starts) until all is quiet."""
        for _ in range(20):
            await asyncio.sleep(0)
            for gate in self.gates:
                gate.set()


async def _callers(c: Coalescer[int, str], requests: list[int]) -> list[asyncio.Task[str]]:
    tasks = [asyncio.ensure_future(c.call(r)) for r in requests]
    await asyncio.sleep(0)  # every caller has reached the coalescer
    return tasks


async def test_an_idle_worker_gets_each_call_alone_and_at_once() -> None:
    w = Worker()
    c = Coalescer(w.one, w.many, max_in_flight=2)
    tasks = await _callers(c, [1, 2])
    assert w.calls == [[1], [2]]  # both sent before either answered: no waiting at low load
    await w.open_all()
    assert [t.result() for t in tasks] == ["answer 1", "answer 2"]
    assert c.batches == {}


async def test_callers_arriving_while_the_worker_is_busy_go_out_as_one_call() -> None:
    w = Worker()
    c = Coalescer(w.one, w.many, max_in_flight=1)
    tasks = await _callers(c, [1, 2, 3, 4, 5])
    assert w.calls == [[1]]  # the others wait for the slot
    await w.open_all()
    assert w.calls == [[1], [2, 3, 4, 5]]
    assert [t.result() for t in tasks] == [f"answer {i}" for i in range(1, 6)]
    assert c.batches == {4: 1}


async def test_batches_are_capped_and_each_takes_a_free_slot() -> None:
    w = Worker()
    c = Coalescer(w.one, w.many, max_in_flight=1, max_batch=3)
    tasks = await _callers(c, list(range(8)))
    await w.open_all()
    assert w.calls == [[0], [1, 2, 3], [4, 5, 6], [7]]
    assert [t.result() for t in tasks] == [f"answer {i}" for i in range(8)]


async def test_an_item_that_fails_alone_fails_only_its_caller() -> None:
    w = Worker()
    c = Coalescer(w.one, w.many, max_in_flight=1)
    tasks = await _callers(c, [1, 2, -3, 4])
    await w.open_all()
    assert tasks[1].result() == "answer 2" and tasks[3].result() == "answer 4"
    with pytest.raises(DeadlineExceeded, match="late -3"):
        tasks[2].result()


async def test_a_failed_batched_call_fails_each_waiter_with_its_own_error() -> None:
    w = Worker()
    c = Coalescer(w.one, w.many, max_in_flight=1)
    tasks = await _callers(c, [1, 2, 3])
    w.fail_whole_call = Unavailable("shard 0 is unavailable; retry shortly")
    await w.open_all()
    errors = [t.exception() for t in tasks]
    assert all(isinstance(e, Unavailable) and "shard 0" in str(e) for e in errors)
    assert errors[1] is not errors[2]  # one raised object per caller


async def test_a_caller_that_leaves_while_waiting_is_not_sent() -> None:
    w = Worker()
    c = Coalescer(w.one, w.many, max_in_flight=1)
    tasks = await _callers(c, [1, 2, 3])
    tasks[1].cancel()
    await w.open_all()
    assert w.calls == [[1], [3]]
    assert tasks[1].cancelled() and tasks[2].result() == "answer 3"


async def test_a_caller_that_leaves_after_its_batch_went_out_does_not_disturb_the_others() -> None:
    w = Worker()
    c = Coalescer(w.one, w.many, max_in_flight=1)
    tasks = await _callers(c, [1, 2, 3])
    w.gates[0].set()
    for _ in range(5):
        await asyncio.sleep(0)
    assert w.calls == [[1], [2, 3]]  # the batch is out
    tasks[1].cancel()
    await w.open_all()
    assert tasks[1].cancelled() and tasks[2].result() == "answer 3"
    assert tasks[0].result() == "answer 1"


class SentWorker:
    """Answers through futures the test resolves, as the shard channel does: a call is out
    the moment it is made, and nothing waits in a task."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self._replies: list[asyncio.Future[list[str]]] = []

    def one(self, request: int) -> asyncio.Future[str]:
        single: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.many([request]).add_done_callback(
            lambda f: single.done() or single.set_result(f.result()[0])
        )
        return single

    def many(self, requests: list[int]) -> asyncio.Future[list[str]]:
        self.calls.append(list(requests))
        reply: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        self._replies.append(reply)
        return reply

    async def reply(self, n: int) -> None:
        """Answer call `n`, then let the coalescer act on it."""
        self._replies[n].set_result([f"answer {r}" for r in self.calls[n]])
        for _ in range(3):
            await asyncio.sleep(0)


async def test_started_requests_are_sent_at_once_and_later_ones_together() -> None:
    w = SentWorker()
    c = Coalescer(w.one, w.many, max_in_flight=1)
    started = [c.start(r) for r in range(4)]
    assert w.calls == [[0]]  # out before the caller awaited anything
    await w.reply(0)
    assert w.calls == [[0], [1, 2, 3]]
    await w.reply(1)
    assert [f.result() for f in started] == [f"answer {r}" for r in range(4)]
    assert (c.alone, c.batches) == (1, {3: 1})


async def test_a_started_request_cancelled_frees_its_slot_or_is_dropped_if_waiting() -> None:
    w = SentWorker()
    c = Coalescer(w.one, w.many, max_in_flight=1)
    sent, waiting, kept = c.start(0), c.start(1), c.start(2)
    waiting.cancel()
    sent.cancel()  # its answer is no longer awaited: the next batch need not wait for it
    for _ in range(3):
        await asyncio.sleep(0)
    assert w.calls == [[0], [2]]
    await w.reply(1)
    await w.reply(0)
    assert kept.result() == "answer 2" and sent.cancelled() and waiting.cancelled()


def test_limits_must_be_positive() -> None:
    async def never(_: object) -> object:
        raise AssertionError

    with pytest.raises(ValueError):
        Coalescer(never, never, max_in_flight=0)  # type: ignore[arg-type]
