"""Choose default search parameters: the fastest setting whose recall@k reaches a target.

Queries are a sample of the vectors left out of the index while it is tuned (then added):
recall is measured the way a new query meets it, not from inside the index. A setting
reaches the target when its mean recall less one standard error over those queries does
(so it holds on queries the tuner never saw, not just on its sample); Stats reports the
mean. Cost grows with nprobe / efSearch, so for a fixed re-rank depth the smallest value
that reaches the target is the fastest one: sweep by doubling, then bisect the last gap.
Lossy codes (PQ, RaBitQ, SQ8) add a second knob, the re-rank depth (k x factor candidates
re-ranked exactly): a deeper list needs a smaller nprobe, so each depth gets its smallest
nprobe (never more than the shallower depth needed) and the pair that answers single
queries fastest (as a shard serves them) wins.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import faiss
import numpy as np

from clipsearch.types import OperatingPoint, SearchParams
from index_service.factory import MAX_EF_SEARCH, Family, IndexSpec

SearchFn = Callable[[np.ndarray, int, SearchParams], np.ndarray]
"""(queries, k, params) -> labels (nq, k), -1 for missing."""

_QUERIES = 200
_NONE = np.zeros(0, dtype=np.int64)
_QPS_QUERIES = 50
# Doubling the knob gaining less recall than this means the codes, not the search, limit
# recall: a deeper re-rank is needed, so the sweep at this depth stops.
_PLATEAU = 0.001
_TIMING_REPEATS = 3


@dataclass(frozen=True, slots=True)
class _Candidate:
    params: SearchParams
    recall: float
    seconds: float = 0.0


def tune(
    spec: IndexSpec,
    search: SearchFn,
    vectors: np.ndarray,
    labels: np.ndarray,
    held: np.ndarray,
    target: float,
    k: int,
) -> OperatingPoint:
    """The operating point of an index holding `vectors` except rows `held` (the queries)."""
    queries = np.ascontiguousarray(vectors[held])
    truth = _ground_truth(queries, vectors, labels, labels[held], k)

    def per_query(sp: SearchParams) -> np.ndarray:
        return _recall(search(queries, k, sp), truth)

    def recall(sp: SearchParams) -> float:
        return _lower_bound(per_query(sp))

    def timed(sp: SearchParams) -> float:
        return _seconds(search, queries[:_QPS_QUERIES], k, sp)

    best = _fastest_reaching(spec, k, recall, timed, target)
    return OperatingPoint(
        nprobe=best.params.nprobe,
        ef_search=best.params.ef_search,
        recall=float(per_query(best.params).mean()),
        target_recall=target,
        k=k,
        qps=_single_query_qps(search, queries[:_QPS_QUERIES], k, best.params),
        rerank=best.params.rerank,
    )


def held_out_rows(spec: IndexSpec, n: int, k: int, seed: int = 1) -> np.ndarray:
    """Sorted rows of `n` vectors to tune on, to be left out of the index until `tune` has run
    (a query that is itself in the index is easier than a new one: an HNSW walk lands on its
    own node, whose links are its neighbours). Up to 200, at most a tenth; none for Flat or
    when too few."""
    size = min(_QUERIES, n // 10)
    if spec.family is Family.FLAT or size < 1 or n - size <= k:
        return _NONE
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def _fastest_reaching(
    spec: IndexSpec,
    k: int,
    recall: Callable[[SearchParams], float],
    timed: Callable[[SearchParams], float],
    target: float,
) -> _Candidate:
    """Over re-rank depths, the fastest (knob, depth) reaching `target` (else the best recall)."""
    values = _values(spec, k)
    reaching: list[_Candidate] = []
    best: _Candidate | None = None
    for factor in spec.rerank_factors():
        value, measured = _smallest_reaching(values, _at_depth(spec, factor, recall), target)
        found = _Candidate(_params(spec, value, factor), measured)
        if best is None or measured > best.recall:
            best = found
        if measured < target:
            continue
        reaching.append(found)
        if value == values[0]:
            break  # a deeper re-rank cannot lower the knob further, it only costs more
        values = [v for v in values if v < value] + [value]
    if not reaching:
        assert best is not None
        return best
    if len(reaching) == 1:
        return reaching[0]
    scored = [_Candidate(c.params, c.recall, timed(c.params)) for c in reaching]
    return min(scored, key=lambda c: c.seconds)


def _at_depth(
    spec: IndexSpec, factor: int, recall: Callable[[SearchParams], float]
) -> Callable[[int], float]:
    """Recall as a function of the knob alone, at re-rank depth `factor`."""
    return lambda value: recall(_params(spec, value, factor))


def _values(spec: IndexSpec, k: int) -> list[int]:
    if spec.family is Family.IVF:
        top, start = spec.nlist, 1
    else:
        top, start = MAX_EF_SEARCH, max(16, k)
    out = [start]
    while out[-1] < top:
        out.append(min(top, out[-1] * 2))
    return out


def _smallest_reaching(
    values: list[int], recall: Callable[[int], float], target: float
) -> tuple[int, float]:
    """Smallest value with recall >= target (else the best value seen before a plateau)."""
    seen: dict[int, float] = {}
    lo, hi = values[0] - 1, 0  # largest value known to miss; smallest known to reach (0: none)
    for v in values:
        seen[v] = recall(v)
        if seen[v] >= target:
            hi = v
            break
        if lo in seen and seen[v] < seen[lo] + _PLATEAU:
            break
        lo = v
    if not hi:
        best = max(seen, key=seen.__getitem__)
        return best, seen[best]
    while hi - lo > max(1, hi // 8):
        mid = (lo + hi) // 2
        seen[mid] = recall(mid)
        lo, hi = (lo, mid) if seen[mid] >= target else (mid, hi)
    return hi, seen[hi]


def _params(spec: IndexSpec, value: int, rerank: int = 0) -> SearchParams:
    if spec.family is Family.IVF:
        return SearchParams(nprobe=value, rerank=rerank)
    return SearchParams(ef_search=value, rerank=rerank)


def _ground_truth(
    queries: np.ndarray, vectors: np.ndarray, labels: np.ndarray, held: np.ndarray, k: int
) -> np.ndarray:
    """Exact top-k labels among the indexed vectors (the held-out ones are not indexed)."""
    extra = min(len(held), k)  # held-out vectors may rank among the neighbours: fetch past them
    _, rows = faiss.knn(
        queries, np.ascontiguousarray(vectors), k + extra, faiss.METRIC_INNER_PRODUCT
    )
    found = labels[rows]
    out = np.full((len(found), k), -1, dtype=np.int64)
    for i, row in enumerate(found):
        kept = row[(row >= 0) & ~np.isin(row, held)][:k]
        out[i, : len(kept)] = kept
    return out


def _recall(found: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per-query recall (queries without any true neighbour left out)."""
    hits = [len(np.intersect1d(g[g >= 0], t[t >= 0])) for g, t in zip(found, truth, strict=True)]
    wanted = (truth >= 0).sum(axis=1)
    return (np.asarray(hits) / np.maximum(wanted, 1))[wanted > 0]


def _lower_bound(per_query: np.ndarray) -> float:
    """Mean recall less one standard error: a setting that just scrapes the target on the
    tuning queries would fall short on others about half the time."""
    if len(per_query) < 2:
        return float(per_query.mean()) if len(per_query) else 0.0
    return float(per_query.mean() - per_query.std(ddof=1) / np.sqrt(len(per_query)))


def _seconds(search: SearchFn, queries: np.ndarray, k: int, params: SearchParams) -> float:
    """Best of a few timings of one-at-a-time searches (other load only ever adds time)."""
    return min(1 / _single_query_qps(search, queries, k, params) for _ in range(_TIMING_REPEATS))


def _single_query_qps(search: SearchFn, queries: np.ndarray, k: int, params: SearchParams) -> float:
    search(queries[:1], k, params)  # warm-up
    start = time.perf_counter()
    for q in queries:
        search(q[None, :], k, params)
    return len(queries) / max(time.perf_counter() - start, 1e-9)
