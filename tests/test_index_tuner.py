"""The tuner picks the cheapest setting reaching the target recall, and it holds on queries
it never saw."""

from __future__ import annotations

import numpy as np
import pytest

from clipsearch.types import Modality, SearchParams
from tests.index_fixtures import brute, built, clustered, docs, recall

N = 8000


@pytest.mark.parametrize("factory", ["IVF64,Flat", "HNSW16", "IVF64,PQ8x4fs"])
@pytest.mark.parametrize("target", [0.8, 0.95])
def test_tuned_point_reaches_target_on_held_out_queries(factory: str, target: float) -> None:
    data = clustered(N + 100, seed=11, clusters=64)
    shard = built(factory, data[:N], train_min=4000, target_recall=target)
    op = shard.stats().indexes[0].operating_point
    assert op is not None and op.target_recall == target and op.k == 10
    assert op.recall >= target and op.qps > 0
    writes = docs(data[:N])

    def measured(params: SearchParams | None) -> float:
        return float(
            np.mean(
                [
                    recall(
                        [r.id for r in shard.search(Modality.IMAGE, q, 10, params=params).records],
                        brute(writes, q, 10),
                    )
                    for q in data[N:]
                ]
            )
        )

    assert measured(None) >= target - 0.04  # queries the tuner never saw
    # The cheapest: a clearly smaller setting misses the target (unless the minimum reached it).
    knob = op.nprobe or op.ef_search
    floor = 1 if op.nprobe else 16
    if knob > floor:
        smaller = max(floor, knob // 2)
        cheaper = SearchParams(nprobe=smaller) if op.nprobe else SearchParams(ef_search=smaller)
        assert measured(cheaper) < op.recall
    shard.close()
