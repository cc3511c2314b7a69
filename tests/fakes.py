"""In-process stand-ins that run the real engines without Ray (for unit tests)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from clipsearch.types import (
    DocRecord,
    DocWrite,
    EncoderStats,
    Modality,
    SearchFilter,
    SearchParams,
    ShardHits,
    ShardStats,
    TextOptions,
)
from index_service.shard import Shard


class LocalShard:
    """A real `Shard` behind the async ShardBackend interface."""

    def __init__(self, shard: Shard) -> None:
        self.shard = shard

    async def search(
        self,
        modality: Modality,
        query: np.ndarray,
        k: int,
        flt: SearchFilter | None,
        params: SearchParams | None = None,
        deadline: float | None = None,
    ) -> ShardHits:
        return self.shard.search(modality, query, k, flt, params)

    async def upsert(self, writes: Sequence[DocWrite]) -> int:
        self.shard.upsert(writes)
        return len(writes)

    async def delete(self, doc_ids: Sequence[str]) -> int:
        return self.shard.delete(doc_ids)

    async def get(self, doc_ids: Sequence[str]) -> list[DocRecord | None]:
        return self.shard.get(doc_ids)

    async def stats(self) -> ShardStats:
        return self.shard.stats()


class HashEncoder:
    """Deterministic fake encoder: a seeded random unit vector per input."""

    model_id = "hash-encoder"

    def __init__(self, dim: int = 16) -> None:
        self.dim = dim

    def _vec(self, data: bytes) -> np.ndarray:
        seed = int.from_bytes(data[:8].ljust(8, b"\0"), "little") ^ len(data)
        v = np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)
        return v / np.linalg.norm(v)

    async def encode_texts(
        self, texts: Sequence[str], options: TextOptions | None = None
    ) -> np.ndarray:
        template = (options.prompt_template if options else None) or "{}"
        return np.stack([self._vec(template.replace("{}", t).encode()) for t in texts])

    async def encode_images(self, images: Sequence[bytes]) -> np.ndarray:
        return np.stack([self._vec(b) for b in images])

    async def stats(self) -> EncoderStats:
        return EncoderStats(self.model_id, self.dim, "cpu", "fp32", 77, 224, replicas=1)


def unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    """`n` random L2-normalised float32 rows."""
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)
