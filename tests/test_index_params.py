"""Per-request search parameters and index stats, from the request edge to the shards."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from clipsearch.client import Client, Document
from clipsearch.errors import InvalidArgument
from clipsearch.settings import LimitSettings
from clipsearch.types import Modality, SearchParams
from clipsearch.v1 import common_pb2, search_pb2
from gateway import convert
from gateway.convert import Validator
from tests.index_fixtures import built, clustered

DIM = 8


def _request(top_k: int = 10, **params: int) -> search_pb2.SearchRequest:
    req = search_pb2.SearchRequest(top_k=top_k, vector=common_pb2.Vector(values=[1.0] * DIM))
    if params:
        req.search_params.CopyFrom(search_pb2.SearchParams(**params))
    return req


def test_params_pass_validation_into_the_query() -> None:
    check = Validator(LimitSettings(), DIM, "IVF64,Flat")
    assert check.search_query(_request()).params is None
    q = check.search_query(_request(nprobe=64, ef_search=10, rerank_factor=64))
    assert q.params == SearchParams(nprobe=64, ef_search=10, rerank=64)
    assert check.search_query(_request(nprobe=0)).params == SearchParams()


@pytest.mark.parametrize(
    ("factory", "params", "message"),
    [
        ("IVF64,Flat", {"nprobe": 65}, r"search_params.nprobe: .*1 to 64, got 65"),
        ("HNSW32", {"ef_search": 5}, r"search_params.ef_search: .*top_k \(10\) to 4096"),
        ("HNSW32", {"ef_search": 5000}, r"search_params.ef_search: .*4096, got 5000"),
        ("Flat", {"nprobe": 100_000}, r"search_params.nprobe: .*1 to 4096"),
        ("IVF64,RaBitQ", {"rerank_factor": 65}, r"search_params.rerank_factor: .*1 to 64, got 65"),
    ],
)
def test_bad_params_name_the_field_and_limit(
    factory: str, params: dict[str, int], message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message):
        Validator(LimitSettings(), DIM, factory).search_query(_request(**params))


def test_index_stats_convert_with_the_operating_point() -> None:
    shard = built("IVF16,Flat", clustered(2000, dim=DIM), train_min=1000)
    image, text = (convert.index_stats(s) for s in shard.stats().indexes)
    assert image.modality == common_pb2.MODALITY_IMAGE and text.modality == common_pb2.MODALITY_TEXT
    assert image.active_type == image.configured_type == "IVF16,Flat"
    assert image.vectors == 2000 and image.bytes_per_vector > 4 * DIM
    op = image.operating_point
    assert 1 <= op.nprobe <= 16 and op.recall >= op.target_recall == pytest.approx(0.95)
    assert not text.HasField("operating_point")
    hits = shard.search(Modality.IMAGE, clustered(1, dim=DIM, seed=3)[0], 5, None, SearchParams(1))
    assert len(hits.records) == 5
    shard.close()


@pytest.mark.integration
def test_params_and_index_stats_through_the_server(client: Client) -> None:
    dim = client.stats().dimension
    vecs = clustered(50, dim=dim, seed=8)
    client.upsert(Document(f"p{i}", image_vector=v) for i, v in enumerate(vecs))
    res = client.search(vector=vecs[3], top_k=5, search_params=SearchParams(nprobe=2))
    assert res.ids[0] == "p3" and len(res.hits) == 5
    with pytest.raises(grpc.RpcError) as err:
        client.search(vector=vecs[3], top_k=10, search_params=SearchParams(ef_search=3))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "search_params.ef_search" in (err.value.details() or "")
    with pytest.raises(grpc.RpcError) as err:  # the client sends the re-rank depth too
        client.search(vector=vecs[3], top_k=5, search_params=SearchParams(rerank=65))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "search_params.rerank_factor" in (err.value.details() or "")
    assert (
        client.search(vector=vecs[3], top_k=5, search_params=SearchParams(rerank=4)).ids[0] == "p3"
    )
    stats = client.stats()
    for shard in stats.shards:
        assert [i.active_type for i in shard.indexes] == ["Flat", "Flat"]
    assert sum(s.indexes[0].vectors for s in stats.shards) == 50
    assert np.isclose(sum(s.image_vectors for s in stats.shards), 50)
