"""The whole path, real at every hop: gRPC over loopback -> gateway -> Ray Serve encoder and
Ray shard actors (Faiss). Run against the bundled demo model."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import grpc
import numpy as np
import pytest

from clipsearch.client import Client, Document
from clipsearch.demo.corpus import demo_documents
from clipsearch.demo.scenes import COLORS, SHAPES, random_scenes, render_png
from tests.fakes import unit_vectors

pytestmark = pytest.mark.integration

NOW = datetime(2026, 6, 1, tzinfo=UTC)


def _dim(client: Client) -> int:
    return int(client.stats().dimension)


def _vector_docs(n: int, dim: int, seed: int) -> tuple[list[Document], np.ndarray, np.ndarray]:
    vecs = unit_vectors(n, dim, seed)
    ages = np.random.default_rng(seed).uniform(0.0, 90.0, n)
    docs = [
        Document(
            f"v{i}",
            image_vector=vecs[i],
            publish_time=NOW - timedelta(days=float(ages[i])),
            metadata={"g": str(i % 3)},
            caption=f"vector doc {i}",
        )
        for i in range(n)
    ]
    return docs, vecs, ages


def _upsert_all(client: Client, docs: list[Document], batch: int = 200) -> None:
    for start in range(0, len(docs), batch):
        assert client.upsert(docs[start : start + batch]) == len(docs[start : start + batch])


def test_sharded_search_equals_one_exact_index(client: Client) -> None:
    dim = _dim(client)
    docs, vecs, _ = _vector_docs(600, dim, seed=1)
    _upsert_all(client, docs)
    for seed in range(5):
        q = unit_vectors(1, dim, 100 + seed)[0]
        result = client.search(vector=q, top_k=25)
        sims = vecs @ q
        order = np.argsort(-sims, kind="stable")[:25]
        assert result.ids == [f"v{i}" for i in order]
        assert np.allclose([h.similarity for h in result.hits], sims[order], atol=1e-5)
        assert result.shards_answered == result.shards_total == 2


@pytest.mark.parametrize("alpha", [0.0, 0.05, 0.5, 10.0])
def test_recency_equals_brute_force(client: Client, alpha: float) -> None:
    dim = _dim(client)
    docs, vecs, ages = _vector_docs(500, dim, seed=2)
    _upsert_all(client, docs)
    q = unit_vectors(1, dim, 7)[0]
    result = client.search(vector=q, top_k=10, decay_per_day=alpha, reference_time=NOW)
    final = (vecs @ q) * np.exp(-alpha * ages)
    order = np.argsort(-final, kind="stable")[:10]
    assert result.ids == [f"v{i}" for i in order]
    assert np.allclose([h.score for h in result.hits], final[order], atol=1e-5)
    assert np.allclose([h.decay for h in result.hits], np.exp(-alpha * ages[order]), atol=1e-5)
    assert result.reference_time == NOW
    if alpha >= 10.0:  # the best raw matches are too old to stay in the top 10
        raw_best = {f"v{i}" for i in np.argsort(-(vecs @ q))[:10]}
        assert len(raw_best & set(result.ids)) < 10
        assert result.candidates_examined > 2 * 10


def test_upsert_get_delete_and_replace(client: Client) -> None:
    dim = _dim(client)
    a, b = unit_vectors(2, dim, 3)
    assert (
        client.upsert([Document("doc-1", image_vector=a, caption="first", metadata={"v": "1"})])
        == 1
    )
    assert client.search(vector=a, top_k=1).ids == ["doc-1"]
    client.upsert([Document("doc-1", image_vector=b, caption="second", metadata={"v": "2"})])
    hits = client.search(vector=b, top_k=5).hits
    assert [h.id for h in hits] == ["doc-1"] and hits[0].caption == "second"
    assert client.stats().total_documents == 1
    (stored,) = client.get(["doc-1"])
    assert stored.metadata == {"v": "2"} and stored.has_image and not stored.has_text
    assert client.delete(["doc-1"]) == 1
    assert client.delete(["doc-1"]) == 0
    assert client.search(vector=b, top_k=5).hits == []
    with pytest.raises(grpc.RpcError) as err:
        client.get(["doc-1"])
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "doc-1" in err.value.details()
    assert client.get(["doc-1"], allow_missing=True) == []


def test_metadata_and_time_filters(client: Client) -> None:
    dim = _dim(client)
    docs, vecs, ages = _vector_docs(300, dim, seed=4)
    _upsert_all(client, docs)
    q = unit_vectors(1, dim, 9)[0]
    result = client.search(
        vector=q, top_k=15, where={"g": "1"}, published_after=NOW - timedelta(days=30)
    )
    keep = np.array([i % 3 == 1 and ages[i] <= 30 for i in range(300)])
    sims = np.where(keep, vecs @ q, -np.inf)
    expected = [f"v{i}" for i in np.argsort(-sims)[: min(15, int(keep.sum()))]]
    assert result.ids == expected and len(expected) == 15


def test_demo_model_retrieves_by_attribute_through_the_api(client: Client) -> None:
    docs = list(demo_documents(480, now=NOW.timestamp()))
    _upsert_all(client, docs, batch=64)
    precisions = []
    for color in COLORS:
        for shape in SHAPES:
            hits = client.search(f"a {color} {shape}", top_k=10).hits
            precisions.append(
                np.mean(
                    [h.metadata["color"] == color and h.metadata["shape"] == shape for h in hits]
                )
            )
    assert float(np.mean(precisions)) >= 0.9, f"attribute precision@10 {np.mean(precisions):.3f}"
    # image -> text: captions describing the query scene's colour and shape come first.
    right = 0
    queries = random_scenes(24, seed=777_777)
    for scene in queries:
        top = client.search(image=render_png(scene, seed=5), target="text", top_k=1).hits[0]
        right += f"{scene.color} {scene.shape}" in top.caption
    assert right / len(queries) >= 0.9, f"image->text top-1 colour+shape {right}/{len(queries)}"


def test_encoder_service_returns_normalised_vectors(client: Client) -> None:
    dim = _dim(client)
    texts = client.encode_text(["a red circle", "a blue square"])
    images = client.encode_image([render_png(random_scenes(1, seed=5)[0])])
    assert texts.shape == (2, dim) and images.shape == (1, dim)
    assert np.allclose(np.linalg.norm(np.vstack([texts, images]), axis=1), 1.0, atol=1e-5)
    same = client.encode_text(["a red circle"])
    assert np.allclose(same[0], texts[0], atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"text": "", "top_k": 5}, "text"),
        ({"text": "a cat", "top_k": 0}, "top_k"),
        ({"text": "a cat", "top_k": 5000}, "top_k"),
        ({"vector": [0.1, 0.2, 0.3], "top_k": 5}, "dimension"),
        ({"vector": "nan", "top_k": 5}, "NaN"),
        ({"image": b"definitely not an image", "top_k": 5}, "image"),
        ({"image": b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "top_k": 5}, "image"),
    ],
)
def test_bad_input_is_invalid_argument_and_server_keeps_serving(
    client: Client, kwargs: dict, fragment: str
) -> None:
    dim = _dim(client)
    if kwargs.get("vector") == "nan":
        kwargs = {**kwargs, "vector": [math.nan] + [0.1] * (dim - 1)}
    client.upsert([Document("keep", image_vector=unit_vectors(1, dim, 0)[0])])
    with pytest.raises(grpc.RpcError) as err:
        client.search(**kwargs)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in err.value.details()
    assert client.search("a red circle", top_k=1).ids == ["keep"]


def test_upsert_with_an_undecodable_image_writes_nothing(client: Client) -> None:
    with pytest.raises(grpc.RpcError) as err:
        client.upsert([Document("ok", text="a red circle"), Document("bad", image=b"GIF89a junk")])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert client.stats().total_documents == 0


def test_stats_report_model_and_shards(client: Client) -> None:
    client.upsert([Document(f"t{i}", text=f"a red circle number {i}") for i in range(10)])
    stats = client.stats()
    assert stats.model_id == "clipsearch-demo" and stats.index_type == "Flat"
    assert len(stats.shards) == 2 and sum(s.documents for s in stats.shards) == 10
    assert sum(s.text_vectors for s in stats.shards) == 10


def test_undecodable_request_body_is_invalid_argument(stack) -> None:  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(stack.address) as channel:
        raw = channel.unary_unary("/clipsearch.v1.SearchService/Search")
        with pytest.raises(grpc.RpcError) as err:
            raw(b"\xff\xff\xff\xff not protobuf", timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid protobuf" in err.value.details()


def test_request_id_is_echoed_in_trailing_metadata(stack) -> None:  # type: ignore[no-untyped-def]
    from clipsearch.v1 import admin_pb2, admin_pb2_grpc

    with grpc.insecure_channel(stack.address) as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        _, call = stub.Stats.with_call(
            admin_pb2.StatsRequest(), metadata=(("x-request-id", "abc-123"),), timeout=30
        )
    assert ("x-request-id", "abc-123") in tuple(call.trailing_metadata())


def test_killed_shard_is_restarted_with_every_acknowledged_write(client: Client, stack) -> None:  # type: ignore[no-untyped-def]
    import os
    import signal
    import time

    import ray

    dim = _dim(client)
    docs, vecs, _ = _vector_docs(200, dim, seed=11)
    _upsert_all(client, docs)
    client.delete(["v0", "v1"])
    before = client.search(vector=vecs[5], top_k=10).ids
    for actor in stack.stack.shard_actors:
        os.kill(ray.get(actor.pid.remote()), signal.SIGKILL)
    deadline, statuses = time.monotonic() + 120, []
    while time.monotonic() < deadline:
        try:
            after = client.search(vector=vecs[5], top_k=10).ids
            break
        except grpc.RpcError as exc:  # UNAVAILABLE while Ray restarts the actors
            statuses.append(exc.code())
            time.sleep(0.5)
    else:
        raise AssertionError(f"shards never came back: {statuses[-3:]}")
    assert set(statuses) <= {grpc.StatusCode.UNAVAILABLE}
    assert after == before
    assert client.stats().total_documents == 198
    assert client.get(["v0", "v1", "v2"], allow_missing=True)[0].id == "v2"
