"""The Ray actor that hosts one `Shard`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import ray

from clipsearch.types import DocRecord, DocWrite, Modality, SearchFilter, ShardHits, ShardStats
from index_service.shard import Shard


class ShardActor:
    """A thin remote wrapper: one call at a time, so writes never race searches."""

    def __init__(self, shard_id: int, dim: int, factory: str) -> None:
        self._shard = Shard(shard_id, dim, factory)

    def ready(self) -> int:
        """Returns the shard id once constructed (used to wait for start-up)."""
        return self._shard.shard_id

    def upsert(self, writes: Sequence[DocWrite]) -> int:
        self._shard.upsert(writes)
        return len(writes)

    def delete(self, doc_ids: Sequence[str]) -> int:
        return self._shard.delete(doc_ids)

    def get(self, doc_ids: Sequence[str]) -> list[DocRecord | None]:
        return self._shard.get(doc_ids)

    def search(
        self, modality: Modality, query: np.ndarray, k: int, flt: SearchFilter | None
    ) -> ShardHits:
        return self._shard.search(modality, query, k, flt)

    def stats(self) -> ShardStats:
        return self._shard.stats()

    def clear(self) -> None:
        self._shard.clear()


def start_shards(n: int, dim: int, factory: str, name_prefix: str = "clipsearch-shard") -> list:
    """Start `n` shard actors and wait until each is constructed."""
    remote_cls = ray.remote(num_cpus=0)(ShardActor)
    actors = [
        remote_cls.options(name=f"{name_prefix}-{i}").remote(i, dim, factory) for i in range(n)
    ]
    ray.get([a.ready.remote() for a in actors])
    return actors
