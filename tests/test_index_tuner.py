"""The tuner picks the fastest setting reaching the target recall (for lossy codes the re-rank
depth with nprobe), and it holds on queries it never saw."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from clipsearch.types import Modality, SearchParams
from gateway import convert
from index_service.shard import Shard
from tests.index_fixtures import brute, built, clustered, docs, recall

N = 8000
_data = clustered(N + 100, seed=11, clusters=64)


def _measured(shard: Shard, params: SearchParams | None, stored: int = N) -> float:
    """Mean recall@10 of the 100 held-out queries (never stored, never tuned on) against
    the first `stored` vectors."""
    writes = docs(_data[:stored])
    return float(
        np.mean(
            [
                recall(
                    [r.id for r in shard.search(Modality.IMAGE, q, 10, params=params).records],
                    brute(writes, q, 10),
                )
                for q in _data[N:]
            ]
        )
    )


@pytest.mark.parametrize("factory", ["IVF64,Flat", "HNSW16", "IVF64,PQ8x4fs", "IVF64,RaBitQ"])
@pytest.mark.parametrize("target", [0.8, 0.95])
def test_tuned_point_reaches_target_on_held_out_queries(factory: str, target: float) -> None:
    shard = built(factory, _data[:N], train_min=N, target_recall=target)
    op = shard.stats().indexes[0].operating_point
    assert op is not None and op.target_recall == target and op.k == 10
    assert op.recall >= target and op.qps > 0
    assert _measured(shard, None) >= target - 0.03  # queries the tuner never saw
    # The cheapest: a clearly smaller setting misses the target (unless the minimum reached it).
    knob = op.nprobe or op.ef_search
    floor = 1 if op.nprobe else 16
    if knob > floor:
        smaller = max(floor, knob // 2)
        cheaper = (
            SearchParams(nprobe=smaller, rerank=op.rerank)
            if op.nprobe
            else SearchParams(ef_search=smaller)
        )
        assert _measured(shard, cheaper) < op.recall
    shard.close()


@pytest.mark.parametrize("factory", ["IVF64,RaBitQ", "IVF64,PQ8x4fs"])
def test_lossy_codes_get_a_tuned_rerank_depth_shown_in_stats(factory: str) -> None:
    shard = built(factory, _data[:N], train_min=N, target_recall=0.95)
    op = shard.stats().indexes[0].operating_point
    assert op is not None and op.rerank >= 1
    assert convert.index_stats(shard.stats().indexes[0]).operating_point.rerank_factor == op.rerank
    # Re-rank depth is what lets 1-bit / 4-bit codes reach the target: the tuned nprobe with
    # a shallow re-rank falls well short, and a per-request deeper one does at least as well.
    tuned = _measured(shard, None)
    assert tuned >= 0.92
    assert _measured(shard, SearchParams(nprobe=op.nprobe, rerank=1)) < tuned - 0.1
    assert _measured(shard, SearchParams(rerank=64)) >= tuned - 0.01
    shard.close()


def test_exact_codes_have_no_rerank_depth() -> None:
    shard = built("IVF64,Flat", _data[:4000], train_min=4000)
    op = shard.stats().indexes[0].operating_point
    assert op is not None and op.rerank == 0 and op.nprobe >= 1
    assert shard.stats().indexes[0].defaults == SearchParams(nprobe=op.nprobe)
    assert shard.stats().indexes[1].defaults is None  # no text vectors: exact search
    assert not convert.index_stats(shard.stats().indexes[1]).HasField("search_defaults")
    shard.close()


def test_index_is_retuned_once_it_has_doubled() -> None:
    shard = built("IVF32,SQ8", _data[:2000], train_min=2000)
    first = shard.stats().indexes[0]
    assert first.active_type == "IVF32,SQ8"
    shard.upsert(docs(_data[2000:3000], start=2000))  # 1.5x: the tuned point is kept
    assert shard.wait_for_rebuilds(60)
    assert shard.stats().indexes[0].operating_point is first.operating_point
    shard.upsert(docs(_data[3000:4000], start=3000))  # 2x: retrained and retuned
    assert shard.wait_for_rebuilds(60)
    assert shard.stats().indexes[0].operating_point is not first.operating_point
    shard.close()


def _grown(factory: str, tuned_at: int, grown_to: int, target: float) -> tuple[Shard, Any]:
    """A shard tuned on the first `tuned_at` vectors, then grown to `grown_to` (< 2x: no
    retune), and the operating point it still reports."""
    shard = built(factory, _data[:tuned_at], train_min=tuned_at, target_recall=target)
    op = shard.stats().indexes[0].operating_point
    assert op is not None
    tuned = shard._indexes[Modality.IMAGE].default_params()
    assert (tuned.rerank, tuned.ef_search) == (op.rerank, op.ef_search)
    shard.upsert(docs(_data[tuned_at:grown_to], start=tuned_at))
    assert shard.wait_for_rebuilds(60)
    assert shard.stats().indexes[0].operating_point is op
    return shard, op


def test_lossy_rerank_depth_grows_with_the_index_until_it_is_retuned() -> None:
    """Between retunings the probed lists fill up with codes competing for the same k x
    factor candidate places; the default depth grows with them, so recall holds."""
    shard, op = _grown("IVF16,PQ8x4fs", 2000, 3600, target=0.9)  # 1.8x
    assert op.rerank > 0
    index = shard._indexes[Modality.IMAGE]
    assert index.default_params().rerank == min(64, -(-op.rerank * 3600 // 2000))
    defaults = shard.stats().indexes[0].defaults
    assert defaults == SearchParams(nprobe=op.nprobe, rerank=index.default_params().rerank)
    assert _measured(shard, None, stored=3600) >= 0.85
    shard.close()


def test_hnsw_ef_search_grows_with_the_graph_until_it_is_retuned() -> None:
    """At a fixed efSearch recall falls as the graph grows; the default ef grows with the
    square root of the growth between retunings, so recall holds."""
    shard, op = _grown("HNSW16", 4000, 7600, target=0.95)  # 1.9x
    assert op.ef_search > 0
    index = shard._indexes[Modality.IMAGE]

    grown = index.default_params().ef_search
    assert grown == min(4096, math.ceil(op.ef_search * math.sqrt(7600 / 4000)))
    assert grown > op.ef_search
    # Operators see both: the tuned point and what searches use now.
    shown = convert.index_stats(shard.stats().indexes[0])
    assert shown.operating_point.ef_search == op.ef_search
    assert (shown.search_defaults.ef_search, shown.search_defaults.nprobe) == (grown, 0)
    now = _measured(shard, None, stored=7600)
    assert now >= 0.95 - 0.01  # queries the tuner never saw, on the grown graph
    assert now >= _measured(shard, SearchParams(ef_search=op.ef_search), stored=7600)
    shard.close()
