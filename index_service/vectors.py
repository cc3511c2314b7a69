"""Raw float32 vectors kept beside a lossy or graph index, addressed by Faiss label.

They are what a rebuild trains and fills a new index from, what re-ranks the candidates of a
compressed index exactly, and what an exact scan over a small filtered candidate set reads.
Rows are dense (a delete moves the last row into the hole), so a full copy is one slice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np


class GrowArray:
    """A 1-d numpy array indexed by label that grows (by doubling) on demand."""

    def __init__(self, dtype: type | np.dtype, fill: object = 0) -> None:
        self._fill = fill
        self.data = np.full(64, fill, dtype=dtype)

    def ensure(self, size: int) -> None:
        """Make indices below `size` addressable."""
        if size > len(self.data):
            grown = np.full(max(size, 2 * len(self.data)), self._fill, dtype=self.data.dtype)
            grown[: len(self.data)] = self.data
            self.data = grown


class VectorStore:
    """label -> vector, dense rows; the caller serialises writes."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._vecs = np.zeros((0, dim), dtype=np.float32)
        self._labels = np.zeros(0, dtype=np.int64)
        self._row = GrowArray(np.int64, -1)
        self.n = 0

    def __len__(self) -> int:
        return self.n

    @classmethod
    def of(cls, vectors: np.ndarray, labels: np.ndarray) -> VectorStore:
        """A store over existing arrays (not copied; the caller must not change them)."""
        store = cls(vectors.shape[1])
        store._vecs, store._labels, store.n = vectors, labels, len(labels)
        store._row.ensure(int(labels.max()) + 1 if len(labels) else 0)
        store._row.data[labels] = np.arange(len(labels))
        return store

    @property
    def nbytes(self) -> int:
        """Memory held, counting spare capacity."""
        return int(self._vecs.nbytes + self._labels.nbytes + self._row.data.nbytes)

    def add(self, labels: np.ndarray, vectors: np.ndarray) -> None:
        """Append rows for new labels (never already stored)."""
        end = self.n + len(labels)
        if end > len(self._vecs):
            self._grow(end)
        self._vecs[self.n : end] = vectors
        self._labels[self.n : end] = labels
        self._row.ensure(int(labels.max()) + 1 if len(labels) else 0)
        self._row.data[labels] = np.arange(self.n, end)
        self.n = end

    def remove(self, labels: np.ndarray) -> None:
        """Drop rows by label; labels not stored are ignored."""
        for label in labels.tolist():
            row = self.row_of(label)
            if row < 0:
                continue
            last = self.n - 1
            if row != last:
                moved = int(self._labels[last])
                self._vecs[row] = self._vecs[last]
                self._labels[row] = moved
                self._row.data[moved] = row
            self._row.data[label] = -1
            self.n = last

    def row_of(self, label: int) -> int:
        """Row of one label, -1 when absent."""
        return int(self._row.data[label]) if label < len(self._row.data) else -1

    def get(self, labels: np.ndarray) -> np.ndarray:
        """Vectors of stored labels, in the given order."""
        return self._vecs[self._row.data[labels]]

    def contains(self, labels: np.ndarray) -> np.ndarray:
        """Boolean mask: which labels are stored."""
        inside = labels < len(self._row.data)
        out = np.zeros(len(labels), dtype=bool)
        out[inside] = self._row.data[labels[inside]] >= 0
        return out

    def view(self) -> tuple[np.ndarray, np.ndarray]:
        """(vectors, labels) of every stored row; valid until the next write."""
        return self._vecs[: self.n], self._labels[: self.n]

    def copy(self) -> tuple[np.ndarray, np.ndarray]:
        """An independent copy of every stored row (what a background rebuild reads)."""
        vecs, labels = self.view()
        return vecs.copy(), labels.copy()

    def save(self, directory: Path, stem: str) -> None:
        """Write rows as two .npy files."""
        vecs, labels = self.view()
        np.save(directory / f"{stem}.vectors.npy", vecs)
        np.save(directory / f"{stem}.labels.npy", labels)

    @classmethod
    def load(cls, directory: Path, stem: str, dim: int, mmap: bool) -> VectorStore:
        """Rows `save` wrote; with mmap they are mapped copy-on-write (pages read on use)."""
        mode: Literal["c"] | None = "c" if mmap else None
        vecs = np.load(directory / f"{stem}.vectors.npy", mmap_mode=mode)
        labels = np.load(directory / f"{stem}.labels.npy").astype(np.int64)
        if vecs.ndim != 2 or vecs.shape[1] != dim or len(labels) != len(vecs):
            raise ValueError(f"{stem} vectors have shape {vecs.shape}, expected (n, {dim})")
        return cls.of(vecs, labels)

    def _grow(self, size: int) -> None:
        cap = max(size, 2 * len(self._vecs), 1024)
        vecs = np.zeros((cap, self.dim), dtype=np.float32)
        vecs[: self.n] = self._vecs[: self.n]
        labels = np.zeros(cap, dtype=np.int64)
        labels[: self.n] = self._labels[: self.n]
        self._vecs, self._labels = vecs, labels
