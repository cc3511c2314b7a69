"""Domain types passed between the gateway and the services (never protobuf).

Times are POSIX seconds (float64); vectors are float32 numpy arrays.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np


class Modality(enum.StrEnum):
    """The embedding space a vector lives in."""

    IMAGE = "image"
    TEXT = "text"


@dataclass(frozen=True, slots=True)
class DocRecord:
    """What a shard stores about a document besides its vectors."""

    id: str
    publish_time: float
    metadata: Mapping[str, str] = field(default_factory=dict)
    caption: str = ""
    has_image: bool = False
    has_text: bool = False


@dataclass(frozen=True, slots=True)
class DocWrite:
    """A document ready to be stored: vectors already encoded and normalised."""

    record: DocRecord
    image_vector: np.ndarray | None = None
    text_vector: np.ndarray | None = None

    def vector(self, modality: Modality) -> np.ndarray | None:
        """The vector of one modality, or None."""
        return self.image_vector if modality is Modality.IMAGE else self.text_vector


@dataclass(frozen=True, slots=True)
class SearchFilter:
    """Conditions a document must meet; empty means no restriction."""

    metadata_equals: tuple[tuple[str, str], ...] = ()
    time_start: float | None = None
    time_end: float | None = None

    @property
    def is_empty(self) -> bool:
        """True when the filter lets every document through."""
        return not self.metadata_equals and self.time_start is None and self.time_end is None

    def matches(self, record: DocRecord) -> bool:
        """Whether one document passes (the reference semantics shards must implement)."""
        if any(record.metadata.get(k) != v for k, v in self.metadata_equals):
            return False
        if self.time_start is not None and record.publish_time < self.time_start:
            return False
        return self.time_end is None or record.publish_time < self.time_end


@dataclass(frozen=True, slots=True)
class ShardHits:
    """One shard's answer: candidates by descending similarity.

    `exhausted` is True when the shard holds no further matching candidate beyond these,
    so asking it for more would return nothing new.
    """

    similarities: np.ndarray
    records: tuple[DocRecord, ...]
    exhausted: bool


@dataclass(frozen=True, slots=True)
class SearchParams:
    """Approximate-search knobs for one request; 0 takes the tuned default.

    Attributes:
        nprobe: IVF inverted lists probed (clamped to the list count).
        ef_search: HNSW candidate list size (raised to k when smaller).
        rerank: lossy codes (PQ, RaBitQ, SQ8): k x rerank candidates are re-ranked exactly
            on the raw vectors; other types ignore it.
    """

    nprobe: int = 0
    ef_search: int = 0
    rerank: int = 0


@dataclass(frozen=True, slots=True)
class OperatingPoint:
    """Default search parameters chosen by the tuner and what they measured.

    `rerank` is the re-rank depth factor (k x rerank candidates re-ranked exactly) for lossy
    codes, 0 for types without codes to re-rank.
    """

    nprobe: int
    ef_search: int
    recall: float
    target_recall: float
    k: int
    qps: float
    rerank: int = 0


@dataclass(frozen=True, slots=True)
class IndexStats:
    """One modality's index inside a shard.

    `bytes_per_vector` counts the index and the raw vectors kept beside it (for retraining,
    exact re-ranking and filtered scans), divided by live vectors. `defaults` are the knobs
    a search without parameters uses now (None for exact search): the operating point,
    widened with the vectors added since it was tuned.
    """

    modality: Modality
    active_type: str
    configured_type: str
    vectors: int
    tombstones: int
    bytes_per_vector: float
    rebuilding: bool
    operating_point: OperatingPoint | None = None
    defaults: SearchParams | None = None


@dataclass(frozen=True, slots=True)
class ShardStats:
    """Counts one shard reports."""

    shard: int
    documents: int
    image_vectors: int
    text_vectors: int
    # Durability: the newest snapshot's sequence (0 = none) and log records written after it.
    snapshot_seq: int = 0
    log_records_since_snapshot: int = 0
    # One entry per modality index (image, text).
    indexes: tuple[IndexStats, ...] = ()


LongTextStrategy = Literal["truncate", "sliding_window", "reject"]
"""What the encoder does with a text longer than the model's context."""


@dataclass(frozen=True, slots=True)
class TextOptions:
    """How a text becomes an embedding; a None field takes the server's default.

    Attributes:
        prompt_template: Template with exactly one "{}" where the text goes, e.g.
            "a photo of {}"; "{}" for the bare text.
        long_text: "truncate", "sliding_window" or "reject" for texts over the context.
    """

    prompt_template: str | None = None
    long_text: LongTextStrategy | None = None


@dataclass(frozen=True, slots=True)
class EncoderStats:
    """What the encoder runs and how it has been used (one replica's view for counters)."""

    model_id: str
    dim: int
    device: str
    dtype: str
    context_length: int
    image_size: int
    replicas: int
    normalized: bool = True
    batch_sizes: Mapping[str, Mapping[int, int]] = field(default_factory=dict)
    cache: Mapping[str, int] = field(default_factory=dict)
    forward_seconds: Mapping[str, float] = field(default_factory=dict)
    """Seconds the model slots have spent in forwards, per queue, summed over replicas:
    its rate divided by `model_slots` is how busy the model is (1 = always computing)."""
    model_slots: int = 0
    """Forwards the replicas run at once, summed."""
