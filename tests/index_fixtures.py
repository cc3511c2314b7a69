"""Data and oracles for the index-engine tests: clustered unit vectors, documents, brute force."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from clipsearch.settings import IndexSettings
from clipsearch.types import DocRecord, DocWrite, Modality, SearchFilter
from index_service.shard import Shard

DIM = 32
ANN_TYPES = [
    "IVF16,Flat",
    "HNSW16",
    "IVF16,PQ8",
    "IVF16,PQ8x4fs",
    "IVF16,RaBitQ",
    "IVF16,SQ8",
]
ALL_TYPES = ["Flat", *ANN_TYPES]


def clustered(n: int, dim: int = DIM, seed: int = 0, clusters: int = 24) -> np.ndarray:
    """Unit vectors around random centres, overlapping like real embeddings (not noise)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + 0.9 * rng.standard_normal((n, dim))
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def docs(
    vectors: np.ndarray, prefix: str = "d", caption: str = "v1", start: int = 0
) -> list[DocWrite]:
    """One document per vector (image vector only, ids from `start`), with metadata."""
    return [
        DocWrite(
            DocRecord(
                id=f"{prefix}{i}",
                publish_time=float(i),
                metadata={"parity": str(i % 2), "tenth": str(i % 10)},
                caption=caption,
                has_image=True,
            ),
            image_vector=v,
        )
        for i, v in enumerate(vectors, start=start)
    ]


def settings(factory: str, train_min: int = 1000, **kw: object) -> IndexSettings:
    """Index settings for small test data."""
    return IndexSettings(factory=factory, train_min_vectors=train_min, **kw)  # type: ignore[arg-type]


def built(factory: str, vectors: np.ndarray, **kw: object) -> Shard:
    """A shard holding `vectors` whose configured index has finished building."""
    shard = Shard(0, vectors.shape[1], settings(factory, **kw))
    for start in range(0, len(vectors), 500):
        shard.upsert(docs(vectors[start : start + 500], start=start))
    assert shard.wait_for_rebuilds(120)
    return shard


def brute(
    writes: Sequence[DocWrite], q: np.ndarray, k: int, flt: SearchFilter | None = None
) -> list[str]:
    """The exact top-k ids among `writes` passing `flt`."""
    rows = [
        (float(w.vector(Modality.IMAGE) @ q), w.record.id)  # type: ignore[operator]
        for w in writes
        if w.vector(Modality.IMAGE) is not None and (flt is None or flt.matches(w.record))
    ]
    return [i for _, i in sorted(rows, key=lambda r: -r[0])[:k]]


def recall(found: Sequence[str], truth: Sequence[str]) -> float:
    """|found ∩ truth| / |truth|."""
    return len(set(found) & set(truth)) / max(1, len(truth))
