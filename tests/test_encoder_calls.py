"""Concurrent encoder calls from the gateway share handle calls (gateway.coalesce), and each
caller still gets its own vector, or its own error, as if it had called alone."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import pytest
from PIL import Image

from clipsearch.errors import InvalidArgument
from encoder_service.model import ClipEncoder, resolve_model
from tests.conftest import RunningStack

pytestmark = pytest.mark.integration


def _png(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 40), colour).save(buffer, "PNG")
    return buffer.getvalue()


async def _each(calls: list[Any]) -> list[Any]:
    return list(await asyncio.gather(*calls, return_exceptions=True))


def test_concurrent_texts_travel_together_and_match_the_model(stack: RunningStack) -> None:
    encoder = stack.stack.coordinator.encoder  # type: ignore[attr-defined]
    texts = [f"a {c} shape number {i} on grey" for i, c in enumerate(["red", "blue"] * 20)]
    texts[7] = "   "  # one bad item among them fails alone
    before = sum(encoder.texts.batches.values())
    got: Any = stack.run(_each([encoder.encode_texts([t]) for t in texts]))
    assert isinstance(got[7], InvalidArgument)
    assert sum(encoder.texts.batches.values()) > before  # not one handle call each
    model = ClipEncoder(resolve_model("demo"))
    for text, vectors in zip(texts, got, strict=True):
        if text.strip():
            assert vectors.shape == (1, encoder.dim)
            want = model.encode_texts([text])[0]
            assert float(vectors[0] @ want) >= 0.9999


def test_concurrent_images_travel_together_and_fail_alone(stack: RunningStack) -> None:
    encoder = stack.stack.coordinator.encoder  # type: ignore[attr-defined]
    images = [_png((i * 6 % 256, 255 - i * 5 % 256, 90)) for i in range(30)]
    images[3] = b"not an image at all"
    alone: list[Any] = [stack.run(encoder.encode_images([b])) for b in images[4:8]]
    before = sum(encoder.images.batches.values())
    got: Any = stack.run(_each([encoder.encode_images([b]) for b in images]))
    assert isinstance(got[3], InvalidArgument) and "image" in str(got[3])
    assert sum(encoder.images.batches.values()) > before
    for one, together in zip(alone, got[4:8], strict=True):
        assert float(one[0] @ together[0]) >= 0.9999


def test_a_multi_item_call_names_the_bad_item(stack: RunningStack) -> None:
    encoder = stack.stack.coordinator.encoder  # type: ignore[attr-defined]
    with pytest.raises(InvalidArgument, match=r"texts\[2\]"):
        stack.run(encoder.encode_texts(["a red circle", "a blue star", "", "grey"]))
