"""The shard engine against brute force (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest

from clipsearch.types import DocRecord, DocWrite, Modality, SearchFilter
from index_service.router import group_by_shard, shard_of
from index_service.shard import Shard
from tests.fakes import unit_vectors

DIM = 24


def _writes(n: int, seed: int = 0, prefix: str = "d") -> list[DocWrite]:
    vecs = unit_vectors(n, DIM, seed)
    return [
        DocWrite(
            DocRecord(
                id=f"{prefix}{i}",
                publish_time=float(i * 1000),
                metadata={"parity": "even" if i % 2 == 0 else "odd", "third": str(i % 3)},
                caption=f"caption {i}",
                has_image=True,
                has_text=i % 4 != 0,
            ),
            image_vector=vecs[i],
            text_vector=vecs[(i + 1) % n] if i % 4 != 0 else None,
        )
        for i in range(n)
    ]


def _brute(
    writes: list[DocWrite],
    q: np.ndarray,
    k: int,
    flt: SearchFilter | None,
    modality: Modality = Modality.IMAGE,
) -> list[str]:
    rows = [
        (float(w.vector(modality) @ q), w.record.id)
        for w in writes
        if w.vector(modality) is not None and (flt is None or flt.matches(w.record))
    ]
    return [i for _, i in sorted(rows, key=lambda r: -r[0])[:k]]


def test_search_equals_brute_force_for_both_modalities() -> None:
    shard, writes = Shard(0, DIM), _writes(200)
    shard.upsert(writes)
    for seed in range(5):
        q = unit_vectors(1, DIM, 100 + seed)[0]
        for modality in Modality:
            hits = shard.search(modality, q, 10)
            assert [r.id for r in hits.records] == _brute(writes, q, 10, None, modality)
            assert np.all(np.diff(hits.similarities) <= 1e-7)


@pytest.mark.parametrize(
    "flt",
    [
        SearchFilter(metadata_equals=(("parity", "odd"),)),
        SearchFilter(metadata_equals=(("parity", "even"), ("third", "1"))),
        SearchFilter(time_start=50_000.0, time_end=120_000.0),
        SearchFilter(metadata_equals=(("third", "2"),), time_start=100_000.0),
    ],
)
def test_filtered_search_returns_k_matches_whenever_they_exist(flt: SearchFilter) -> None:
    shard, writes = Shard(0, DIM), _writes(200)
    shard.upsert(writes)
    q = unit_vectors(1, DIM, 7)[0]
    hits = shard.search(Modality.IMAGE, q, 10, flt)
    assert [r.id for r in hits.records] == _brute(writes, q, 10, flt)
    assert len(hits.records) == 10
    assert all(flt.matches(r) for r in hits.records)


def test_filter_matching_nothing_is_empty_and_exhausted() -> None:
    shard = Shard(0, DIM)
    shard.upsert(_writes(20))
    hits = shard.search(
        Modality.IMAGE,
        unit_vectors(1, DIM, 1)[0],
        5,
        SearchFilter(metadata_equals=(("parity", "prime"),)),
    )
    assert hits.records == () and hits.exhausted


def test_exhausted_only_when_no_more_candidates() -> None:
    shard = Shard(0, DIM)
    shard.upsert(_writes(30))
    q = unit_vectors(1, DIM, 3)[0]
    assert not shard.search(Modality.IMAGE, q, 10).exhausted
    full = shard.search(Modality.IMAGE, q, 30)
    assert full.exhausted and len(full.records) == 30
    # Text vectors exist for 3 of every 4 documents only.
    assert len(shard.search(Modality.TEXT, q, 100).records) == 22


def test_upsert_replaces_and_delete_is_idempotent() -> None:
    shard, writes = Shard(0, DIM), _writes(10)
    shard.upsert(writes)
    new_vec = unit_vectors(1, DIM, 99)[0]
    shard.upsert(
        [DocWrite(DocRecord("d3", 5.0, {"v": "2"}, "new", True, False), image_vector=new_vec)]
    )
    assert len(shard) == 10
    top = shard.search(Modality.IMAGE, new_vec, 1)
    assert top.records[0].id == "d3" and top.records[0].caption == "new"
    assert pytest.approx(float(top.similarities[0]), abs=1e-5) == 1.0
    # The old text vector of d3 is gone with the old version.
    assert all(r.id != "d3" for r in shard.search(Modality.TEXT, new_vec, 10).records)
    assert shard.delete(["d3", "nope"]) == 1
    assert shard.delete(["d3"]) == 0
    assert shard.get(["d3", "d4"])[0] is None and shard.get(["d4"])[0].id == "d4"  # type: ignore[union-attr]
    assert shard.stats().documents == 9 and shard.stats().image_vectors == 9


def test_deleted_documents_never_match_filters() -> None:
    shard = Shard(0, DIM)
    shard.upsert(_writes(10))
    shard.delete([f"d{i}" for i in range(0, 10, 2)])
    hits = shard.search(
        Modality.IMAGE,
        unit_vectors(1, DIM, 5)[0],
        10,
        SearchFilter(metadata_equals=(("parity", "even"),)),
    )
    assert hits.records == ()


def test_routing_is_stable_and_balanced() -> None:
    ids = [f"doc-{i}" for i in range(4000)]
    assert shard_of("doc-1", 4) == shard_of("doc-1", 4)
    # Fixed values: routing must not change between releases (it decides where data lives).
    assert [shard_of(f"doc-{i}", 4) for i in range(8)] == [0, 1, 2, 2, 3, 3, 2, 1]
    counts = [len(v) for v in group_by_shard(ids, 4).values()]
    assert len(counts) == 4 and min(counts) > 800


def test_save_then_load_gives_the_same_answers(tmp_path):
    shard = Shard(3, 8)
    vectors = unit_vectors(20, 8, seed=5)
    writes = [
        DocWrite(
            DocRecord(f"d{i}", float(i), {"k": str(i % 2)}, f"c{i}", True, i % 3 == 0),
            image_vector=vectors[i],
            text_vector=vectors[i] if i % 3 == 0 else None,
        )
        for i in range(20)
    ]
    shard.upsert(writes)
    shard.delete(["d4"])
    shard.save(tmp_path)
    loaded = Shard.load(tmp_path, 3, 8, "Flat")
    assert loaded.stats() == shard.stats()
    flt = SearchFilter(metadata_equals=(("k", "0"),))
    for modality in Modality:
        a = shard.search(modality, vectors[6], 5, flt)
        b = loaded.search(modality, vectors[6], 5, flt)
        assert [r.id for r in a.records] == [r.id for r in b.records]
    assert loaded.get(["d4", "d7"]) == shard.get(["d4", "d7"])
    loaded.upsert(writes[:1])  # still writable, labels continue after the saved ones
    assert len(loaded) == 19
