"""Shard.save / Shard.load for every index type, mid-rebuild, and memory-mapped."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

import index_service.vector_index as vector_index
from clipsearch.types import Modality, SearchFilter
from index_service.shard import Shard
from tests.index_fixtures import ALL_TYPES, DIM, built, clustered, docs, settings

N = 2500


def _answers(shard: Shard, queries: np.ndarray) -> list[list[str]]:
    flt = SearchFilter(metadata_equals=(("parity", "1"),))
    return [
        [r.id for r in shard.search(Modality.IMAGE, q, 10, f).records]
        for q in queries
        for f in (None, flt)
    ]


def _same_state(a: Shard, b: Shard) -> None:
    sa, sb = a.stats(), b.stats()
    assert sa.documents == sb.documents
    for ia, ib in zip(sa.indexes, sb.indexes, strict=True):
        assert (ia.active_type, ia.vectors, ia.tombstones, ia.operating_point) == (
            ib.active_type,
            ib.vectors,
            ib.tombstones,
            ib.operating_point,
        )


@pytest.mark.parametrize("mmap", [False, True])
@pytest.mark.parametrize("factory", ALL_TYPES)
def test_round_trip_gives_the_same_answers(factory: str, mmap: bool, tmp_path: Path) -> None:
    data = clustered(N + 20, seed=6)
    shard = built(factory, data[:N])
    shard.delete([f"d{i}" for i in range(0, 200, 2)])
    shard.save(tmp_path)
    loaded = Shard.load(tmp_path, 0, DIM, settings(factory), mmap=mmap)
    _same_state(shard, loaded)
    assert _answers(loaded, data[N:]) == _answers(shard, data[N:])
    # Writable afterwards; a mapped index is copied on the first write instead of aborting.
    loaded.upsert(docs(data[N:], prefix="new"))
    loaded.delete(["d1", "new3"])
    hits = loaded.search(Modality.IMAGE, data[N + 5], 10).records
    assert "new5" in {h.id for h in hits} and "new3" not in {h.id for h in hits}
    assert loaded.get(["d1", "d3"])[0] is None and loaded.get(["d3"])[0] is not None
    shard.close()
    loaded.close()


def test_save_during_a_rebuild_then_load_resumes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate, started = threading.Event(), threading.Event()
    real = vector_index.build_index

    def gated(*args, **kwargs):  # type: ignore[no-untyped-def]
        started.set()
        assert gate.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(vector_index, "build_index", gated)
    data = clustered(N + 20, seed=7)
    shard = Shard(0, DIM, settings("IVF16,Flat"))
    shard.upsert(docs(data[:N]))
    assert started.wait(10) and shard.stats().indexes[0].rebuilding
    shard.upsert(docs(data[N:], prefix="late"))  # journaled for the running build
    shard.save(tmp_path)
    gate.set()
    loaded = Shard.load(tmp_path, 0, DIM, settings("IVF16,Flat"))
    assert loaded.stats().indexes[0].active_type in ("Flat", "IVF16,Flat")
    assert loaded.wait_for_rebuilds(60) and shard.wait_for_rebuilds(60)
    assert loaded.stats().indexes[0].active_type == "IVF16,Flat"
    assert loaded.stats().indexes[0].vectors == N + 20
    hits = loaded.search(Modality.IMAGE, data[N + 1], 5).records
    assert hits[0].id == "late1"
