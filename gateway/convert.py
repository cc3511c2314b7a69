"""Protobuf <-> domain conversion with validation: the only place that reads request fields.

Every check raises InvalidArgument naming the field and the limit, so a caller can fix it.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable

import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from clipsearch.client import posix_parts
from clipsearch.client import to_timestamp as timestamp
from clipsearch.errors import InvalidArgument
from clipsearch.settings import LimitSettings
from clipsearch.types import (
    DocRecord,
    EncoderStats,
    IndexStats,
    LongTextStrategy,
    Modality,
    SearchFilter,
    SearchParams,
    TextOptions,
)
from clipsearch.v1 import admin_pb2, common_pb2, search_pb2
from gateway.coordinator import SearchOutcome, SearchQuery, UpsertItem

_LONG_TEXT: dict[int, LongTextStrategy | None] = {
    common_pb2.LONG_TEXT_UNSPECIFIED: None,
    common_pb2.LONG_TEXT_TRUNCATE: "truncate",
    common_pb2.LONG_TEXT_SLIDING_WINDOW: "sliding_window",
    common_pb2.LONG_TEXT_REJECT: "reject",
}
# Documents are embedded as given unless the request names a template: the server's default
# template is for queries ("a photo of {}" suits a query, not a stored caption).
_DOCUMENT_TEMPLATE = "{}"

MAX_EF_SEARCH = 4096
"""Largest efSearch a request may ask for (documented in search.proto)."""
MAX_RERANK = 64
"""Largest re-rank factor a request may ask for (search.proto; index_service.factory)."""

_MODALITY_PB = {Modality.IMAGE: common_pb2.MODALITY_IMAGE, Modality.TEXT: common_pb2.MODALITY_TEXT}

_MODALITY = {
    common_pb2.MODALITY_UNSPECIFIED: Modality.IMAGE,
    common_pb2.MODALITY_IMAGE: Modality.IMAGE,
    common_pb2.MODALITY_TEXT: Modality.TEXT,
}


class Validator:
    """Checks requests against the configured limits and the model's dimension."""

    def __init__(self, limits: LimitSettings, dim: int, factory: str = "Flat") -> None:
        self.limits = limits
        self.dim = dim
        ivf = re.match(r"IVF(\d+),", factory)
        # nprobe beyond the list count means nothing; exact and HNSW indexes ignore it.
        self.max_nprobe = int(ivf.group(1)) if ivf else MAX_EF_SEARCH

    def search_query(
        self, req: search_pb2.SearchRequest, deadline: float | None = None
    ) -> SearchQuery:
        """A SearchRequest as a validated SearchQuery (with the call's `deadline`, epoch s)."""
        kind = req.WhichOneof("query")
        if kind is None:
            raise InvalidArgument("query: set exactly one of text, image or vector")
        top_k = self._top_k(req.top_k)
        alpha, ref = self._recency(req)
        target = _MODALITY.get(req.target)
        if target is None:
            raise InvalidArgument(f"target: unknown modality {req.target}")
        flt = self._filter(req.filter) if req.HasField("filter") else None
        params = self._search_params(req, top_k) if req.HasField("search_params") else None
        text = image = vector = text_options = None
        if kind == "vector":  # the common case first
            vector = self.vector(req.vector, "vector")
        elif kind == "text":
            text = self.text(req.text, "text")
            text_options = self.text_options(req.text_options, "text_options")
        else:
            image = self.image(req.image, "image")
        return SearchQuery(
            target=target,
            top_k=top_k,
            text=text,
            image=image,
            vector=vector,
            flt=flt,
            alpha=alpha,
            reference_time=ref,
            allow_partial=req.allow_partial,
            text_options=text_options,
            params=params,
            deadline=deadline,
        )

    def upsert_items(self, req: search_pb2.UpsertRequest, now: float) -> list[UpsertItem]:
        """Validated documents of an UpsertRequest (ids distinct)."""
        docs = req.documents
        self._count(len(docs), self.limits.max_upsert_documents, "documents")
        items = [self._upsert_item(d, f"documents[{n}]", now) for n, d in enumerate(docs)]
        self._distinct([i.record.id for i in items], "documents")
        return items

    def text_options(
        self, options: common_pb2.TextOptions, field: str, default_template: str | None = None
    ) -> TextOptions:
        """TextOptions with a checked template (exactly one "{}", within the text limit)."""
        template = (
            options.prompt_template if options.HasField("prompt_template") else default_template
        )
        if template is not None:
            if template.count("{}") != 1:
                raise InvalidArgument(
                    f'{field}.prompt_template: must contain "{{}}" exactly once, where the '
                    f"text goes (found {template.count('{}')})"
                )
            if len(template.encode("utf-8")) > self.limits.max_text_bytes:
                raise InvalidArgument(
                    f"{field}.prompt_template: over the limit of {self.limits.max_text_bytes} bytes"
                )
        if options.long_text not in _LONG_TEXT:
            raise InvalidArgument(f"{field}.long_text: unknown strategy {options.long_text}")
        return TextOptions(prompt_template=template, long_text=_LONG_TEXT[options.long_text])

    def document_text_options(self, options: common_pb2.TextOptions, field: str) -> TextOptions:
        """TextOptions for stored texts: an unset template means the bare text."""
        return self.text_options(options, field, default_template=_DOCUMENT_TEMPLATE)

    def ids(self, ids: Iterable[str], field: str = "ids") -> list[str]:
        """A validated list of document ids."""
        id_list = list(ids)
        self._count(len(id_list), self.limits.max_ids_per_call, field)
        return [self.doc_id(i, f"{field}[{n}]") for n, i in enumerate(id_list)]

    def doc_id(self, doc_id: str, field: str) -> str:
        """One document id: non-empty, at most max_id_bytes of UTF-8."""
        size = len(doc_id.encode("utf-8"))
        if size == 0 or size > self.limits.max_id_bytes:
            raise InvalidArgument(f"{field}: id must be 1 to {self.limits.max_id_bytes} bytes")
        if any(ord(c) < 0x20 or c == "\x7f" for c in doc_id):
            raise InvalidArgument(f"{field}: id must not contain control characters (NUL, ...)")
        return doc_id

    def text(self, text: str, field: str) -> str:
        """Text within the byte limit and not blank."""
        if len(text.encode("utf-8")) > self.limits.max_text_bytes:
            raise InvalidArgument(f"{field}: over the limit of {self.limits.max_text_bytes} bytes")
        if not text.strip():
            raise InvalidArgument(f"{field}: must not be empty or only whitespace")
        return text

    def image(self, data: bytes, field: str) -> bytes:
        """Image bytes within the byte limit (decoding is checked by the encoder)."""
        if not data:
            raise InvalidArgument(f"{field}: image bytes are empty")
        if len(data) > self.limits.max_image_bytes:
            raise InvalidArgument(
                f"{field}: image is {len(data)} bytes, over the limit of "
                f"{self.limits.max_image_bytes}"
            )
        return data

    def vector(self, vec: common_pb2.Vector, field: str) -> np.ndarray:
        """A finite, non-zero vector of the model's dimension, L2-normalised."""
        arr = np.array(vec.values, dtype=np.float32)
        if arr.shape[0] != self.dim:
            raise InvalidArgument(
                f"{field}: has dimension {arr.shape[0]}, the model's is {self.dim}"
            )
        # One pass tells all: the float64 sum of squares of finite float32 values cannot
        # overflow, so it is NaN or infinite exactly when an element is.
        wide = arr.astype(np.float64)
        squares = float(wide.dot(wide))  # `@` takes the slower generalised-ufunc path
        if not math.isfinite(squares):
            raise InvalidArgument(f"{field}: contains NaN or infinity")
        if squares == 0.0:
            raise InvalidArgument(f"{field}: must be non-zero")
        # Divided in float64: the norm of large finite float32 values can itself exceed
        # float32's range (512 x 3e38 -> 6.8e39), and in float32 it became inf, the vector 0.
        wide /= math.sqrt(squares)
        return wide.astype(np.float32)

    def encode_batch(self, n: int, field: str) -> None:
        """An Encode* batch size within 1..max_encode_items."""
        self._count(n, self.limits.max_encode_items, field)

    def _top_k(self, top_k: int) -> int:
        if not 1 <= top_k <= self.limits.max_top_k:
            raise InvalidArgument(f"top_k: must be 1 to {self.limits.max_top_k}, got {top_k}")
        return top_k

    def _search_params(self, req: search_pb2.SearchRequest, top_k: int) -> SearchParams:
        p = req.search_params
        if p.nprobe > self.max_nprobe:
            raise InvalidArgument(
                f"search_params.nprobe: must be 0 (tuned default) or 1 to {self.max_nprobe}, "
                f"got {p.nprobe}"
            )
        if p.ef_search and not top_k <= p.ef_search <= MAX_EF_SEARCH:
            raise InvalidArgument(
                f"search_params.ef_search: must be 0 (tuned default) or top_k ({top_k}) to "
                f"{MAX_EF_SEARCH}, got {p.ef_search}"
            )
        if p.rerank_factor > MAX_RERANK:
            raise InvalidArgument(
                f"search_params.rerank_factor: must be 0 (tuned default) or 1 to {MAX_RERANK}, "
                f"got {p.rerank_factor}"
            )
        return SearchParams(nprobe=p.nprobe, ef_search=p.ef_search, rerank=p.rerank_factor)

    def _recency(self, req: search_pb2.SearchRequest) -> tuple[float, float]:
        alpha = req.recency.decay_per_day
        if not math.isfinite(alpha) or alpha < 0:
            raise InvalidArgument("recency.decay_per_day: must be finite and >= 0")
        if req.recency.HasField("reference_time"):
            return alpha, _seconds(req.recency.reference_time)
        return alpha, time.time()

    def _filter(self, flt: search_pb2.Filter) -> SearchFilter:
        pairs = dict(flt.metadata_equals)
        self._count(len(pairs), self.limits.max_filter_entries, "filter.metadata_equals", 0)
        self._metadata(pairs, "filter.metadata_equals")
        rng = flt.publish_time
        start = _seconds(rng.start) if rng.HasField("start") else None
        end = _seconds(rng.end) if rng.HasField("end") else None
        if start is not None and end is not None and end < start:
            raise InvalidArgument("filter.publish_time: end is before start")
        return SearchFilter(tuple(sorted(pairs.items())), start, end)

    def _upsert_item(self, doc: search_pb2.UpsertDocument, field: str, now: float) -> UpsertItem:
        doc_id = self.doc_id(doc.id, f"{field}.id")
        self._count(len(doc.metadata), self.limits.max_metadata_entries, f"{field}.metadata", 0)
        metadata = self._metadata(dict(doc.metadata), f"{field}.metadata")
        image = self.image(doc.image, f"{field}.image") if doc.image else None
        text = self.text(doc.text, f"{field}.text") if doc.text else None
        image_vec = self._opt_vector(doc, "image_vector", field)
        text_vec = self._opt_vector(doc, "text_vector", field)
        if image is not None and image_vec is not None:
            raise InvalidArgument(f"{field}: give image or image_vector, not both")
        if text is not None and text_vec is not None:
            raise InvalidArgument(f"{field}: give text or text_vector, not both")
        if image is None and image_vec is None and text is None and text_vec is None:
            raise InvalidArgument(f"{field}: needs an image, a text or a vector")
        caption = text if text is not None else self._caption(doc.caption, f"{field}.caption")
        publish = _seconds(doc.publish_time) if doc.HasField("publish_time") else now
        record = DocRecord(
            id=doc_id,
            publish_time=publish,
            metadata=metadata,
            caption=caption,
            has_image=image is not None or image_vec is not None,
            has_text=text is not None or text_vec is not None,
        )
        return UpsertItem(record, image, text, image_vec, text_vec)

    def _opt_vector(
        self, doc: search_pb2.UpsertDocument, name: str, field: str
    ) -> np.ndarray | None:
        return self.vector(getattr(doc, name), f"{field}.{name}") if doc.HasField(name) else None

    def _caption(self, caption: str, field: str) -> str:
        if len(caption.encode("utf-8")) > self.limits.max_text_bytes:
            raise InvalidArgument(f"{field}: over the limit of {self.limits.max_text_bytes} bytes")
        return caption

    def _metadata(self, pairs: dict[str, str], field: str) -> dict[str, str]:
        lim = self.limits
        for key, value in pairs.items():
            if not 1 <= len(key.encode("utf-8")) <= lim.max_metadata_key_bytes:
                raise InvalidArgument(
                    f"{field}: keys must be 1 to {lim.max_metadata_key_bytes} bytes"
                )
            if len(value.encode("utf-8")) > lim.max_metadata_value_bytes:
                raise InvalidArgument(
                    f"{field}[{key!r}]: value over {lim.max_metadata_value_bytes} bytes"
                )
        return pairs

    @staticmethod
    def _count(n: int, limit: int, field: str, minimum: int = 1) -> None:
        if not minimum <= n <= limit:
            raise InvalidArgument(f"{field}: must hold {minimum} to {limit} items, got {n}")

    @staticmethod
    def _distinct(ids: list[str], field: str) -> None:
        if len(set(ids)) != len(ids):
            dup = next(i for n, i in enumerate(ids) if i in ids[:n])
            raise InvalidArgument(f"{field}: id {dup!r} appears more than once")


