"""Choose default search parameters: the cheapest setting whose recall@k reaches a target.

Queries are stored vectors drawn at random; each query's own document is left out of both
the exact ground truth and the approximate answer, so recall measures real neighbours and
not the trivial self-match. Cost grows with nprobe / efSearch, so the smallest value that
reaches the target is the fastest one: sweep by doubling, then bisect the last gap.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import faiss
import numpy as np

from clipsearch.types import OperatingPoint, SearchParams
from index_service.factory import MAX_EF_SEARCH, Family, IndexSpec

SearchFn = Callable[[np.ndarray, int, SearchParams], np.ndarray]
"""(queries, k, params) -> labels (nq, k), -1 for missing."""

_QUERIES = 200
_QPS_QUERIES = 50


def tune(
    spec: IndexSpec,
    search: SearchFn,
    vectors: np.ndarray,
    labels: np.ndarray,
    target: float,
    k: int,
    seed: int = 1,
) -> OperatingPoint | None:
    """The operating point for an index of `spec` holding `vectors` (None for Flat)."""
    if spec.family is Family.FLAT or len(vectors) <= k + 1:
        return None
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(vectors), size=min(_QUERIES, len(vectors)), replace=False)
    queries = np.ascontiguousarray(vectors[rows])
    truth = _ground_truth(queries, vectors, labels, labels[rows], k)

    def recall(value: int) -> float:
        found = search(queries, k + 1, _params(spec, value))
        return _recall(found, truth, labels[rows], k)

    value, measured = _smallest_reaching(_values(spec, k), recall, target)
    params = _params(spec, value)
    return OperatingPoint(
        nprobe=params.nprobe,
        ef_search=params.ef_search,
        recall=measured,
        target_recall=target,
        k=k,
        qps=_single_query_qps(search, queries[:_QPS_QUERIES], k, params),
    )


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
    """Smallest value with recall >= target (the largest value when none reaches it)."""
    seen: dict[int, float] = {}
    lo, hi = 0, 0  # largest value known to miss (0: none yet); smallest known to reach
    for v in values:
        seen[v] = recall(v)
        if seen[v] >= target:
            hi = v
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


def _params(spec: IndexSpec, value: int) -> SearchParams:
    if spec.family is Family.IVF:
        return SearchParams(nprobe=value)
    return SearchParams(ef_search=value)


def _ground_truth(
    queries: np.ndarray, vectors: np.ndarray, labels: np.ndarray, own: np.ndarray, k: int
) -> np.ndarray:
    _, rows = faiss.knn(queries, np.ascontiguousarray(vectors), k + 1, faiss.METRIC_INNER_PRODUCT)
    return _drop_own(labels[rows], own, k)


def _drop_own(found: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """Each row without the query's own label, cut to k."""
    out = np.full((len(found), k), -1, dtype=np.int64)
    for i, row in enumerate(found):
        kept = row[(row != own[i]) & (row >= 0)][:k]
        out[i, : len(kept)] = kept
    return out


def _recall(found: np.ndarray, truth: np.ndarray, own: np.ndarray, k: int) -> float:
    got = _drop_own(found, own, k)
    hits = sum(len(np.intersect1d(g[g >= 0], t[t >= 0])) for g, t in zip(got, truth, strict=True))
    return hits / max(1, int((truth >= 0).sum()))


def _single_query_qps(search: SearchFn, queries: np.ndarray, k: int, params: SearchParams) -> float:
    search(queries[:1], k, params)  # warm-up
    start = time.perf_counter()
    for q in queries:
        search(q[None, :], k, params)
    return len(queries) / max(time.perf_counter() - start, 1e-9)
