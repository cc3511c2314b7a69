import datetime

from clipsearch.v1 import common_pb2 as _common_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Filter(_message.Message):
    __slots__ = ("metadata_equals", "publish_time")
    class MetadataEqualsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    METADATA_EQUALS_FIELD_NUMBER: _ClassVar[int]
    PUBLISH_TIME_FIELD_NUMBER: _ClassVar[int]
    metadata_equals: _containers.ScalarMap[str, str]
    publish_time: _common_pb2.TimeRange
    def __init__(self, metadata_equals: _Optional[_Mapping[str, str]] = ..., publish_time: _Optional[_Union[_common_pb2.TimeRange, _Mapping]] = ...) -> None: ...

class Recency(_message.Message):
    __slots__ = ("decay_per_day", "reference_time")
    DECAY_PER_DAY_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_TIME_FIELD_NUMBER: _ClassVar[int]
    decay_per_day: float
    reference_time: _timestamp_pb2.Timestamp
    def __init__(self, decay_per_day: _Optional[float] = ..., reference_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("text", "image", "vector", "target", "top_k", "filter", "recency", "allow_partial", "text_options", "search_params")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    RECENCY_FIELD_NUMBER: _ClassVar[int]
    ALLOW_PARTIAL_FIELD_NUMBER: _ClassVar[int]
    TEXT_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    SEARCH_PARAMS_FIELD_NUMBER: _ClassVar[int]
    text: str
    image: bytes
    vector: _common_pb2.Vector
    target: _common_pb2.Modality
    top_k: int
    filter: Filter
    recency: Recency
    allow_partial: bool
    text_options: _common_pb2.TextOptions
    search_params: SearchParams
    def __init__(self, text: _Optional[str] = ..., image: _Optional[bytes] = ..., vector: _Optional[_Union[_common_pb2.Vector, _Mapping]] = ..., target: _Optional[_Union[_common_pb2.Modality, str]] = ..., top_k: _Optional[int] = ..., filter: _Optional[_Union[Filter, _Mapping]] = ..., recency: _Optional[_Union[Recency, _Mapping]] = ..., allow_partial: _Optional[bool] = ..., text_options: _Optional[_Union[_common_pb2.TextOptions, _Mapping]] = ..., search_params: _Optional[_Union[SearchParams, _Mapping]] = ...) -> None: ...

class SearchParams(_message.Message):
    __slots__ = ("nprobe", "ef_search", "rerank_factor")
    NPROBE_FIELD_NUMBER: _ClassVar[int]
    EF_SEARCH_FIELD_NUMBER: _ClassVar[int]
    RERANK_FACTOR_FIELD_NUMBER: _ClassVar[int]
    nprobe: int
    ef_search: int
    rerank_factor: int
    def __init__(self, nprobe: _Optional[int] = ..., ef_search: _Optional[int] = ..., rerank_factor: _Optional[int] = ...) -> None: ...

class Hit(_message.Message):
    __slots__ = ("id", "similarity", "decay", "score", "publish_time", "metadata", "caption")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    DECAY_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    PUBLISH_TIME_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CAPTION_FIELD_NUMBER: _ClassVar[int]
    id: str
    similarity: float
    decay: float
    score: float
    publish_time: _timestamp_pb2.Timestamp
    metadata: _containers.ScalarMap[str, str]
    caption: str
    def __init__(self, id: _Optional[str] = ..., similarity: _Optional[float] = ..., decay: _Optional[float] = ..., score: _Optional[float] = ..., publish_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., metadata: _Optional[_Mapping[str, str]] = ..., caption: _Optional[str] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("encode_ms", "search_ms", "merge_ms", "total_ms", "decode_ms", "rerank_ms")
    ENCODE_MS_FIELD_NUMBER: _ClassVar[int]
    SEARCH_MS_FIELD_NUMBER: _ClassVar[int]
    MERGE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    RERANK_MS_FIELD_NUMBER: _ClassVar[int]
    encode_ms: float
    search_ms: float
    merge_ms: float
    total_ms: float
    decode_ms: float
    rerank_ms: float
    def __init__(self, encode_ms: _Optional[float] = ..., search_ms: _Optional[float] = ..., merge_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., decode_ms: _Optional[float] = ..., rerank_ms: _Optional[float] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("hits", "recency", "candidates_examined", "shards_answered", "shards_total", "timings", "partial", "missing_shards")
    HITS_FIELD_NUMBER: _ClassVar[int]
    RECENCY_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_EXAMINED_FIELD_NUMBER: _ClassVar[int]
    SHARDS_ANSWERED_FIELD_NUMBER: _ClassVar[int]
    SHARDS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    MISSING_SHARDS_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[Hit]
    recency: Recency
    candidates_examined: int
    shards_answered: int
    shards_total: int
    timings: Timings
    partial: bool
    missing_shards: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, hits: _Optional[_Iterable[_Union[Hit, _Mapping]]] = ..., recency: _Optional[_Union[Recency, _Mapping]] = ..., candidates_examined: _Optional[int] = ..., shards_answered: _Optional[int] = ..., shards_total: _Optional[int] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., partial: _Optional[bool] = ..., missing_shards: _Optional[_Iterable[int]] = ...) -> None: ...

class UpsertDocument(_message.Message):
    __slots__ = ("id", "image", "text", "image_vector", "text_vector", "publish_time", "metadata", "caption")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_VECTOR_FIELD_NUMBER: _ClassVar[int]
    TEXT_VECTOR_FIELD_NUMBER: _ClassVar[int]
    PUBLISH_TIME_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CAPTION_FIELD_NUMBER: _ClassVar[int]
    id: str
    image: bytes
    text: str
    image_vector: _common_pb2.Vector
    text_vector: _common_pb2.Vector
    publish_time: _timestamp_pb2.Timestamp
    metadata: _containers.ScalarMap[str, str]
    caption: str
    def __init__(self, id: _Optional[str] = ..., image: _Optional[bytes] = ..., text: _Optional[str] = ..., image_vector: _Optional[_Union[_common_pb2.Vector, _Mapping]] = ..., text_vector: _Optional[_Union[_common_pb2.Vector, _Mapping]] = ..., publish_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., metadata: _Optional[_Mapping[str, str]] = ..., caption: _Optional[str] = ...) -> None: ...

class UpsertRequest(_message.Message):
    __slots__ = ("documents", "text_options")
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    TEXT_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    documents: _containers.RepeatedCompositeFieldContainer[UpsertDocument]
    text_options: _common_pb2.TextOptions
    def __init__(self, documents: _Optional[_Iterable[_Union[UpsertDocument, _Mapping]]] = ..., text_options: _Optional[_Union[_common_pb2.TextOptions, _Mapping]] = ...) -> None: ...

class UpsertResponse(_message.Message):
    __slots__ = ("upserted",)
    UPSERTED_FIELD_NUMBER: _ClassVar[int]
    upserted: int
    def __init__(self, upserted: _Optional[int] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ids: _Optional[_Iterable[str]] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    def __init__(self, deleted: _Optional[int] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("ids", "allow_missing")
    IDS_FIELD_NUMBER: _ClassVar[int]
    ALLOW_MISSING_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    allow_missing: bool
    def __init__(self, ids: _Optional[_Iterable[str]] = ..., allow_missing: _Optional[bool] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("documents", "missing_ids")
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    MISSING_IDS_FIELD_NUMBER: _ClassVar[int]
    documents: _containers.RepeatedCompositeFieldContainer[_common_pb2.Document]
    missing_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, documents: _Optional[_Iterable[_Union[_common_pb2.Document, _Mapping]]] = ..., missing_ids: _Optional[_Iterable[str]] = ...) -> None: ...
