"""Filtered search side by side: the shard engine vs raw Faiss, one run, one printed table.

A shard applies a metadata filter inside the Faiss search (an ID selector over the matching
labels, exact scans of small candidate sets, wider retries when the ANN search comes back
short, and default settings widened for the filter's selectivity). Two ways a hand-rolled
CLIP + Faiss script filters, on the same vectors:

  faiss+sel    raw Faiss with an IDSelectorBatch of the matching ids (the library's own
               in-index filter, no fallbacks) at the settings the shard uses for that
               filter: the QPS ratio is the shard's own cost
  post-filter  raw Faiss without a filter at the shard's unfiltered tuned setting,
               fetching k / selectivity candidates and keeping the matching ones (enough
               on average; HNSW's efSearch raised to the fetch)

For each index type and filter selectivity: recall@10 against exact filtered search, the
share of queries answered with fewer than 10 hits although thousands match, and queries per
second one at a time (the shard's time includes building the candidate set from its
metadata index; the others get their id sets prebuilt).

The last row per type, "since", is a feed's sliding window: publish time at least a bound
that moves with every query (about half the documents pass), so no two queries share a
filter; faiss+sel builds its selector from that query's prebuilt id set, in the timing.

Data: bench/index.py's clustered, normalised vectors (seeded, cached); every document has
metadata keys p50, p10, p1, p01 whose value "0" matches 50 %, 10 %, 1 %, 0.1 % of them,
and document i is published at T0 + i seconds.

Usage: PYTHONPATH=. python bench/filters.py [--n 100000] [--dim 128]
       [--types 'Flat;IVF1024,Flat;HNSW32'] [--queries 200]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.index import dataset  # noqa: E402
from clipsearch.settings import IndexSettings  # noqa: E402
from clipsearch.types import DocRecord, DocWrite, Modality, SearchFilter, SearchParams  # noqa: E402
from index_service.shard import Shard  # noqa: E402
from index_service.vector_index import filtered_params  # noqa: E402

K = 10
SELECTIVITY = {"p50": 2, "p10": 10, "p1": 100, "p01": 1000}  # key -> one document in n
BATCH = 5000
T0 = 1.7e9


def _shard(factory: str, base: np.ndarray) -> Shard:
    shard = Shard(0, base.shape[1], IndexSettings(factory=factory))
    for start in range(0, len(base), BATCH):
        shard.upsert(
            [
                DocWrite(
                    DocRecord(
                        str(i),
                        T0 + i,
                        {key: str(i % n) for key, n in SELECTIVITY.items()},
                        has_image=True,
                    ),
                    image_vector=base[i],
                )
                for i in range(start, min(start + BATCH, len(base)))
            ]
        )
    shard.wait_for_rebuilds()
    return shard


def _raw(factory: str, base: np.ndarray) -> Any:
    index: Any = faiss.index_factory(base.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if factory.startswith("HNSW"):
        index.hnsw.efConstruction = IndexSettings().hnsw_ef_construction
    index.train(base)
    index.add(base)
    return index


def _params(factory: str, sp: SearchParams | None, sel: object, fetch: int) -> Any:
    fa: Any = faiss
    if factory.startswith("IVF"):
        return fa.SearchParametersIVF(nprobe=sp.nprobe if sp else 1, sel=sel)
    if factory.startswith("HNSW"):
        ef = max(sp.ef_search if sp else 64, fetch)
        return fa.SearchParametersHNSW(efSearch=ef, sel=sel)
    return fa.SearchParameters(sel=sel) if sel is not None else None


def _searchers(
    shard: Shard,
    raw: Any,
    factory: str,
    sp: SearchParams | None,
    queries: np.ndarray,
    flt: Callable[[int], SearchFilter],
    match: Callable[[int], np.ndarray],
    passes: Callable[[int, np.ndarray], np.ndarray],
    fetch: int,
) -> tuple[Callable[[int], np.ndarray], ...]:
    """(the shard, raw Faiss with a selector, raw Faiss post-filtered): query i -> ids.
    Query i's filter, its matching ids and which of some ids pass it come from the three
    callables (a repeated filter returns the same id array: its selector is built once)."""
    selectors: dict[int, tuple[np.ndarray, Any]] = {}

    def ours(i: int) -> np.ndarray:
        hits = shard.search(Modality.IMAGE, queries[i], K, flt(i))
        return np.array([int(r.id) for r in hits.records], dtype=np.int64)

    def with_sel(i: int) -> np.ndarray:
        ids = match(i)
        kept = selectors.get(id(ids))
        if kept is None or kept[0] is not ids:
            kept = selectors[id(ids)] = (ids, faiss.IDSelectorBatch(ids))
        widened = filtered_params(sp, len(ids) / len(shard)) if sp is not None else None
        _, lab = raw.search(queries[i : i + 1], K, params=_params(factory, widened, kept[1], K))
        return lab[0][lab[0] >= 0]

    def post(i: int) -> np.ndarray:
        _, lab = raw.search(queries[i : i + 1], fetch, params=_params(factory, sp, None, fetch))
        return lab[0][(lab[0] >= 0) & passes(i, lab[0])][:K]

    return ours, with_sel, post


def _timed(fn: Callable[[int], np.ndarray], n: int) -> tuple[list[np.ndarray], float]:
    fn(0)
    out = []
    t = time.perf_counter()
    for i in range(n):
        out.append(fn(i))
    return out, n / (time.perf_counter() - t)


def _score(found: list[np.ndarray], truth: np.ndarray) -> tuple[float, float]:
    """(recall@K, share of answers shorter than K)."""
    rec = np.mean([len(np.intersect1d(f, t)) / K for f, t in zip(found, truth, strict=True)])
    short = np.mean([len(f) < K for f in found])
    return float(rec), float(short)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--types", default="Flat;IVF1024,Flat;HNSW32")
    args = ap.parse_args()
    faiss.omp_set_num_threads(1)  # one query at a time, as a shard searches
    base, queries, _ = dataset(args.n, args.dim, args.queries, seed=5)
    ids = np.arange(args.n, dtype=np.int64)
    print(
        f"{args.n} x {args.dim} vectors, {args.queries} queries one at a time, k {K}; "
        "recall@10 vs exact filtered search / share of answers short of 10 hits / QPS"
    )
    print(
        f"{'type':<14} {'filter':>6} {'matching':>8} | {'shard':^22} | {'faiss+sel':^22} | "
        f"{'post-filter':^22} | shard QPS vs faiss+sel"
    )
    # A sliding window: query i wants documents published since a bound of its own.
    since = [args.n // 2 - i for i in range(args.queries)]
    matches = [ids[s:] for s in since]
    since_truth = np.stack(
        [
            m[faiss.knn(queries[i : i + 1], base[m], K, faiss.METRIC_INNER_PRODUCT)[1][0]]
            for i, m in enumerate(matches)
        ]
    )
    for factory in args.types.split(";"):
        t0 = time.perf_counter()
        shard = _shard(factory, base)
        stats = shard.stats().indexes[0]
        sp = stats.defaults
        raw = _raw(factory, base)
        print(
            f"{factory}: shard built in {time.perf_counter() - t0:.0f} s, active "
            f"{stats.active_type}, defaults {sp}"
        )
        searchers = partial(_searchers, shard, raw, factory, sp, queries)
        for key, one_in in SELECTIVITY.items():
            match = ids[ids % one_in == 0]
            _, gt_pos = faiss.knn(queries, base[match], K, faiss.METRIC_INNER_PRODUCT)
            flt = SearchFilter(metadata_equals=((key, "0"),))
            fns = searchers(
                lambda i, f=flt: f,  # type: ignore[misc]
                lambda i, m=match: m,  # type: ignore[misc]
                lambda i, lab, o=one_in: lab % o == 0,  # type: ignore[misc]
                min(args.n, math.ceil(K * one_in)),
            )
            _row(f"1/{one_in}", len(match), fns, match[gt_pos], args.queries)
        fns = searchers(
            lambda i: SearchFilter(time_start=T0 + since[i]),
            lambda i: matches[i],
            lambda i, lab: lab >= since[i],
            min(args.n, 2 * K),
        )
        _row("since", len(matches[0]), fns, since_truth, args.queries)
        shard.close()


def _row(
    name: str,
    matching: int,
    fns: tuple[Callable[[int], np.ndarray], ...],
    truth: np.ndarray,
    queries: int,
) -> None:
    cells = []
    qps = []
    for fn in fns:
        found, rate = _timed(fn, queries)
        rec, short = _score(found, truth)
        cells.append(f"{rec:5.3f} {short:5.1%} {rate:7.0f}")
        qps.append(rate)
    print(
        f"{'':<14} {name:>6} {matching:>8} | "
        + " | ".join(f"{c:^22}" for c in cells)
        + f" | {qps[0] / qps[1]:5.2f}x"
    )


if __name__ == "__main__":
    main()
