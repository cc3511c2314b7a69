"""Index types side by side on embedding-like vectors, one run, one printed table.

For each factory string: build time (train on a sample + add), memory per vector (index and
index + the raw vectors a shard keeps beside it), the tuner's operating point, recall@10 of
held-out queries against exact search, and QPS one query at a time and batched, all through
the shard engine's own search path (re-ranking included). Then 4 shards vs 1 (merged top-10).

Data: a hard Gaussian mixture (topics > sub-clusters > points, unit-normalised, seeded), cached
under /tmp with its exact ground truth, plus a difficulty check (IVF nprobe=1 recall).

Usage:
  PYTHONPATH=. python bench/index.py [--n 1000000] [--dim 512] \
      [--types 'Flat;IVF1024,Flat;HNSW32'] [--shards-check]
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import faiss
import numpy as np

from clipsearch.types import SearchParams
from index_service.factory import Family, IndexSpec, build_index, index_bytes
from index_service.router import shard_of
from index_service.tuner import tune
from index_service.vector_index import _search_index
from index_service.vectors import VectorStore

K = 10
CACHE = Path("/tmp/clipsearch-bench")
DEFAULT_TYPES = "Flat;IVF1024,Flat;HNSW32;IVF1024,PQ64;IVF1024,PQ128x4fs;IVF1024,RaBitQ;IVF1024,SQ8"


def dataset(n: int, dim: int, nq: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(base, queries, exact top-K labels of each query), cached on disk."""
    CACHE.mkdir(exist_ok=True)
    stem = CACHE / f"mix-{n}x{dim}-q{nq}-s{seed}"
    if not stem.with_suffix(".gt.npy").exists():
        rng = np.random.default_rng(seed)
        # Overlapping clusters: 64 topics, each a cloud of sub-centres, each a cloud of points.
        topics = rng.standard_normal((64, dim)).astype(np.float32)
        centres = topics[rng.integers(0, 64, max(64, n // 250))]
        centres += 0.6 * rng.standard_normal(centres.shape, dtype=np.float32)
        x = np.empty((n + nq, dim), dtype=np.float32)
        for s in range(0, n + nq, 100_000):
            e = min(s + 100_000, n + nq)
            pick = centres[rng.integers(0, len(centres), e - s)]
            x[s:e] = pick + 1.0 * rng.standard_normal((e - s, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        _, gt = faiss.knn(x[n:], x[:n], K, faiss.METRIC_INNER_PRODUCT)
        np.save(stem.with_suffix(".x.npy"), x)
        np.save(stem.with_suffix(".gt.npy"), gt)
    x = np.load(stem.with_suffix(".x.npy"), mmap_mode="r")
    return (
        np.ascontiguousarray(x[:n]),
        np.ascontiguousarray(x[n:]),
        np.load(stem.with_suffix(".gt.npy")),
    )


def recall(found: np.ndarray, gt: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(f, g)) / K for f, g in zip(found, gt, strict=True)]))


def qps_single(fn, queries: np.ndarray, n: int) -> float:  # type: ignore[no-untyped-def]
    fn(queries[:1])
    t = time.perf_counter()
    for q in queries[:n]:
        fn(q[None, :])
    return n / (time.perf_counter() - t)


def qps_batched(fn, queries: np.ndarray) -> float:  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    fn(queries)
    return len(queries) / (time.perf_counter() - t)


def run_type(factory: str, base: np.ndarray, queries: np.ndarray, gt: np.ndarray, single: int):  # type: ignore[no-untyped-def]
    spec = IndexSpec.parse(factory, base.shape[1])
    labels = np.arange(len(base), dtype=np.int64)
    t0 = time.perf_counter()
    index = build_index(spec, base, labels)
    build_s = time.perf_counter() - t0
    store = VectorStore.of(base, labels) if spec.family is not Family.FLAT else None

    def search(q: np.ndarray, k: int, sp: SearchParams) -> np.ndarray:
        return _search_index(index, spec, store, q, k, sp, None, set())[1]

    t0 = time.perf_counter()
    op = tune(spec, search, base, labels, 0.95, K)
    tune_s = time.perf_counter() - t0
    sp = SearchParams(op.nprobe, op.ef_search) if op else SearchParams()
    fn = lambda q: search(q, K, sp)  # noqa: E731
    idx_b = index_bytes(index) / len(base)
    raw_b = (store.nbytes / len(base)) if store else 0.0
    row = {
        "type": factory,
        "build_s": build_s,
        "tune_s": tune_s,
        "index_B": idx_b,
        "total_B": idx_b + raw_b,
        "point": f"nprobe={op.nprobe}" if op and op.nprobe else f"ef={op.ef_search}" if op else "-",
        "tuned_recall": op.recall if op else 1.0,
        "recall": recall(fn(queries), gt),
        "qps1": qps_single(
            fn, queries, single if spec.family is not Family.FLAT else min(single, 30)
        ),
        "qpsB": qps_batched(fn, queries),
    }
    if spec.family is Family.IVF:
        row["nprobe1"] = recall(search(queries, K, SearchParams(nprobe=1)), gt)
    return row, (index, spec, store, sp)


def shards_check(
    factory: str, base: np.ndarray, queries: np.ndarray, sp: SearchParams, one: np.ndarray
) -> str:
    """Merged top-K over 4 shards (routed by document id) vs the single index's answer."""
    spec = IndexSpec.parse(factory, base.shape[1])
    route = np.fromiter((shard_of(f"d{i}", 4) for i in range(len(base))), dtype=np.int64)
    sims, labs = [], []
    for s in range(4):
        labels = np.flatnonzero(route == s).astype(np.int64)
        part = np.ascontiguousarray(base[labels])
        index = build_index(spec, part, labels)
        store = VectorStore.of(part, labels) if spec.family is not Family.FLAT else None
        d, i = _search_index(index, spec, store, queries, K, sp, None, set())
        sims.append(d)
        labs.append(i)
        del index, part
        gc.collect()
    d, i = np.concatenate(sims, 1), np.concatenate(labs, 1)
    merged = np.take_along_axis(i, np.argsort(-d, axis=1, kind="stable")[:, :K], 1)
    same = float(np.mean([set(a) == set(b) for a, b in zip(merged, one, strict=True)]))
    return f"{factory}: 4-shard vs 1-shard identical top-{K} sets {same:.3f}", merged


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--single", type=int, default=200, help="queries timed one at a time")
    ap.add_argument("--types", default=DEFAULT_TYPES, help="factory strings separated by ';'")
    ap.add_argument("--shards-check", action="store_true")
    args = ap.parse_args()
    faiss.omp_set_num_threads(max(1, faiss.omp_get_max_threads()))
    t0 = time.perf_counter()
    base, queries, gt = dataset(args.n, args.dim, args.queries)
    print(
        f"data {args.n} x {args.dim} (+{args.queries} held-out queries), ready in "
        f"{time.perf_counter() - t0:.0f} s, {faiss.omp_get_max_threads()} threads"
    )
    head = (
        f"{'type':<18}{'build s':>8}{'tune s':>7}{'idx B/v':>8}{'+raw B/v':>9}"
        f"{'op point':>12}{'tuned R':>8}{'R@10':>7}{'QPS 1':>8}{'QPS batch':>10}{'nprobe1 R':>10}"
    )
    print(head)
    exact_batched = None
    for factory in args.types.split(";"):
        row, (index, spec, store, sp) = run_type(factory, base, queries, gt, args.single)
        if factory == "Flat":
            exact_batched = row["qpsB"]
        speed = f"  {row['qpsB'] / exact_batched:5.1f}x exact batched" if exact_batched else ""
        print(
            f"{row['type']:<18}{row['build_s']:>8.1f}{row['tune_s']:>7.1f}{row['index_B']:>8.0f}"
            f"{row['total_B']:>9.0f}{row['point']:>12}{row['tuned_recall']:>8.3f}"
            f"{row['recall']:>7.3f}{row['qps1']:>8.0f}{row['qpsB']:>10.0f}"
            f"{row.get('nprobe1', float('nan')):>10.3f}{speed}",
            flush=True,
        )
        if args.shards_check:
            one = _search_index(index, spec, store, queries, K, sp, None, set())[1]
            index = None
            gc.collect()
            line, merged = shards_check(factory, base, queries, sp, one)
            r1, r4 = recall(one, gt), recall(merged, gt)
            print(f"    {line}; recall 1 shard {r1:.4f}, 4 shards {r4:.4f}", flush=True)
        del index, store
        gc.collect()


if __name__ == "__main__":
    main()
