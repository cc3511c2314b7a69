"""Where a request's time goes inside an encoder replica, for the latest requests.

Each embedded item (cache hits aside) leaves one `PhaseTimes`: preparing it (image: hash,
decode and preprocess in a worker, including the hop there and back; text: template and
tokenise), waiting for its batch to start, the batch's forward in the model thread, and
the hop from the model thread back to the caller. The benchmark subtracts these from what
a client measured to split the low-load latency into its parts; an operator can ask a
replica for them (`EncoderDeployment.phase_times`) without a profiler.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

RECENT = 256
"""Requests kept per queue: enough for a median, bounded whatever the traffic."""


@dataclass(frozen=True)
class PhaseTimes:
    """Seconds one item spent in each phase inside the replica."""

    prepare_s: float
    queue_s: float  # until its batch's forward began (batch wait + hop to the model thread)
    forward_s: float  # its batch's forward, timed in the model thread
    return_s: float  # forward end until the caller's coroutine resumed
    batch_size: int

    @property
    def total_s(self) -> float:
        """From entering the replica's method until its result was ready."""
        return self.prepare_s + self.queue_s + self.forward_s + self.return_s


class PhaseLog:
    """The latest `RECENT` `PhaseTimes` per queue (not thread-safe: event-loop use only)."""

    def __init__(self, queues: Sequence[str], keep: int = RECENT) -> None:
        self._recent: dict[str, deque[PhaseTimes]] = {q: deque(maxlen=keep) for q in queues}

    def add(self, queue: str, times: PhaseTimes) -> None:
        """Record one item's phases."""
        self._recent[queue].append(times)

    def recent(self, queue: str) -> list[PhaseTimes]:
        """The kept records of one queue, oldest first."""
        return list(self._recent[queue])
