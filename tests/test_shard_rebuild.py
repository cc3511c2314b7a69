"""The background rebuild swaps in the trained index without losing or resurrecting writes,
while other threads keep writing and searching."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import index_service.vector_index as vector_index
from clipsearch.types import DocRecord, DocWrite, Modality, SearchParams
from index_service.shard import Shard
from tests.index_fixtures import DIM, clustered, docs, settings

_SLOW_BUILD_S = 0.8


@pytest.fixture
def slow_build(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Make every build last long enough that writes land while it runs; the event tells
    when a build has started."""
    started = threading.Event()
    real = vector_index.build_index

    def build(*args, **kwargs):  # type: ignore[no-untyped-def]
        started.set()
        index = real(*args, **kwargs)
        time.sleep(_SLOW_BUILD_S)
        return index

    monkeypatch.setattr(vector_index, "build_index", build)
    return started


def _write(doc_id: str, vec: np.ndarray, version: int) -> DocWrite:
    return DocWrite(DocRecord(doc_id, 0.0, {"v": str(version)}, f"v{version}", True), vec)


@pytest.mark.parametrize("factory", ["IVF32,Flat", "HNSW16", "IVF32,PQ8x4fs"])
def test_writes_during_rebuild_survive_the_swap(factory: str, slow_build: threading.Event) -> None:
    vecs = clustered(6000, seed=4)
    shard = Shard(0, DIM, settings(factory, train_min=800))
    live: dict[str, int] = {}  # acknowledged id -> row of its current vector
    deleted: set[str] = set()
    errors: list[BaseException] = []
    stop = threading.Event()

    def searcher(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            while not stop.is_set():
                hits = shard.search(Modality.IMAGE, vecs[rng.integers(0, 6000)], 10)
                assert np.all(np.diff(hits.similarities) <= 1e-5)
        except BaseException as exc:  # noqa: BLE001 (reported by the main thread)
            errors.append(exc)

    threads = [threading.Thread(target=searcher, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    rng = np.random.default_rng(0)
    writes_during_build = 0
    row = 0
    for step in range(40):
        batch = []
        for i in rng.choice(3000, 100, replace=False):  # ids distinct within a call
            doc_id = f"d{i}"
            batch.append(_write(doc_id, vecs[row], step))
            live[doc_id], row = row, row + 1
            deleted.discard(doc_id)
        shard.upsert(batch)
        victims = [f"d{i}" for i in rng.integers(0, 3000, 20)]
        shard.delete(victims)
        for v in victims:
            live.pop(v, None)
            deleted.add(v)
        writes_during_build += shard.stats().indexes[0].rebuilding
        if step == 14:
            assert slow_build.wait(10)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert writes_during_build >= 3  # the swap really had writes to replay
    assert shard.wait_for_rebuilds(60)
    stats = shard.stats().indexes[0]
    assert stats.active_type == factory and stats.vectors == len(live)
    exhaustive = SearchParams(nprobe=32, ef_search=1024)
    for doc_id, r in live.items():
        assert shard.get([doc_id])[0] is not None
        found = shard.search(Modality.IMAGE, vecs[r], 10, params=exhaustive).records
        assert doc_id in {h.id for h in found}  # 10, not 1: 4-bit PQ ranks approximately
    assert shard.get(sorted(deleted)) == [None] * len(deleted)
    for doc_id in deleted:
        found = shard.search(Modality.IMAGE, vecs[int(doc_id[1:])], 20, params=exhaustive)
        assert doc_id not in {h.id for h in found.records}
    shard.close()


def test_searches_and_writes_go_on_while_the_rebuild_replays_its_journal(
    monkeypatch: pytest.MonkeyPatch, slow_build: threading.Event
) -> None:
    """Writes made during a build are replayed into the new index before the swap; all but
    the last few hundred are replayed with no lock held, so neither searches nor writes wait
    for them (an HNSW insert is slow: 90k of them under the exclusive lock stalled searches
    for 37 s)."""
    vecs = clustered(3200, seed=5)
    replaying, release = threading.Event(), threading.Event()
    real_replay = vector_index.VectorIndex._replay

    def replay(self, new, entries, dead):  # type: ignore[no-untyped-def]
        if not replaying.is_set():  # the first round: hold it until the test has looked
            replaying.set()
            release.wait(60)
        real_replay(self, new, entries, dead)

    monkeypatch.setattr(vector_index.VectorIndex, "_replay", replay)
    shard = Shard(0, DIM, settings("HNSW16", train_min=800))
    shard.upsert(docs(vecs[:1000]))  # past the training floor: the build starts
    assert slow_build.wait(10)
    shard.upsert(docs(vecs[1000:3000], start=1000))  # journaled: 2000 > CUTOVER_VECTORS
    assert replaying.wait(60)

    found: list[str] = []
    wrote: list[int] = []

    def search_and_write() -> None:
        found.append(shard.search(Modality.IMAGE, vecs[2500], 1).records[0].id)
        shard.upsert(docs(vecs[3000:], start=3000))
        wrote.append(len(shard))

    other = threading.Thread(target=search_and_write)
    other.start()
    other.join(30)
    release.set()
    assert found == ["d2500"], "a search waited for the rebuild's journal replay"
    assert wrote == [3200], "a write waited for the rebuild's journal replay"

    assert shard.wait_for_rebuilds(120)
    stats = shard.stats().indexes[0]
    assert stats.active_type == "HNSW16" and stats.vectors == 3200
    deep = SearchParams(ef_search=512)
    for row in range(0, 3200, 7):  # before, during and after the replay rounds
        hits = shard.search(Modality.IMAGE, vecs[row], 3, params=deep)
        assert hits.records[0].id == f"d{row}"
    shard.close()


def test_a_rebuild_that_ends_past_its_retraining_size_rebuilds_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bulk load outruns the first build: when it swaps in, the shard already holds over
    twice what it was trained and tuned on, and no further write may come to notice."""
    sizes: list[int] = []
    real = vector_index.build_index
    gate, building = threading.Event(), threading.Event()

    def build(spec, vecs, *args, **kwargs):  # type: ignore[no-untyped-def]
        sizes.append(len(vecs))
        building.set()
        gate.wait(30)  # the first build waits for the rest of the load
        return real(spec, vecs, *args, **kwargs)

    monkeypatch.setattr(vector_index, "build_index", build)
    vecs = clustered(3000, seed=6)
    shard = Shard(0, DIM, settings("IVF32,Flat", train_min=800))
    shard.upsert(docs(vecs[:1000]))
    # The background build must have taken its 1,000 vectors before the rest arrives (on a
    # busy machine its thread could otherwise start after the second upsert).
    assert building.wait(30)
    shard.upsert(docs(vecs[1000:], start=1000))  # during the first build
    gate.set()
    assert shard.wait_for_rebuilds(60)
    assert sizes == [1000, 3000]
    stats = shard.stats().indexes[0]
    assert stats.active_type == "IVF32,Flat" and stats.vectors == 3000
    shard.close()
