"""A caller in its own process: times sequential gRPC calls and prints the seconds as JSON.

The served rows of bench.search_path run here rather than on a thread of the benchmark's
process, which also hosts the gateway: a caller and server sharing one interpreter contend
for its lock, which no real caller does.

  search  `--queries` is a .npy file of query vectors; one Search per row, top_k `--k`
  ping    a no-op unary /bench.Echo/Ping (the bare gRPC hop), `--n` calls

Usage: python -m bench.caller search PORT --queries q.npy [--k 10] [--nprobe N]
           [--ef-search N]
       python -m bench.caller ping PORT --n 300
"""

from __future__ import annotations

import argparse
import json
import time

import grpc
import numpy as np

from clipsearch.client import Client
from clipsearch.types import SearchParams


def _time(call: object, n: int) -> list[float]:
    call(0)  # type: ignore[operator]  # warm-up: connect, first-call paths
    out = []
    for i in range(n):
        t = time.perf_counter()
        call(i)  # type: ignore[operator]
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["search", "ping"])
    ap.add_argument("port", type=int)
    ap.add_argument("--queries")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--nprobe", type=int, default=0)
    ap.add_argument("--ef-search", type=int, default=0)
    ap.add_argument("--n", type=int, default=300)
    args = ap.parse_args()
    target = f"127.0.0.1:{args.port}"
    if args.what == "ping":
        with grpc.insecure_channel(target) as channel:
            ping = channel.unary_unary("/bench.Echo/Ping")
            samples = _time(lambda i: ping(b"", timeout=10), args.n)
    else:
        queries = np.load(args.queries)
        params = None
        if args.nprobe or args.ef_search:
            params = SearchParams(nprobe=args.nprobe, ef_search=args.ef_search)
        with Client(target, timeout=120) as client:
            samples = _time(
                lambda i: client.search(vector=queries[i], top_k=args.k, search_params=params),
                len(queries) - 1,
            )
    print(json.dumps(samples))


if __name__ == "__main__":
    main()
