"""The shape of a shard search as it crosses the Ray actor call: plain tuples and bytes.

Ray serialises every argument and result. Dataclasses, enums and numpy arrays each take a
slower path than one tuple of builtins (numpy goes out of band, slotted dataclasses through
`__getstate__` in Python), which measured ~0.6 ms per shard call on this path: about a
third of the whole served-minus-Faiss overhead. So the gateway packs a search into one
tuple and the shard answers with one; both ends still work on the domain types
(`clipsearch.types`), which is what every other caller of `Shard` sees.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from clipsearch.types import DocRecord, Modality, SearchFilter, SearchParams, ShardHits

# (modality, float32 query bytes, k, filter or None, params or None, deadline or None)
SearchRequest = tuple[
    str,
    bytes,
    int,
    tuple[tuple[tuple[str, str], ...], float | None, float | None] | None,
    tuple[int, int, int] | None,
    float | None,
]
# (float32 similarity bytes, records as tuples, exhausted)
SearchReply = tuple[bytes, tuple[tuple[object, ...], ...], bool]


def pack_request(
    modality: Modality,
    query: np.ndarray,
    k: int,
    flt: SearchFilter | None,
    params: SearchParams | None,
    deadline: float | None,
) -> SearchRequest:
    """One tuple of builtins for `ShardActor.search_packed`."""
    packed_flt = None
    if flt is not None and not flt.is_empty:
        packed_flt = (flt.metadata_equals, flt.time_start, flt.time_end)
    packed_params = None if params is None else (params.nprobe, params.ef_search, params.rerank)
    vector = np.ascontiguousarray(query, dtype=np.float32).tobytes()
    return (modality.value, vector, k, packed_flt, packed_params, deadline)


def unpack_request(
    request: SearchRequest,
) -> tuple[Modality, np.ndarray, int, SearchFilter | None, SearchParams | None, float | None]:
    """The domain arguments of a packed search, in `Shard.search` order plus the deadline."""
    modality, vector, k, packed_flt, packed_params, deadline = request
    flt = None if packed_flt is None else SearchFilter(*packed_flt)
    params = None if packed_params is None else SearchParams(*packed_params)
    query = np.frombuffer(vector, dtype=np.float32)
    return Modality(modality), query, k, flt, params, deadline


def pack_hits(hits: ShardHits) -> SearchReply:
    """One tuple of builtins for the gateway."""
    records = tuple(
        (r.id, r.publish_time, _plain(r.metadata), r.caption, r.has_image, r.has_text)
        for r in hits.records
    )
    return (np.asarray(hits.similarities, dtype=np.float32).tobytes(), records, hits.exhausted)


def unpack_hits(reply: SearchReply) -> ShardHits:
    """The shard's answer as the coordinator ranks it."""
    sims, records, exhausted = reply
    return ShardHits(
        np.frombuffer(sims, dtype=np.float32),
        tuple(DocRecord(*r) for r in records),  # type: ignore[arg-type]
        exhausted,
    )


def _plain(metadata: Mapping[str, str]) -> dict[str, str]:
    """A dict, which `marshal` (the search channel) and Ray both carry as a builtin."""
    return metadata if type(metadata) is dict else dict(metadata)