_MIN_SECONDS, _MAX_SECONDS = -62_135_596_800, 253_402_300_799  # 0001-01-01 .. 9999-12-31


def _seconds(ts: Timestamp) -> float:
    if not _MIN_SECONDS <= ts.seconds <= _MAX_SECONDS or not 0 <= ts.nanos < 1_000_000_000:
        raise InvalidArgument(
            f"timestamp {ts.seconds}s {ts.nanos}ns is outside years 1 to 9999 (or nanos invalid)"
        )
    return ts.seconds + ts.nanos * 1e-9


def document(record: DocRecord) -> common_pb2.Document:
    """A stored record as a protobuf Document."""
    return common_pb2.Document(
        id=record.id,
        publish_time=timestamp(record.publish_time),
        metadata=dict(record.metadata),
        caption=record.caption,
        has_image=record.has_image,
        has_text=record.has_text,
    )


def search_response(outcome: SearchOutcome, q: SearchQuery) -> search_pb2.SearchResponse:
    """A SearchOutcome as the SearchResponse of query `q`.

    Built in place: each hit is added to the response's own repeated field and its
    Timestamp and metadata filled there (a Hit built apart, or a Timestamp, would be copied
    in; and a map field's `update` walks a dict in Python through the Mapping ABCs).
    """
    resp = search_pb2.SearchResponse(
        candidates_examined=outcome.candidates,
        shards_answered=outcome.shards_answered,
        partial=bool(outcome.missing_shards),
        missing_shards=outcome.missing_shards,
        shards_total=outcome.shards_total,
    )
    recency = resp.recency
    recency.decay_per_day = q.alpha
    _set_posix(recency.reference_time, q.reference_time)
    t = outcome.timings_ms
    timings = resp.timings
    timings.encode_ms = t.get("encode", 0.0)
    timings.search_ms = t.get("search", 0.0)
    timings.merge_ms = t.get("merge", 0.0)
    timings.total_ms = t.get("total", 0.0)
    timings.decode_ms = t.get("decode", 0.0)
    timings.rerank_ms = t.get("rerank", 0.0)
    add = resp.hits.add
    for h in outcome.hits:
        record = h.record
        hit = add(
            id=record.id,
            similarity=h.similarity,
            decay=h.decay,
            score=h.score,
            caption=record.caption,
        )
        if record.metadata:
            metadata = hit.metadata
            for key, value in record.metadata.items():
                metadata[key] = value
        publish_time = record.publish_time
        if publish_time == int(publish_time):  # `_set_posix`'s common case, inlined
            hit.publish_time.seconds = int(publish_time)
        else:
            _set_posix(hit.publish_time, publish_time)
    return resp


