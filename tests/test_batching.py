"""The encoder's batch scheduler: batches form when the model is free, and fill."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from encoder_service.batching import Batcher


class GatedModel:
    """A model whose every forward waits until the test opens the gate."""

    def __init__(self) -> None:
        self.batches: list[tuple[str, list[Any]]] = []
        self.gate = asyncio.Event()
        self.started = asyncio.Event()
        self.fail_with: Exception | None = None

    async def __call__(self, queue: str, items: list[Any]) -> Sequence[Any]:
        self.batches.append((queue, list(items)))
        self.started.set()
        await self.gate.wait()
        if self.fail_with is not None:
            raise self.fail_with
        return [f"{queue}:{item}" for item in items]


class SlotModel:
    """A model whose forwards each wait for their own gate (`gates[n]` for batch n)."""

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []
        self.gates: list[asyncio.Event] = []

    async def __call__(self, queue: str, items: list[Any]) -> Sequence[Any]:
        gate = asyncio.Event()
        self.batches.append(list(items))
        self.gates.append(gate)
        await gate.wait()
        return [f"{queue}:{item}" for item in items]


async def _until(predicate: Any) -> None:
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("condition never became true")


async def test_requests_arriving_during_a_forward_form_one_full_batch() -> None:
    model = GatedModel()
    batcher = Batcher(model, ("text",), max_batch_size=8, wait_s=0.001)
    first = asyncio.ensure_future(batcher.submit("text", 0))
    await model.started.wait()
    # 11 callers arrive, one by one, while the model is busy with the first batch: Serve's
    # @serve.batch would close a batch every wait_s; here they wait for the model.
    later = []
    for i in range(1, 12):
        later.append(asyncio.ensure_future(batcher.submit("text", i)))
        await asyncio.sleep(0.003)
    assert batcher.depths() == {"text": 11}
    model.gate.set()
    results = await asyncio.gather(first, *later)
    assert results == [f"text:{i}" for i in range(12)]
    assert [len(items) for _, items in model.batches] == [1, 8, 3]
    assert batcher.batch_sizes() == {"text": {1: 1, 8: 1, 3: 1}}


async def test_idle_model_waits_for_company_then_runs_a_partial_batch() -> None:
    model = GatedModel()
    model.gate.set()
    batcher = Batcher(model, ("text",), max_batch_size=8, wait_s=0.05)
    results = await asyncio.gather(*(batcher.submit("text", i) for i in range(3)))
    assert results == ["text:0", "text:1", "text:2"]
    assert model.batches == [("text", [0, 1, 2])]


async def test_a_request_after_a_quiet_spell_runs_at_once() -> None:
    # wait_s is an hour: a lone request that waited for company would never finish here.
    model = GatedModel()
    model.gate.set()
    batcher = Batcher(model, ("text", "image"), max_batch_size=8, wait_s=3600.0)
    assert await asyncio.wait_for(batcher.submit("text", 0), timeout=30) == "text:0"
    # Another queue's recent traffic is no company for this one.
    assert await asyncio.wait_for(batcher.submit("image", 1), timeout=30) == "image:1"
    assert model.batches == [("text", [0]), ("image", [1])]


async def test_a_request_close_behind_another_waits_for_company() -> None:
    model = GatedModel()
    model.gate.set()
    batcher = Batcher(model, ("text",), max_batch_size=2, wait_s=3600.0)
    assert await batcher.submit("text", 0) == "text:0"  # after a quiet spell: alone, at once
    # The model is idle again, but 1 arrives well within wait_s of 0: it waits for 2.
    second = asyncio.ensure_future(batcher.submit("text", 1))
    await _until(lambda: batcher.depths() == {"text": 1})
    for _ in range(5):
        await asyncio.sleep(0)
    assert not second.done()
    third = batcher.submit("text", 2)
    assert await asyncio.gather(second, third) == ["text:1", "text:2"]
    assert model.batches == [("text", [0]), ("text", [1, 2])]


async def test_the_queue_with_the_oldest_request_goes_next() -> None:
    model = GatedModel()
    batcher = Batcher(model, ("text", "image"), max_batch_size=4, wait_s=0.0)
    busy = asyncio.ensure_future(batcher.submit("text", "t0"))
    await model.started.wait()
    image = asyncio.ensure_future(batcher.submit("image", "i0"))
    await asyncio.sleep(0.002)
    texts = [asyncio.ensure_future(batcher.submit("text", f"t{i}")) for i in (1, 2)]
    await _until(lambda: batcher.depths() == {"text": 2, "image": 1})
    model.gate.set()
    await asyncio.gather(busy, image, *texts)
    assert [q for q, _ in model.batches] == ["text", "image", "text"]


async def test_a_cancelled_caller_is_left_out_of_its_batch() -> None:
    model = GatedModel()
    batcher = Batcher(model, ("image",), max_batch_size=8, wait_s=0.0)
    first = asyncio.ensure_future(batcher.submit("image", 0))
    await model.started.wait()
    keep = asyncio.ensure_future(batcher.submit("image", 1))
    gone = asyncio.ensure_future(batcher.submit("image", 2))
    await _until(lambda: batcher.depths()["image"] == 2)
    gone.cancel()
    model.gate.set()
    assert await asyncio.gather(first, keep) == ["image:0", "image:1"]
    assert [items for _, items in model.batches] == [[0], [1]]


async def test_a_failed_forward_fails_its_callers_only() -> None:
    model = GatedModel()
    model.fail_with = ValueError("boom")
    model.gate.set()
    batcher = Batcher(model, ("text",), max_batch_size=2, wait_s=0.0)
    with pytest.raises(ValueError, match="boom"):
        await batcher.submit("text", 0)
    model.fail_with = None
    assert await batcher.submit("text", 1) == "text:1"
    assert batcher.alive()


async def test_new_limits_apply_to_the_next_batch() -> None:
    model = GatedModel()
    batcher = Batcher(model, ("text",), max_batch_size=8, wait_s=0.0)
    first = asyncio.ensure_future(batcher.submit("text", 0))
    await model.started.wait()
    later = [asyncio.ensure_future(batcher.submit("text", i)) for i in range(1, 7)]
    await _until(lambda: batcher.depths()["text"] == 6)
    batcher.set_limits(max_batch_size=2, wait_s=0.0)
    model.gate.set()
    await asyncio.gather(first, *later)
    assert [len(items) for _, items in model.batches] == [1, 2, 2, 2]


async def test_a_wrong_number_of_results_fails_the_batch_instead_of_misrouting() -> None:
    async def short(queue: str, items: list[Any]) -> list[Any]:
        return items[:-1]

    batcher = Batcher(short, ("text",), max_batch_size=4, wait_s=0.01)
    outcomes = await asyncio.gather(
        *(batcher.submit("text", i) for i in range(3)), return_exceptions=True
    )
    assert all(isinstance(o, RuntimeError) and "returned 2 results" in str(o) for o in outcomes)


async def test_waiters_fail_instead_of_hanging_when_the_scheduler_dies() -> None:
    model = GatedModel()
    batcher = Batcher(model, ("text",), max_batch_size=4, wait_s=0.0)
    first = asyncio.ensure_future(batcher.submit("text", 0))
    await model.started.wait()
    waiting = asyncio.ensure_future(batcher.submit("text", 1))
    await _until(lambda: batcher.depths()["text"] == 1)
    assert batcher._task is not None
    batcher._task.cancel()  # what a bug inside the loop, or the loop closing, amounts to
    for caller in (first, waiting):  # the batch being run, and the one still queued
        with pytest.raises(RuntimeError, match="stopped"):
            await caller
    assert not batcher.alive()
    with pytest.raises(RuntimeError, match="stopped"):
        await batcher.submit("text", 2)


async def test_two_batch_slots_run_two_batches_at_once_and_no_more() -> None:
    model = GatedModel()
    batcher = Batcher(model, ("image",), max_batch_size=2, wait_s=0.0, max_concurrent=2)
    callers = [asyncio.ensure_future(batcher.submit("image", i)) for i in range(6)]
    await _until(lambda: len(model.batches) == 2)
    await asyncio.sleep(0.01)
    assert len(model.batches) == 2  # both slots busy: the third batch waits for one
    assert batcher.depths() == {"image": 2}
    model.gate.set()
    assert await asyncio.gather(*callers) == [f"image:{i}" for i in range(6)]
    assert sorted(len(items) for _, items in model.batches) == [2, 2, 2]


async def test_a_second_slot_takes_only_a_full_batch_while_the_first_runs() -> None:
    model = GatedModel()
    batcher = Batcher(model, ("text",), max_batch_size=4, wait_s=0.0, max_concurrent=2)
    first = asyncio.ensure_future(batcher.submit("text", 0))
    await model.started.wait()
    partial = [asyncio.ensure_future(batcher.submit("text", i)) for i in (1, 2)]
    await asyncio.sleep(0.02)
    assert len(model.batches) == 1  # 2 of 4 queued: no half-empty second batch
    partial += [asyncio.ensure_future(batcher.submit("text", i)) for i in (3, 4)]
    await _until(lambda: len(model.batches) == 2)
    assert model.batches[1] == ("text", [1, 2, 3, 4])
    model.gate.set()
    await asyncio.gather(first, *partial)


async def _lone_then_full(batcher: Batcher, model: SlotModel, queue: str, last: int) -> list[Any]:
    """Item 0 first, after a quiet spell (so alone, at once), then items 1..last at once:
    [1, 2, 3, 4] starts beside it as a full batch, the rest wait."""
    callers = [asyncio.ensure_future(batcher.submit(queue, 0))]
    await _until(lambda: len(model.batches) == 1)
    callers += [asyncio.ensure_future(batcher.submit(queue, i)) for i in range(1, last + 1)]
    await _until(lambda: len(model.batches) == 2)
    assert model.batches[1] == [1, 2, 3, 4]
    return callers


async def _answered(model: SlotModel, callers: list[Any], queue: str) -> None:
    """Open every gate; each caller gets its own item's answer."""
    for gate in model.gates:
        gate.set()
    assert await asyncio.gather(*callers) == [f"{queue}:{i}" for i in range(len(callers))]


