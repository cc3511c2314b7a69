"""Hostile inputs against the real running stack (Ray Serve encoder, shard actors, gateway).

Each case asserts the status code; after it the server must still report SERVING and the
stored data must be unchanged (or, for the few hostile-looking inputs that are valid
writes, hold exactly what was written)."""

# ruff: noqa: E501, N806  (the case table reads best one case per line)
from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from clipsearch.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    common_pb2,
    encoder_pb2,
    encoder_pb2_grpc,
    search_pb2,
    search_pb2_grpc,
)
from tests.fakes import unit_vectors

pytestmark = pytest.mark.integration

C = grpc.StatusCode
SEED_IDS = ("seed-0", "seed-1", "seed-2")


@dataclass
class Stubs:
    channel: grpc.Channel
    search: search_pb2_grpc.SearchServiceStub
    encoder: encoder_pb2_grpc.EncoderServiceStub
    admin: admin_pb2_grpc.AdminServiceStub
    dim: int


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG")
    return out.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (the data is a few bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )


def _bomb() -> bytes:
    """A small PNG that decodes to 36 megapixels (over the 25 MP limit)."""
    return _png(Image.new("L", (6000, 6000)))


def _gif_animated() -> bytes:
    frames = [Image.new("P", (32, 32), i * 40) for i in range(3)]
    out = io.BytesIO()
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    return out.getvalue()


def _png16() -> bytes:
    arr = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).astype(np.uint16)
    image = Image.fromarray(arr)
    assert image.mode == "I;16"
    return _png(image)


def _ts(seconds: int) -> Timestamp:
    return Timestamp(seconds=seconds)


def _vec(values: Any) -> common_pb2.Vector:
    return common_pb2.Vector(values=list(values))


def _search(s: Stubs, **fields: Any) -> Any:
    fields.setdefault("top_k", 5)
    return s.search.Search(search_pb2.SearchRequest(**fields), timeout=60)


def _search_vec(s: Stubs, **fields: Any) -> Any:
    return _search(s, vector=_vec(unit_vectors(1, s.dim, 7)[0]), **fields)


def _upsert_one(s: Stubs, doc_id: str) -> Any:
    doc = search_pb2.UpsertDocument(id=doc_id, image_vector=_vec(unit_vectors(1, s.dim, 3)[0]))
    return s.search.Upsert(search_pb2.UpsertRequest(documents=[doc]), timeout=60)


def _raw(s: Stubs, method: str, body: bytes, timeout: float = 60) -> Any:
    call = s.channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    return call(body, timeout=timeout)


def _top_k_minus_one(s: Stubs) -> Any:
    """top_k is uint32: send the varint of -1 (as a 64-bit two's complement) on the wire."""
    body = search_pb2.SearchRequest(vector=_vec(unit_vectors(1, s.dim, 1)[0])).SerializeToString()
    body += b"\x28" + b"\xff" * 9 + b"\x01"  # field 5, varint 2**64 - 1
    return _raw(s, "/clipsearch.v1.SearchService/Search", body)


def _cancel_mid_call(s: Stubs) -> Any:
    future = s.search.Search.future(
        search_pb2.SearchRequest(text="a red circle " * 50, top_k=5), timeout=60
    )
    future.cancel()
    return future.result()


def _over_size_limit(s: Stubs) -> Any:
    return _search(s, image=b"\x00" * (64 * 1024 * 1024 + 16))


def _filter(**kwargs: Any) -> search_pb2.Filter:
    return search_pb2.Filter(**kwargs)


@dataclass(frozen=True)
class Case:
    name: str
    call: Callable[[Stubs], Any]
    code: grpc.StatusCode
    writes: tuple[str, ...] = ()  # ids a successful case adds


