"""Concurrent searches over real shard actors: coalesced into shared actor calls, and every
caller still gets exactly the answer it would get alone."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

from clipsearch.client import Client, Document
from clipsearch.errors import DeadlineExceeded
from clipsearch.settings import IndexSettings
from clipsearch.types import DocRecord, DocWrite, Modality, SearchFilter, SearchParams
from gateway.coordinator import SearchQuery
from index_service import wire
from index_service.actor import ShardActor
from tests.conftest import RunningStack
from tests.fakes import unit_vectors


def _queries(dim: int) -> list[SearchQuery]:
    vecs = unit_vectors(40, dim, seed=11)
    queries = []
    for i, v in enumerate(vecs):
        flt = SearchFilter((("group", str(i % 3)),)) if i % 4 == 0 else None
        alpha = 0.5 if i % 5 == 0 else 0.0
        queries.append(
            SearchQuery(Modality.IMAGE, 5, vector=v, flt=flt, alpha=alpha, reference_time=1e6)
        )
    return queries


def _ids_and_scores(outcome: object) -> list[tuple[str, float]]:
    return [(h.record.id, h.score) for h in outcome.hits]  # type: ignore[attr-defined]


def _assert_same_answers(got: list[tuple[str, float]], want: list[tuple[str, float]]) -> None:
    """Same ids in the same order, scores equal up to float rounding (searches that travel
    together are scored by one matrix product, a lone one by per-vector sums; no two
    documents here score within the tolerance of each other)."""
    assert [i for i, _ in got] == [i for i, _ in want]
    np.testing.assert_allclose([s for _, s in got], [s for _, s in want], atol=1e-5)


@pytest.mark.integration
def test_concurrent_searches_share_actor_calls_and_answer_as_if_alone(
    stack: RunningStack, client: Client
) -> None:
    coordinator = stack.stack.coordinator  # type: ignore[attr-defined]
    dim = coordinator.encoder.dim
    vecs = unit_vectors(250, dim, seed=5)
    client.upsert(
        Document(f"d{i}", image_vector=v, metadata={"group": str(i % 3)}, publish_time=i * 3600.0)
        for i, v in enumerate(vecs)
    )
    queries = _queries(dim)

    async def alone() -> list[object]:
        return [await coordinator.search(q) for q in queries]

    async def together() -> list[object]:
        return list(await asyncio.gather(*(coordinator.search(q) for q in queries)))

    expected = [_ids_and_scores(o) for o in stack.run(alone())]  # type: ignore[union-attr]
    before = [dict(s.searches.batches) for s in coordinator.shards]
    got = [_ids_and_scores(o) for o in stack.run(together())]  # type: ignore[union-attr]
    for answer, alone_answer in zip(got, expected, strict=True):
        _assert_same_answers(answer, alone_answer)
    assert all(len(hits) == 5 for hits in got)
    batched = [
        sum(n * c for n, c in s.searches.batches.items()) - sum(n * c for n, c in b.items())
        for s, b in zip(coordinator.shards, before, strict=True)
    ]
    assert all(b > 0 for b in batched)  # searches travelled together, not one call each
    assert all(s.channel_calls > 0 and s.channel_open for s in coordinator.shards)  # direct


def test_a_batched_item_past_its_deadline_is_refused_alone(tmp_path: Path) -> None:
    dim = 8
    actor = ShardActor(0, dim, IndexSettings(), str(tmp_path), "m")
    try:
        q = np.ones(dim, dtype=np.float32) / np.sqrt(dim)
        late = wire.pack_request(Modality.IMAGE, q, 1, None, None, time.time() - 1)
        live = wire.pack_request(Modality.IMAGE, q, 1, None, None, time.time() + 60)
        answers = actor.search_many([live, late, live])
        assert isinstance(answers[1], DeadlineExceeded)
        assert all(wire.unpack_hits(a).exhausted for a in (answers[0], answers[2]))  # type: ignore[arg-type]
        assert actor.skipped() == 1
    finally:
        actor.close()


def test_a_mixed_batch_answers_each_search_as_alone(tmp_path: Path) -> None:
    """A coalesced call mixes searches with different k, filters, parameters and modalities:
    alike ones are searched together, and each gets its own answer, in order."""
    dim = 16
    actor = ShardActor(0, dim, IndexSettings(), str(tmp_path), "m")
    try:
        vecs = unit_vectors(300, dim, seed=2)
        actor.upsert(
            [
                DocWrite(
                    DocRecord(f"d{i}", float(i), {"group": str(i % 3)}, "", True, False),
                    image_vector=v,
                )
                for i, v in enumerate(vecs)
            ]
        )
        queries = unit_vectors(12, dim, seed=3)
        red = SearchFilter((("group", "1"),), time_start=100.0)
        later = time.time() + 60
        requests = [
            wire.pack_request(modality, q, k, flt, params, later)
            for n, q in enumerate(queries)
            for modality, k, flt, params in [
                (Modality.IMAGE, 5, None, None),
                (Modality.IMAGE, 3 + n % 2, red if n % 3 else None, None),
                (Modality.IMAGE, 5, None, SearchParams(nprobe=1)),
                (Modality.TEXT, 5, None, None),  # no text vectors: an empty answer
            ]
        ]
        requests.insert(5, wire.pack_request(Modality.IMAGE, queries[0], 5, None, None, 1.0))
        answers = actor.search_many(requests)
        assert isinstance(answers.pop(5), DeadlineExceeded)
        del requests[5]
        assert len(answers) == len(requests) == 48
        for request, answer in zip(requests, answers, strict=True):
            alone = actor.search_packed(request)
            assert wire.unpack_hits(answer).records == wire.unpack_hits(alone).records  # type: ignore[arg-type]
            np.testing.assert_allclose(
                wire.unpack_hits(answer).similarities,  # type: ignore[arg-type]
                wire.unpack_hits(alone).similarities,
                atol=1e-5,
            )
        assert sum(len(wire.unpack_hits(a).records) for a in answers) > 0  # type: ignore[arg-type]
    finally:
        actor.close()
