"""GPU Faiss placement (index.use_gpu): runs only where faiss-gpu sees a CUDA GPU."""

from __future__ import annotations

import faiss
import pytest

from clipsearch.types import Modality, SearchFilter
from index_service.shard import Shard
from tests.index_fixtures import DIM, brute, clustered, docs, settings

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1,
        reason="needs faiss-gpu and a CUDA GPU",
    ),
]


@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat", "IVF16,SQ8"])
def test_gpu_shard_answers_like_the_cpu_oracle(factory: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = clustered(3020, seed=12)
    writes = docs(data[:3000])
    shard = Shard(0, DIM, settings(factory, use_gpu=True))
    for start in range(0, 3000, 500):
        shard.upsert(writes[start : start + 500])
    assert shard.wait_for_rebuilds(120)
    assert shard.stats().indexes[0].active_type == factory
    shard.delete([f"d{i}" for i in range(0, 300, 3)])
    gone = {f"d{i}" for i in range(0, 300, 3)}
    flt = SearchFilter(metadata_equals=(("parity", "1"),))
    for q in data[3000:]:
        hits = shard.search(Modality.IMAGE, q, 10).records
        assert len(hits) == 10 and not {h.id for h in hits} & gone
        filtered = shard.search(Modality.IMAGE, q, 10, flt).records
        live = [w for w in writes if w.record.id not in gone]
        assert [h.id for h in filtered] == brute(live, q, 10, flt)
    shard.save(tmp_path)
    loaded = Shard.load(tmp_path, 0, DIM, settings(factory, use_gpu=True))
    q = data[3001]
    assert [h.id for h in loaded.search(Modality.IMAGE, q, 10).records] == [
        h.id for h in shard.search(Modality.IMAGE, q, 10).records
    ]
    shard.close()
    loaded.close()
