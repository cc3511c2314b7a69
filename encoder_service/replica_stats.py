"""Encoder counters summed over every replica of a deployment.

Serve hands a `stats` call to one replica, whose batch histograms and cache counters are
its own: with two replicas, Stats showed about half the traffic. So every replica reports
its counters every `REPORT_S` seconds to one small actor per deployment (`StatsBoard`,
named after the app and deployment, created by whichever replica comes first), and `stats`
answers with the sum over the replicas that reported within `STALE_S`: a replica that died
drops out of the sum (its cache is gone with it), one that restarted counts from zero.
The same reports carry each replica's direct channel address, so any replica can tell the
gateway where all of them listen (`StatsBoard.channels`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import ray
from ray import serve

REPORT_S = 2.0
"""How often each replica reports its counters."""
STALE_S = 15.0
"""A replica whose last report is older than this is left out of the sum."""

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplicaCounters:
    """One replica's counters since it started."""

    batch_sizes: Mapping[str, Mapping[int, int]] = field(default_factory=dict)
    cache: Mapping[str, int] = field(default_factory=dict)
    channel: tuple[str, str] | None = None
    """(Ray node id, socket address) of its direct channel (encoder_service.channel)."""
    forward_seconds: Mapping[str, float] = field(default_factory=dict)
    """Seconds its model slots have spent in forwards, per queue, running ones to now."""
    model_slots: int = 0
    """Forwards it runs at once."""


def merge(snapshots: Iterable[ReplicaCounters]) -> ReplicaCounters:
    """Histograms summed per queue and size; cache counters (and capacities), forward
    seconds and model slots summed."""
    sizes: dict[str, Counter[int]] = {}
    cache: Counter[str] = Counter()
    forward: dict[str, float] = {}
    slots = 0
    for snapshot in snapshots:
        for queue, histogram in snapshot.batch_sizes.items():
            sizes.setdefault(queue, Counter()).update(histogram)
        cache.update(snapshot.cache)
        for queue, seconds in snapshot.forward_seconds.items():
            forward[queue] = forward.get(queue, 0.0) + seconds
        slots += snapshot.model_slots
    return ReplicaCounters(
        {q: dict(h) for q, h in sizes.items()},
        dict(cache),
        forward_seconds=forward,
        model_slots=slots,
    )


class StatsBoard:
    """The latest counters of each replica (run as a Ray actor; plain class for tests)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._latest: dict[str, tuple[float, ReplicaCounters]] = {}

    def report(self, replica: str, counters: ReplicaCounters) -> None:
        """Replace `replica`'s counters."""
        self._latest[replica] = (self._clock(), counters)

    def merged(self, stale_s: float = STALE_S) -> tuple[int, ReplicaCounters]:
        """(replicas counted, their summed counters), forgetting replicas silent too long."""
        live = self._live(stale_s)
        return len(live), merge(live)

    def channels(self, stale_s: float = STALE_S) -> list[tuple[str, str]]:
        """The direct channels of the replicas that reported within `stale_s`."""
        return [c.channel for c in self._live(stale_s) if c.channel is not None]

    def _live(self, stale_s: float) -> list[ReplicaCounters]:
        now = self._clock()
        self._latest = {r: v for r, v in self._latest.items() if now - v[0] <= stale_s}
        return [counters for _, counters in self._latest.values()]


class StatsReporter:
    """One replica's side: reports its counters every REPORT_S and reads the sum.

    Args:
        counters: Returns this replica's counters now.
    """

    def __init__(self, counters: Callable[[], ReplicaCounters]) -> None:
        self._counters = counters
        self._board: Any = None  # the deployment's StatsBoard actor, once found
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the periodic report (once; needs the replica's running event loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._report_forever())

    async def merged(self) -> ReplicaCounters:
        """The counters summed over live replicas; this replica's own if the board cannot
        be reached (a warning says so)."""
        answer = await self._ask_board("merged")
        return self._counters() if answer is None else answer[1]

    async def channels(self) -> list[tuple[str, str]]:
        """The live replicas' direct channels; this replica's own if the board cannot be
        reached."""
        answer = await self._ask_board("channels")
        if answer is not None:
            return answer  # type: ignore[no-any-return]
        own = self._counters().channel
        return [own] if own is not None else []

    async def _ask_board(self, method: str) -> Any:
        """Report now, then call the board's `method(STALE_S)`; None if it cannot be had."""
        self.start()
        try:
            await self._report()
            return await getattr(self._board, method).remote(STALE_S)
        except Exception as exc:  # no board (not under Serve, actor lost): say so, go on
            log.warning("encoder stats: the replicas' board unavailable (%s): %r", method, exc)
            self._board = None
            return None

    async def _report_forever(self) -> None:
        while True:
            try:
                await self._report()
            except Exception as exc:  # the board died with its replica: find or make anew
                log.debug("encoder stats report failed: %r", exc)
                self._board = None
            await asyncio.sleep(REPORT_S)

    async def _report(self) -> None:
        """Send this replica's counters to the deployment's StatsBoard (made if missing)."""
        context = serve.get_replica_context()
        if self._board is None:
            name = f"clipsearch-stats:{context.app_name}:{context.deployment}"
            actor = ray.remote(num_cpus=0)(StatsBoard)
            self._board = actor.options(name=name, get_if_exists=True).remote()
        await self._board.report.remote(context.replica_tag, self._counters())
