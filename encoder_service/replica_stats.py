"""Encoder counters summed over every replica of a deployment.

Serve hands a `stats` call to one replica, whose batch histograms and cache counters are
its own: with two replicas, Stats showed about half the traffic. So every replica reports
its counters every `REPORT_S` seconds to one small actor per deployment (`StatsBoard`,
named after the app and deployment, created by whichever replica comes first), and `stats`
answers with the sum over the replicas that reported within `STALE_S`: a replica that died
drops out of the sum (its cache is gone with it), one that restarted counts from zero.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

REPORT_S = 2.0
"""How often each replica reports its counters."""
STALE_S = 15.0
"""A replica whose last report is older than this is left out of the sum."""


@dataclass(frozen=True)
class ReplicaCounters:
    """One replica's counters since it started."""

    batch_sizes: Mapping[str, Mapping[int, int]] = field(default_factory=dict)
    cache: Mapping[str, int] = field(default_factory=dict)


def merge(snapshots: Iterable[ReplicaCounters]) -> ReplicaCounters:
    """Histograms summed per queue and size; cache counters (and capacities) summed."""
    sizes: dict[str, Counter[int]] = {}
    cache: Counter[str] = Counter()
    for snapshot in snapshots:
        for queue, histogram in snapshot.batch_sizes.items():
            sizes.setdefault(queue, Counter()).update(histogram)
        cache.update(snapshot.cache)
    return ReplicaCounters({q: dict(h) for q, h in sizes.items()}, dict(cache))


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
        now = self._clock()
        self._latest = {r: v for r, v in self._latest.items() if now - v[0] <= stale_s}
        return len(self._latest), merge(c for _, c in self._latest.values())
