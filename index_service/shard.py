"""One shard: a Faiss index per modality, the id <-> label map, metadata and filters.

Pure engine: no Ray, no gRPC. Callers (the gateway) validate input; a violated invariant
here is a bug and raises ValueError.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import faiss
import numpy as np

from clipsearch.types import DocRecord, DocWrite, Modality, SearchFilter, ShardHits, ShardStats

_EMPTY = ShardHits(np.zeros(0, dtype=np.float32), (), exhausted=True)


def make_index(dim: int, factory: str) -> faiss.Index:
    """An inner-product Faiss index from a factory string, addressable by our int64 labels."""
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if not isinstance(index, faiss.IndexIDMap):
        index = faiss.IndexIDMap2(index)
    return index


class Shard:
    """Documents of one shard, searchable by image or text embedding."""

    def __init__(self, shard_id: int, dim: int, factory: str = "Flat") -> None:
        self.shard_id = shard_id
        self.dim = dim
        self.factory = factory
        self.clear()

    def clear(self) -> None:
        """Drop every document."""
        self._indexes = {m: make_index(self.dim, self.factory) for m in Modality}
        self._label_of: dict[str, int] = {}
        self._records: dict[int, DocRecord] = {}
        self._by_meta: dict[tuple[str, str], set[int]] = {}
        self._next_label = 0

    def __len__(self) -> int:
        return len(self._label_of)

    def upsert(self, writes: Sequence[DocWrite]) -> None:
        """Store documents; an existing id is replaced as a whole."""
        self.delete(w.record.id for w in writes)
        labels = np.arange(self._next_label, self._next_label + len(writes), dtype=np.int64)
        self._next_label += len(writes)
        for label, write in zip(labels.tolist(), writes, strict=True):
            self._remember(label, write.record)
        for modality in Modality:
            self._add_vectors(modality, labels, writes)

    def delete(self, doc_ids: Iterable[str]) -> int:
        """Remove documents by id; unknown ids are ignored. Returns how many existed."""
        labels = [self._forget(i) for i in doc_ids if i in self._label_of]
        if labels:
            selector = faiss.IDSelectorBatch(np.asarray(labels, dtype=np.int64))
            for index in self._indexes.values():
                index.remove_ids(selector)
        return len(labels)

    def get(self, doc_ids: Sequence[str]) -> list[DocRecord | None]:
        """Records for the ids, None where an id is not stored."""
        return [self._records[self._label_of[i]] if i in self._label_of else None for i in doc_ids]

    def search(
        self, modality: Modality, query: np.ndarray, k: int, flt: SearchFilter | None = None
    ) -> ShardHits:
        """Up to k best matches by inner product, restricted by `flt` inside Faiss."""
        index = self._indexes[modality]
        candidates = self._candidates(modality, flt)
        n_candidates = index.ntotal if candidates is None else len(candidates)
        if n_candidates == 0 or k <= 0:
            return _EMPTY
        params = None
        if candidates is not None:
            params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(candidates))  # type: ignore[call-arg]
        k_eff = min(k, n_candidates)
        sims, labels = index.search(self._as_query(query), k_eff, params=params)
        keep = labels[0] >= 0
        records = tuple(self._records[int(lb)] for lb in labels[0][keep])
        return ShardHits(sims[0][keep].astype(np.float32), records, len(records) >= n_candidates)

    def stats(self) -> ShardStats:
        """Document and vector counts."""
        return ShardStats(
            shard=self.shard_id,
            documents=len(self._label_of),
            image_vectors=int(self._indexes[Modality.IMAGE].ntotal),
            text_vectors=int(self._indexes[Modality.TEXT].ntotal),
        )

    def save(self, directory: Path) -> None:
        """Write the shard's whole state as plain files into `directory` (no fsync).

        The caller (index_service.snapshot) makes the directory atomic and checksummed and
        calls this only between writes, so the files describe one consistent moment.
        """
        for modality, index in self._indexes.items():
            faiss.write_index(index, str(directory / f"{modality.value}.faiss"))
        rows = [
            [lb, r.id, r.publish_time, dict(r.metadata), r.caption, r.has_image, r.has_text]
            for lb, r in self._records.items()
        ]
        state = {"next_label": self._next_label, "records": rows}
        (directory / "records.json").write_text(json.dumps(state, ensure_ascii=True))

    @classmethod
    def load(cls, directory: Path, shard_id: int, dim: int, factory: str) -> Shard:
        """A shard from files `save` wrote (already verified by the caller)."""
        shard = cls(shard_id, dim, factory)
        for modality in Modality:
            index = faiss.read_index(str(directory / f"{modality.value}.faiss"))
            if index.d != dim:
                raise ValueError(f"{modality.value} index has dimension {index.d}, not {dim}")
            shard._indexes[modality] = index
        state = json.loads((directory / "records.json").read_text())
        for lb, doc_id, t, meta, caption, has_image, has_text in state["records"]:
            shard._remember(int(lb), DocRecord(doc_id, t, meta, caption, has_image, has_text))
        shard._next_label = int(state["next_label"])
        return shard

    def _as_query(self, query: np.ndarray) -> np.ndarray:
        q = np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1)
        if q.shape[1] != self.dim:
            raise ValueError(f"query has dimension {q.shape[1]}, shard holds {self.dim}")
        return q

    def _add_vectors(
        self, modality: Modality, labels: np.ndarray, writes: Sequence[DocWrite]
    ) -> None:
        rows: list[tuple[int, np.ndarray]] = [
            (lb, v)
            for lb, w in zip(labels.tolist(), writes, strict=True)
            if (v := w.vector(modality)) is not None
        ]
        if not rows:
            return
        vectors = np.stack([v for _, v in rows]).astype(np.float32, copy=False)
        if vectors.shape[1] != self.dim:
            raise ValueError(
                f"{modality} vectors have dimension {vectors.shape[1]}, expected {self.dim}"
            )
        ids = np.fromiter((lb for lb, _ in rows), dtype=np.int64, count=len(rows))
        self._indexes[modality].add_with_ids(np.ascontiguousarray(vectors), ids)

    def _remember(self, label: int, record: DocRecord) -> None:
        self._label_of[record.id] = label
        self._records[label] = record
        for pair in record.metadata.items():
            self._by_meta.setdefault(pair, set()).add(label)

    def _forget(self, doc_id: str) -> int:
        label = self._label_of.pop(doc_id)
        record = self._records.pop(label)
        for pair in record.metadata.items():
            holders = self._by_meta[pair]
            holders.discard(label)
            if not holders:
                del self._by_meta[pair]
        return label

    def _candidates(self, modality: Modality, flt: SearchFilter | None) -> np.ndarray | None:
        """Labels passing the filter and holding this modality; None = no filter."""
        if flt is None or flt.is_empty:
            return None
        if flt.metadata_equals:
            sets = [self._by_meta.get(pair, set()) for pair in flt.metadata_equals]
            pool: Iterable[int] = set.intersection(*sets)
        else:
            pool = self._records.keys()
        has = "has_image" if modality is Modality.IMAGE else "has_text"
        keep = [
            lb for lb in pool if getattr(self._records[lb], has) and flt.matches(self._records[lb])
        ]
        return np.asarray(sorted(keep), dtype=np.int64)
