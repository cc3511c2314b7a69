"""index.use_gpu on a machine without GPU Faiss fails at start with what to fix."""

from __future__ import annotations

import faiss
import pytest

from index_service.gpu import GpuUnavailable
from index_service.shard import Shard
from tests.index_fixtures import DIM, settings


@pytest.mark.skipif(
    hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0,
    reason="this machine has GPU Faiss (tests/gpu covers it)",
)
def test_use_gpu_without_gpu_faiss_is_a_clear_error() -> None:
    with pytest.raises(GpuUnavailable, match="index.use_gpu"):
        Shard(0, DIM, settings("IVF16,Flat", use_gpu=True))
