"""An LRU embedding cache bounded in bytes, keyed by a content hash.

The key is a SHA-256 over everything that decides the vector: the model (id, dtype,
resolutions), the preprocessing (template, long-text strategy) and the input bytes. Equal
keys therefore mean equal vectors, and a cache entry can never leak across models or options.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

# Bookkeeping per entry beyond the vector itself: the 32-byte digest, the OrderedDict node
# and the numpy array header. Counting it keeps many tiny vectors from overshooting the cap.
ENTRY_OVERHEAD_BYTES = 200


@dataclass(frozen=True, slots=True)
class CacheCounters:
    """What the cache did since it was created, and what it holds now."""

    hits: int
    misses: int
    entries: int
    bytes: int
    capacity_bytes: int


def content_key(*parts: str | bytes) -> bytes:
    """A digest of `parts`, each length-prefixed so that no two part lists collide."""
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode("utf-8") if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.digest()


class EmbeddingCache:
    """Thread-safe LRU map from content key to a read-only float32 vector.

    Args:
        capacity_bytes: Upper bound on the bytes held (vectors plus per-entry overhead);
            0 disables the cache (every lookup misses, nothing is stored).
    """

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._lock = threading.Lock()

    def get(self, key: bytes) -> np.ndarray | None:
        """The cached vector (now most recently used), or None; counts a hit or a miss."""
        with self._lock:
            vector = self._entries.get(key)
            if vector is None:
                self._misses += 1
                return None
            self._entries.move_to_end(key)
            self._hits += 1
            return vector

    def put(self, key: bytes, vector: np.ndarray) -> None:
        """Store a copy of `vector`, evicting least recently used entries to stay in bounds."""
        size = _entry_bytes(vector)
        if size > self.capacity_bytes:
            return
        stored = np.array(vector, dtype=np.float32, copy=True)
        stored.setflags(write=False)  # callers share it: nobody may change it in place
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= _entry_bytes(old)
            while self._entries and self._bytes + size > self.capacity_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= _entry_bytes(evicted)
            self._entries[key] = stored
            self._bytes += size

    def counters(self) -> CacheCounters:
        """Hits, misses, entries, bytes held and capacity."""
        with self._lock:
            return CacheCounters(
                self._hits, self._misses, len(self._entries), self._bytes, self.capacity_bytes
            )


def _entry_bytes(vector: np.ndarray) -> int:
    return int(vector.size) * 4 + ENTRY_OVERHEAD_BYTES
