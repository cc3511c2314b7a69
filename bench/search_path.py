"""The served search path vs the raw libraries, measured side by side in one run.

Starts an embedded Ray runtime with the encoder deployment, then for each index factory its
own shard actors and gateway on loopback, fills them with N random unit vectors, and times
the same queries (one at a time, top_k 10) through every layer of the vector-search path:

  faiss        in-process Faiss: one index of the same factory over the same N vectors,
               searched with the same nprobe / efSearch (the issue's baseline)
  served       gateway end to end, timed by a caller in its own process (bench.caller):
               gRPC client -> interceptor -> servicer -> coordinator ->
               direct search channel per shard (index_service.channel) -> Shard engine ->
               merge -> response
  served/ray   the same with every shard search a Ray actor call (`use_channel` off)
  faiss/idle   in-process Faiss again, idling IDLE_GAP before each query as a shard does
               between served queries (caches and the idle vCPU go cold: what the served
               path pays on top of the warm loop above, with no code of ours involved)
  coordinator  the same search from inside the gateway's event loop, without gRPC
  coord/idle   the same, idling IDLE_GAP before each search
  served/ghz   the served search sent by ghz (Go, ~0.1 ms of its own per call)
  ghz floor    ghz against a bare grpc.aio server answering a same-size Search response
  coord/ray    the same with Ray actor calls
  ray floor    a no-op call fanned out to the same shard actors (the bare Ray hop)
  grpc floor   a no-op unary call to a bare grpc.aio server (the bare gRPC hop), timed
               by the same out-of-process caller
  x16 callers  coordinator QPS with 16 concurrent callers, shard calls coalesced (the
               default: concurrent searches share an actor call) vs one call per search

and prints served - faiss (issue 4's target: <= 2 ms for IVF/HNSW). A last row times a
text query end to end against the model's own forward pass + in-process Faiss. Run it as a
module (bench/gateway.py would shadow the gateway package on a script's path).

Usage: PYTHONPATH=. python -m bench.search_path [--docs 100000] [--queries 300]
       [--factories 'Flat;IVF1024,Flat;HNSW32'] [--shards 2] [--model demo]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import grpc
import numpy as np
import ray

from clipsearch.client import Client
from clipsearch.launcher import ENCODER_APP, init_ray
from clipsearch.settings import IndexSettings, Settings, load_settings
from clipsearch.types import DocRecord, Modality, SearchParams
from clipsearch.v1 import search_pb2
from encoder_service.model import ClipEncoder, resolve_model
from gateway.backends import RayEncoder, RayShard
from gateway.coordinator import Coordinator, SearchQuery, UpsertItem
from gateway.server import create_server, drain
from index_service.actor import start_shards
from load.payloads import PROTOSET, write_protoset

K = 10
NPROBE = 16
EF_SEARCH = 64
CONCURRENCY = 16  # callers in the throughput row
SECONDS = 2.0  # per throughput round
ROUNDS = 3
IDLE_GAP = 0.002  # the /idle rows: about a served query's round trip between two searches


@dataclass
class Served:
    """One factory's shards and gateway."""

    factory: str
    coordinator: Coordinator
    actors: list[Any]
    server: Any
    health: Any
    client: Client
    port: int
    data_dir: str


def _p(samples: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples) * 1000.0, q))


def _time(fn: Callable[[int], object], n: int, gap: float = 0.0) -> list[float]:
    """Per-call seconds; `gap` idles that long before each call (as a served query finds
    the shard: the next search comes a client and gateway round trip after the last)."""
    fn(0)  # warm-up
    out = []
    for i in range(n):
        if gap:
            time.sleep(gap)
        t = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - t)
    return out


async def _time_async(
    fn: Callable[[int], Awaitable[object]], n: int, gap: float = 0.0
) -> list[float]:
    await fn(0)
    out = []
    for i in range(n):
        if gap:
            await asyncio.sleep(gap)
        t = time.perf_counter()
        await fn(i)
        out.append(time.perf_counter() - t)
    return out


def _params(factory: str) -> SearchParams | None:
    if factory.startswith("IVF"):
        return SearchParams(nprobe=NPROBE)
    if factory.startswith("HNSW"):
        return SearchParams(ef_search=EF_SEARCH)
    return None


