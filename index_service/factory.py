"""What a Faiss factory string means for a shard: its family, training needs, search knobs,
memory, and how to build one from raw vectors.

Supported (inner product): Flat, IVF{n},Flat, HNSW{M}, IVF{n},PQ{m}, IVF{n},PQ{m}x4fs,
IVF{n},RaBitQ, IVF{n},SQ8.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

FLAT = "Flat"
MAX_EF_SEARCH = 4096
MAX_RERANK = 64
"""Deepest re-rank: k x this many candidates of a lossy index are re-ranked exactly."""
# Faiss warns below 39 training points per centroid; below that k-means is poor.
_POINTS_PER_CENTROID = 39
# Training never needs more than this many points per centroid (Faiss subsamples too).
_SAMPLE_PER_CENTROID = 64
# A graph index is no faster than exact search over fewer vectors than this.
_HNSW_MIN_VECTORS = 10_000
_ADD_CHUNK = 65_536
# Lossy codes fetch refine x k candidates, re-ranked exactly on the raw vectors. These are the
# depths used before the tuner has run (it then picks the depth jointly with nprobe): coarser
# codes need a deeper list (measured on 512-d clustered data: 4-bit PQ loses true neighbours
# beyond 8x k). Re-ranking 16 x k vectors costs ~0.1 ms, far below the coarse search.
_REFINE = {"Flat": 0, "SQ8": 2, "RaBitQ": 8, "PQx8": 8, "PQx4": 16}


class Family(enum.StrEnum):
    """How an index searches, which decides its knob and whether it can delete."""

    FLAT = "flat"
    IVF = "ivf"
    HNSW = "hnsw"


@dataclass(frozen=True, slots=True)
class IndexSpec:
    """A parsed, validated factory string."""

    factory: str
    family: Family
    nlist: int = 0
    refine: int = 0
    codebook_bits: int = 0

    @classmethod
    def parse(cls, factory: str, dim: int) -> IndexSpec:
        """Validate `factory` for vectors of `dim` (ValueError naming the problem)."""
        f = factory.strip()
        if f == FLAT:
            return cls(f, Family.FLAT)
        if m := re.fullmatch(r"HNSW(\d+)", f):
            _try_factory(f, dim)
            return cls(f, Family.HNSW)
        m = re.fullmatch(r"IVF(\d+),(Flat|SQ8|RaBitQ|PQ(\d+)(x4fs)?)", f)
        if m is None:
            raise ValueError(
                f"index factory {factory!r} is not supported; use Flat, IVF{{n}},Flat, HNSW{{M}}, "
                "IVF{n},PQ{m}, IVF{n},PQ{m}x4fs, IVF{n},RaBitQ or IVF{n},SQ8"
            )
        _try_factory(f, dim)
        codes = m.group(2)
        bits = 4 if m.group(4) else 8 if codes.startswith("PQ") else 0
        return cls(
            f, Family.IVF, int(m.group(1)), _REFINE[codes if not bits else f"PQx{bits}"], bits
        )

    def rerank_factors(self) -> tuple[int, ...]:
        """Re-rank depths the tuner may choose from, cheapest first ((0,): nothing to re-rank)."""
        if not self.lossy:
            return (0,)
        return tuple(2**i for i in range(MAX_RERANK.bit_length()))

    @property
    def lossy(self) -> bool:
        """Whether codes are compressed (candidates are then re-ranked on raw vectors)."""
        return self.refine > 0

    @property
    def needs_training(self) -> bool:
        """Whether the index must see sample vectors before it can hold any."""
        return self.family is Family.IVF

    def auto_train_min(self) -> int:
        """Vectors needed before this type is worth building (settings: train_min_vectors 0)."""
        if self.family is Family.FLAT:
            return 0
        if self.family is Family.HNSW:
            return _HNSW_MIN_VECTORS
        need = _POINTS_PER_CENTROID * self.nlist
        if self.codebook_bits:
            need = max(need, _POINTS_PER_CENTROID * 2**self.codebook_bits)
        return need

    def train_sample_size(self, n: int) -> int:
        """How many of `n` vectors to train on."""
        per = _SAMPLE_PER_CENTROID * max(self.nlist, 2**self.codebook_bits)
        return min(n, max(per, self.auto_train_min()))


def per_shard_factory(factory: str, shards: int) -> str:
    """The factory each of `shards` shards builds when IVF{n} counts lists for the whole
    collection: IVF{n / shards}, so every list holds as many vectors as in one index."""
    m = re.fullmatch(r"IVF(\d+),(.+)", factory.strip())
    if m is None or shards <= 1:
        return factory.strip()
    return f"IVF{max(1, int(m.group(1)) // shards)},{m.group(2)}"


def _try_factory(factory: str, dim: int) -> None:
    try:
        faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ValueError(f"index factory {factory!r} does not fit dimension {dim}") from exc


def empty_index(spec: IndexSpec, dim: int) -> faiss.Index:
    """An untrained index of `spec`, addressable by our int64 labels."""
    index = faiss.index_factory(dim, spec.factory, faiss.METRIC_INNER_PRODUCT)
    if spec.family is not Family.IVF:  # IVF takes ids natively and can remove them
        index = faiss.IndexIDMap2(index)
    return index


def build_index(
    spec: IndexSpec,
    vectors: np.ndarray,
    labels: np.ndarray,
    seed: int = 0,
    ef_construction: int = 0,
    skip: np.ndarray | None = None,
) -> faiss.Index:
    """A trained index of `spec` holding `vectors` under `labels` (training on a sample).

    `ef_construction`: HNSW candidate list while linking (0 = Faiss's default, 40).
    `skip`: sorted rows not to add and not to train on (the tuner's held-out queries: a
    query that trained the codebooks is encoded more faithfully than a new one, which made a
    shallow re-rank look good enough for lossy codes on small data).
    """
    index = empty_index(spec, vectors.shape[1])
    if spec.family is Family.HNSW and ef_construction:
        hnsw: Any = _inner(index)
        hnsw.hnsw.efConstruction = ef_construction
    if spec.needs_training:
        rng = np.random.default_rng(seed)
        pool = np.arange(len(vectors))
        if skip is not None and len(skip):
            pool = np.setdiff1d(pool, skip, assume_unique=True)
        take = spec.train_sample_size(len(pool))
        rows = np.sort(rng.choice(pool, size=take, replace=False))
        index.train(np.ascontiguousarray(vectors[rows]))
    for start in range(0, len(vectors), _ADD_CHUNK):
        end = min(start + _ADD_CHUNK, len(vectors))
        rows = np.arange(start, end)
        if skip is not None and len(skip):
            rows = rows[~np.isin(rows, skip)]
        index.add_with_ids(np.ascontiguousarray(vectors[rows]), labels[rows])
    return index


def can_remove(index: faiss.Index) -> bool:
    """Whether deletes can be applied to the index itself; if not, they are tombstones.

    HNSW has no remove_ids. Fast-scan IVF has one, but on faiss 1.15.1 vectors added after
    a removal are then mostly not found (measured: 44 of 100 self-queries), so it is not used.
    """
    return not isinstance(_inner(index), faiss.IndexHNSW | faiss.IndexIVFFastScan)


def index_bytes(index: faiss.Index) -> int:
    """Approximate memory an index holds: codes, ids, graph links and coarse centroids."""
    n = int(index.ntotal)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return n * (int(ivf.code_size) + 8) + int(ivf.nlist) * int(ivf.d) * 4
    inner: Any = _inner(index)
    extra = 0
    if inner is not index:  # IndexIDMap2: id array plus the reverse hash map
        extra = n * (8 + 32)
    if isinstance(inner, faiss.IndexHNSW):
        graph: Any = inner.hnsw
        links = graph.neighbors.size() * 4 + graph.levels.size() * 4 + graph.offsets.size() * 8
        storage: Any = faiss.downcast_index(inner.storage)
        return extra + n * int(storage.code_size) + int(links)
    return extra + n * int(inner.code_size)


def describe(index: faiss.Index) -> str:
    """The factory-like name of a built index, e.g. 'IVF64,Flat'."""
    return type(_inner(index)).__name__


def _inner(index: faiss.Index) -> faiss.Index:
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexIDMap):
        return faiss.downcast_index(index.index)
    return index