def _set_posix(ts: Timestamp, seconds: float) -> None:
    """Fill `ts` in place from POSIX seconds (same rounding as `to_timestamp`)."""
    whole = int(seconds)
    if whole == seconds:  # whole seconds, as most stored publish times are: nothing to round
        ts.seconds = whole
        return
    whole, nanos = posix_parts(seconds)
    ts.seconds = whole
    if nanos:
        ts.nanos = nanos


def index_stats(s: IndexStats) -> admin_pb2.IndexStats:
    """One modality index's state as a protobuf IndexStats."""
    msg = admin_pb2.IndexStats(
        modality=_MODALITY_PB[s.modality],
        active_type=s.active_type,
        configured_type=s.configured_type,
        vectors=s.vectors,
        tombstones=s.tombstones,
        bytes_per_vector=s.bytes_per_vector,
        rebuilding=s.rebuilding,
    )
    if s.operating_point is not None:
        op = s.operating_point
        msg.operating_point.CopyFrom(
            admin_pb2.OperatingPoint(
                nprobe=op.nprobe,
                ef_search=op.ef_search,
                recall=op.recall,
                target_recall=op.target_recall,
                k=op.k,
                qps=op.qps,
                rerank_factor=op.rerank,
            )
        )
    if s.defaults is not None:
        d = s.defaults
        msg.search_defaults.CopyFrom(
            search_pb2.SearchParams(nprobe=d.nprobe, ef_search=d.ef_search, rerank_factor=d.rerank)
        )
    return msg


def vectors(arr: np.ndarray) -> list[common_pb2.Vector]:
    """Rows of a (n, d) array as Vector messages."""
    return [common_pb2.Vector(values=row.tolist()) for row in arr]


def encoder_stats(stats: EncoderStats) -> admin_pb2.EncoderStats:
    """The encoder's read-out as its protobuf message."""
    modalities = {"text": common_pb2.MODALITY_TEXT, "image": common_pb2.MODALITY_IMAGE}
    return admin_pb2.EncoderStats(
        model_id=stats.model_id,
        dimension=stats.dim,
        normalized=stats.normalized,
        device=stats.device,
        dtype=stats.dtype,
        context_length=stats.context_length,
        image_size=stats.image_size,
        batch_sizes=[
            admin_pb2.BatchHistogram(modality=modalities[name], batches=dict(sizes))
            for name, sizes in stats.batch_sizes.items()
            if name in modalities
        ],
        cache=admin_pb2.CacheStats(**stats.cache),
        replicas=stats.replicas,
    )
