"""Filtered search returns k matching hits whenever k documents match.

The hard case: the matching documents sit far from the query, so a low-nprobe IVF search
(or a short HNSW candidate list) meets none of them; the shard must widen its search.
"""

from __future__ import annotations

import numpy as np
import pytest

from clipsearch.types import DocRecord, DocWrite, Modality, SearchFilter, SearchParams
from index_service.shard import Shard
from index_service.vector_index import EXACT_SCAN_MAX
from tests.index_fixtures import DIM, brute, settings

FAR = EXACT_SCAN_MAX + 500  # more than an exact scan takes, so the ANN path must cope


def _two_regions() -> tuple[list[DocWrite], np.ndarray]:
    """Documents around two opposite poles; only the far pole's ones are tagged 'far'."""
    rng = np.random.default_rng(3)
    pole = rng.standard_normal(DIM).astype(np.float32)
    near = pole + 0.6 * rng.standard_normal((6000, DIM)).astype(np.float32)
    far = -pole + 0.6 * rng.standard_normal((FAR, DIM)).astype(np.float32)
    x = np.concatenate([near, far])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    writes = [
        DocWrite(
            DocRecord(f"d{i}", float(i), {"side": "far" if i >= 6000 else "near"}, "", True),
            image_vector=x[i],
        )
        for i in range(len(x))
    ]
    return writes, pole / np.linalg.norm(pole)


@pytest.fixture(scope="module")
def data() -> tuple[list[DocWrite], np.ndarray]:
    return _two_regions()


@pytest.mark.parametrize("factory", ["Flat", "IVF64,Flat", "IVF64,SQ8", "HNSW16"])
def test_far_filter_still_gets_k_hits(
    factory: str, data: tuple[list[DocWrite], np.ndarray]
) -> None:
    writes, query = data
    shard = Shard(0, DIM, settings(factory, train_min=2000))
    for start in range(0, len(writes), 1000):
        shard.upsert(writes[start : start + 1000])
    assert shard.wait_for_rebuilds(120)
    assert shard.stats().indexes[0].active_type == factory
    flt = SearchFilter(metadata_equals=(("side", "far"),))
    stingy = SearchParams(nprobe=1, ef_search=16)
    for k in (10, 100):
        hits = shard.search(Modality.IMAGE, query, k, flt, stingy)
        assert len(hits.records) == k
        assert all(r.metadata["side"] == "far" for r in hits.records)
        assert np.all(np.diff(hits.similarities) <= 1e-5)
        if factory == "Flat":  # IVF stops widening at the first step with k hits
            assert [r.id for r in hits.records] == brute(writes, query, k, flt)
    # Fewer matches than k: all of them, and the answer says nothing more exists.
    few = SearchFilter(metadata_equals=(("side", "far"),), time_start=float(len(writes) - 7))
    hits = shard.search(Modality.IMAGE, query, 20, few, stingy)
    assert sorted(r.id for r in hits.records) == sorted(brute(writes, query, 20, few))
    assert len(hits.records) == 7 and hits.exhausted
    shard.close()


@pytest.mark.parametrize("factory", ["IVF64,Flat", "HNSW16", "IVF64,PQ8x4fs"])
def test_deleted_documents_never_pass_a_filter(
    factory: str, data: tuple[list[DocWrite], np.ndarray]
) -> None:
    writes, query = data
    shard = Shard(0, DIM, settings(factory, train_min=2000))
    for start in range(0, len(writes), 1000):
        shard.upsert(writes[start : start + 1000])
    assert shard.wait_for_rebuilds(120)
    far_ids = [w.record.id for w in writes[6000:]]
    shard.delete(far_ids[: FAR - 30])  # 30 far documents remain
    flt = SearchFilter(metadata_equals=(("side", "far"),))
    hits = shard.search(Modality.IMAGE, -query, 50, flt, SearchParams(nprobe=1, ef_search=16))
    assert sorted(r.id for r in hits.records) == sorted(far_ids[FAR - 30 :])
    unfiltered = shard.search(Modality.IMAGE, -query, 50)
    assert not {r.id for r in unfiltered.records} & set(far_ids[: FAR - 30])
    shard.close()
