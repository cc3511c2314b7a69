"""Observability: Prometheus metrics over HTTP, JSON logs with the request id, tracing."""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.request

import grpc
import numpy as np
import pytest

from clipsearch.v1 import search_pb2, search_pb2_grpc
from gateway.logs import JsonFormatter, request_id_var
from tests.gateway_harness import DIM, code_of, gateway


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return reply.read().decode()


def _value(text: str, prefix: str) -> float:
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {prefix!r} in\n{text}")


async def test_metrics_endpoint_counts_rpcs_stages_and_shards() -> None:
    obs = {"metrics_port": 0}
    async with gateway(observability=obs) as (port, health):
        metrics_port = health.observability.metrics_port
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = search_pb2_grpc.SearchServiceStub(channel)
            vec = {"values": np.ones(DIM).tolist()}
            doc = search_pb2.UpsertDocument(id="a", image_vector=vec)
            assert await code_of(stub.Upsert(search_pb2.UpsertRequest(documents=[doc]))) == (
                grpc.StatusCode.OK
            )
            for _ in range(3):
                await stub.Search(search_pb2.SearchRequest(text="a red circle", top_k=3))
            bad = search_pb2.SearchRequest(text="x", top_k=0)
            assert await code_of(stub.Search(bad)) == grpc.StatusCode.INVALID_ARGUMENT
        await health.check_once()
        text = await asyncio.to_thread(_scrape, metrics_port)
    search = 'method="/clipsearch.v1.SearchService/Search"'
    assert _value(text, f'clipsearch_rpc_total{{code="OK",{search}}}') == 3
    assert _value(text, f'clipsearch_rpc_total{{code="INVALID_ARGUMENT",{search}}}') == 1
    assert _value(text, f'clipsearch_rpc_seconds_count{{code="OK",{search}}}') == 3
    for stage in ("encode", "search", "merge", "total"):
        assert _value(text, f'clipsearch_stage_seconds_count{{stage="{stage}"}}') == 3
    shard_vectors = [_value(text, f'clipsearch_shard_vectors{{modality="image",shard="{n}"}}')
                     for n in (0, 1)]  # fmt: skip
    assert sum(shard_vectors) == 1
    assert _value(text, 'clipsearch_shard_probe_seconds{shard="1"}') >= 0
    assert _value(text, "clipsearch_encoder_probe_seconds") > 0
    assert _value(text, 'clipsearch_healthy{service="overall"}') == 1
    assert _value(text, 'clipsearch_rpc_in_flight{method_class="read"}') == 0


async def test_request_id_is_taken_or_made_and_returned_in_trailers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="clipsearch.access")
    async with gateway() as (port, _):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = search_pb2_grpc.SearchServiceStub(channel)
            request = search_pb2.SearchRequest(text="a red circle", top_k=3)
            call = stub.Search(request, metadata=(("x-request-id", "abc-123"),))
            await call
            assert dict(await call.trailing_metadata())["x-request-id"] == "abc-123"
            call = stub.Search(search_pb2.SearchRequest(text="x", top_k=0))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            made = dict(err.value.trailing_metadata())["x-request-id"]
            assert len(made) == 32
    lines = [r for r in caplog.records if r.name == "clipsearch.access"]
    by_id = {getattr(r, "request_id", None): r for r in lines}
    assert by_id["abc-123"].status == "OK"  # type: ignore[attr-defined]
    assert by_id["abc-123"].getMessage().startswith(
        "rpc method=/clipsearch.v1.SearchService/Search status=OK ms="
    ) and by_id["abc-123"].getMessage().endswith(" request_id=abc-123")
    assert by_id[made].status == "INVALID_ARGUMENT"  # type: ignore[attr-defined]
    record = json.loads(JsonFormatter().format(by_id[made]))
    assert record["request_id"] == made and record["status"] == "INVALID_ARGUMENT"
    assert record["method"].endswith("/Search") and record["logger"] == "clipsearch.access"


def test_json_lines_carry_the_request_id_of_the_current_call() -> None:
    token = request_id_var.set("rid-7")
    try:
        record = logging.LogRecord(
            "clipsearch.x", logging.WARNING, __file__, 1, "hi %s", ("a",), None
        )
        out = json.loads(JsonFormatter().format(record))
    finally:
        request_id_var.reset(token)
    assert out == {**out, "message": "hi a", "level": "WARNING", "request_id": "rid-7"}


async def test_a_span_per_rpc_when_tracing_is_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from gateway import server, tracing

    exporter = InMemorySpanExporter()
    monkeypatch.setattr(server, "tracer_for", lambda _endpoint: tracing.tracer_for("", exporter))
    async with gateway() as (port, _):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = search_pb2_grpc.SearchServiceStub(channel)
            await stub.Search(
                search_pb2.SearchRequest(text="a", top_k=1), metadata=(("x-request-id", "t-1"),)
            )
    (span,) = [
        s for s in exporter.get_finished_spans() if s.attributes["clipsearch.request_id"] == "t-1"
    ]
    assert span.name == "clipsearch.rpc"
    assert span.attributes["rpc.method"] == "/clipsearch.v1.SearchService/Search"
    assert span.attributes["rpc.grpc.status_code"] == "OK"
    assert tracing.tracer_for("") is None


