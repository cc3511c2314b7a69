"""Merging shard answers and the exact recency re-rank (pure functions, no I/O).

Recency: score = similarity * exp(-alpha * age_days). Because the decay is at most 1, a
document never seen (its similarity is at most the last one a non-exhausted shard returned,
the *bound*) cannot score above the bound when that bound is >= 0. So once the k-th best
score among the candidates reaches the bound, the top k is exact; otherwise the caller
fetches more. A negative bound gives no such guarantee (decay moves negative scores up
towards 0), so then the k-th score must reach 0 or every shard must be exhausted.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from typing import NamedTuple

from clipsearch.types import DocRecord, ShardHits

SECONDS_PER_DAY = 86_400.0


class RankedHit(NamedTuple):
    """A candidate with its recency decay applied.

    A NamedTuple, not a frozen dataclass: k are built per search, and a frozen dataclass's
    `__init__` sets each field through `object.__setattr__` (1.3 us a hit against 0.3).
    """

    record: DocRecord
    similarity: float
    decay: float
    score: float


def decay_factor(publish_time: float, reference_time: float, alpha: float) -> float:
    """exp(-alpha * age_days); future-dated documents have age 0."""
    if alpha == 0.0:
        return 1.0
    age_days = max(0.0, reference_time - publish_time) / SECONDS_PER_DAY
    return math.exp(-alpha * age_days)


def rank(
    answers: Sequence[ShardHits], k: int, alpha: float, reference_time: float
) -> list[RankedHit]:
    """The best k candidates of all shards by decayed score (ties broken by id).

    Candidates are ranked as plain tuples (`-score, id, arrival`: compared in C, no key
    function, and the arrival number keeps equal keys in shard order); a RankedHit is built
    only for the k kept.
    """
    keyed: list[tuple[float, str, int, DocRecord, float, float]] = []
    append = keyed.append
    for hits in answers:
        pairs = zip(hits.similarities.tolist(), hits.records, strict=True)
        if alpha == 0.0:
            for sim, rec in pairs:
                append((-sim, rec.id, len(keyed), rec, sim, 1.0))
        else:
            for sim, rec in pairs:
                d = decay_factor(rec.publish_time, reference_time, alpha)
                append((-(sim * d), rec.id, len(keyed), rec, sim, d))
    top = heapq.nsmallest(k, keyed) if 8 * k < len(keyed) else sorted(keyed)[:k]
    return [RankedHit(rec, sim, d, -neg) for neg, _, _, rec, sim, d in top]


def unseen_bound(answers: Sequence[ShardHits]) -> float | None:
    """Highest similarity an unfetched document can have; None when every shard is exhausted."""
    bounds = [float(h.similarities[-1]) for h in answers if not h.exhausted and len(h.records)]
    if any(not h.exhausted and not len(h.records) for h in answers):
        return math.inf
    return max(bounds) if bounds else None


def is_exact(top: Sequence[RankedHit], k: int, bound: float | None, alpha: float) -> bool:
    """Whether `top` is provably the exact decayed top-k given the unseen bound."""
    if bound is None:
        return True
    if len(top) < k:
        return False
    threshold = bound if (alpha == 0.0 or bound >= 0.0) else 0.0
    return top[k - 1].score >= threshold


def candidate_count(answers: Sequence[ShardHits]) -> int:
    """How many candidates the shards returned in total."""
    return sum(len(h.records) for h in answers)
