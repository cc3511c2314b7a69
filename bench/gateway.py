"""The gateway's own overhead: Search through the real gateway with in-process stub encoder
and shards, against a bare grpc.aio echo server answering the same messages.

The three servers run side by side in a child process each, the load generator in this one:

  throughput   closed loop, `--concurrency` callers, `--seconds` per server per round, the
               servers alternated in 0.5 s slices (a burst of other load on the machine
               falls on all): gateway req/s ÷ echo req/s (target >= 0.5), and the same
               against the raw-bytes echo
  tail         open loop at 70 % of the gateway's median saturation, arrivals on a fixed
               schedule, latency counted from the scheduled send time (no coordinated
               omission), `--rounds` times: p99 ÷ p50 (target <= 3). Each round also
               prints the load generator's own send lag (actual - scheduled send): a stall
               of the generator delays every call behind it and counts as latency, so a
               tail that comes with a large lag is the generator's, not the server's

The gateway path is everything real but the engines: interceptor (request id, deadline,
admission, metrics; the access log only with `--access-log json|text`, written to
/dev/null as `clipsearch serve` would format it), validation, the coordinator's fan-out to
`--shards` stub shards, the exact merge, and response conversion. The echo (the target's
denominator) parses each request as a SearchRequest and answers with a SearchResponse equal
to the gateway's answer, serialised per call, as the gateway does; the raw-bytes echo (the
figure's denominator until 2026-11-29) takes and returns bytes, grpc's work alone. The load
generator's garbage collector is off while it measures (as in `timeit`); the servers keep
theirs (frozen start-up heap, as `clipsearch serve` runs).

With `--pin on` (the default, when at least 2 CPUs are allowed) the servers run on the first
allowed CPU and the load generator on the others, so the generator's own work never competes
with the server it measures; all servers get exactly the same placement. `--pin off` lets
the scheduler place everything. The output says which was used.

Usage: PYTHONPATH=. python -m bench.gateway [--seconds 5] [--concurrency 32] [--shards 2]
         [--top-k 10] [--rounds 3] [--pin on|off] [--access-log off|json|text]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import multiprocessing as mp
import os
import statistics
import sys
import time
from collections.abc import Iterator
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
SLICE_S = 0.5  # closed-loop phases alternate the two servers in slices this long


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

    def search(self, *args: Any) -> asyncio.Future[Any]:
        """A done future, as the shard backend's API asks (the real one returns the future
        of a search it sent; an in-process shard has answered by the time it returns)."""
        answered: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        answered.set_result(self._hits)
        return answered

    async def upsert(self, writes: Any) -> int:
        return len(writes)

    async def delete(self, ids: Any) -> int:
        return 0

    async def get(self, ids: Any) -> list[Any]:
        return [None for _ in ids]

    async def stats(self) -> Any:
        return self._stats


async def _gateway_main(port_out: Any, shards: int, top_k: int, access_log: str) -> None:
    import logging

    from clipsearch.settings import load_settings
    from gateway import logs
    from gateway.coordinator import Coordinator
    from gateway.server import create_server, freeze_startup_heap

    if access_log == "off":
        logging.getLogger("clipsearch.access").setLevel(logging.WARNING)
    else:  # as `clipsearch serve` sets logging up, the lines going to /dev/null
        logs.setup(json_logs=access_log == "json")
        handler = logging.getLogger().handlers[0]
        assert isinstance(handler, logging.StreamHandler)
        handler.setStream(open(os.devnull, "w"))  # noqa: SIM115 (open while serving)
    settings = load_settings(
        gateway={"port": 0, "admission": {"read": 0, "write": 0, "admin": 0}},
        limits={"max_top_k": 1000},
    )
    coordinator = Coordinator(_StubEncoder(), [_StubShard(n, top_k) for n in range(shards)])  # type: ignore[arg-type]
    server, port, _ = await create_server(coordinator, settings)
    freeze_startup_heap()  # as `clipsearch serve` does
    port_out.put(port)
    await server.wait_for_termination()


async def _echo_main(port_out: Any, reply: bytes, parse: bool) -> None:
    if parse:  # the fair echo: a SearchRequest parsed, the same SearchResponse serialised
        answer: Any = search_pb2.SearchResponse.FromString(reply)
        method = grpc.unary_unary_rpc_method_handler(
            _answer(answer),
            request_deserializer=search_pb2.SearchRequest.FromString,
            response_serializer=search_pb2.SearchResponse.SerializeToString,
        )
    else:  # raw bytes both ways: grpc alone
        method = grpc.unary_unary_rpc_method_handler(_answer(reply))
    handler = grpc.method_handlers_generic_handler(
        "clipsearch.v1.SearchService", {"Search": method}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    from gateway.server import freeze_startup_heap

    freeze_startup_heap()  # the same treatment as the gateway
    port_out.put(port)
    await server.wait_for_termination()


def _answer(reply: Any) -> Any:
    async def search(request: Any, context: Any) -> Any:
        return reply

    return search


def _pin(cpus: set[int] | None) -> None:
    """Keep this process (and the threads it starts after this) on `cpus`; None: anywhere."""
    if cpus:
        os.sched_setaffinity(0, cpus)


def _run_gateway(
    port_out: Any, cpus: set[int] | None, shards: int, top_k: int, access_log: str = "off"
) -> None:
    _pin(cpus)  # before grpc and asyncio start their threads, which inherit it
    asyncio.run(_gateway_main(port_out, shards, top_k, access_log))


def _run_echo(port_out: Any, cpus: set[int] | None, reply: bytes, parse: bool) -> None:
    _pin(cpus)
    asyncio.run(_echo_main(port_out, reply, parse))


# ---- the load generator ---------------------------------------------------------------------


async def _closed_loops(
    addresses: dict[str, str], body: bytes, concurrency: int, seconds: float, slice_s: float
) -> dict[str, float]:
    """Closed-loop req/s of each server, measured in alternating slices of `slice_s` until
    each has had `seconds`: a burst of other load on the machine then falls on both.

    A slice counts the calls it started, timed until the last of them is answered (so the
    ramp-down of the concurrent callers is inside the slice, for both servers alike).
    """
    channels = {name: grpc.aio.insecure_channel(a) for name, a in addresses.items()}
    try:
        calls = {name: ch.unary_unary(SEARCH) for name, ch in channels.items()}
        for call in calls.values():
            for _ in range(50):  # warm up
                await call(body, timeout=10)
        done = dict.fromkeys(calls, 0)
        spent = dict.fromkeys(calls, 0.0)
        with _no_gc():
            while min(spent.values()) < seconds:
                for name, call in calls.items():
                    start = time.perf_counter()
                    stop = start + slice_s
                    count = 0

                    async def worker(call: Any = call, stop: float = stop) -> None:
                        nonlocal count
                        while time.perf_counter() < stop:
                            await call(body, timeout=10)
                            count += 1

                    await asyncio.gather(*(worker() for _ in range(concurrency)))
                    done[name] += count
                    spent[name] += time.perf_counter() - start
        return {name: done[name] / spent[name] for name in calls}
    finally:
        for ch in channels.values():
            await ch.close()


async def _open_loop(
    address: str, body: bytes, rate: float, seconds: float
) -> tuple[list[float], list[float]]:
    """Latencies, each counted from its scheduled send time, and the generator's own lag
    (actual send - scheduled send) of each call: a stall of this process shows in the lag,
    so a tail it caused can be told from one the server caused."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(SEARCH)
        for _ in range(50):
            await call(body, timeout=10)
        n = int(rate * seconds)
        latencies: list[float] = []
        lags: list[float] = []
        failures: list[BaseException] = []
        finished = asyncio.Event()

        async def one(scheduled: float) -> None:
            lags.append(time.perf_counter() - scheduled)
            try:
                await call(body, timeout=30)
                latencies.append(time.perf_counter() - scheduled)
            except Exception as exc:  # noqa: BLE001 (re-raised below, after the round)
                failures.append(exc)
            if len(latencies) + len(failures) == n:
                finished.set()

        tasks = set()
        with _no_gc():
            t0 = time.perf_counter()
            for i in range(n):
                scheduled = t0 + i / rate
                delay = scheduled - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                task = asyncio.ensure_future(one(scheduled))
                tasks.add(task)  # held until done (the loop keeps only weak references)
                task.add_done_callback(tasks.discard)
            # an Event, not a gather over every call: building that gather blocked the loop
            # for ~10 ms with the last calls' answers waiting (a tail of the generator's own)
            await finished.wait()
        if failures:
            raise failures[0]
        return latencies, lags


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """The load generator's collector off while it measures (as `timeit` does): its pauses
    would be counted as the server's latency. The servers keep theirs."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _cpu_split(pin: bool) -> tuple[set[int] | None, set[int] | None]:
    """(server CPUs, load-generator CPUs): the first allowed CPU and the rest, or Nones."""
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2:
        return None, None
    return {cpus[0]}, set(cpus[1:])


def _cpus(cpus: set[int] | None) -> str:
    return ",".join(str(c) for c in sorted(cpus or ()))


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
    parser.add_argument(
        "--pin",
        choices=("on", "off"),
        default="on",
        help="server on one CPU, load generator on the others (both servers alike); "
        "on needs at least 2 CPUs, else it is off",
    )
    parser.add_argument(
        "--access-log",
        choices=("off", "json", "text"),
        default="off",
        help="the gateway's access log (one line per RPC, to /dev/null), as --json-logs "
        "or plain text; off by default, as in earlier figures",
    )
    args = parser.parse_args()
    body = _request(args.top_k)
    server_cpus, driver_cpus = _cpu_split(args.pin == "on")
    if server_cpus:
        _pin(driver_cpus)  # before this process's grpc threads start

    # Both servers run side by side (the idle one costs nothing) so the closed-loop phases can
    # alternate closely: `--rounds` rounds of interleaved slices, the order flipped every
    # round, each round giving a ratio. Then `--rounds` open-loop phases against the gateway
    # at 70 % of its median saturation, each giving a tail figure. Medians of rounds are
    # reported, so one burst of noise from other processes on the machine decides neither
    # figure (nor the open-loop rate: one lucky saturation reading would overload it).
    ratios: list[float] = []
    raw_ratios: list[float] = []
    gw_rates: list[float] = []
    tails: list[tuple[float, float, float]] = []
    gw, port = _start(_run_gateway, server_cpus, args.shards, args.top_k, args.access_log)
    echoes: list[Any] = []
    try:
        gw_address = f"127.0.0.1:{port}"
        reply = asyncio.run(_one(gw_address, body))
        servers = [("gw", gw_address)]
        for name, parse in (("echo", True), ("raw", False)):
            proc, port = _start(_run_echo, server_cpus, reply, parse)
            echoes.append(proc)
            servers.append((name, f"127.0.0.1:{port}"))
        for n in range(args.rounds):
            order = servers[:: 1 - 2 * (n % 2)]
            rps = asyncio.run(
                _closed_loops(dict(order), body, args.concurrency, args.seconds, SLICE_S)
            )
            gw_rates.append(rps["gw"])
            ratios.append(rps["gw"] / rps["echo"])
            raw_ratios.append(rps["gw"] / rps["raw"])
            print(
                f"closed loop {n + 1}: gateway {rps['gw']:,.0f} req/s, echo "
                f"{rps['echo']:,.0f} req/s (raw bytes {rps['raw']:,.0f}), ratio "
                f"{ratios[-1]:.2f} (to raw bytes {raw_ratios[-1]:.2f})",
                flush=True,
            )
        rate = 0.7 * statistics.median(gw_rates)
        for n in range(args.rounds):
            latencies, lags = asyncio.run(_open_loop(gw_address, body, rate, args.seconds))
            q = statistics.quantiles(latencies, n=100)
            tails.append((rate, q[49] * 1000, q[98] * 1000))
            print(
                f"open loop {n + 1} at {rate:,.0f} req/s: p50 {tails[-1][1]:.2f} ms, "
                f"p99 {tails[-1][2]:.2f} ms, p99/p50 {tails[-1][2] / tails[-1][1]:.2f} "
                f"(load generator's own send lag: p99 "
                f"{statistics.quantiles(lags, n=100)[98] * 1000:.2f} ms, max "
                f"{max(lags) * 1000:.2f} ms)",
                flush=True,
            )
    finally:
        for proc in (gw, *echoes):
            proc.terminate()
            proc.join(10)

    ratio = statistics.median(ratios)
    raw_ratio = statistics.median(raw_ratios)
    tail = statistics.median(p99 / p50 for _, p50, p99 in tails)
    rate, p50, p99 = sorted(tails, key=lambda t: t[2] / t[1])[len(tails) // 2]
    placement = (
        f"servers pinned to CPU {_cpus(server_cpus)}, load generator to CPU {_cpus(driver_cpus)}"
        if server_cpus
        else "not pinned: servers and load generator share all CPUs"
    )
    print(placement)
    print(
        f"request {len(body)} B, response {len(reply)} B, {args.shards} stub shards, "
        f"top_k {args.top_k}, concurrency {args.concurrency}, {args.seconds:.0f} s per phase, "
        f"access log {args.access_log}"
    )
    print(f"{'figure':<34}{'value':>12}{'target':>10}{'':>6}")
    rows = [
        (
            "gateway / echo (median of rounds)",
            f"{ratio:.2f}",
            ">= 0.5",
            "ok" if ratio >= 0.5 else "MISS",
        ),
        ("gateway / raw-bytes echo", f"{raw_ratio:.2f}", "", ""),
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