def _cases() -> list[Case]:
    S, U, E = _search, _upsert_one, _search_vec
    return [
        Case("empty search", lambda s: s.search.Search(search_pb2.SearchRequest(), timeout=60), C.INVALID_ARGUMENT),
        Case("text only whitespace", lambda s: S(s, text=" \t\n\u3000 "), C.INVALID_ARGUMENT),
        Case("text of 1 MB", lambda s: S(s, text="a" * 1_000_000), C.INVALID_ARGUMENT),
        Case("unicode text", lambda s: S(s, text="ein roter Kreis 🔴 赤い円"), C.OK),
        Case("RTL text", lambda s: S(s, text="دائرة حمراء \u202eevil"), C.OK),
        Case("zero-width text", lambda s: S(s, text="a\u200bred\u200dcircle\ufeff"), C.OK),
        Case("only zero-width characters", lambda s: S(s, text="\u200b\u200c\u200d"), C.OK),
        Case("control characters", lambda s: S(s, text="red\x00\x07\x1b[31mcircle\x7f"), C.OK),
        Case("top_k 0", lambda s: E(s, top_k=0), C.INVALID_ARGUMENT),
        Case("top_k -1 on the wire", _top_k_minus_one, C.INVALID_ARGUMENT),
        Case("top_k 10^9", lambda s: E(s, top_k=10**9), C.INVALID_ARGUMENT),
        Case("vector of wrong dimension", lambda s: S(s, vector=_vec([0.1] * (s.dim + 1))), C.INVALID_ARGUMENT),
        Case("empty vector", lambda s: S(s, vector=_vec([])), C.INVALID_ARGUMENT),
        Case("vector all zeros", lambda s: S(s, vector=_vec([0.0] * s.dim)), C.INVALID_ARGUMENT),
        Case("vector with NaN", lambda s: S(s, vector=_vec([float("nan")] + [0.1] * (s.dim - 1))), C.INVALID_ARGUMENT),
        Case("vector with +inf", lambda s: S(s, vector=_vec([float("inf")] + [0.1] * (s.dim - 1))), C.INVALID_ARGUMENT),
        Case("vector with -inf", lambda s: S(s, vector=_vec([float("-inf")] + [0.1] * (s.dim - 1))), C.INVALID_ARGUMENT),
        Case("vector of huge finite floats", lambda s: S(s, vector=_vec([3e38] * s.dim)), C.OK),
        Case("image of 0 bytes", lambda s: s.encoder.EncodeImage(encoder_pb2.EncodeImageRequest(images=[b""]), timeout=60), C.INVALID_ARGUMENT),
        Case("truncated JPEG", lambda s: S(s, image=_jpeg(Image.new("RGB", (64, 64), "red"))[:300]), C.INVALID_ARGUMENT),
        Case("PNG claiming 50000x50000", lambda s: S(s, image=_png_claiming(50_000, 50_000)), C.INVALID_ARGUMENT),
        Case("decompression bomb", lambda s: S(s, image=_bomb()), C.INVALID_ARGUMENT),
        Case("animated GIF", lambda s: S(s, image=_gif_animated()), C.OK),
        Case("CMYK JPEG", lambda s: S(s, image=_jpeg(Image.new("CMYK", (48, 48), (0, 255, 255, 0)))), C.OK),
        Case("16-bit PNG", lambda s: S(s, image=_png16()), C.OK),
        Case("SVG bytes", lambda s: S(s, image=b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'), C.INVALID_ARGUMENT),
        Case("HTML bytes", lambda s: S(s, image=b"<!doctype html><html><body>hi</body></html>"), C.INVALID_ARGUMENT),
        Case("random bytes as image", lambda s: S(s, image=bytes(range(256)) * 8), C.INVALID_ARGUMENT),
        Case("unknown target modality", lambda s: E(s, target=99), C.INVALID_ARGUMENT),
        Case("filter with 10^5 keys", lambda s: E(s, filter=_filter(metadata_equals={f"k{i}": "v" for i in range(100_000)})), C.INVALID_ARGUMENT),
        Case("filter key empty", lambda s: E(s, filter=_filter(metadata_equals={"": "v"})), C.INVALID_ARGUMENT),
        Case("publish-time range reversed", lambda s: E(s, filter=_filter(publish_time=common_pb2.TimeRange(start=_ts(2_000_000_000), end=_ts(1_000_000_000)))), C.INVALID_ARGUMENT),
        Case("negative alpha", lambda s: E(s, recency=search_pb2.Recency(decay_per_day=-1.0)), C.INVALID_ARGUMENT),
        Case("NaN alpha", lambda s: E(s, recency=search_pb2.Recency(decay_per_day=float("nan"))), C.INVALID_ARGUMENT),
        Case("infinite alpha", lambda s: E(s, recency=search_pb2.Recency(decay_per_day=float("inf"))), C.INVALID_ARGUMENT),
        Case("reference time year 9999", lambda s: E(s, recency=search_pb2.Recency(decay_per_day=0.1, reference_time=_ts(253_402_300_000))), C.OK),
        Case("reference time year 1", lambda s: E(s, recency=search_pb2.Recency(decay_per_day=0.1, reference_time=_ts(-62_135_596_000))), C.OK),
        Case("reference time beyond year 9999", lambda s: E(s, recency=search_pb2.Recency(decay_per_day=0.1, reference_time=_ts(10**15))), C.INVALID_ARGUMENT),
        Case("upsert with empty id", lambda s: U(s, ""), C.INVALID_ARGUMENT),
        Case("upsert with 10 KB id", lambda s: U(s, "x" * 10_240), C.INVALID_ARGUMENT),
        Case("upsert id with NUL byte", lambda s: U(s, "bad\x00id"), C.INVALID_ARGUMENT),
        Case("upsert with no documents", lambda s: s.search.Upsert(search_pb2.UpsertRequest(), timeout=60), C.INVALID_ARGUMENT),
        Case("upsert duplicate ids", lambda s: s.search.Upsert(search_pb2.UpsertRequest(documents=[search_pb2.UpsertDocument(id="d", caption="x", image_vector=_vec(unit_vectors(1, s.dim, 1)[0]))] * 2), timeout=60), C.INVALID_ARGUMENT),
        Case("upsert document without content", lambda s: s.search.Upsert(search_pb2.UpsertRequest(documents=[search_pb2.UpsertDocument(id="n")]), timeout=60), C.INVALID_ARGUMENT),
        Case("upsert one bad among good", lambda s: s.search.Upsert(search_pb2.UpsertRequest(documents=[search_pb2.UpsertDocument(id="g", text="fine"), search_pb2.UpsertDocument(id="b", image=b"<html>")]), timeout=60), C.INVALID_ARGUMENT),
        Case("duplicate ids in one Delete", lambda s: s.search.Delete(search_pb2.DeleteRequest(ids=["nope", "nope"]), timeout=60), C.OK),
        Case("Delete of no ids", lambda s: s.search.Delete(search_pb2.DeleteRequest(), timeout=60), C.INVALID_ARGUMENT),
        Case("Get of an unknown id", lambda s: s.search.Get(search_pb2.GetRequest(ids=["nope"]), timeout=60), C.NOT_FOUND),
        Case("Get of 10^4 ids", lambda s: s.search.Get(search_pb2.GetRequest(ids=[f"i{n}" for n in range(10_000)]), timeout=60), C.INVALID_ARGUMENT),
        Case("EncodeText of no texts", lambda s: s.encoder.EncodeText(encoder_pb2.EncodeTextRequest(), timeout=60), C.INVALID_ARGUMENT),
        Case("EncodeText of 1000 texts", lambda s: s.encoder.EncodeText(encoder_pb2.EncodeTextRequest(texts=["x"] * 1000), timeout=60), C.INVALID_ARGUMENT),
        Case("undecodable request body", lambda s: _raw(s, "/clipsearch.v1.SearchService/Search", b"\xff\xff\xff\xff"), C.INVALID_ARGUMENT),
        Case("message over the size limit", _over_size_limit, C.RESOURCE_EXHAUSTED),
        Case("deadline already expired", lambda s: s.search.Search(search_pb2.SearchRequest(text="red", top_k=1), timeout=-1), C.DEADLINE_EXCEEDED),
        Case("client cancels mid-call", _cancel_mid_call, C.CANCELLED),
        Case("unknown method", lambda s: _raw(s, "/clipsearch.v1.SearchService/DropTables", b""), C.UNIMPLEMENTED),
    ]  # fmt: skip


CASES = _cases()


@pytest.fixture(scope="module")
def channel(running_stack: Any) -> Iterator[grpc.Channel]:
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    with grpc.insecure_channel(running_stack.address, options=options) as ch:
        yield ch


def _fingerprint(s: Stubs) -> tuple[Any, ...]:
    stats = s.admin.Stats(admin_pb2.StatsRequest(), timeout=60)
    got = s.search.Get(search_pb2.GetRequest(ids=list(SEED_IDS)), timeout=60)
    return (
        stats.total_documents,
        tuple(sorted(sh.image_vectors + sh.text_vectors for sh in stats.shards)),
        tuple(d.SerializeToString(deterministic=True) for d in got.documents),
    )


def _seeded(channel: grpc.Channel) -> tuple[Stubs, np.ndarray]:
    """Stubs on `channel`, with the SEED_IDS documents (re)written; their vectors."""
    stubs = Stubs(
        channel,
        search_pb2_grpc.SearchServiceStub(channel),
        encoder_pb2_grpc.EncoderServiceStub(channel),
        admin_pb2_grpc.AdminServiceStub(channel),
        0,
    )
    stubs.dim = stubs.admin.Stats(admin_pb2.StatsRequest(), timeout=60).dimension
    vecs = unit_vectors(len(SEED_IDS), stubs.dim, 11)
    seed = [
        search_pb2.UpsertDocument(id=i, image_vector=_vec(v), caption=f"seed {i}")
        for i, v in zip(SEED_IDS, vecs, strict=True)
    ]
    stubs.search.Upsert(search_pb2.UpsertRequest(documents=seed), timeout=60)
    return stubs, vecs


def _assert_serving(stack: Any, channel: grpc.Channel) -> None:
    """Health checks run *after* the case (canary encode through the batch loop, a canary
    search on every shard) pass, and grpc.health.v1 says SERVING for every service.

    The background checks run every few seconds, so the status left from before the case
    could hide a loop the case broke: this runs one now. One slow canary on a busy machine
    is tried again (gateway.health_failures), so it no longer reads as an outage."""
    checked = stack.run(stack.stack.health.check_once())
    assert set(checked.values()) == {True}, checked
    health = health_pb2_grpc.HealthStub(channel)
    for service in checked:
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=30)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, service or "overall"


def test_there_are_at_least_40_cases() -> None:
    assert len(CASES) >= 40 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input(case: Case, stack: Any, channel: grpc.Channel) -> None:
    stubs, vecs = _seeded(channel)
    before = _fingerprint(stubs)
    try:
        case.call(stubs)
        code = C.OK
    except grpc.RpcError as err:
        code = err.code()  # type: ignore[attr-defined]
        details = err.details() or ""  # type: ignore[attr-defined]
        assert "Traceback" not in details and '.py"' not in details  # no trace, no source path
    except grpc.FutureCancelledError:
        code = C.CANCELLED
    assert code == case.code, case.name
    _assert_serving(stack, channel)
    assert _fingerprint(stubs) == before
    # and the server still answers a normal search correctly
    best = _search(stubs, vector=_vec(vecs[0]), top_k=1)
    assert [h.id for h in best.hits] == [SEED_IDS[0]]


BEYOND = 1_000
HELD = 4  # the read limit while the test runs: this many searches are held in flight


def test_1000_calls_beyond_the_admission_limit(
    stack: Any, channel: grpc.Channel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With `HELD` searches parked inside the real gateway (their shard call waits on a gate),
    1,000 more are refused at once with RESOURCE_EXHAUSTED; the held ones then finish, the
    server stays SERVING and the data is unchanged."""
    import asyncio
    import threading
    import time

    from gateway.logs import request_id_var

    gw = stack.stack
    admission = gw.health.admission
    s, vecs = _seeded(channel)
    before = _fingerprint(s)

    gate = threading.Event()  # opened by the test thread; polled on the gateway's loop
    parked = 0
    shard = gw.coordinator.shards[0]
    real_search = shard.search

    async def gated_search(*args: Any) -> Any:
        nonlocal parked
        if (request_id_var.get() or "").startswith("held-"):  # not the health canary's calls
            parked += 1
            while not gate.is_set():
                await asyncio.sleep(0.01)
        return await real_search(*args)

    monkeypatch.setattr(shard, "search", gated_search)
    old_limit = admission.limit("read")
    admission.set_limit("read", HELD)
    request = search_pb2.SearchRequest(vector=_vec(vecs[0]), top_k=1)
    try:
        held = [
            s.search.Search.future(request, timeout=120, metadata=(("x-request-id", f"held-{i}"),))
            for i in range(HELD)
        ]
        deadline = time.monotonic() + 60
        while parked < HELD and time.monotonic() < deadline:
            time.sleep(0.01)
        assert parked == HELD and admission.in_flight["read"] == HELD
        start = time.monotonic()
        beyond = [s.search.Search.future(request, timeout=60) for _ in range(BEYOND)]
        codes = [f.exception().code() if f.exception() else C.OK for f in beyond]  # type: ignore[union-attr]
        refused_in = time.monotonic() - start
        assert codes.count(C.RESOURCE_EXHAUSTED) == BEYOND, {c: codes.count(c) for c in set(codes)}
        assert refused_in < 30, f"1,000 refusals took {refused_in:.1f} s"
        assert not any(f.done() for f in held)  # still parked, untouched by the flood
        refused = gw.health.observability.metrics.rejected.labels("read")._value.get()
        assert refused >= BEYOND
    finally:
        gate.set()
        admission.set_limit("read", old_limit)
    assert [[h.id for h in f.result(timeout=60).hits] for f in held] == [[SEED_IDS[0]]] * HELD
    assert admission.in_flight["read"] == 0
    _assert_serving(stack, channel)
    assert _fingerprint(s) == before
    # the encoder's queue depths reach the metrics through the Serve handle (once the
    # deployment offers queue_depths; before that the gauge is simply absent)
    from encoder_service.deployment import EncoderDeployment

    stack.run(gw.health.check_once())
    depth = gw.health.observability.metrics.registry.get_sample_value(
        "clipsearch_encoder_queue_depth", {"queue": "text"}
    )
    deployment = getattr(EncoderDeployment, "func_or_class", EncoderDeployment)
    assert (depth is not None) == hasattr(deployment, "queue_depths")
