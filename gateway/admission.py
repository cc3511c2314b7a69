"""Admission control: a bound on calls in flight per method class, failing fast past it.

The choice: a call over the bound is refused at once with RESOURCE_EXHAUSTED rather than
queued. A queue in front of a saturated encoder only turns overload into timeouts for every
caller; an immediate refusal keeps latency bounded for admitted calls and tells clients to
back off (retry with jitter) or go to another replica. Classes are counted separately, so a
flood of searches cannot starve writes or the admin service. Health and reflection are never
limited.
"""

from __future__ import annotations

from collections.abc import Mapping

from clipsearch.errors import ResourceExhausted
from clipsearch.settings import AdmissionSettings


class Admission:
    """Counters per class; used from the one event loop of the gateway (no lock needed)."""

    def __init__(self, limits: Mapping[str, int]) -> None:
        self._limits = dict(limits)
        self.in_flight = dict.fromkeys(self._limits, 0)
        self.rejected = dict.fromkeys(self._limits, 0)

    @classmethod
    def from_settings(cls, admission: AdmissionSettings) -> Admission:
        return cls({"read": admission.read, "write": admission.write, "admin": admission.admin})

    def enter(self, method_class: str) -> bool:
        """Take a slot (True), or raise ResourceExhausted when the class is full. Returns
        False for unlimited classes, which need no `leave`."""
        limit = self._limits.get(method_class, 0)
        if limit <= 0:
            return False
        if self.in_flight[method_class] >= limit:
            self.rejected[method_class] += 1
            raise ResourceExhausted(
                f"too many {method_class} calls in flight (limit {limit}); retry with backoff"
            )
        self.in_flight[method_class] += 1
        return True

    def leave(self, method_class: str) -> None:
        self.in_flight[method_class] -= 1

    def limit(self, method_class: str) -> int:
        """The current bound of a class (0: unlimited)."""
        return self._limits.get(method_class, 0)

    def set_limit(self, method_class: str, limit: int) -> None:
        """Change a class's bound at run time; calls already admitted keep their slots."""
        if method_class not in self._limits or limit < 0:
            raise ValueError(f"no admission class {method_class!r}, or a negative limit")
        self._limits[method_class] = limit
