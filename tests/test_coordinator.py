"""Fan-out, merge and the exact recency rule over real shard engines (no Ray, no gRPC)."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

from clipsearch.errors import NotFound, Unavailable
from clipsearch.types import DocRecord, Modality, SearchFilter, ShardHits
from gateway.coordinator import Coordinator, SearchQuery, UpsertItem
from index_service.shard import Shard
from tests.fakes import HashEncoder, LocalShard, unit_vectors

DIM = 16
DAY = 86_400.0
NOW = 1_800_000_000.0


def _coordinator(n_shards: int) -> Coordinator:
    return Coordinator(HashEncoder(DIM), [LocalShard(Shard(i, DIM)) for i in range(n_shards)])


def _items(n: int, seed: int = 0) -> list[UpsertItem]:
    vecs = unit_vectors(n, DIM, seed)
    ages = np.random.default_rng(seed + 1).uniform(0, 90, n)
    return [
        UpsertItem(
            DocRecord(f"doc-{i}", NOW - ages[i] * DAY, {"g": str(i % 5)}, has_image=True),
            image_vector=vecs[i],
        )
        for i in range(n)
    ]


def _reference(
    items: list[UpsertItem], q: np.ndarray, k: int, alpha: float, flt: SearchFilter | None = None
) -> list[tuple[str, float]]:
    scored = []
    for it in items:
        if flt is not None and not flt.matches(it.record):
            continue
        age = max(0.0, NOW - it.record.publish_time) / DAY
        scored.append((it.record.id, float(it.image_vector @ q) * math.exp(-alpha * age)))  # type: ignore[operator]
    return sorted(scored, key=lambda r: (-r[1], r[0]))[:k]


async def test_sharded_search_equals_one_exact_index() -> None:
    items = _items(500)
    sharded, single = _coordinator(4), _coordinator(1)
    await sharded.upsert(items)
    await single.upsert(items)
    for seed in range(10):
        q = SearchQuery(Modality.IMAGE, 20, vector=unit_vectors(1, DIM, 1000 + seed)[0])
        a, b = await sharded.search(q), await single.search(q)
        assert [h.record.id for h in a.hits] == [h.record.id for h in b.hits]
        assert np.allclose([h.score for h in a.hits], [h.score for h in b.hits], atol=1e-5)
        assert a.shards_answered == a.shards_total == 4


@pytest.mark.parametrize("alpha", [0.0, 0.01, 0.1, 1.0, 20.0])
async def test_recency_top_k_equals_brute_force(alpha: float) -> None:
    items = _items(400, seed=3)
    coord = _coordinator(3)
    await coord.upsert(items)
    for seed in range(5):
        qv = unit_vectors(1, DIM, 500 + seed)[0]
        out = await coord.search(
            SearchQuery(Modality.IMAGE, 10, vector=qv, alpha=alpha, reference_time=NOW)
        )
        expected = _reference(items, qv, 10, alpha)
        assert [h.record.id for h in out.hits] == [i for i, _ in expected]
        assert np.allclose([h.score for h in out.hits], [s for _, s in expected], atol=1e-5)
        assert out.candidates >= 10


async def test_large_alpha_lets_fresh_documents_beat_the_best_raw_matches() -> None:
    items = _items(400, seed=5)
    coord = _coordinator(2)
    await coord.upsert(items)
    qv = unit_vectors(1, DIM, 77)[0]
    plain = await coord.search(SearchQuery(Modality.IMAGE, 10, vector=qv, reference_time=NOW))
    decayed = await coord.search(
        SearchQuery(Modality.IMAGE, 10, vector=qv, alpha=5.0, reference_time=NOW)
    )
    assert set(h.record.id for h in plain.hits) - set(h.record.id for h in decayed.hits)
    assert decayed.candidates > plain.candidates  # it had to look further than the top 10


async def test_filtered_recency_search_is_exact() -> None:
    items = _items(300, seed=9)
    coord = _coordinator(3)
    await coord.upsert(items)
    flt = SearchFilter(metadata_equals=(("g", "2"),), time_start=NOW - 60 * DAY)
    qv = unit_vectors(1, DIM, 4)[0]
    out = await coord.search(
        SearchQuery(Modality.IMAGE, 7, vector=qv, flt=flt, alpha=0.3, reference_time=NOW)
    )
    assert [h.record.id for h in out.hits] == [i for i, _ in _reference(items, qv, 7, 0.3, flt)]


async def test_upsert_replaces_across_shards_and_get_delete_round_trip() -> None:
    coord = _coordinator(4)
    await coord.upsert(_items(50))
    await coord.upsert(_items(50, seed=42))  # same ids, new vectors
    stats = await coord.stats()
    assert sum(s.documents for s in stats) == 50
    assert await coord.delete(["doc-1", "doc-2", "missing"]) == 2
    with pytest.raises(NotFound, match="doc-1"):
        await coord.get(["doc-1", "doc-3"], allow_missing=False)
    got = await coord.get(["doc-1", "doc-3"], allow_missing=True)
    assert got[0] is None and got[1] is not None and got[1].id == "doc-3"


async def test_text_and_image_queries_are_encoded() -> None:
    coord = _coordinator(2)
    await coord.upsert([UpsertItem(DocRecord("t", NOW, has_text=True), text="a red circle")])
    out = await coord.search(SearchQuery(Modality.TEXT, 1, text="a red circle"))
    assert out.hits[0].record.id == "t"
    assert out.hits[0].similarity == pytest.approx(1.0, abs=1e-5)


class DownShard(LocalShard):
    """A shard that cannot be reached."""

    async def search(self, *args: object) -> ShardHits:  # type: ignore[override]
        raise Unavailable("shard 1 is unavailable; retry shortly")


async def test_a_down_shard_fails_the_search_unless_partial_results_are_allowed() -> None:
    items = _items(300, seed=12)
    shards = [LocalShard(Shard(i, DIM)) for i in range(3)]
    coord = Coordinator(HashEncoder(DIM), shards)
    await coord.upsert(items)
    down = Coordinator(HashEncoder(DIM), [shards[0], DownShard(shards[1].shard), shards[2]])
    qv = unit_vectors(1, DIM, 8)[0]
    with pytest.raises(Unavailable):
        await down.search(SearchQuery(Modality.IMAGE, 10, vector=qv))
    out = await down.search(SearchQuery(Modality.IMAGE, 10, vector=qv, allow_partial=True))
    alive = [it for it in items if shards[1].shard.get([it.record.id])[0] is None]
    assert [h.record.id for h in out.hits] == [i for i, _ in _reference(alive, qv, 10, 0.0)]
    assert out.missing_shards == (1,) and (out.shards_answered, out.shards_total) == (2, 3)


class _Blocking(LocalShard):
    """A shard whose searches wait until released, recording whether they were cancelled."""

    def __init__(self, shard: Shard) -> None:
        super().__init__(shard)
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.cancelled = False

    async def search(self, *args: object, **kwargs: object) -> ShardHits:
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        return await super().search(*args, **kwargs)  # type: ignore[arg-type]


async def test_a_cancelled_search_cancels_every_shard_search() -> None:
    shards = [_Blocking(Shard(i, DIM)) for i in range(3)]
    coord = Coordinator(HashEncoder(DIM), shards)
    q = SearchQuery(Modality.IMAGE, 5, vector=unit_vectors(1, DIM, 7)[0])
    task = asyncio.ensure_future(coord.search(q))
    await asyncio.wait_for(asyncio.gather(*(s.started.wait() for s in shards)), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0)  # the shard tasks' cancellations land
    assert all(s.cancelled for s in shards)


async def test_every_shard_answers_before_a_failure_is_raised() -> None:
    """A shard's error is raised only once every shard has answered (none left running)."""
    shards = [_Blocking(Shard(i, DIM)) for i in range(3)]

    async def broken(*args: object, **kwargs: object) -> ShardHits:
        raise NotFound("shard 0 broke")

    shards[0].search = broken  # type: ignore[method-assign]
    coord = Coordinator(HashEncoder(DIM), shards)
    q = SearchQuery(Modality.IMAGE, 5, vector=unit_vectors(1, DIM, 7)[0], allow_partial=True)
    task = asyncio.ensure_future(coord.search(q))
    await asyncio.wait_for(asyncio.gather(*(s.started.wait() for s in shards[1:])), 5)
    assert not task.done()
    for s in shards[1:]:
        s.release.set()
    with pytest.raises(NotFound):
        await task
    assert not any(s.cancelled for s in shards)


