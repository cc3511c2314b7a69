import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Modality(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODALITY_UNSPECIFIED: _ClassVar[Modality]
    MODALITY_IMAGE: _ClassVar[Modality]
    MODALITY_TEXT: _ClassVar[Modality]

class LongText(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LONG_TEXT_UNSPECIFIED: _ClassVar[LongText]
    LONG_TEXT_TRUNCATE: _ClassVar[LongText]
    LONG_TEXT_SLIDING_WINDOW: _ClassVar[LongText]
    LONG_TEXT_REJECT: _ClassVar[LongText]
MODALITY_UNSPECIFIED: Modality
MODALITY_IMAGE: Modality
MODALITY_TEXT: Modality
LONG_TEXT_UNSPECIFIED: LongText
LONG_TEXT_TRUNCATE: LongText
LONG_TEXT_SLIDING_WINDOW: LongText
LONG_TEXT_REJECT: LongText

class Vector(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class TimeRange(_message.Message):
    __slots__ = ("start", "end")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    start: _timestamp_pb2.Timestamp
    end: _timestamp_pb2.Timestamp
    def __init__(self, start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Document(_message.Message):
    __slots__ = ("id", "publish_time", "metadata", "caption", "has_image", "has_text")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    PUBLISH_TIME_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CAPTION_FIELD_NUMBER: _ClassVar[int]
    HAS_IMAGE_FIELD_NUMBER: _ClassVar[int]
    HAS_TEXT_FIELD_NUMBER: _ClassVar[int]
    id: str
    publish_time: _timestamp_pb2.Timestamp
    metadata: _containers.ScalarMap[str, str]
    caption: str
    has_image: bool
    has_text: bool
    def __init__(self, id: _Optional[str] = ..., publish_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., metadata: _Optional[_Mapping[str, str]] = ..., caption: _Optional[str] = ..., has_image: _Optional[bool] = ..., has_text: _Optional[bool] = ...) -> None: ...

class TextOptions(_message.Message):
    __slots__ = ("prompt_template", "long_text")
    PROMPT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    LONG_TEXT_FIELD_NUMBER: _ClassVar[int]
    prompt_template: str
    long_text: LongText
    def __init__(self, prompt_template: _Optional[str] = ..., long_text: _Optional[_Union[LongText, str]] = ...) -> None: ...
