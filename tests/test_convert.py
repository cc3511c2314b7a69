"""Request validation at the edge: each bad field is named (no Ray, no gRPC)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from clipsearch.errors import InvalidArgument
from clipsearch.settings import LimitSettings
from clipsearch.types import Modality
from clipsearch.v1 import common_pb2, search_pb2
from gateway.convert import Validator, timestamp

DIM = 8


def _validator() -> Validator:
    return Validator(LimitSettings(), DIM)


def _vec(values: list[float]) -> common_pb2.Vector:
    return common_pb2.Vector(values=values)


@pytest.mark.parametrize(
    ("request_kwargs", "message"),
    [
        ({"top_k": 5}, "query"),
        ({"text": "x", "top_k": 0}, "top_k"),
        ({"text": "x", "top_k": 1001}, "top_k"),
        ({"text": "   ", "top_k": 5}, "text"),
        ({"text": "x" * 5000, "top_k": 5}, "4096 bytes"),
        ({"image": b"", "top_k": 5}, "image bytes are empty"),
        ({"vector": _vec([1.0] * 7), "top_k": 5}, "dimension 7"),
        ({"vector": _vec([1.0] * 7 + [math.nan]), "top_k": 5}, "NaN"),
        ({"vector": _vec([0.0] * 8), "top_k": 5}, "non-zero"),
        ({"text": "x", "top_k": 5, "recency": search_pb2.Recency(decay_per_day=-1)}, "decay"),
        ({"text": "x", "top_k": 5, "target": 7}, "target"),
    ],
)
def test_bad_search_requests_name_the_field(request_kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        _validator().search_query(search_pb2.SearchRequest(**request_kwargs))


def test_query_vectors_are_normalised_and_defaults_applied() -> None:
    q = _validator().search_query(search_pb2.SearchRequest(vector=_vec([3.0] + [0.0] * 7), top_k=3))
    assert q.target is Modality.IMAGE and q.alpha == 0.0
    assert np.allclose(q.vector, [1.0] + [0.0] * 7)  # type: ignore[arg-type]


def test_vectors_of_huge_finite_floats_keep_their_direction() -> None:
    """Their norm overflows float32 (8 x 3e38 -> 8.5e38): normalised in float64, not to 0."""
    check = _validator()
    q = check.search_query(search_pb2.SearchRequest(vector=_vec([3e38] * 8), top_k=3))
    assert q.vector is not None and q.vector.dtype == np.float32
    assert np.allclose(q.vector, [8**-0.5] * 8)
    doc = search_pb2.UpsertDocument(id="a", image_vector=_vec([-3e38] + [3e38] * 7))
    (item,) = check.upsert_items(search_pb2.UpsertRequest(documents=[doc]), now=0.0)
    assert np.allclose(item.image_vector, [-(8**-0.5)] + [8**-0.5] * 7)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (search_pb2.UpsertDocument(id="", text="x"), "id"),
        (search_pb2.UpsertDocument(id="a" * 257, text="x"), "id"),
        (search_pb2.UpsertDocument(id="a"), "needs an image"),
        (search_pb2.UpsertDocument(id="a", text="x", text_vector=_vec([1.0] * 8)), "not both"),
        (search_pb2.UpsertDocument(id="a", text="x", metadata={"": "v"}), "keys"),
        (search_pb2.UpsertDocument(id="a", image_vector=_vec([1.0, 2.0])), "dimension 2"),
    ],
)
def test_bad_documents_name_the_field(doc: search_pb2.UpsertDocument, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        _validator().upsert_items(search_pb2.UpsertRequest(documents=[doc]), now=0.0)


def test_duplicate_ids_in_one_upsert_are_rejected() -> None:
    docs = [
        search_pb2.UpsertDocument(id="a", text="x"),
        search_pb2.UpsertDocument(id="a", text="y"),
    ]
    with pytest.raises(InvalidArgument, match="more than once"):
        _validator().upsert_items(search_pb2.UpsertRequest(documents=docs), now=0.0)


def test_upsert_defaults_publish_time_to_now_and_keeps_caption() -> None:
    doc = search_pb2.UpsertDocument(id="a", text="a cat", metadata={"k": "v"})
    (item,) = _validator().upsert_items(search_pb2.UpsertRequest(documents=[doc]), now=123.5)
    assert item.record.publish_time == 123.5 and item.record.caption == "a cat"
    assert item.record.has_text and not item.record.has_image


def test_timestamps_round_trip() -> None:
    for seconds in (0.0, 1_700_000_000.25, 1.999999999, 1.9999999999, -0.5):
        ts = timestamp(seconds)
        assert abs(ts.seconds + ts.nanos / 1e9 - seconds) < 1e-6


def test_search_response_timestamps_match_to_timestamp() -> None:
    """Hit and reference times in a response equal `to_timestamp`'s, whole seconds (the fast
    path) and fractional ones alike."""
    from clipsearch.types import DocRecord
    from gateway.convert import search_response
    from gateway.coordinator import SearchOutcome, SearchQuery
    from gateway.ranking import RankedHit

    times = (0.0, 1_800_000_000.0, -86_400.0, 1_700_000_000.25, 1.9999999999, -0.5, 2.0**40)
    hits = [
        RankedHit(DocRecord(f"d{n}", t, {}, "", True, False), 0.5, 1.0, 0.5)
        for n, t in enumerate(times)
    ]
    outcome = SearchOutcome(hits, len(hits), 1, 1)
    for reference in times:
        query = SearchQuery(Modality.IMAGE, len(hits), reference_time=reference)
        resp = search_response(outcome, query)
        assert [h.publish_time for h in resp.hits] == [timestamp(t) for t in times]
        assert resp.recency.reference_time == timestamp(reference)