class _Sent(LocalShard):
    """A backend that sends its search at once and answers through a future, as RayShard
    does over its channel; the test answers (or fails) each search when it likes."""

    def __init__(self, shard: Shard) -> None:
        super().__init__(shard)
        self.sent: list[tuple[asyncio.Future[ShardHits], tuple[object, ...]]] = []

    def search(self, *args: object) -> asyncio.Future[ShardHits]:  # type: ignore[override]
        future: asyncio.Future[ShardHits] = asyncio.get_running_loop().create_future()
        self.sent.append((future, args))
        return future

    def answer(self, error: Exception | None = None) -> None:
        future, args = self.sent.pop(0)
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(self.shard.search(*args[:5]))  # type: ignore[arg-type]


async def test_backends_answering_through_futures_merge_like_coroutines_in_any_order() -> None:
    items = _items(300, seed=14)
    shards = [_Sent(Shard(i, DIM)) for i in range(3)]
    coord = Coordinator(HashEncoder(DIM), shards)
    await coord.upsert(items)
    reference = _coordinator(3)
    await reference.upsert(items)
    q = SearchQuery(Modality.IMAGE, 10, vector=unit_vectors(1, DIM, 21)[0], allow_partial=True)
    task = asyncio.ensure_future(coord.search(q))
    await asyncio.sleep(0)
    assert all(len(s.sent) == 1 for s in shards)  # every shard's search out before any answer
    shards[2].answer()
    shards[1].answer(Unavailable("shard 1 is unavailable; retry shortly"))
    await asyncio.sleep(0)
    assert not task.done()  # still waiting for shard 0
    shards[0].answer()
    out = await task
    alive = [it for it in items if shards[1].shard.get([it.record.id])[0] is None]
    assert [h.record.id for h in out.hits] == [i for i, _ in _reference(alive, q.vector, 10, 0.0)]  # type: ignore[arg-type]
    assert out.missing_shards == (1,) and out.shards_answered == 2


async def test_a_cancelled_search_cancels_every_shard_future() -> None:
    shards = [_Sent(Shard(i, DIM)) for i in range(3)]
    coord = Coordinator(HashEncoder(DIM), shards)
    task = asyncio.ensure_future(coord.search(SearchQuery(Modality.IMAGE, 5, vector=np.ones(DIM))))
    await asyncio.sleep(0)
    sent = [s.sent[0][0] for s in shards]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert all(f.cancelled() for f in sent)
