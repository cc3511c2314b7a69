"""Milvus Lite on the same vectors as bench/index.py, for its side-by-side table (named so
that it does not shadow the milvus_lite package when bench/ is on sys.path).

Optional: needs `pip install pymilvus milvus-lite` (not a project dependency). Milvus has no
tuner, so each index type's search knob is swept and the smallest value reaching the target
recall on the held-out queries is reported (tuned on the test queries: a small advantage).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

_BATCH = 10_000
# (Milvus index type, build params, search knob, values swept)
TYPES: list[tuple[str, dict[str, int], str, list[int]]] = [
    ("FLAT", {}, "", [0]),
    ("IVF_FLAT", {"nlist": 256}, "nprobe", [1, 2, 4, 8, 16, 32, 64]),
    ("IVF_SQ8", {"nlist": 256}, "nprobe", [1, 2, 4, 8, 16, 32, 64]),
    ("HNSW", {"M": 32, "efConstruction": 128}, "ef", [16, 32, 64, 128, 256, 512]),
]


def compare(
    base: np.ndarray,
    queries: np.ndarray,
    gt: np.ndarray,
    recall: Callable[[np.ndarray, np.ndarray], float],
    target: float,
    k: int,
    single: int,
) -> list[dict[str, Any]]:
    """One row per Milvus index type: build s, chosen knob, recall@k, QPS single and batched."""
    from pymilvus import DataType, MilvusClient  # optional dependency

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        client = MilvusClient(str(Path(tmp) / "bench.db"))
        for index_type, build_params, knob, values in TYPES:
            name = f"b_{index_type.lower()}"
            t0 = time.perf_counter()
            _load(client, DataType, name, index_type, build_params, base)
            search = _searcher(client, name, knob, k)
            search(queries[:1], values[0])  # builds / loads the index
            build_s = time.perf_counter() - t0
            value, measured = values[-1], 0.0
            for v in values:
                measured = recall(search(queries, v), gt)
                value = v
                if measured >= target:
                    break
            at = lambda q, f=search, v=value: f(q, v)  # noqa: E731
            rows.append(
                {
                    "type": f"Milvus {index_type}",
                    "build_s": build_s,
                    "point": f"{knob}={value}" if knob else "-",
                    "recall": measured,
                    "qps1": _qps_single(at, queries[:single]),
                    "qpsB": _qps_batched(at, queries),
                }
            )
            client.drop_collection(name)
        client.close()
    return rows


def _load(
    client: Any, dtypes: Any, name: str, index_type: str, params: dict[str, int], base: np.ndarray
) -> None:
    """A collection `name` with an `index_type` index over `base` (ids = row numbers)."""
    schema = client.create_schema(auto_id=False)
    schema.add_field("id", dtypes.INT64, is_primary=True)
    schema.add_field("vector", dtypes.FLOAT_VECTOR, dim=base.shape[1])
    index_params = client.prepare_index_params()
    index_params.add_index(
        field_name="vector", index_type=index_type, metric_type="IP", params=params
    )
    client.create_collection(name, schema=schema, index_params=index_params)
    for s in range(0, len(base), _BATCH):
        chunk = base[s : s + _BATCH]
        client.insert(name, [{"id": s + i, "vector": v.tolist()} for i, v in enumerate(chunk)])
    client.flush(name)  # rows still in the memtable would be searched by brute force


def _searcher(client: Any, name: str, knob: str, k: int) -> Callable[[np.ndarray, int], np.ndarray]:
    def search(q: np.ndarray, value: int) -> np.ndarray:
        params = {"metric_type": "IP", "params": {knob: value} if knob else {}}
        res = client.search(name, data=q.tolist(), limit=k, search_params=params)
        out = np.full((len(q), k), -1, dtype=np.int64)
        for r, hits in enumerate(res):
            ids = [h["id"] for h in hits][:k]
            out[r, : len(ids)] = ids
        return out

    return search


def _qps_single(fn: Callable[[np.ndarray], Any], queries: np.ndarray) -> float:
    fn(queries[:1])
    t = time.perf_counter()
    for q in queries:
        fn(q[None, :])
    return len(queries) / (time.perf_counter() - t)


def _qps_batched(fn: Callable[[np.ndarray], Any], queries: np.ndarray) -> float:
    t = time.perf_counter()
    fn(queries)
    return len(queries) / (time.perf_counter() - t)
