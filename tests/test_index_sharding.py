"""IVF list counts per shard: as written (default) or divided over the shards."""

from __future__ import annotations

import pytest

from index_service.factory import per_shard_factory
from tests.index_fixtures import built, clustered


@pytest.mark.parametrize(
    ("factory", "shards", "expected"),
    [
        ("IVF1024,Flat", 4, "IVF256,Flat"),
        ("IVF1024,PQ64x4fs", 8, "IVF128,PQ64x4fs"),
        ("IVF3,SQ8", 4, "IVF1,SQ8"),
        ("IVF1024,RaBitQ", 1, "IVF1024,RaBitQ"),
        ("HNSW32", 4, "HNSW32"),
        ("Flat", 4, "Flat"),
    ],
)
def test_collection_lists_are_divided_over_shards(factory: str, shards: int, expected: str) -> None:
    assert per_shard_factory(factory, shards) == expected


@pytest.mark.parametrize(
    ("scope", "expected"), [("shard", "IVF32,Flat"), ("collection", "IVF8,Flat")]
)
def test_each_shard_builds_and_tunes_its_own_lists(scope: str, expected: str) -> None:
    shard = built("IVF32,Flat", clustered(2000), train_min=1000, shards=4, nlist_scope=scope)
    stats = shard.stats().indexes[0]
    assert stats.active_type == stats.configured_type == expected
    assert stats.operating_point is not None
    assert stats.operating_point.recall >= stats.operating_point.target_recall
    shard.close()
