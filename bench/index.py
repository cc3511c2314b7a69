"""Index types side by side on embedding-like vectors, one run, one printed table.

For each factory string: build time (train on a sample + add), memory per vector (index and
index + the raw vectors a shard keeps beside it), the tuner's operating point, recall@10 of
held-out queries against exact search, and QPS one query at a time and batched, all through
the shard engine's own search path (re-ranking included). Then 4 shards vs 1 (merged top-10).

Data: a hard Gaussian mixture (topics > sub-clusters > points, unit-normalised, seeded), cached
under /tmp with its exact ground truth, plus a difficulty check (IVF nprobe=1 recall).

Usage:
  PYTHONPATH=. python bench/index.py [--n 1000000] [--dim 512] \
      [--types 'Flat;IVF1024,Flat;HNSW32'] [--shards-check 'Flat;IVF1024,Flat'] \
      [--ef-construction 0] [--milvus 200000]
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import faiss
import numpy as np

from clipsearch.settings import IndexSettings
from clipsearch.types import SearchParams
from index_service.factory import Family, IndexSpec, build_index, index_bytes, per_shard_factory
from index_service.router import shard_of
from index_service.tuner import held_out_rows, tune
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


def run_type(factory: str, base: np.ndarray, queries: np.ndarray, gt: np.ndarray, args):  # type: ignore[no-untyped-def]
    single = args.single
    spec = IndexSpec.parse(factory, base.shape[1])
    labels = np.arange(len(base), dtype=np.int64)
    store = VectorStore.of(base, labels) if spec.family is not Family.FLAT else None
    # The steps of VectorIndex._build (what a shard runs), timed apart.
    held = held_out_rows(spec, len(base), K)
    t0 = time.perf_counter()
    index = build_index(spec, base, labels, ef_construction=args.ef_construction, skip=held)
    build_s = time.perf_counter() - t0

    def search(q: np.ndarray, k: int, sp: SearchParams) -> np.ndarray:
        return _search_index(index, spec, store, q, k, sp, None, set())[1]

    t0 = time.perf_counter()
    op = tune(spec, search, base, labels, held, 0.95, K) if len(held) else None
    tune_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    index.add_with_ids(np.ascontiguousarray(base[held]), labels[held])
    build_s += time.perf_counter() - t0
    sp = SearchParams(op.nprobe, op.ef_search, op.rerank) if op else SearchParams()
    fn = lambda q: search(q, K, sp)  # noqa: E731
    idx_b = index_bytes(index) / len(base)
    raw_b = (store.nbytes / len(base)) if store else 0.0
    row = {
        "type": factory,
        "build_s": build_s,
        "tune_s": tune_s,
        "index_B": idx_b,
        "total_B": idx_b + raw_b,
        "point": point(op),
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


def point(op) -> str:  # type: ignore[no-untyped-def]
    """The operating point as text, e.g. 'np=8 rr=4' (nprobe, re-rank factor) or 'ef=64'."""
    if op is None:
        return "-"
    knob = f"np={op.nprobe}" if op.nprobe else f"ef={op.ef_search}"
    return f"{knob} rr={op.rerank}" if op.rerank else knob


def shards_check(
    factory: str, base: np.ndarray, queries: np.ndarray, sp: SearchParams, gt: np.ndarray
) -> list[str]:
    """4 shards (routed by document id, merged top-K) vs the single index, as deployed.

    Each shard builds `factory` and runs its own tuner (what a shard actor does); IVF types
    are also built with nlist / 4 per shard (index.nlist_scope = collection). Each layout is
    searched at its shards' own tuned points and at the single index's point `sp`.
    """
    spec = IndexSpec.parse(factory, base.shape[1])
    route = np.fromiter((shard_of(f"d{i}", 4) for i in range(len(base))), dtype=np.int64)
    layouts = [("same nlist", spec.factory)]
    if spec.family is Family.IVF:
        layouts.append(("nlist/4", per_shard_factory(spec.factory, 4)))
    lines = []
    for name, shard_factory in layouts:
        parts = _shard_answers(
            IndexSpec.parse(shard_factory, base.shape[1]), base, route, queries, sp
        )
        for how, merged, secs, points in parts:
            if spec.family is Family.FLAT and how == "tuned":
                continue
            lines.append(
                f"{shard_factory} x4 ({name}) at {how}: recall {recall(merged, gt):.4f}, "
                f"identical top-{K} sets {_same(merged, gt):.3f}, batched QPS "
                f"{len(queries) / secs:.0f} (4 shards in turn){points}"
            )
    return lines


def _shard_answers(spec, base, route, queries, sp):  # type: ignore[no-untyped-def]
    """[(setting, merged top-K labels, seconds, points)] for the tuned points and for `sp`."""
    per = {"tuned": ([], [], 0.0), "single's point": ([], [], 0.0)}
    ops = []
    for s in range(4):
        labels = np.flatnonzero(route == s).astype(np.int64)
        part = np.ascontiguousarray(base[labels])
        store = VectorStore.of(part, labels) if spec.family is not Family.FLAT else None
        index, op = _build_tuned(spec, part, labels, store)

        def search(q, k, p, index=index, store=store):  # type: ignore[no-untyped-def]
            return _search_index(index, spec, store, q, k, p, None, set())

        ops.append(point(op))
        tuned = SearchParams(op.nprobe, op.ef_search, op.rerank) if op else SearchParams()
        for how, params in (("tuned", tuned), ("single's point", sp)):
            t = time.perf_counter()
            d, i = search(queries, K, params)
            sims, labs, secs = per[how]
            sims.append(d)
            labs.append(i)
            per[how] = (sims, labs, secs + time.perf_counter() - t)
        del index, part, store
        gc.collect()
    out = []
    for how, (sims, labs, secs) in per.items():
        d, i = np.concatenate(sims, 1), np.concatenate(labs, 1)
        merged = np.take_along_axis(i, np.argsort(-d, axis=1, kind="stable")[:, :K], 1)
        out.append((how, merged, secs, f" [{', '.join(ops)}]" if how == "tuned" else ""))
    return out


def _build_tuned(spec, vectors, labels, store):  # type: ignore[no-untyped-def]
    """What a shard's rebuild does (VectorIndex._build): build without the tuning sample,
    tune on it, add it."""
    held = held_out_rows(spec, len(vectors), K)
    index = build_index(spec, vectors, labels, skip=held)
    if not len(held):
        return index, None

    def search(q, k, p):  # type: ignore[no-untyped-def]
        return _search_index(index, spec, store, q, k, p, None, set())[1]

    op = tune(spec, search, vectors, labels, held, 0.95, K)
    index.add_with_ids(np.ascontiguousarray(vectors[held]), labels[held])
    return index, op


def _same(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([set(x) == set(y) for x, y in zip(a, b, strict=True)]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--single", type=int, default=200, help="queries timed one at a time")
    ap.add_argument("--types", default=DEFAULT_TYPES, help="factory strings separated by ';'")
    ap.add_argument(
        "--shards-check", default="", help="types (';'-separated) also run as 4 shards vs 1"
    )
    ap.add_argument(
        "--ef-construction",
        type=int,
        default=IndexSettings().hnsw_ef_construction,
        help="HNSW; default: the server's; 0 = Faiss's 40",
    )
    ap.add_argument(
        "--milvus", type=int, default=0, help="also Milvus Lite, on the first N vectors (ours too)"
    )
    args = ap.parse_args()
    faiss.omp_set_num_threads(max(1, faiss.omp_get_max_threads()))
    t0 = time.perf_counter()
    base, queries, gt = dataset(args.n, args.dim, args.queries)
    if args.milvus:
        base = base[: args.milvus]
        _, gt = faiss.knn(queries, base, K, faiss.METRIC_INNER_PRODUCT)
    print(
        f"data {len(base)} x {args.dim} (+{args.queries} held-out queries), ready in "
        f"{time.perf_counter() - t0:.0f} s, {faiss.omp_get_max_threads()} threads"
    )
    head = (
        f"{'type':<18}{'build s':>8}{'tune s':>7}{'idx B/v':>8}{'+raw B/v':>9}"
        f"{'op point':>14}{'tuned R':>8}{'R@10':>7}{'QPS 1':>8}{'QPS batch':>10}{'nprobe1 R':>10}"
    )
    print(head)
    exact_batched = None
    for factory in args.types.split(";"):
        row, (index, spec, store, sp) = run_type(factory, base, queries, gt, args)
        if factory == "Flat":
            exact_batched = row["qpsB"]
        speed = f"  {row['qpsB'] / exact_batched:5.1f}x exact batched" if exact_batched else ""
        print(
            f"{row['type']:<18}{row['build_s']:>8.1f}{row['tune_s']:>7.1f}{row['index_B']:>8.0f}"
            f"{row['total_B']:>9.0f}{row['point']:>14}{row['tuned_recall']:>8.3f}"
            f"{row['recall']:>7.3f}{row['qps1']:>8.0f}{row['qpsB']:>10.0f}"
            f"{row.get('nprobe1', float('nan')):>10.3f}{speed}",
            flush=True,
        )
        if factory in args.shards_check.split(";"):
            one = _search_index(index, spec, store, queries, K, sp, None, set())[1]
            print(f"    1 shard: identical top-{K} sets {_same(one, gt):.3f}", flush=True)
            index = None
            gc.collect()
            for line in shards_check(factory, base, queries, sp, gt):
                print(f"    {line}", flush=True)
        del index, store
        gc.collect()
    if args.milvus:
        milvus(base, queries, gt, args.single, exact_batched)


def milvus(base, queries, gt, single: int, exact_batched: float | None) -> None:  # type: ignore[no-untyped-def]
    """Milvus Lite rows on the same vectors and queries, in the same table layout."""
    from bench.milvus_side import compare

    for row in compare(base, queries, gt, recall, 0.95, K, single):
        speed = f"  {row['qpsB'] / exact_batched:5.1f}x exact batched" if exact_batched else ""
        print(
            f"{row['type']:<18}{row['build_s']:>8.1f}{'':>24}{row['point']:>14}{'':>8}"
            f"{row['recall']:>7.3f}{row['qps1']:>8.0f}{row['qpsB']:>10.0f}{'':>10}{speed}",
            flush=True,
        )


if __name__ == "__main__":
    main()
