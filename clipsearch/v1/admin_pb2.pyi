from clipsearch.v1 import common_pb2 as _common_pb2
from clipsearch.v1 import search_pb2 as _search_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ShardStats(_message.Message):
    __slots__ = ("shard", "documents", "image_vectors", "text_vectors", "indexes", "snapshot_seq", "log_records_since_snapshot")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_VECTORS_FIELD_NUMBER: _ClassVar[int]
    TEXT_VECTORS_FIELD_NUMBER: _ClassVar[int]
    INDEXES_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_SEQ_FIELD_NUMBER: _ClassVar[int]
    LOG_RECORDS_SINCE_SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    shard: int
    documents: int
    image_vectors: int
    text_vectors: int
    indexes: _containers.RepeatedCompositeFieldContainer[IndexStats]
    snapshot_seq: int
    log_records_since_snapshot: int
    def __init__(self, shard: _Optional[int] = ..., documents: _Optional[int] = ..., image_vectors: _Optional[int] = ..., text_vectors: _Optional[int] = ..., indexes: _Optional[_Iterable[_Union[IndexStats, _Mapping]]] = ..., snapshot_seq: _Optional[int] = ..., log_records_since_snapshot: _Optional[int] = ...) -> None: ...

class IndexStats(_message.Message):
    __slots__ = ("modality", "active_type", "configured_type", "vectors", "tombstones", "bytes_per_vector", "rebuilding", "operating_point", "search_defaults")
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_TYPE_FIELD_NUMBER: _ClassVar[int]
    CONFIGURED_TYPE_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    TOMBSTONES_FIELD_NUMBER: _ClassVar[int]
    BYTES_PER_VECTOR_FIELD_NUMBER: _ClassVar[int]
    REBUILDING_FIELD_NUMBER: _ClassVar[int]
    OPERATING_POINT_FIELD_NUMBER: _ClassVar[int]
    SEARCH_DEFAULTS_FIELD_NUMBER: _ClassVar[int]
    modality: _common_pb2.Modality
    active_type: str
    configured_type: str
    vectors: int
    tombstones: int
    bytes_per_vector: float
    rebuilding: bool
    operating_point: OperatingPoint
    search_defaults: _search_pb2.SearchParams
    def __init__(self, modality: _Optional[_Union[_common_pb2.Modality, str]] = ..., active_type: _Optional[str] = ..., configured_type: _Optional[str] = ..., vectors: _Optional[int] = ..., tombstones: _Optional[int] = ..., bytes_per_vector: _Optional[float] = ..., rebuilding: _Optional[bool] = ..., operating_point: _Optional[_Union[OperatingPoint, _Mapping]] = ..., search_defaults: _Optional[_Union[_search_pb2.SearchParams, _Mapping]] = ...) -> None: ...

class OperatingPoint(_message.Message):
    __slots__ = ("nprobe", "ef_search", "recall", "target_recall", "k", "qps", "rerank_factor")
    NPROBE_FIELD_NUMBER: _ClassVar[int]
    EF_SEARCH_FIELD_NUMBER: _ClassVar[int]
    RECALL_FIELD_NUMBER: _ClassVar[int]
    TARGET_RECALL_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    QPS_FIELD_NUMBER: _ClassVar[int]
    RERANK_FACTOR_FIELD_NUMBER: _ClassVar[int]
    nprobe: int
    ef_search: int
    recall: float
    target_recall: float
    k: int
    qps: float
    rerank_factor: int
    def __init__(self, nprobe: _Optional[int] = ..., ef_search: _Optional[int] = ..., recall: _Optional[float] = ..., target_recall: _Optional[float] = ..., k: _Optional[int] = ..., qps: _Optional[float] = ..., rerank_factor: _Optional[int] = ...) -> None: ...

class BatchHistogram(_message.Message):
    __slots__ = ("modality", "batches")
    class BatchesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    modality: _common_pb2.Modality
    batches: _containers.ScalarMap[int, int]
    def __init__(self, modality: _Optional[_Union[_common_pb2.Modality, str]] = ..., batches: _Optional[_Mapping[int, int]] = ...) -> None: ...

class CacheStats(_message.Message):
    __slots__ = ("hits", "misses", "entries", "bytes", "capacity_bytes")
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    hits: int
    misses: int
    entries: int
    bytes: int
    capacity_bytes: int
    def __init__(self, hits: _Optional[int] = ..., misses: _Optional[int] = ..., entries: _Optional[int] = ..., bytes: _Optional[int] = ..., capacity_bytes: _Optional[int] = ...) -> None: ...

class EncoderStats(_message.Message):
    __slots__ = ("model_id", "dimension", "normalized", "device", "dtype", "context_length", "image_size", "batch_sizes", "cache", "replicas")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    NORMALIZED_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZES_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    dimension: int
    normalized: bool
    device: str
    dtype: str
    context_length: int
    image_size: int
    batch_sizes: _containers.RepeatedCompositeFieldContainer[BatchHistogram]
    cache: CacheStats
    replicas: int
    def __init__(self, model_id: _Optional[str] = ..., dimension: _Optional[int] = ..., normalized: _Optional[bool] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., context_length: _Optional[int] = ..., image_size: _Optional[int] = ..., batch_sizes: _Optional[_Iterable[_Union[BatchHistogram, _Mapping]]] = ..., cache: _Optional[_Union[CacheStats, _Mapping]] = ..., replicas: _Optional[int] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("model_id", "dimension", "index_type", "shards", "total_documents", "encoder")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    INDEX_TYPE_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    ENCODER_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    dimension: int
    index_type: str
    shards: _containers.RepeatedCompositeFieldContainer[ShardStats]
    total_documents: int
    encoder: EncoderStats
    def __init__(self, model_id: _Optional[str] = ..., dimension: _Optional[int] = ..., index_type: _Optional[str] = ..., shards: _Optional[_Iterable[_Union[ShardStats, _Mapping]]] = ..., total_documents: _Optional[int] = ..., encoder: _Optional[_Union[EncoderStats, _Mapping]] = ...) -> None: ...