async def test_shard_call_figures_are_exported_per_shard() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from gateway.coalesce import Coalescer
    from gateway.shard_metrics import ShardCallCollector

    class Backend:
        def __init__(self, alone: int, batches: dict[int, int], calls: int, up: bool) -> None:
            async def one(r: int) -> int:
                return r

            async def many(rs: list[int]) -> list[int]:
                return rs

            self.searches: Coalescer[int, int] = Coalescer(one, many)
            self.searches.alone, self.searches.batches = alone, batches
            self.channel_calls, self.channel_open = calls, up

    registry = CollectorRegistry()
    shards = [Backend(5, {3: 2, 7: 1}, 8, True), Backend(1, {}, 0, False), object()]
    registry.register(ShardCallCollector(shards))
    text = generate_latest(registry).decode()
    assert _value(text, 'clipsearch_shard_search_calls_total{kind="alone",shard="0"}') == 5
    assert _value(text, 'clipsearch_shard_search_calls_total{kind="batched",shard="0"}') == 3
    assert _value(text, 'clipsearch_shard_search_batches_total{shard="0",size="7"}') == 1
    assert _value(text, 'clipsearch_shard_channel_calls_total{shard="0"}') == 8
    assert _value(text, 'clipsearch_shard_channel_open{shard="0"}') == 1
    assert _value(text, 'clipsearch_shard_channel_open{shard="1"}') == 0
    assert 'shard="2"' not in text  # a backend without the counters is skipped


async def test_a_real_coalescer_counts_calls_alone_and_batched() -> None:
    from gateway.coalesce import Coalescer

    release = asyncio.Event()

    async def one(r: int) -> int:
        await release.wait()
        return r

    async def many(rs: list[int]) -> list[int]:
        return rs

    c: Coalescer[int, int] = Coalescer(one, many, max_in_flight=1)
    calls = [asyncio.ensure_future(c.call(i)) for i in range(4)]
    await asyncio.sleep(0)
    release.set()
    assert await asyncio.gather(*calls) == [0, 1, 2, 3]
    assert c.alone == 1 and c.batches == {3: 1}


def test_loop_histograms_expose_what_prometheus_client_would() -> None:
    """The lock-free per-call series scrape exactly as prometheus_client's own Counter and
    Histogram fed the same observations (bucket edges, +Inf, count, sum, names, labels)."""
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    from gateway.metrics import _LATENCY_BUCKETS, GatewayMetrics

    observed = (0.0005, 0.0007, 0.003, 0.25, 30.0, 40.0)  # edges, between, past the last
    ours = GatewayMetrics()
    reference = CollectorRegistry()
    seconds = Histogram(
        "clipsearch_rpc_seconds",
        "RPC latency by method and status",
        ["method", "code"],
        buckets=_LATENCY_BUCKETS,
        registry=reference,
    )
    count = Counter(
        "clipsearch_rpc", "RPCs by method and status", ["method", "code"], registry=reference
    )
    for code in ("OK", "INVALID_ARGUMENT"):
        for value in observed:
            ours.observe_rpc("/s/M", code, value)
            seconds.labels("/s/M", code).observe(value)
            count.labels("/s/M", code).inc()

    def rpc_lines(text: bytes) -> list[str]:
        return sorted(
            line.rsplit(" ", 1)[0] if "_created" in line else line  # creation times differ
            for line in text.decode().splitlines()
            if line.startswith(
                ("clipsearch_rpc_total", "clipsearch_rpc_seconds", "clipsearch_rpc_created")
            )
        )

    assert rpc_lines(generate_latest(ours.registry)) == rpc_lines(generate_latest(reference))


def test_json_timestamps_follow_each_record_across_seconds() -> None:
    """The once-a-second timestamp cache never stamps a line with another second's time."""
    formatter = JsonFormatter()
    stamps = []
    for created in (1_800_000_000.25, 1_800_000_000.75, 1_800_000_001.5, 86_400.0):
        record = logging.LogRecord("clipsearch.x", logging.INFO, __file__, 1, "é", None, None)
        record.created, record.msecs = created, (created % 1) * 1000
        stamps.append(json.loads(formatter.format(record))["ts"])
    assert stamps == [
        "2027-01-15T08:00:00.250Z",
        "2027-01-15T08:00:00.750Z",
        "2027-01-15T08:00:01.500Z",
        "1970-01-02T00:00:00.000Z",
    ]
    assert '"message": "é"' in formatter.format(record)  # not escaped to \\u00e9
