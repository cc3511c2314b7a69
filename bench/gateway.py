"""The gateway's own overhead: Search through the real gateway with in-process stub encoder
and shards, against a bare grpc.aio echo server moving the same bytes.

Both servers run in one child process each (one at a time), the load generator in this one:

  throughput   closed loop, `--concurrency` callers for `--seconds`: gateway req/s ÷ echo
               req/s (target >= 0.5)
  tail         open loop at 70 % of the gateway's measured saturation, arrivals on a fixed
               schedule, latency counted from the scheduled send time (no coordinated
               omission): p99 ÷ p50 (target <= 3)

The gateway path is everything real but the engines: interceptor (request id, deadline,
admission, metrics, access log), validation, the coordinator's fan-out to `--shards` stub
shards, the exact merge, and response conversion. The echo server returns a pre-serialised
SearchResponse of the same size as the gateway's answer.

Usage: PYTHONPATH=. python bench/gateway.py [--seconds 5] [--concurrency 32] [--shards 2]
         [--top-k 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import statistics
import sys
import time
from typing import Any

# Run as a script, this file's folder comes first on sys.path, and its name would shadow the
# `gateway` package (in the child processes too): drop the folder.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import grpc  # noqa: E402
import numpy as np  # noqa: E402

from clipsearch.v1 import common_pb2, search_pb2  # noqa: E402

DIM = 512
SEARCH = "/clipsearch.v1.SearchService/Search"


# ---- the servers (run in a child process) ---------------------------------------------------


class _StubEncoder:
    model_id = "stub"
    dim = DIM

    def __init__(self) -> None:
        v = np.random.default_rng(0).standard_normal(DIM).astype(np.float32)
        self._v = v / np.linalg.norm(v)

    async def encode_texts(self, texts: Any, options: Any = None) -> np.ndarray:
        return np.stack([self._v for _ in texts])

    async def encode_images(self, images: Any) -> np.ndarray:
        return np.stack([self._v for _ in images])

    async def stats(self) -> Any:
        from clipsearch.types import EncoderStats

        return EncoderStats(self.model_id, DIM, "cpu", "fp32", 77, 224, replicas=1)


class _StubShard:
    """Answers every search with the same k candidates (no index work)."""

    def __init__(self, number: int, k: int) -> None:
        from clipsearch.types import DocRecord, ShardHits, ShardStats

        records = tuple(
            DocRecord(f"s{number}-{i}", 1.8e9, {"color": "red"}, f"caption {i}", True, False)
            for i in range(k)
        )
        sims = np.linspace(0.9, 0.5, k).astype(np.float32) - 0.01 * number
        self._hits = ShardHits(sims, records, exhausted=True)
        self._stats = ShardStats(number, k, k, 0)

    async def search(self, *args: Any) -> Any:
        return self._hits

    async def upsert(self, writes: Any) -> int:
        return len(writes)

    async def delete(self, ids: Any) -> int:
        return 0

    async def get(self, ids: Any) -> list[Any]:
        return [None for _ in ids]

    async def stats(self) -> Any:
        return self._stats


async def _gateway_main(port_out: Any, shards: int, top_k: int) -> None:
    import logging

    from clipsearch.settings import load_settings
    from gateway.coordinator import Coordinator
    from gateway.server import create_server, freeze_startup_heap

    logging.getLogger("clipsearch.access").setLevel(logging.WARNING)
    settings = load_settings(
        gateway={"port": 0, "admission": {"read": 0, "write": 0, "admin": 0}},
        limits={"max_top_k": 1000},
    )
    coordinator = Coordinator(_StubEncoder(), [_StubShard(n, top_k) for n in range(shards)])  # type: ignore[arg-type]
    server, port, _ = await create_server(coordinator, settings)
    freeze_startup_heap()  # as `clipsearch serve` does
    port_out.put(port)
    await server.wait_for_termination()


async def _echo_main(port_out: Any, reply: bytes) -> None:
    async def search(request: bytes, context: Any) -> bytes:
        return reply

    handler = grpc.method_handlers_generic_handler(
        "clipsearch.v1.SearchService",
        {"Search": grpc.unary_unary_rpc_method_handler(search)},  # raw bytes both ways
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    from gateway.server import freeze_startup_heap

    freeze_startup_heap()  # the same treatment as the gateway
    port_out.put(port)
    await server.wait_for_termination()


def _run_gateway(port_out: Any, shards: int, top_k: int) -> None:
    asyncio.run(_gateway_main(port_out, shards, top_k))


def _run_echo(port_out: Any, reply: bytes) -> None:
    asyncio.run(_echo_main(port_out, reply))


# ---- the load generator ---------------------------------------------------------------------


async def _closed_loop(address: str, body: bytes, concurrency: int, seconds: float) -> float:
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(SEARCH)
        for _ in range(50):  # warm up
            await call(body, timeout=10)
        done = 0
        stop = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < stop:
                await call(body, timeout=10)
                done += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done / (time.perf_counter() - start)


async def _open_loop(address: str, body: bytes, rate: float, seconds: float) -> list[float]:
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(SEARCH)
        for _ in range(50):
            await call(body, timeout=10)
        latencies: list[float] = []
        tasks = []
        t0 = time.perf_counter()
        n = int(rate * seconds)

        async def one(scheduled: float) -> None:
            await call(body, timeout=30)
            latencies.append(time.perf_counter() - scheduled)

        for i in range(n):
            scheduled = t0 + i / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(scheduled)))
        await asyncio.gather(*tasks)
        return latencies


def _start(target: Any, *args: Any) -> tuple[Any, int]:
    ctx = mp.get_context("spawn")
    port_out = ctx.Queue()
    proc = ctx.Process(target=target, args=(port_out, *args), daemon=True)
    proc.start()
    return proc, int(port_out.get(timeout=60))


def _request(top_k: int) -> bytes:
    vec = np.random.default_rng(1).standard_normal(DIM).astype(np.float32)
    vec /= np.linalg.norm(vec)
    return search_pb2.SearchRequest(
        vector=common_pb2.Vector(values=vec.tolist()), top_k=top_k
    ).SerializeToString()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the two servers")
    args = parser.parse_args()
    body = _request(args.top_k)

    # Alternate the two servers `--rounds` times; each round gives a ratio (gateway vs the echo
    # measured right after it) and a tail figure (open loop at 70 % of that round's gateway
    # saturation). The medians of the rounds are reported, so one burst of noise from other
    # processes on the machine does not decide either figure.
    ratios: list[float] = []
    tails: list[tuple[float, float, float]] = []
    reply = b""
    for _ in range(args.rounds):
        gw_rps = echo_rps = 0.0
        gw, port = _start(_run_gateway, args.shards, args.top_k)
        try:
            address = f"127.0.0.1:{port}"
            reply = asyncio.run(_one(address, body))
            gw_rps = asyncio.run(_closed_loop(address, body, args.concurrency, args.seconds))
            rate = 0.7 * gw_rps
            q = statistics.quantiles(
                asyncio.run(_open_loop(address, body, rate, args.seconds)), n=100
            )
            tails.append((rate, q[49] * 1000, q[98] * 1000))
        finally:
            gw.terminate()
            gw.join(10)
        echo, port = _start(_run_echo, reply)
        try:
            echo_rps = asyncio.run(
                _closed_loop(f"127.0.0.1:{port}", body, args.concurrency, args.seconds)
            )
        finally:
            echo.terminate()
            echo.join(10)
        ratios.append(gw_rps / echo_rps)
        print(
            f"round {len(ratios)}: gateway {gw_rps:,.0f} req/s, echo {echo_rps:,.0f} req/s, "
            f"ratio {ratios[-1]:.2f}; open loop at {rate:,.0f} req/s p50 {tails[-1][1]:.2f} ms "
            f"p99 {tails[-1][2]:.2f} ms",
            flush=True,
        )

    ratio = statistics.median(ratios)
    tail = statistics.median(p99 / p50 for _, p50, p99 in tails)
    rate, p50, p99 = sorted(tails, key=lambda t: t[2] / t[1])[len(tails) // 2]
    print(
        f"request {len(body)} B, response {len(reply)} B, {args.shards} stub shards, "
        f"top_k {args.top_k}, concurrency {args.concurrency}, {args.seconds:.0f} s per phase"
    )
    print(f"{'figure':<34}{'value':>12}{'target':>10}{'':>6}")
    rows = [
        (
            "gateway / echo (median of rounds)",
            f"{ratio:.2f}",
            ">= 0.5",
            "ok" if ratio >= 0.5 else "MISS",
        ),
        (f"open loop at {rate:,.0f} req/s: p50 ms", f"{p50:.2f}", "", ""),
        ("open loop p99 ms", f"{p99:.2f}", "", ""),
        ("p99 / p50 (median of rounds)", f"{tail:.2f}", "<= 3", "ok" if tail <= 3 else "MISS"),
    ]
    for name, value, target, verdict in rows:
        print(f"{name:<34}{value:>12}{target:>10}{verdict:>6}")


async def _one(address: str, body: bytes) -> bytes:
    async with grpc.aio.insecure_channel(address) as channel:
        reply: bytes = await channel.unary_unary(SEARCH)(body, timeout=10)
        search_pb2.SearchResponse.FromString(reply)  # a real answer, not an error
        return reply


if __name__ == "__main__":
    main()
