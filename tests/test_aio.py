"""clipsearch.aio.settle: gather(return_exceptions=True) semantics with one task fewer."""

from __future__ import annotations

import asyncio

import pytest

from clipsearch.aio import settle


async def _after(delay: float, value: object) -> object:
    await asyncio.sleep(delay)
    if isinstance(value, Exception):
        raise value
    return value


async def test_results_and_errors_come_back_in_call_order() -> None:
    boom = ValueError("boom")
    got = await settle([_after(0.02, "a"), _after(0.0, boom), _after(0.01, "c")])
    assert got == ["a", boom, "c"]
    assert await settle([]) == []


async def test_the_calls_run_concurrently() -> None:
    started: list[int] = []

    async def call(n: int) -> int:
        started.append(n)
        await asyncio.sleep(0.05)
        return n

    task = asyncio.ensure_future(settle([call(n) for n in range(3)]))
    await asyncio.sleep(0.01)
    assert sorted(started) == [0, 1, 2]  # all under way before the first finished
    assert await task == [0, 1, 2]


async def test_cancelling_the_caller_cancels_every_call() -> None:
    cancelled: list[int] = []

    async def call(n: int) -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(n)
            raise

    task = asyncio.ensure_future(settle([call(n) for n in range(3)]))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0)
    assert sorted(cancelled) == [0, 1, 2]
