"""The request logic behind the servicers: encode, route, fan out, merge, re-rank.

Works on domain types only; the servicers convert protobuf at the edge.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from clipsearch.aio import settle
from clipsearch.errors import DeadlineExceeded, NotFound, Unavailable
from clipsearch.types import (
    DocRecord,
    DocWrite,
    Modality,
    SearchFilter,
    SearchParams,
    ShardHits,
    ShardStats,
    TextOptions,
)
from gateway.backends import EncoderBackend, ShardBackend
from gateway.ranking import RankedHit, candidate_count, is_exact, rank, unseen_bound
from index_service.router import group_by_shard

# With recency on, start by fetching this many times k per shard (the seed's 3x), then grow.
_RECENCY_OVERFETCH = 3
_GROWTH = 4


class SearchQuery(NamedTuple):
    """A validated search. Exactly one of text, image, vector is set.

    A NamedTuple, not a frozen dataclass: one is built per Search, and a frozen
    dataclass's `__init__` sets each of the 12 fields through `object.__setattr__` (4.7 us
    against about 1).
    """

    target: Modality
    top_k: int
    text: str | None = None
    image: bytes | None = None
    vector: np.ndarray | None = None
    flt: SearchFilter | None = None
    alpha: float = 0.0
    reference_time: float = 0.0
    allow_partial: bool = False
    text_options: TextOptions | None = None
    params: SearchParams | None = None
    deadline: float | None = None  # the caller's, epoch seconds; shards refuse work past it


@dataclass(frozen=True, slots=True)
class UpsertItem:
    """A validated document write; raw inputs are encoded by the coordinator."""

    record: DocRecord
    image: bytes | None = None
    text: str | None = None
    image_vector: np.ndarray | None = None
    text_vector: np.ndarray | None = None


@dataclass(slots=True)
class SearchOutcome:
    """Hits plus the evidence of how they were found."""

    hits: list[RankedHit]
    candidates: int
    shards_answered: int
    shards_total: int
    missing_shards: tuple[int, ...] = ()
    timings_ms: dict[str, float] = field(default_factory=dict)


class Coordinator:
    """Fans requests out to the shards and merges their answers."""

    def __init__(self, encoder: EncoderBackend, shards: Sequence[ShardBackend]) -> None:
        self.encoder = encoder
        self.shards = list(shards)

    async def search(self, q: SearchQuery) -> SearchOutcome:
        """The exact top_k by similarity x recency decay over all shards."""
        t0 = time.perf_counter()
        vector = q.vector if q.vector is not None else await self._encoded(q)
        t1 = time.perf_counter()
        fetch = q.top_k * (_RECENCY_OVERFETCH if q.alpha > 0 else 1)
        missing: set[int] = set()
        rerank_s = 0.0
        while True:
            answers, gone = await self._fan_out(q, vector, fetch)
            missing |= gone
            t2 = time.perf_counter()
            top = rank(answers, q.top_k, q.alpha, q.reference_time)
            if q.alpha > 0:  # ranking by decayed score is the recency re-rank
                rerank_s = time.perf_counter() - t2  # this round's (the last counts)
            bound = unseen_bound(answers)
            if is_exact(top, q.top_k, bound, q.alpha):
                break
            _check_deadline(q.deadline)  # never start another round the caller cannot use
            fetch *= _GROWTH
        t3 = time.perf_counter()
        timings_ms = {
            "encode": (t1 - t0) * 1000.0,
            "search": (t2 - t1) * 1000.0,
            "merge": max(0.0, t3 - t2 - rerank_s) * 1000.0,
            "rerank": rerank_s * 1000.0,
            "total": (t3 - t0) * 1000.0,
        }
        return SearchOutcome(
            hits=top,
            candidates=candidate_count(answers),
            shards_answered=len(answers),
            shards_total=len(self.shards),
            missing_shards=tuple(sorted(missing)),
            timings_ms=timings_ms,
        )

    async def upsert(
        self, items: Sequence[UpsertItem], text_options: TextOptions | None = None
    ) -> int:
        """Encode raw inputs (texts with `text_options`), then write each document to its
        shard."""
        writes = await self._encode_items(items, text_options)
        by_id = {w.record.id: w for w in writes}
        groups = group_by_shard(by_id, len(self.shards))
        await asyncio.gather(
            *(self.shards[s].upsert([by_id[i] for i in ids]) for s, ids in groups.items())
        )
        return len(writes)

    async def delete(self, doc_ids: Sequence[str]) -> int:
        """Delete ids from their shards; returns how many existed."""
        groups = group_by_shard(dict.fromkeys(doc_ids), len(self.shards))
        counts = await asyncio.gather(*(self.shards[s].delete(ids) for s, ids in groups.items()))
        return sum(counts)

    async def get(self, doc_ids: Sequence[str], allow_missing: bool) -> list[DocRecord | None]:
        """Records in request order, None for unknown ids (NotFound unless allow_missing)."""
        groups = group_by_shard(dict.fromkeys(doc_ids), len(self.shards))
        answers = await asyncio.gather(*(self.shards[s].get(ids) for s, ids in groups.items()))
        found: dict[str, DocRecord | None] = {}
        for ids, records in zip(groups.values(), answers, strict=True):
            found.update(zip(ids, records, strict=True))
        missing = [i for i in doc_ids if found[i] is None]
        if missing and not allow_missing:
            shown = ", ".join(repr(i) for i in missing[:5])
            raise NotFound(f"{len(missing)} id(s) not stored: {shown}")
        return [found[i] for i in doc_ids]

    async def stats(self) -> list[ShardStats]:
        """Per-shard counts."""
        return list(await asyncio.gather(*(s.stats() for s in self.shards)))

    async def _encoded(self, q: SearchQuery) -> np.ndarray:
        """The query text's or image's vector."""
        if q.text is not None:
            return (await self.encoder.encode_texts([q.text], q.text_options))[0]
        assert q.image is not None  # guaranteed by validation
        return (await self.encoder.encode_images([q.image]))[0]

    async def _fan_out(
        self, q: SearchQuery, vector: np.ndarray, k: int
    ) -> tuple[list[ShardHits], set[int]]:
        """Every shard's answer; unavailable shards are skipped only if the query allows."""
        results = await settle(
            [s.search(q.target, vector, k, q.flt, q.params, q.deadline) for s in self.shards]
        )
        answers, missing = [], set()
        for shard_id, result in enumerate(results):
            if isinstance(result, Unavailable) and q.allow_partial:
                missing.add(shard_id)
            elif isinstance(result, BaseException):
                raise result
            else:
                answers.append(result)
        return answers, missing

    async def _encode_items(
        self, items: Sequence[UpsertItem], text_options: TextOptions | None
    ) -> list[DocWrite]:
        texts = [i.text for i in items if i.text is not None]
        images = [i.image for i in items if i.image is not None]

        async def encode_texts(inputs: list[str]) -> np.ndarray:
            return await self.encoder.encode_texts(inputs, text_options)

        text_vecs, image_vecs = await asyncio.gather(
            self._maybe(encode_texts, texts),
            self._maybe(self.encoder.encode_images, images),
        )
        text_iter, image_iter = iter(text_vecs), iter(image_vecs)
        return [
            DocWrite(
                record=item.record,
                image_vector=next(image_iter) if item.image is not None else item.image_vector,
                text_vector=next(text_iter) if item.text is not None else item.text_vector,
            )
            for item in items
        ]

    @staticmethod
    async def _maybe(
        encode: Callable[[list[Any]], Awaitable[np.ndarray]], inputs: list[Any]
    ) -> np.ndarray:
        return await encode(inputs) if inputs else np.zeros((0, 0), dtype=np.float32)


def _check_deadline(deadline: float | None) -> None:
    """Raise DeadlineExceeded once the caller's deadline (epoch seconds) has passed."""
    if deadline is not None and time.time() >= deadline:
        raise DeadlineExceeded("deadline exceeded while fetching more recency candidates")
