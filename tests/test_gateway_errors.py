"""The gateway's status mapping over a real grpc.aio server with in-process engines (no Ray)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
from ray.serve.exceptions import BackPressureError, DeploymentID, DeploymentUnavailableError

from clipsearch.errors import ResourceExhausted, Unavailable
from clipsearch.settings import load_settings
from clipsearch.v1 import search_pb2, search_pb2_grpc
from gateway.backends import call_remote
from gateway.coordinator import Coordinator
from gateway.server import create_server
from index_service.shard import Shard
from tests.fakes import HashEncoder, LocalShard

DIM = 16


class BrokenShard(LocalShard):
    """A shard whose search fails with a given exception."""

    def __init__(self, exc: Exception) -> None:
        super().__init__(Shard(0, DIM))
        self.exc = exc

    async def search(self, *args: object) -> object:  # type: ignore[override]
        raise self.exc


async def _serve(shard: LocalShard) -> AsyncIterator[search_pb2_grpc.SearchServiceStub]:
    settings = load_settings(gateway={"port": 0})
    server, port, _ = await create_server(Coordinator(HashEncoder(DIM), [shard]), settings)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield search_pb2_grpc.SearchServiceStub(channel)
    await server.stop(0)


def _query() -> search_pb2.SearchRequest:
    return search_pb2.SearchRequest(text="a red circle", top_k=3)


async def test_unexpected_error_is_internal_without_leaking_details() -> None:
    async for stub in _serve(BrokenShard(RuntimeError("secret at /srv/data/shard0.index"))):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Search(_query(), timeout=10)
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert "request id" in err.value.details()
        assert "secret" not in err.value.details() and "RuntimeError" not in err.value.details()


async def test_domain_error_keeps_its_code_and_message() -> None:
    async for stub in _serve(BrokenShard(Unavailable("shard 0 is unavailable; retry shortly"))):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Search(_query(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert err.value.details() == "shard 0 is unavailable; retry shortly"


async def test_working_shard_answers_over_the_same_plumbing() -> None:
    shard = LocalShard(Shard(0, DIM))
    async for stub in _serve(shard):
        vec = np.ones(DIM, dtype=np.float32).tolist()
        doc = search_pb2.UpsertDocument(id="a", text="a red circle", image_vector={"values": vec})
        await stub.Upsert(search_pb2.UpsertRequest(documents=[doc]), timeout=10)
        resp = await stub.Search(
            search_pb2.SearchRequest(text="a red circle", top_k=3, target=2), timeout=10
        )
        assert [h.id for h in resp.hits] == ["a"] and resp.hits[0].similarity == pytest.approx(1)


async def _raise(exc: BaseException) -> None:
    raise exc


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (BackPressureError(num_queued_requests=9, max_queued_requests=8), ResourceExhausted),
        (DeploymentUnavailableError(DeploymentID("encoder", "app")), Unavailable),
    ],
)
async def test_ray_failures_become_domain_errors(exc: BaseException, expected: type) -> None:
    with pytest.raises(expected, match="the encoder"):
        await call_remote(_raise(exc), "the encoder")
