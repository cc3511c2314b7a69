"""Every supported index type end to end on small data: build, tune, search, filter, delete."""

from __future__ import annotations

import numpy as np
import pytest

from clipsearch.types import DocRecord, DocWrite, Modality, SearchFilter, SearchParams, ShardHits
from index_service.factory import IndexSpec
from index_service.shard import Shard
from tests.index_fixtures import ALL_TYPES, ANN_TYPES, DIM, brute, built, clustered, docs, recall

N = 3000


@pytest.fixture(scope="module", params=ALL_TYPES)
def shard_and_data(request: pytest.FixtureRequest) -> tuple[Shard, np.ndarray]:
    data = clustered(N + 50, seed=1)  # the last 50 are queries from the same distribution
    shard = built(request.param, data[:N], target_recall=0.9)
    yield shard, data
    shard.close()


def test_shard_switches_to_the_configured_type(shard_and_data: tuple[Shard, np.ndarray]) -> None:
    shard, _ = shard_and_data
    (image, text) = shard.stats().indexes
    assert image.active_type == image.configured_type == shard.factory
    assert image.vectors == N and image.tombstones == 0 and not image.rebuilding
    assert image.bytes_per_vector > 0
    assert text.vectors == 0 and text.active_type == "Flat"
    if shard.factory != "Flat":
        assert image.operating_point is not None
        assert image.operating_point.recall >= 0.9


def test_recall_on_queries_not_stored(shard_and_data: tuple[Shard, np.ndarray]) -> None:
    shard, data = shard_and_data
    writes = docs(data[:N])
    got = [
        recall([r.id for r in shard.search(Modality.IMAGE, q, 10).records], brute(writes, q, 10))
        for q in data[N:]
    ]
    assert np.mean(got) >= (1.0 if shard.factory == "Flat" else 0.8)


def test_every_search_returns_k_sorted_hits(shard_and_data: tuple[Shard, np.ndarray]) -> None:
    shard, data = shard_and_data
    for q in data[N : N + 10]:
        for params in (None, SearchParams(nprobe=1, ef_search=10)):
            hits = shard.search(Modality.IMAGE, q, 20, params=params)
            assert len(hits.records) == 20 and not hits.exhausted
            assert len({r.id for r in hits.records}) == 20
            assert np.all(np.diff(hits.similarities) <= 1e-5)


def test_selective_filter_is_exact(shard_and_data: tuple[Shard, np.ndarray]) -> None:
    shard, data = shard_and_data
    flt = SearchFilter(metadata_equals=(("tenth", "3"),), time_start=500.0)
    for q in data[N : N + 5]:
        hits = shard.search(Modality.IMAGE, q, 10, flt, SearchParams(nprobe=1, ef_search=10))
        assert [r.id for r in hits.records] == brute(docs(data[:N]), q, 10, flt)


def _same_hits(got: ShardHits, want: ShardHits, tol: float = 1e-5) -> None:
    """The same hits in the same order, up to float rounding: a batch's scores come from a
    matrix product, a lone query's from per-vector sums, so documents whose scores tie
    within `tol` may swap places (or, at the k-th place, be exchanged)."""
    np.testing.assert_allclose(got.similarities, want.similarities, atol=tol)
    wanted = {r.id: s for r, s in zip(want.records, want.similarities, strict=True)}
    for record, sim in zip(got.records, got.similarities, strict=True):
        if record.id in wanted:
            assert abs(wanted[record.id] - sim) <= tol
        else:  # a tie at the cut
            assert sim <= want.similarities[-1] + tol


def test_a_batch_answers_every_query_as_alone(shard_and_data: tuple[Shard, np.ndarray]) -> None:
    """Coalesced searches run as one batched index search and answer as they would alone."""
    shard, data = shard_and_data
    queries = data[N:]
    flt = SearchFilter(metadata_equals=(("tenth", "3"),))
    for k, f, params in ((10, None, None), (25, None, SearchParams(2, 12)), (10, flt, None)):
        batch = shard.search_many(Modality.IMAGE, queries, k, f, params)
        assert len(batch) == len(queries)
        for q, together in zip(queries, batch, strict=True):
            alone = shard.search(Modality.IMAGE, q, k, f, params)
            assert len(together.records) == len(alone.records) == k
            _same_hits(together, alone)


def test_delete_and_replace_never_surface_old_versions() -> None:
    vectors = clustered(N + 50, seed=2)  # the last 50 become new versions of documents
    for factory in ANN_TYPES:
        shard = built(factory, vectors[:N])
        gone = [f"d{i}" for i in range(0, 300, 3)]
        shard.delete(gone)
        replaced = [i for i in range(300) if i % 3][:50]
        moved = dict(zip(replaced, vectors[N:], strict=True))
        shard.upsert(
            [DocWrite(DocRecord(f"d{i}", 0, {}, "v2", True), image_vector=moved[i]) for i in moved]
        )
        batch = shard.search_many(Modality.IMAGE, vectors[:300], 10)  # as coalesced
        for i in range(300):
            ids = [r.id for r in shard.search(Modality.IMAGE, vectors[i], 10).records]
            assert not set(ids) & set(gone), factory
            if i in moved:  # the old vector of a replaced document no longer finds it
                assert f"d{i}" not in ids, factory
            assert [r.id for r in batch[i].records] == ids, factory
        for i, vec in moved.items():
            # Every list, a long walk and the deepest re-rank: the exact match must win
            # whatever operating point the (timing-based) tuner picked on this machine.
            wide = SearchParams(nprobe=16, ef_search=512, rerank=64)
            top = shard.search(Modality.IMAGE, vec, 1, params=wide).records[0]
            assert (top.id, top.caption) == (f"d{i}", "v2"), factory
        assert shard.get(gone[:1]) == [None]
        shard.close()


def test_unsupported_factory_is_refused_with_the_list() -> None:
    with pytest.raises(ValueError, match="not supported"):
        Shard(0, DIM, "LSH")
    with pytest.raises(ValueError, match="does not fit dimension"):
        IndexSpec.parse("IVF16,PQ5", DIM)
