"""The packed form of a shard search carries every argument and every hit field intact."""

from __future__ import annotations

import numpy as np
import pytest

from clipsearch.settings import IndexSettings
from clipsearch.types import (
    DocRecord,
    DocWrite,
    Modality,
    SearchFilter,
    SearchParams,
    ShardHits,
)
from index_service import wire
from index_service.shard import Shard


@pytest.mark.parametrize(
    "flt",
    [None, SearchFilter(), SearchFilter((("lang", "en"), ("src", "x")), 10.0, None)],
)
@pytest.mark.parametrize("params", [None, SearchParams(nprobe=7, ef_search=33, rerank=4)])
def test_request_round_trip(flt: SearchFilter | None, params: SearchParams | None) -> None:
    query = np.arange(8, dtype=np.float64) / 10  # any dtype in; float32 out
    packed = wire.pack_request(Modality.TEXT, query, 5, flt, params, 123.5)
    modality, q, k, got_flt, got_params, deadline = wire.unpack_request(packed)
    assert modality is Modality.TEXT and k == 5 and deadline == 123.5
    np.testing.assert_array_equal(q, query.astype(np.float32))
    # an empty filter restricts nothing, so it travels as None
    assert got_flt == (None if flt is None or flt.is_empty else flt)
    assert got_params == params


def test_hits_round_trip() -> None:
    records = (
        DocRecord("a", 1.5, {"lang": "en"}, "a caption", True, False),
        DocRecord("b\x00é", -2.0, {}, "", False, True),
    )
    hits = ShardHits(np.array([0.9, 0.25], dtype=np.float32), records, True)
    got = wire.unpack_hits(wire.pack_hits(hits))
    assert got.records == records and got.exhausted is True
    np.testing.assert_array_equal(got.similarities, hits.similarities)


def test_packed_search_matches_direct_search() -> None:
    """The call the gateway makes answers exactly what `Shard.search` answers."""
    rng = np.random.default_rng(0)
    shard = Shard(0, 16, IndexSettings(factory="Flat"))
    vecs = rng.normal(size=(50, 16)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    shard.upsert(
        [
            DocWrite(DocRecord(f"d{i}", float(i), {"p": str(i % 3)}), image_vector=vecs[i])
            for i in range(50)
        ]
    )
    flt = SearchFilter((("p", "1"),), 5.0, 40.0)
    direct = shard.search(Modality.IMAGE, vecs[3], 4, flt)
    request = wire.pack_request(Modality.IMAGE, vecs[3], 4, flt, None, None)
    modality, q, k, f, p, _ = wire.unpack_request(request)
    packed = wire.unpack_hits(wire.pack_hits(shard.search(modality, q, k, f, p)))
    assert packed.records == direct.records and len(direct.records) == 4
    np.testing.assert_array_equal(packed.similarities, direct.similarities)
