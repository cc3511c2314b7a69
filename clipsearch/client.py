"""`clipsearch.Client`: a typed, synchronous Python client over the generated stubs."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import grpc
import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from clipsearch.types import SearchParams, TextOptions
from clipsearch.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    common_pb2,
    encoder_pb2,
    encoder_pb2_grpc,
    search_pb2,
    search_pb2_grpc,
)

TimeLike = datetime | float | int
_TARGETS = {"image": common_pb2.MODALITY_IMAGE, "text": common_pb2.MODALITY_TEXT}
_LONG_TEXT = {
    None: common_pb2.LONG_TEXT_UNSPECIFIED,
    "truncate": common_pb2.LONG_TEXT_TRUNCATE,
    "sliding_window": common_pb2.LONG_TEXT_SLIDING_WINDOW,
    "reject": common_pb2.LONG_TEXT_REJECT,
}


@dataclass(frozen=True, slots=True)
class Hit:
    """One search result."""

    id: str
    similarity: float
    decay: float
    score: float
    publish_time: datetime
    metadata: dict[str, str]
    caption: str


@dataclass(frozen=True, slots=True)
class SearchResult:
    """Hits, best first, with how the server found them."""

    hits: list[Hit]
    candidates_examined: int
    shards_answered: int
    shards_total: int
    reference_time: datetime
    timings_ms: dict[str, float]
    partial: bool = False
    missing_shards: tuple[int, ...] = ()

    @property
    def ids(self) -> list[str]:
        """The hit ids in rank order."""
        return [h.id for h in self.hits]


@dataclass(frozen=True, slots=True)
class Document:
    """A document to upsert: give image and/or text, or precomputed vectors."""

    id: str
    image: bytes | None = None
    text: str | None = None
    image_vector: Sequence[float] | np.ndarray | None = None
    text_vector: Sequence[float] | np.ndarray | None = None
    publish_time: TimeLike | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    caption: str = ""


@dataclass(frozen=True, slots=True)
class StoredDocument:
    """A document as the server holds it."""

    id: str
    publish_time: datetime
    metadata: dict[str, str]
    caption: str
    has_image: bool
    has_text: bool


class Client:
    """Talks to a clipsearch gateway. Errors surface as `grpc.RpcError` with a status code.

    Args:
        target: host:port of the gateway.
        timeout: deadline in seconds for each call.
        metadata: extra call metadata.
        token: bearer token sent as `authorization: Bearer <token>`.
        tls: connect with TLS (implied by root_certificates or a client certificate).
        root_certificates: PEM of the CA that signed the server's certificate (None: the
            system's roots).
        client_cert, client_key: PEM of this client's certificate and key (mTLS).
    """

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        timeout: float = 30.0,
        metadata: Sequence[tuple[str, str]] = (),
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        client_cert: bytes | None = None,
        client_key: bytes | None = None,
    ) -> None:
        options = [
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ]
        if tls or root_certificates is not None or client_cert is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates, client_key, client_cert)
            self._channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        if token is not None:
            metadata = (*metadata, ("authorization", f"Bearer {token}"))
        self._search = search_pb2_grpc.SearchServiceStub(self._channel)
        self._encoder = encoder_pb2_grpc.EncoderServiceStub(self._channel)
        self._admin = admin_pb2_grpc.AdminServiceStub(self._channel)
        self._kw = {"timeout": timeout, "metadata": tuple(metadata)}

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def search(
        self,
        text: str | None = None,
        *,
        image: bytes | None = None,
        vector: Sequence[float] | np.ndarray | None = None,
        target: str = "image",
        top_k: int = 10,
        where: Mapping[str, str] | None = None,
        published_after: TimeLike | None = None,
        published_before: TimeLike | None = None,
        decay_per_day: float = 0.0,
        reference_time: TimeLike | None = None,
        allow_partial: bool = False,
        text_options: TextOptions | None = None,
        search_params: SearchParams | None = None,
    ) -> SearchResult:
        """Nearest documents to one query (text, image bytes or vector) in `target` space.

        `text_options` sets the prompt template and long-text strategy of a text query
        (unset fields: the server's defaults). `search_params` sets nprobe / efSearch / the
        re-rank depth for approximate indexes (0 fields: the shard's tuned operating point).
        """
        req = search_pb2.SearchRequest(
            top_k=top_k, target=_TARGETS[target], allow_partial=allow_partial
        )
        if text_options is not None:
            req.text_options.CopyFrom(to_text_options(text_options))
        if search_params is not None:
            req.search_params.nprobe = search_params.nprobe
            req.search_params.ef_search = search_params.ef_search
            req.search_params.rerank_factor = search_params.rerank
        if text is not None:
            req.text = text
        if image is not None:
            req.image = image
        if vector is not None:
            req.vector.values.extend(np.asarray(vector, dtype=np.float32).tolist())
        if where or published_after is not None or published_before is not None:
            req.filter.metadata_equals.update(where or {})
            if published_after is not None:
                req.filter.publish_time.start.CopyFrom(to_timestamp(published_after))
            if published_before is not None:
                req.filter.publish_time.end.CopyFrom(to_timestamp(published_before))
        if decay_per_day or reference_time is not None:
            req.recency.decay_per_day = decay_per_day
            if reference_time is not None:
                req.recency.reference_time.CopyFrom(to_timestamp(reference_time))
        return _search_result(self._search.Search(req, **self._kw))

    def upsert(
        self, documents: Iterable[Document], *, text_options: TextOptions | None = None
    ) -> int:
        """Insert or replace documents; returns how many were written.

        Texts are embedded as given unless `text_options` sets a template; long texts follow
        `text_options.long_text` (else the server's default).
        """
        req = search_pb2.UpsertRequest(documents=[to_upsert_document(d) for d in documents])
        if text_options is not None:
            req.text_options.CopyFrom(to_text_options(text_options))
        return int(self._search.Upsert(req, **self._kw).upserted)

    def delete(self, ids: Iterable[str]) -> int:
        """Delete by id (idempotent); returns how many existed."""
        return int(self._search.Delete(search_pb2.DeleteRequest(ids=list(ids)), **self._kw).deleted)

    def get(self, ids: Iterable[str], *, allow_missing: bool = False) -> list[StoredDocument]:
        """Stored documents by id; unknown ids raise NOT_FOUND unless allow_missing."""
        req = search_pb2.GetRequest(ids=list(ids), allow_missing=allow_missing)
        return [_stored(d) for d in self._search.Get(req, **self._kw).documents]

    def encode_text(
        self, texts: Sequence[str], *, options: TextOptions | None = None
    ) -> np.ndarray:
        """(n, dim) L2-normalised embeddings of texts (template / long-text per `options`)."""
        req = encoder_pb2.EncodeTextRequest(texts=list(texts))
        if options is not None:
            req.options.CopyFrom(to_text_options(options))
        resp = self._encoder.EncodeText(req, **self._kw)
        return _matrix(resp.embeddings)

    def encode_image(self, images: Sequence[bytes]) -> np.ndarray:
        """(n, dim) L2-normalised embeddings of encoded images."""
        req = encoder_pb2.EncodeImageRequest(images=list(images))
        return _matrix(self._encoder.EncodeImage(req, **self._kw).embeddings)

    def stats(self) -> admin_pb2.StatsResponse:
        """Model, index type and per-shard counts."""
        return self._admin.Stats(admin_pb2.StatsRequest(), **self._kw)


def to_timestamp(value: TimeLike) -> Timestamp:
    """A protobuf Timestamp from a datetime (naive = UTC) or POSIX seconds."""
    seconds = (
        value.replace(tzinfo=value.tzinfo or UTC).timestamp()
        if isinstance(value, datetime)
        else float(value)
    )
    whole, nanos = posix_parts(seconds)
    return Timestamp(seconds=whole, nanos=nanos)


def posix_parts(seconds: float) -> tuple[int, int]:
    """POSIX seconds as a Timestamp's (seconds, nanos), rounded to the nearest nanosecond."""
    whole = math.floor(seconds)
    nanos = round((seconds - whole) * 1e9)
    if nanos == 1_000_000_000:  # rounding reached the next second
        whole, nanos = whole + 1, 0
    return int(whole), int(nanos)


def to_text_options(options: TextOptions) -> common_pb2.TextOptions:
    """Client TextOptions as the protobuf message (None fields stay unset)."""
    if options.long_text not in _LONG_TEXT:
        raise ValueError(f"long_text must be one of {sorted(k for k in _LONG_TEXT if k)}")
    out = common_pb2.TextOptions(long_text=_LONG_TEXT[options.long_text])
    if options.prompt_template is not None:
        out.prompt_template = options.prompt_template
    return out


def _datetime(ts: Timestamp) -> datetime:
    return datetime.fromtimestamp(ts.seconds + ts.nanos * 1e-9, tz=UTC)


def _matrix(vectors: Sequence[common_pb2.Vector]) -> np.ndarray:
    return np.asarray([list(v.values) for v in vectors], dtype=np.float32)


def to_upsert_document(doc: Document) -> search_pb2.UpsertDocument:
    """A client Document as its protobuf message."""
    out = search_pb2.UpsertDocument(id=doc.id, metadata=dict(doc.metadata), caption=doc.caption)
    if doc.image is not None:
        out.image = doc.image
    if doc.text is not None:
        out.text = doc.text
    if doc.image_vector is not None:
        out.image_vector.values.extend(np.asarray(doc.image_vector, dtype=np.float32).tolist())
    if doc.text_vector is not None:
        out.text_vector.values.extend(np.asarray(doc.text_vector, dtype=np.float32).tolist())
    if doc.publish_time is not None:
        out.publish_time.CopyFrom(to_timestamp(doc.publish_time))
    return out


def _search_result(resp: search_pb2.SearchResponse) -> SearchResult:
    hits = [
        Hit(
            h.id,
            h.similarity,
            h.decay,
            h.score,
            _datetime(h.publish_time),
            dict(h.metadata),
            h.caption,
        )
        for h in resp.hits
    ]
    t = resp.timings
    return SearchResult(
        hits=hits,
        candidates_examined=resp.candidates_examined,
        shards_answered=resp.shards_answered,
        shards_total=resp.shards_total,
        reference_time=_datetime(resp.recency.reference_time),
        timings_ms={
            "encode": t.encode_ms,
            "search": t.search_ms,
            "merge": t.merge_ms,
            "total": t.total_ms,
            "decode": t.decode_ms,
            "rerank": t.rerank_ms,
        },
        partial=resp.partial,
        missing_shards=tuple(resp.missing_shards),
    )


def _stored(d: common_pb2.Document) -> StoredDocument:
    return StoredDocument(
        d.id, _datetime(d.publish_time), dict(d.metadata), d.caption, d.has_image, d.has_text
    )
