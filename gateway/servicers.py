"""The three public services: thin adapters from protobuf to the coordinator and back."""

from __future__ import annotations

import asyncio
import time
from time import perf_counter
from typing import Any

import grpc
import numpy as np

from clipsearch.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    encoder_pb2,
    encoder_pb2_grpc,
    search_pb2,
    search_pb2_grpc,
)
from gateway import convert
from gateway.coordinator import Coordinator
from gateway.errors import deadline_var


class SearchServicer(search_pb2_grpc.SearchServiceServicer):
    """Search, Upsert, Delete, Get."""

    def __init__(self, coordinator: Coordinator, validator: convert.Validator) -> None:
        self._coord = coordinator
        self._check = validator

    async def Search(  # noqa: N802 (gRPC method names)
        self, request: search_pb2.SearchRequest, context: grpc.aio.ServicerContext
    ) -> search_pb2.SearchResponse:
        started = perf_counter()
        # the deadline: the client's, or the gateway's default; shards refuse work past it
        query = self._check.search_query(request, deadline_var.get())
        decode_ms = (perf_counter() - started) * 1000.0
        outcome = await self._coord.search(query)
        timings = outcome.timings_ms
        timings["decode"] = decode_ms
        timings["total"] = timings.get("total", 0.0) + decode_ms
        return convert.search_response(outcome, query)

    async def Upsert(  # noqa: N802
        self, request: search_pb2.UpsertRequest, context: grpc.aio.ServicerContext
    ) -> search_pb2.UpsertResponse:
        items = self._check.upsert_items(request, now=time.time())
        options = self._check.document_text_options(request.text_options, "text_options")
        return search_pb2.UpsertResponse(upserted=await self._coord.upsert(items, options))

    async def Delete(  # noqa: N802
        self, request: search_pb2.DeleteRequest, context: grpc.aio.ServicerContext
    ) -> search_pb2.DeleteResponse:
        ids = self._check.ids(request.ids)
        return search_pb2.DeleteResponse(deleted=await self._coord.delete(ids))

    async def Get(  # noqa: N802
        self, request: search_pb2.GetRequest, context: grpc.aio.ServicerContext
    ) -> search_pb2.GetResponse:
        ids = self._check.ids(request.ids)
        records = await self._coord.get(ids, request.allow_missing)
        return search_pb2.GetResponse(
            documents=[convert.document(r) for r in records if r is not None],
            missing_ids=[i for i, r in zip(ids, records, strict=True) if r is None],
        )


class EncoderServicer(encoder_pb2_grpc.EncoderServiceServicer):
    """EncodeText, EncodeImage."""

    def __init__(self, coordinator: Coordinator, validator: convert.Validator) -> None:
        self._encoder = coordinator.encoder
        self._check = validator

    async def EncodeText(  # noqa: N802
        self, request: encoder_pb2.EncodeTextRequest, context: grpc.aio.ServicerContext
    ) -> encoder_pb2.EncodeTextResponse:
        self._check.encode_batch(len(request.texts), "texts")
        texts = [self._check.text(t, f"texts[{n}]") for n, t in enumerate(request.texts)]
        options = self._check.text_options(request.options, "options")
        vecs = await self._encoder.encode_texts(texts, options)
        return encoder_pb2.EncodeTextResponse(**self._reply_fields(vecs))

    async def EncodeImage(  # noqa: N802
        self, request: encoder_pb2.EncodeImageRequest, context: grpc.aio.ServicerContext
    ) -> encoder_pb2.EncodeImageResponse:
        self._check.encode_batch(len(request.images), "images")
        images = [self._check.image(b, f"images[{n}]") for n, b in enumerate(request.images)]
        vecs = await self._encoder.encode_images(images)
        return encoder_pb2.EncodeImageResponse(**self._reply_fields(vecs))

    def _reply_fields(self, vecs: np.ndarray) -> dict[str, Any]:
        return {
            "embeddings": convert.vectors(vecs),
            "model_id": self._encoder.model_id,
            "dimension": self._encoder.dim,
        }


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    """Stats."""

    def __init__(self, coordinator: Coordinator, index_type: str) -> None:
        self._coord = coordinator
        self._index_type = index_type

    async def Stats(  # noqa: N802
        self, request: admin_pb2.StatsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.StatsResponse:
        shards, encoder = await asyncio.gather(self._coord.stats(), self._coord.encoder.stats())
        return admin_pb2.StatsResponse(
            model_id=self._coord.encoder.model_id,
            dimension=self._coord.encoder.dim,
            index_type=self._index_type,
            shards=[
                admin_pb2.ShardStats(
                    shard=s.shard,
                    documents=s.documents,
                    image_vectors=s.image_vectors,
                    text_vectors=s.text_vectors,
                    snapshot_seq=s.snapshot_seq,
                    log_records_since_snapshot=s.log_records_since_snapshot,
                    indexes=[convert.index_stats(i) for i in s.indexes],
                )
                for s in shards
            ],
            total_documents=sum(s.documents for s in shards),
            encoder=convert.encoder_stats(encoder),
        )
