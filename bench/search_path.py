"""The served search path vs the raw libraries, measured side by side in one run.

Starts the embedded stack (Ray Serve encoder, shard actors, gateway on loopback), fills it
with N random unit vectors, then times the same work three ways, one query at a time:

  vector search: gateway end to end (gRPC + fan-out to shards + merge)  vs  in-process
                 faiss.IndexFlatIP.search on the same vectors and k
  text search:   gateway end to end (encoder + search)  vs  the model's own forward pass
                 (ClipEncoder.encode_texts, batch 1) + in-process Faiss

Usage: PYTHONPATH=. python bench/search_path.py [--docs 20000] [--queries 200] [--model demo]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import threading
import time
from collections.abc import Callable

import faiss
import numpy as np
import ray

from clipsearch.client import Client, Document
from clipsearch.launcher import init_ray, start_stack
from clipsearch.settings import load_settings
from encoder_service.model import ClipEncoder, resolve_model


def _p(samples: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples) * 1000.0, q))


def _time(fn: Callable[[int], object], n: int) -> list[float]:
    fn(0)  # warm-up
    out = []
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - t)
    return out


def _row(name: str, ours: list[float], raw: list[float]) -> str:
    p50o, p50r = _p(ours, 50), _p(raw, 50)
    return (
        f"{name:<14} served p50 {p50o:7.2f} ms  p99 {_p(ours, 99):7.2f} ms | raw p50 "
        f"{p50r:7.2f} ms | served - raw {p50o - p50r:6.2f} ms | ratio {p50o / p50r:5.2f}x"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=20_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--model", default="demo")
    args = ap.parse_args()
    data_dir = tempfile.mkdtemp(prefix="csbench-")
    settings = load_settings(
        gateway={"port": 0}, demo_corpus=0, encoder={"model": args.model}, data_dir=data_dir
    )
    ray_temp = init_ray(settings)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    stack = asyncio.run_coroutine_threadsafe(start_stack(settings), loop).result(600)
    client = Client(stack.address, timeout=120)
    dim = client.stats().dimension
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((args.docs, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    for s in range(0, args.docs, 256):
        client.upsert(
            Document(f"d{i}", image_vector=vecs[i]) for i in range(s, min(s + 256, args.docs))
        )
    raw_index = faiss.IndexFlatIP(dim)
    raw_index.add(vecs)
    queries = rng.standard_normal((args.queries + 1, dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    texts = [f"a photo of thing number {i}" for i in range(args.queries + 1)]
    model = ClipEncoder(resolve_model(args.model))

    served_vec = _time(lambda i: client.search(vector=queries[i], top_k=10), args.queries)
    raw_vec = _time(lambda i: raw_index.search(queries[i : i + 1], 10), args.queries)
    served_txt = _time(lambda i: client.search(texts[i], top_k=10), args.queries)
    raw_txt = _time(lambda i: raw_index.search(model.encode_texts([texts[i]]), 10), args.queries)

    print(
        f"{args.docs} docs x {dim} dims, {settings.index.shards} shards, model {args.model}, "
        f"{args.queries} sequential queries, top_k 10"
    )
    print(_row("vector search", served_vec, raw_vec))
    print(_row("text search", served_txt, raw_txt))
    client.close()
    asyncio.run_coroutine_threadsafe(stack.stop(), loop).result(120)
    ray.shutdown()
    for path in (ray_temp, data_dir):
        if path:
            shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
