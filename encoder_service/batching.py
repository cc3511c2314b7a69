"""Dynamic batching that forms each batch when the model becomes free, not before.

Ray Serve's `@serve.batch` closes a batch `batch_wait_timeout_s` after its first request even
while the model is still busy with the previous one; the closed batch then waits for the
model, and the callers that arrive during that wait start yet another small batch. Under a
steady load the batches fragment (measured: batches of 3-4 at 16 concurrent callers with a
limit of 8, on a CPU where one forward takes 0.5 s).

Here a batch is taken from the queue only when the model is free. Requests that arrive
during a forward wait in the queue, so the next batch holds all of them (up to the limit).
On an idle model the oldest request waits at most `wait_s` for company, and only when company
is likely: a request that arrived more than `wait_s` after the one before it in its queue
(a caller at low load, the first of a burst) starts at once. At the rate seen last, less
than one more request would arrive within `wait_s`, so waiting would add `wait_s` to its
latency and buy nothing; the first of a burst runs alone and the rest of the burst, arriving
during its forward, forms full batches behind it.

One scheduler serves several named queues (text, images) over one model: when the model
frees up, the queue whose oldest request has waited longest goes next, so neither modality
starves the other. With `max_concurrent` > 1 the model runs that many batches at once (on a
CPU: one single-threaded forward per core, which a busy neighbour process slows only by the
time it takes, where one multi-threaded forward stalls at every OpenMP barrier while any of
its threads is descheduled); "free" then means "fewer than that many batches running".

While other batches run, a free slot waits for a full batch, so that steady load is not
split into small batches. It starts a partial one only when arrivals have stopped (none
for `QUIET_WAITS` x `wait_s`, counted from the newest item and from the moment a slot last
freed: callers in a closed loop come back within a few milliseconds, and a shorter pause
split 16 callers' batches of 8 into 1s to 7s) and every running batch started beside
another one. A batch that started alone is taken to use the whole machine (the
encoder gives a lone forward every thread), and a partial batch beside it would only slow
it down. Measured before this rule (fp32 ViT-B/32, 2 cores, 16 images at once on an idle
replica): the first image ran alone, 8 ran beside it, and the last 7 waited 625 ms for the
batch of 8 to end while one core had nothing to do.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")
QUIET_WAITS = 10
"""Pause without arrivals, in units of `wait_s`, after which a free slot beside running
batches stops waiting for a full batch."""
Runner = Callable[[str, list[Any]], Awaitable[Sequence[Any]]]


@dataclass
class _Pending(Generic[T]):
    item: T
    future: asyncio.Future[Any]
    arrived: float = field(default_factory=time.monotonic)
    after_quiet: bool = False  # arrived over wait_s after the previous one in its queue


class Batcher:
    """Named FIFO queues drained, one batch at a time, into a single model.

    Args:
        run: `await run(queue_name, items)` runs one batch and returns one result per item,
            in order. Its exception fails every caller of that batch.
        queues: The queue names.
        max_batch_size: Most items in one batch (changeable with `set_limits`).
        wait_s: Longest time the oldest request waits for more to arrive while the model is
            idle (changeable with `set_limits`).
        max_concurrent: Batches run at once.
    """

    def __init__(
        self,
        run: Runner,
        queues: Sequence[str],
        max_batch_size: int,
        wait_s: float,
        max_concurrent: int = 1,
    ) -> None:
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1, got {max_concurrent}")
        self._run = run
        self._queues: dict[str, deque[_Pending[Any]]] = {name: deque() for name in queues}
        self._sizes: dict[str, Counter[int]] = {name: Counter() for name in queues}
        self._last_arrival: dict[str, float] = {name: -float("inf") for name in queues}
        self._max_batch_size = max_batch_size
        self._wait_s = wait_s
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._slots = asyncio.Semaphore(max_concurrent)
        # running batch -> whether it started while no other batch ran
        self._running: dict[asyncio.Task[None], bool] = {}
        self._freed_at = -float("inf")  # when a batch last ended (time.monotonic)

    def set_limits(self, max_batch_size: int, wait_s: float) -> None:
        """New limits; the batch being formed uses them from its next check."""
        self._max_batch_size = max_batch_size
        self._wait_s = wait_s
        self._arrived.set()

    async def submit(self, queue: str, item: Any) -> Any:
        """Queue one item and wait for its result (cancelling drops it from its batch)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())
            self._task.add_done_callback(self._fail_waiting)
        elif self._task.done():
            raise RuntimeError("the batch scheduler has stopped")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        pending = _Pending(item, future)
        pending.after_quiet = pending.arrived - self._last_arrival[queue] > self._wait_s
        self._last_arrival[queue] = pending.arrived
        self._queues[queue].append(pending)
        self._arrived.set()
        return await future

    def depths(self) -> dict[str, int]:
        """Requests waiting in each queue (not counting the batch being run)."""
        return {name: len(q) for name, q in self._queues.items()}

    def batch_sizes(self) -> dict[str, dict[int, int]]:
        """How many batches of each size each queue has run."""
        return {name: dict(sizes) for name, sizes in self._sizes.items()}

    def alive(self) -> bool:
        """False once the scheduler task has died (it never returns on its own)."""
        return self._task is None or not self._task.done()

    async def _loop(self) -> None:
        try:
            while True:
                await self._slots.acquire()
                queue = await self._next_queue()
                batch = await self._collect(queue)
                if not batch:
                    self._slots.release()
                    continue
                alone = not self._running
                task = asyncio.get_running_loop().create_task(self._run_batch(queue, batch))
                self._running[task] = alone
                task.add_done_callback(self._batch_done)
        finally:  # the scheduler is going away: so are the batches it started
            for task in list(self._running):
                task.cancel()

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._running.pop(task, None)
        self._freed_at = time.monotonic()
        self._slots.release()
        self._arrived.set()  # a batch waiting to fill may now start

    async def _next_queue(self) -> str:
        """Wait for a request; the queue holding the oldest one goes next."""
        while True:
            self._drop_cancelled()
            waiting = [(q[0].arrived, name) for name, q in self._queues.items() if q]
            if waiting:
                return min(waiting)[1]
            self._arrived.clear()
            await self._arrived.wait()

    async def _collect(self, name: str) -> list[_Pending[Any]]:
        """Up to max_batch_size items of one queue. On an idle model, wait while the batch is
        not full and its oldest item has waited less than wait_s, unless that item came after
        a quiet spell; while other batches run, start this one once it is full, or the others
        are done, or (beside batches that did not start alone) once arrivals have stopped.
        See the module docstring."""
        queue = self._queues[name]
        while queue and len(queue) < self._max_batch_size:
            left: float | None = None
            if not self._running:
                if queue[0].after_quiet:
                    break
                left = queue[0].arrived + self._wait_s - time.monotonic()
                if left <= 0:
                    break
            elif not any(self._running.values()):  # a core is free: wait for arrivals only
                quiet_from = max(queue[-1].arrived, self._freed_at)
                left = quiet_from + QUIET_WAITS * self._wait_s - time.monotonic()
                if left <= 0:
                    break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                break
            self._drop_cancelled()
        batch: list[_Pending[Any]] = []
        while queue and len(batch) < self._max_batch_size:
            pending = queue.popleft()
            if not pending.future.done():
                batch.append(pending)
        return batch

    async def _run_batch(self, name: str, batch: list[_Pending[Any]]) -> None:
        self._sizes[name][len(batch)] += 1
        try:
            results = await self._run(name, [p.item for p in batch])
        except asyncio.CancelledError:
            _fail(batch, RuntimeError("the batch scheduler has stopped"))
            raise
        except Exception as exc:  # every caller of this batch gets the model's error
            _fail(batch, exc)
            return
        if len(results) != len(batch):
            _fail(
                batch, RuntimeError(f"{name} batch of {len(batch)} returned {len(results)} results")
            )
            return
        for pending, result in zip(batch, results, strict=True):
            if not pending.future.done():
                pending.future.set_result(result)

    def _fail_waiting(self, task: asyncio.Task[None]) -> None:
        """The scheduler died (a bug, or the loop closing): no waiter may hang on it."""
        error = RuntimeError("the batch scheduler has stopped")
        for queue in self._queues.values():
            _fail(list(queue), error)
            queue.clear()

    def _drop_cancelled(self) -> None:
        for queue in self._queues.values():
            if any(p.future.done() for p in queue):
                kept = [p for p in queue if not p.future.done()]
                queue.clear()
                queue.extend(kept)


def _fail(batch: Sequence[_Pending[Any]], error: BaseException) -> None:
    for pending in batch:
        if not pending.future.done():
            pending.future.set_exception(error)
