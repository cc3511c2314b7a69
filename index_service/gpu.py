"""GPU placement for exact and IVF indexes (settings: index.use_gpu).

GPU Faiss indexes are not thread-safe and take no ID selectors, so a shard on the GPU
serialises its searches, keeps deletes as tombstones, and answers filtered searches with an
exact scan of its raw vectors on the CPU. HNSW has no GPU form and stays on the CPU.
"""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np

from index_service.factory import Family, IndexSpec

_resources: Any = None


class GpuUnavailable(RuntimeError):
    """use_gpu was asked for where faiss-gpu or a GPU is missing."""


def check_gpu() -> None:
    """Raise GpuUnavailable with what to fix unless GPU Faiss can run here."""
    if not hasattr(faiss, "StandardGpuResources"):
        raise GpuUnavailable(
            "index.use_gpu is set but this Faiss build has no GPU support; install the gpu "
            "extra (faiss-gpu) or set index.use_gpu to false"
        )
    if faiss.get_num_gpus() < 1:
        raise GpuUnavailable("index.use_gpu is set but no CUDA GPU is visible to Faiss")


def _res() -> Any:
    global _resources
    if _resources is None:
        check_gpu()
        _resources = faiss.StandardGpuResources()
    return _resources


def movable(spec: IndexSpec) -> bool:
    """Whether indexes of `spec` go to the GPU (exact and IVF do, HNSW does not)."""
    return spec.family is not Family.HNSW


def to_gpu(spec: IndexSpec, index: faiss.Index, vectors: np.ndarray, labels: np.ndarray) -> Any:
    """A GPU copy of a CPU index holding `vectors` under `labels`."""
    if spec.family is Family.FLAT:
        gpu = faiss.IndexIDMap2(faiss.GpuIndexFlatIP(_res(), int(vectors.shape[1])))
        if len(vectors):
            gpu.add_with_ids(np.ascontiguousarray(vectors), labels)
        return gpu
    return faiss.index_cpu_to_gpu(_res(), 0, index)


def to_cpu(spec: IndexSpec, index: faiss.Index, vectors: np.ndarray, labels: np.ndarray) -> Any:
    """A CPU copy (for saving) holding exactly the live `vectors` under `labels`."""
    if spec.family is Family.FLAT:
        flat: Any = faiss.IndexIDMap2(faiss.IndexFlatIP(int(vectors.shape[1])))
        if len(vectors):
            flat.add_with_ids(np.ascontiguousarray(vectors), labels)
        return flat
    cpu: Any = faiss.index_gpu_to_cpu(index)
    keep = faiss.IDSelectorBatch(np.ascontiguousarray(labels, dtype=np.int64))
    drop = faiss.IDSelectorNot(keep)  # `keep` must outlive `drop`
    cpu.remove_ids(drop)
    return cpu
