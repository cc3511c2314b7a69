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
    __slots__ = ("shard", "documents", "image_vectors", "text_vectors")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_VECTORS_FIELD_NUMBER: _ClassVar[int]
    TEXT_VECTORS_FIELD_NUMBER: _ClassVar[int]
    shard: int
    documents: int
    image_vectors: int
    text_vectors: int
    def __init__(self, shard: _Optional[int] = ..., documents: _Optional[int] = ..., image_vectors: _Optional[int] = ..., text_vectors: _Optional[int] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("model_id", "dimension", "index_type", "shards", "total_documents")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    INDEX_TYPE_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    dimension: int
    index_type: str
    shards: _containers.RepeatedCompositeFieldContainer[ShardStats]
    total_documents: int
    def __init__(self, model_id: _Optional[str] = ..., dimension: _Optional[int] = ..., index_type: _Optional[str] = ..., shards: _Optional[_Iterable[_Union[ShardStats, _Mapping]]] = ..., total_documents: _Optional[int] = ...) -> None: ...