async def test_after_a_burst_the_free_slot_runs_the_rest_once_arrivals_stop() -> None:
    model = SlotModel()
    batcher = Batcher(model, ("image",), max_batch_size=4, wait_s=0.002, max_concurrent=2)
    callers = await _lone_then_full(batcher, model, "image", 7)
    await asyncio.sleep(0.1)  # no arrivals for 50 x wait_s
    assert len(model.batches) == 2  # the lone batch holds every core: no partial batch
    model.gates[0].set()
    # The batch of 4 still runs, and it started beside another (one core each): the last 3
    # go now instead of waiting for a 4th that is not coming (or for the batch of 4).
    await _until(lambda: len(model.batches) == 3)
    assert model.batches[2] == [5, 6, 7]
    await _answered(model, callers, "image")


async def test_a_free_slot_waits_for_a_full_batch_while_items_keep_coming() -> None:
    model = SlotModel()
    batcher = Batcher(model, ("text",), max_batch_size=4, wait_s=0.1, max_concurrent=2)
    callers = await _lone_then_full(batcher, model, "text", 4)
    model.gates[0].set()  # now only [1, 2, 3, 4] runs, started beside another
    for i in range(5, 9):  # one every 10 ms: arrivals have not stopped
        callers.append(asyncio.ensure_future(batcher.submit("text", i)))
        await asyncio.sleep(0.01)
        if i < 8:
            assert len(model.batches) == 2, model.batches
    await _until(lambda: len(model.batches) == 3)
    assert model.batches[2] == [5, 6, 7, 8]
    await _answered(model, callers, "text")


async def test_a_freed_slot_gives_the_callers_it_answered_time_to_come_back() -> None:
    model = SlotModel()
    batcher = Batcher(model, ("text",), max_batch_size=4, wait_s=0.05, max_concurrent=2)
    callers = await _lone_then_full(batcher, model, "text", 5)  # 5 waits
    await asyncio.sleep(0.1)  # item 5 is old now
    model.gates[0].set()
    await asyncio.sleep(0.02)  # the caller answered comes back (a closed loop), and others
    callers += [asyncio.ensure_future(batcher.submit("text", i)) for i in (6, 7, 8)]
    await _until(lambda: len(model.batches) == 3)
    assert model.batches[2] == [5, 6, 7, 8]  # not [5] alone
    await _answered(model, callers, "text")
