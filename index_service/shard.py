"""One shard: a vector index per modality, the id <-> label map, metadata and filters.

Pure engine: no Ray, no gRPC. Callers (the gateway) validate input; a violated invariant
here is a bug and raises ValueError. Thread-safe: searches and reads share a readers-writer
lock, writes take it exclusively, and background rebuilds swap their index in under it
(see index_service.vector_index).

Labels are int64s handed out in increasing order; an upsert of an existing id gives it a
new label and deletes the old one, so a replaced version can never be returned.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from clipsearch.settings import IndexSettings
from clipsearch.types import (
    DocRecord,
    DocWrite,
    Modality,
    SearchFilter,
    SearchParams,
    ShardHits,
    ShardStats,
)
from index_service.rwlock import RWLock
from index_service.vector_index import Candidates, VectorIndex
from index_service.vectors import GrowArray

_EMPTY = ShardHits(np.zeros(0, dtype=np.float32), (), exhausted=True)
_NO_LABELS = np.zeros(0, dtype=np.int64)
# Candidate sets of recent filters, kept until the next write (the least recently used
# goes first, so a stream of one-off filters, such as a sliding time window, does not push
# out the repeated ones), and sorted label arrays of recently filtered metadata pairs, kept
# until a write touches the pair (a filter matching half of 100k documents cost ~4 ms to
# gather per search from the pair's Python set).
POOL_CACHE = 64
PAIR_CACHE = 256
_STATE = "records.json"


class Shard:
    """Documents of one shard, searchable by image or text embedding.

    Args:
        shard_id: The shard's number.
        dim: Vector dimension.
        index: Index settings (factory string, training threshold, tuner target, GPU), or
            just a factory string with default settings otherwise.
    """

    def __init__(self, shard_id: int, dim: int, index: IndexSettings | str = "Flat") -> None:
        self.shard_id = shard_id
        self.dim = dim
        self.settings = index if isinstance(index, IndexSettings) else IndexSettings(factory=index)
        self.factory = self.settings.factory
        self._lock = RWLock()
        self._cache_lock = threading.Lock()  # searches (shared lock) add to the caches
        self._indexes: dict[Modality, VectorIndex] = {}
        self._reset()

    def _reset(self) -> None:
        for old in self._indexes.values():
            old.close(wait=False)
        self._indexes = {m: VectorIndex(self.dim, self.settings, self._lock, m) for m in Modality}
        self._label_of: dict[str, int] = {}
        self._records: dict[int, DocRecord] = {}
        self._by_meta: dict[tuple[str, str], set[int]] = {}
        self._pair_labels: dict[tuple[str, str], np.ndarray] = {}
        self._pools: dict[tuple[object, ...], Candidates] = {}
        self._times = GrowArray(np.float64)
        self._has = {m: GrowArray(np.bool_, False) for m in Modality}
        self._next_label = 0

    def clear(self) -> None:
        """Drop every document."""
        with self._lock.write():
            self._reset()

    def close(self) -> None:
        """Stop background rebuilds (waits for a running one)."""
        for index in self._indexes.values():
            index.close()

    def __len__(self) -> int:
        return len(self._label_of)

    def upsert(self, writes: Sequence[DocWrite]) -> None:
        """Store documents; an existing id is replaced as a whole."""
        batches = {m: self._vectors(m, writes) for m in Modality}
        with self._lock.write():
            self._delete_locked([w.record.id for w in writes])
            first = self._next_label
            self._next_label += len(writes)
            self._times.ensure(self._next_label)
            for has in self._has.values():
                has.ensure(self._next_label)
            for label, write in enumerate(writes, start=first):
                self._remember(label, write.record)
            for modality, (offsets, vectors) in batches.items():
                if len(offsets):
                    labels = offsets + first
                    self._has[modality].data[labels] = True
                    self._indexes[modality].add(labels, vectors)
            self._pools.clear()
            self._maybe_rebuild()

    def delete(self, doc_ids: Iterable[str]) -> int:
        """Remove documents by id; unknown ids are ignored. Returns how many existed."""
        with self._lock.write():
            removed = self._delete_locked(doc_ids)
            self._maybe_rebuild()
        return removed

    def get(self, doc_ids: Sequence[str]) -> list[DocRecord | None]:
        """Records for the ids, None where an id is not stored."""
        with self._lock.read():
            labels = [self._label_of.get(i) for i in doc_ids]
            return [None if lb is None else self._records[lb] for lb in labels]

    def search(
        self,
        modality: Modality,
        query: np.ndarray,
        k: int,
        flt: SearchFilter | None = None,
        params: SearchParams | None = None,
    ) -> ShardHits:
        """Up to k best matches by inner product, restricted by `flt` inside the index.

        Returns k hits whenever k documents match (see index_service.vector_index for how
        each index type keeps that promise); `params` overrides the tuned nprobe/efSearch.
        """
        return self.search_many(modality, np.reshape(query, (1, -1)), k, flt, params)[0]

    def search_many(
        self,
        modality: Modality,
        queries: np.ndarray,
        k: int,
        flt: SearchFilter | None = None,
        params: SearchParams | None = None,
    ) -> list[ShardHits]:
        """`search` for each row of `queries` (n x dim) with the same k, filter and
        parameters, answered by one batched index search: what a shard does with the
        concurrent searches the gateway coalesces into one call."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"query has dimension {queries.shape[-1]}, shard holds {self.dim}")
        index = self._indexes[modality]
        with self._lock.write() if index.exclusive_search else self._lock.read():
            allowed = self._candidates(modality, flt)
            n = len(index) if allowed is None else len(allowed)
            if n == 0 or k <= 0:
                return [_EMPTY] * len(queries)
            answers = []
            for sims, labels in index.search_many(queries, k, allowed, params):
                records = tuple(self._records[lb] for lb in labels.tolist())
                answers.append(ShardHits(sims.astype(np.float32), records, len(records) >= n))
        return answers

    def stats(self) -> ShardStats:
        """Document and vector counts, and each modality index's state."""
        with self._lock.read():
            indexes = tuple(self._indexes[m].stats() for m in Modality)
            return ShardStats(
                shard=self.shard_id,
                documents=len(self._label_of),
                image_vectors=indexes[0].vectors,
                text_vectors=indexes[1].vectors,
                indexes=indexes,
            )

    def wait_for_rebuilds(self, timeout: float | None = None) -> bool:
        """Block until no background rebuild runs (tests, benchmarks); True if none does."""
        return all(index.wait(timeout) for index in self._indexes.values())

    def save(self, directory: Path) -> None:
        """Write the shard's whole state as plain files into `directory` (no fsync).

        Consistent even while writes and a background rebuild run: it holds the lock, so it
        writes the index searches see now plus the raw vectors a rebuild starts from; `load`
        gives the same answers and resumes the rebuild. The caller (index_service.snapshot)
        makes the directory atomic and checksummed.
        """
        with self._lock.read():
            states = {m.value: self._indexes[m].save(directory) for m in Modality}
            rows = [
                [lb, r.id, r.publish_time, dict(r.metadata), r.caption, r.has_image, r.has_text]
                for lb, r in self._records.items()
            ]
            state = {"next_label": self._next_label, "records": rows, "indexes": states}
            (directory / _STATE).write_text(json.dumps(state, ensure_ascii=True))

    @classmethod
    def load(
        cls,
        directory: Path,
        shard_id: int,
        dim: int,
        index: IndexSettings | str,
        *,
        mmap: bool = False,
    ) -> Shard:
        """A shard from files `save` wrote (already verified by the caller).

        With `mmap`, index files and raw vectors are memory-mapped where Faiss allows
        (pages are read on use); the first write to a mapped index copies it into memory.
        """
        shard = cls(shard_id, dim, index)
        state = json.loads((directory / _STATE).read_text())
        for modality in Modality:
            shard._indexes[modality].restore(directory, state["indexes"][modality.value], mmap)
        shard._next_label = int(state["next_label"])
        shard._times.ensure(shard._next_label)
        for m in Modality:
            shard._has[m].ensure(shard._next_label)
        for lb, doc_id, t, meta, caption, has_image, has_text in state["records"]:
            shard._remember(int(lb), DocRecord(doc_id, t, meta, caption, has_image, has_text))
            shard._has[Modality.IMAGE].data[lb] = has_image
            shard._has[Modality.TEXT].data[lb] = has_text
        with shard._lock.write():
            shard._maybe_rebuild()
        return shard

    def _maybe_rebuild(self) -> None:
        for index in self._indexes.values():
            index.maybe_rebuild()

    def _vectors(
        self, modality: Modality, writes: Sequence[DocWrite]
    ) -> tuple[np.ndarray, np.ndarray]:
        """(offsets into writes, stacked vectors) of the writes carrying this modality."""
        offsets = [n for n, w in enumerate(writes) if w.vector(modality) is not None]
        if not offsets:
            return np.zeros(0, dtype=np.int64), np.zeros((0, self.dim), dtype=np.float32)
        vecs = np.stack([writes[n].vector(modality) for n in offsets]).astype(np.float32)  # type: ignore[misc]
        if vecs.ndim != 2 or vecs.shape[1] != self.dim:
            raise ValueError(f"{modality} vectors have dimension {vecs.shape[-1]}, not {self.dim}")
        return np.asarray(offsets, dtype=np.int64), np.ascontiguousarray(vecs)

    def _delete_locked(self, doc_ids: Iterable[str]) -> int:
        labels = [self._forget(i) for i in dict.fromkeys(doc_ids) if i in self._label_of]
        if not labels:
            return 0
        self._pools.clear()
        arr = np.asarray(labels, dtype=np.int64)
        for modality, index in self._indexes.items():
            has = self._has[modality].data
            mine = arr[has[arr]]
            if len(mine):
                has[mine] = False
                index.remove(mine)
        return len(labels)

    def _remember(self, label: int, record: DocRecord) -> None:
        self._label_of[record.id] = label
        self._records[label] = record
        self._times.data[label] = record.publish_time
        for pair in record.metadata.items():
            self._by_meta.setdefault(pair, set()).add(label)
            self._pair_labels.pop(pair, None)

    def _forget(self, doc_id: str) -> int:
        label = self._label_of.pop(doc_id)
        record = self._records.pop(label)
        for pair in record.metadata.items():
            self._pair_labels.pop(pair, None)
            holders = self._by_meta[pair]
            holders.discard(label)
            if not holders:
                del self._by_meta[pair]
        return label

    def _candidates(self, modality: Modality, flt: SearchFilter | None) -> Candidates | None:
        """Live labels passing the filter and holding this modality; None = no filter.
        Caller holds the lock (shared is enough); writes clear the cache under it."""
        if flt is None or flt.is_empty:
            return None
        key = (modality, flt.metadata_equals, flt.time_start, flt.time_end)
        with self._cache_lock:  # least recently used first: a hit moves to the end
            found = self._pools.pop(key, None)
            if found is not None:
                self._pools[key] = found
                return found
        found = self._passing(modality, flt)
        with self._cache_lock:
            if len(self._pools) >= POOL_CACHE:
                del self._pools[next(iter(self._pools))]
            self._pools[key] = found
        return found

    def _passing(self, modality: Modality, flt: SearchFilter) -> Candidates:
        """The labels passing `flt` that hold `modality`."""
        has = self._has[modality].data
        times = self._times.data
        if not flt.metadata_equals:  # publish time alone: one pass over every label
            n = self._next_label
            mask = has[:n].copy()
            if flt.time_start is not None:
                mask &= times[:n] >= flt.time_start
            if flt.time_end is not None:
                mask &= times[:n] < flt.time_end
            return Candidates.of_mask(mask)
        arrays = sorted((self._pair_array(p) for p in flt.metadata_equals), key=len)
        pool = arrays[0]
        for other in arrays[1:]:
            pool = np.intersect1d(pool, other, assume_unique=True)
        pool = pool[has[pool]]  # a new array: the cached ones are never changed
        if flt.time_start is not None:
            pool = pool[times[pool] >= flt.time_start]
        if flt.time_end is not None:
            pool = pool[times[pool] < flt.time_end]
        return Candidates(pool)

    def _pair_array(self, pair: tuple[str, str]) -> np.ndarray:
        """Sorted labels of the documents with metadata `pair`."""
        labels = self._pair_labels.get(pair)
        if labels is None:
            holders = self._by_meta.get(pair)
            if not holders:
                return _NO_LABELS
            labels = np.fromiter(holders, dtype=np.int64, count=len(holders))
            labels.sort()
            with self._cache_lock:
                if len(self._pair_labels) >= PAIR_CACHE:
                    del self._pair_labels[next(iter(self._pair_labels))]
                self._pair_labels[pair] = labels
        return labels