def _raw_index(factory: str, vecs: np.ndarray) -> Any:
    """An in-process Faiss index of `factory` over `vecs`, set to the benchmark's params."""
    index: Any = faiss.index_factory(vecs.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if factory.startswith("HNSW"):  # linked as a shard links it (graph quality sets speed)
        index.hnsw.efConstruction = IndexSettings().hnsw_ef_construction
    index.train(vecs)
    index.add(vecs)
    if factory.startswith("IVF"):
        faiss.extract_index_ivf(index).nprobe = NPROBE
    if factory.startswith("HNSW"):
        faiss.ParameterSpace().set_index_parameter(index, "efSearch", EF_SEARCH)
    return index


async def _serve(
    settings: Settings, factory: str, shards: int, encoder: RayEncoder, vecs: np.ndarray, n: int
) -> Served:
    """Start `shards` actors of `factory` and a gateway over them; fill; wait for training."""
    index = IndexSettings(factory=factory, shards=shards, snapshot_every=10**9)
    data_dir = str(settings.data_dir / f"f{n}")
    actors = await asyncio.to_thread(
        start_shards, index, encoder.dim, data_dir, encoder.model_id, f"bench-{n}"
    )
    backends = [RayShard(a, i) for i, a in enumerate(actors)]
    if not all(await asyncio.gather(*(b.connect() for b in backends))):
        print(f"  ({factory}: no direct search channel; every search is an actor call)")
    coordinator = Coordinator(encoder, backends)
    gw_settings = settings.model_copy(update={"index": index})
    server, port, health = await create_server(coordinator, gw_settings)
    for s in range(0, len(vecs), 5000):
        await coordinator.upsert(
            [
                UpsertItem(DocRecord(f"d{i}", 0.0, has_image=True), image_vector=vecs[i])
                for i in range(s, min(s + 5000, len(vecs)))
            ]
        )
    give_up = time.monotonic() + 900  # a shard below its training floor never switches
    while not all(
        i.active_type == i.configured_type and not i.rebuilding
        for s in await coordinator.stats()
        for i in s.indexes[:1]
    ):
        if time.monotonic() > give_up:
            raise RuntimeError(f"{factory} not trained after 900 s; use more --docs")
        await asyncio.sleep(0.5)
    client = Client(f"127.0.0.1:{port}", timeout=120)
    return Served(factory, coordinator, actors, server, health, client, port, data_dir)


async def _bare_grpc(reply: bytes = b"") -> tuple[Any, int]:
    """A bare grpc.aio server: /bench.Echo/Ping answers nothing, and
    /clipsearch.v1.SearchService/Search answers `reply` to anything (bytes in and out)."""

    async def ping(request: bytes, context: Any) -> bytes:
        return b""

    async def search(request: bytes, context: Any) -> bytes:
        return reply

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "bench.Echo", {"Ping": grpc.unary_unary_rpc_method_handler(ping)}
            ),
            grpc.method_handlers_generic_handler(
                "clipsearch.v1.SearchService",
                {"Search": grpc.unary_unary_rpc_method_handler(search)},
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


def _row(name: str, samples: list[float], raw_p50: float | None = None) -> str:
    p50 = _p(samples, 50)
    line = f"  {name:<12} p50 {p50:7.2f} ms  p99 {_p(samples, 99):7.2f} ms"
    if raw_p50 is not None:
        line += f"  | - faiss {p50 - raw_p50:6.2f} ms  ratio {p50 / raw_p50:5.2f}x"
    return line


def _measure(
    served: Served, vecs: np.ndarray, queries: np.ndarray, n: int, run: Callable[..., Any]
) -> list[str]:
    """The table rows of one factory."""
    params = _params(served.factory)
    raw = _raw_index(served.factory, vecs)
    raw_s = _time(lambda i: raw.search(queries[i : i + 1], K), n)
    raw_idle_s = _time(lambda i: raw.search(queries[i : i + 1], K), n, IDLE_GAP)
    served_s = _caller(served, queries[: n + 1], params)

    async def coord(i: int) -> object:
        q = SearchQuery(Modality.IMAGE, K, vector=queries[i], params=params)
        return await served.coordinator.search(q)

    async def ray_floor(i: int) -> object:
        return await asyncio.gather(*(a.ready.remote() for a in served.actors))

    ghz_rows = _ghz_rows(served, queries[: n + 1], params, run)
    coord_s = run(_time_async(coord, n))
    coord_idle_s = run(_time_async(coord, n, IDLE_GAP))
    _use_channel(served, False)
    served_ray_s = _caller(served, queries[: n + 1], params)
    coord_ray_s = run(_time_async(coord, n))
    _use_channel(served, True)
    floor_s = run(_time_async(ray_floor, n))
    r = _p(raw_s, 50)
    return [
        f"{served.factory}:",
        _row("faiss", raw_s),
        _row("faiss/idle", raw_idle_s, r),
        _row("served", served_s, r),
        _row("served/ray", served_ray_s, r),
        *(_row(name, samples, r) for name, samples in ghz_rows),
        _row("coordinator", coord_s, r),
        _row("coord/idle", coord_idle_s, r),
        _row("coord/ray", coord_ray_s, r),
        _row("ray floor", floor_s),
        _throughput_row(served, lambda i: coord(i % n), run),
    ]


def _caller(served: Served, queries: np.ndarray, params: SearchParams | None) -> list[float]:
    """Sequential Searches timed by a client in its own process (bench.caller)."""
    path = os.path.join(served.data_dir, "queries.npy")
    np.save(path, queries)
    extra = []
    if params is not None:
        extra = ["--nprobe", str(params.nprobe), "--ef-search", str(params.ef_search)]
    return _run_caller(["search", str(served.port), "--queries", path, "--k", str(K), *extra])


def _ghz_rows(
    served: Served, queries: np.ndarray, params: SearchParams | None, run: Callable[..., Any]
) -> list[tuple[str, list[float]]]:
    """The same sequential Searches sent by ghz (a Go client, whose own cost per call is a
    fraction of Python's), against the gateway and against a bare grpc.aio server that
    answers every Search with a real response of the same size (ghz floor)."""
    ghz = _ghz_binary()
    if ghz is None:
        return []
    out = Path(served.data_dir)
    write_protoset(out / PROTOSET)
    search_params = {}
    if params is not None:
        search_params = {"nprobe": params.nprobe, "ef_search": params.ef_search}
    messages = [
        {"vector": {"values": [float(x) for x in q]}, "top_k": K, "search_params": search_params}
        for q in queries
    ]
    (out / "queries.json").write_text(json.dumps(messages))
    with grpc.insecure_channel(f"127.0.0.1:{served.port}") as channel:
        request = search_pb2.SearchRequest(top_k=K)
        request.vector.values.extend(queries[0].tolist())
        reply = channel.unary_unary("/clipsearch.v1.SearchService/Search")(
            request.SerializeToString(), timeout=10
        )
    echo, echo_port = run(_bare_grpc(reply))
    rows = []
    for name, port in (("ghz floor", echo_port), ("served/ghz", served.port)):
        rows.append((name, _ghz(ghz, out, port, len(messages))))
    run(echo.stop(0))
    return rows


def _ghz(ghz: str, out: Path, port: int, n: int) -> list[float]:
    argv = [
        ghz, "--insecure", "--protoset", PROTOSET, "--call",
        "clipsearch.v1.SearchService/Search", "--data-file", "queries.json",
        "-c", "1", "--connections", "1", "-n", str(n), "--format", "json",
        f"127.0.0.1:{port}",
    ]  # fmt: skip
    done = subprocess.run(argv, cwd=out, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ghz failed: {done.stderr[-2000:]}")
    report = json.loads(done.stdout)
    errors = [d for d in report["details"] if d.get("error")]
    if errors:
        raise RuntimeError(f"ghz: {len(errors)} calls failed, e.g. {errors[0]['error']}")
    return [d["latency"] / 1e9 for d in report["details"]]


def _ghz_binary() -> str | None:
    tools = os.environ.get("CLIPSEARCH_TOOLS", os.path.expanduser("~/.cache/clipsearch/tools"))
    pinned = os.path.join(tools, "bin", "ghz")
    return pinned if os.access(pinned, os.X_OK) else shutil.which("ghz")


def _run_caller(argv: list[str]) -> list[float]:
    done = subprocess.run(
        [sys.executable, "-m", "bench.caller", *argv], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"bench.caller failed: {done.stderr[-2000:]}")
    samples: list[float] = json.loads(done.stdout.strip().splitlines()[-1])
    return samples


def _use_channel(served: Served, on: bool) -> None:
    for shard in served.coordinator.shards:
        shard.use_channel = on  # type: ignore[attr-defined]


def _throughput_row(
    served: Served, coord: Callable[[int], Awaitable[object]], run: Callable[..., Any]
) -> str:
    """Coordinator QPS at CONCURRENCY callers: shard calls coalesced (the default) vs every
    search its own actor call per shard, alternated rounds, medians."""
    shards = served.coordinator.shards
    default = shards[0].searches.max_in_flight  # type: ignore[attr-defined]
    rates: dict[str, list[float]] = {"coalesced": [], "one call each": []}
    for _ in range(ROUNDS):
        for name, in_flight in (("coalesced", default), ("one call each", 10**9)):
            for shard in shards:
                shard.searches.max_in_flight = in_flight  # type: ignore[attr-defined]
            rates[name].append(run(_qps(coord, CONCURRENCY, SECONDS)))
    for shard in shards:
        shard.searches.max_in_flight = default  # type: ignore[attr-defined]
    a, b = (float(np.median(v)) for v in rates.values())
    return (
        f"  x{CONCURRENCY} callers  coalesced {a:6.0f} QPS  one call each {b:6.0f} QPS"
        f"  | ratio {a / b:4.2f}x"
    )


async def _qps(fn: Callable[[int], Awaitable[object]], callers: int, seconds: float) -> float:
    stop = time.perf_counter() + seconds
    done = 0

    async def caller(start: int) -> None:
        nonlocal done
        i = start
        while time.perf_counter() < stop:
            await fn(i)
            done += 1
            i += callers

    started = time.perf_counter()
    await asyncio.gather(*(caller(c) for c in range(callers)))
    return done / (time.perf_counter() - started)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--factories", default="Flat;IVF1024,Flat;HNSW32")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--model", default="demo")
    args = ap.parse_args()
    data_dir = tempfile.mkdtemp(prefix="csbench-")
    settings = load_settings(
        gateway={"port": 0}, demo_corpus=0, encoder={"model": args.model}, data_dir=data_dir
    )
    ray_temp = init_ray(settings)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    def run(coro: Awaitable[Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(1800)  # type: ignore[arg-type]

    from ray import serve

    from encoder_service.deployment import build_encoder_app

    serve.start(proxy_location="Disabled")
    app = build_encoder_app(settings.encoder, settings.limits)
    handle = serve.run(app, name=ENCODER_APP, route_prefix=None)
    info = handle.info.remote().result()
    encoder = RayEncoder(handle, info["model_id"], info["dim"])
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((args.docs, encoder.dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    queries = rng.standard_normal((args.queries + 1, encoder.dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)

    echo, echo_port = run(_bare_grpc())
    grpc_floor = _run_caller(["ping", str(echo_port), "--n", str(args.queries)])

    print(
        f"{args.docs} docs x {encoder.dim} dims, {args.shards} shards, {args.queries} "
        f"sequential queries, top_k {K}, nprobe {NPROBE}, efSearch {EF_SEARCH}"
    )
    print(_row("grpc floor", grpc_floor))
    first: Served | None = None
    for n, factory in enumerate(args.factories.split(";")):
        served = run(_serve(settings, factory, args.shards, encoder, vecs, n))
        for line in _measure(served, vecs, queries, args.queries, run):
            print(line, flush=True)
        if first is None:
            first = served
        else:
            _stop(served, run)
    assert first is not None
    texts = [f"a photo of thing number {i}" for i in range(args.queries + 1)]
    model = ClipEncoder(resolve_model(args.model))
    raw = _raw_index(first.factory, vecs)
    served_txt = _time(lambda i: first.client.search(texts[i], top_k=K), args.queries)
    raw_txt = _time(lambda i: raw.search(model.encode_texts([texts[i]]), K), args.queries)
    print(f"text search ({first.factory}, encoder + search):")
    print(_row("model+faiss", raw_txt))
    print(_row("served", served_txt, _p(raw_txt, 50)))
    _stop(first, run)
    run(echo.stop(0))
    serve.shutdown()
    ray.shutdown()
    for path in (ray_temp, data_dir):
        if path:
            shutil.rmtree(path, ignore_errors=True)


def _stop(served: Served, run: Callable[..., Any]) -> None:
    served.client.close()
    run(drain(served.server, served.health, 0))
    for actor in served.actors:
        ray.kill(actor)


if __name__ == "__main__":
    main()
