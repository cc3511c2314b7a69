"""Unit tests for encoder_service.cache: byte bound, LRU order, counters, keys."""

from __future__ import annotations

import numpy as np
import pytest

from encoder_service.cache import ENTRY_OVERHEAD_BYTES, EmbeddingCache, content_key

DIM = 8
ENTRY = DIM * 4 + ENTRY_OVERHEAD_BYTES


def vec(value: float) -> np.ndarray:
    return np.full(DIM, value, dtype=np.float32)


def test_hit_and_miss_are_counted() -> None:
    cache = EmbeddingCache(10 * ENTRY)
    assert cache.get(b"a") is None
    cache.put(b"a", vec(1))
    got = cache.get(b"a")
    assert got is not None
    np.testing.assert_array_equal(got, vec(1))
    counters = cache.counters()
    assert (counters.hits, counters.misses, counters.entries) == (1, 1, 1)
    assert counters.bytes == ENTRY and counters.capacity_bytes == 10 * ENTRY


def test_bytes_stay_within_capacity_evicting_least_recently_used() -> None:
    cache = EmbeddingCache(3 * ENTRY)
    for key in (b"a", b"b", b"c"):
        cache.put(key, vec(1))
    cache.get(b"a")  # a is now the most recent; b is the oldest
    cache.put(b"d", vec(2))
    assert cache.get(b"b") is None
    assert all(cache.get(k) is not None for k in (b"a", b"c", b"d"))
    assert cache.counters().bytes <= 3 * ENTRY
    assert cache.counters().entries == 3


def test_replacing_a_key_does_not_double_count() -> None:
    cache = EmbeddingCache(3 * ENTRY)
    cache.put(b"a", vec(1))
    cache.put(b"a", vec(2))
    assert cache.counters().bytes == ENTRY
    np.testing.assert_array_equal(cache.get(b"a"), vec(2))  # type: ignore[arg-type]


def test_zero_capacity_stores_nothing() -> None:
    cache = EmbeddingCache(0)
    cache.put(b"a", vec(1))
    assert cache.get(b"a") is None
    assert cache.counters().entries == 0 and cache.counters().bytes == 0


def test_stored_vectors_are_private_read_only_copies() -> None:
    cache = EmbeddingCache(10 * ENTRY)
    original = vec(1)
    cache.put(b"a", original)
    original[:] = 5  # the caller changing its array must not change the cache
    got = cache.get(b"a")
    assert got is not None and float(got[0]) == 1.0
    with pytest.raises(ValueError):
        got[0] = 3


def test_negative_capacity_is_refused() -> None:
    with pytest.raises(ValueError):
        EmbeddingCache(-1)


def test_content_key_separates_its_parts() -> None:
    assert content_key("ab", "c") != content_key("a", "bc")
    assert content_key("m", "text", "x") != content_key("m", "image", "x")
    assert content_key("m", b"\x00") == content_key("m", b"\x00")
    assert len(content_key("m")) == 32
