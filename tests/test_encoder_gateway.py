"""The encoder's options and read-outs through the real gateway (demo model, gRPC on loopback)."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from PIL import Image

from clipsearch.client import Client, Document
from clipsearch.types import TextOptions
from clipsearch.v1 import common_pb2

pytestmark = pytest.mark.integration

LONG = " ".join(["a red circle beside a blue star"] * 12)  # far over the demo's 32 tokens


def invalid(call: object) -> str:
    """Run `call`, expect INVALID_ARGUMENT, return the message."""
    with pytest.raises(grpc.RpcError) as err:
        call()  # type: ignore[operator]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return str(err.value.details())


def test_template_per_request_equals_the_templated_text(client: Client) -> None:
    templated = client.encode_text(["a red circle"], options=TextOptions("a photo of {}"))
    spelled_out = client.encode_text(["a photo of a red circle"])
    bare = client.encode_text(["a red circle"])
    np.testing.assert_allclose(templated, spelled_out, atol=1e-5)
    assert float(templated[0] @ bare[0]) < 0.9999


@pytest.mark.parametrize(
    ("template", "fragment"),
    [
        ("a photo", 'options.prompt_template: must contain "{}" exactly once'),
        ("{} and {}", "found 2"),
        ("{}" + "x" * 5000, "options.prompt_template: over the limit of 4096 bytes"),
    ],
)
def test_bad_templates_are_refused_at_the_gateway(
    client: Client, template: str, fragment: str
) -> None:
    assert fragment in invalid(lambda: client.encode_text(["x"], options=TextOptions(template)))
    assert client.encode_text(["still serving"]).shape[0] == 1


def test_long_text_strategies(client: Client) -> None:
    truncated = client.encode_text([LONG])
    windows = client.encode_text([LONG], options=TextOptions(long_text="sliding_window"))
    assert float(truncated[0] @ windows[0]) < 0.9999
    message = invalid(
        lambda: client.encode_text(["short", LONG], options=TextOptions(long_text="reject"))
    )
    assert message.startswith("texts[1]: text is ") and "context of 32" in message
    message = invalid(
        lambda: client.search(LONG, top_k=1, text_options=TextOptions(long_text="reject"))
    )
    assert "over the model's context of 32" in message


def test_upserted_texts_are_embedded_bare(client: Client) -> None:
    client.upsert([Document("bare", text="a green square")])
    bare = client.encode_text(["a green square"])[0]
    hits = client.search(vector=bare, target="text", top_k=1)
    assert hits.ids == ["bare"] and hits.hits[0].similarity == pytest.approx(1.0, abs=1e-4)
    templated = client.search(
        "a green square", target="text", top_k=1, text_options=TextOptions("a photo of {}")
    )
    assert templated.hits[0].similarity < 0.9999  # the query template reached the encoder


def test_stats_report_the_encoder(client: Client) -> None:
    text = "a purple triangle for the cache"
    before = client.stats().encoder.cache
    client.encode_text([text])
    client.encode_text([text])
    stats = client.stats()
    enc = stats.encoder
    assert (enc.model_id, enc.dimension, enc.normalized) == ("clipsearch-demo", 128, True)
    assert (enc.device, enc.dtype, enc.context_length, enc.image_size) == ("cpu", "fp32", 32, 64)
    assert enc.replicas == 1
    assert enc.cache.hits - before.hits >= 1 and enc.cache.misses - before.misses >= 1
    assert 0 < enc.cache.bytes <= enc.cache.capacity_bytes
    histograms = {h.modality: dict(h.batches) for h in enc.batch_sizes}
    assert sum(histograms[common_pb2.MODALITY_TEXT].values()) >= 1


def test_truncated_image_names_the_problem(client: Client) -> None:
    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, "JPEG")
    data = buffer.getvalue()
    message = invalid(lambda: client.encode_image([data, data[: len(data) // 2]]))
    assert message == "images[1]: image is truncated or corrupt"


def test_upsert_text_options_shape_the_stored_text_vector(client: Client) -> None:
    client.upsert([Document("bare", text="a red circle")])
    client.upsert(
        [Document("templated", text="a red circle")],
        text_options=TextOptions("a photo of {}"),
    )
    spelled_out = client.encode_text(["a photo of a red circle"])[0]
    hits = client.search(vector=spelled_out, target="text", top_k=2).hits
    assert [h.id for h in hits] == ["templated", "bare"]
    assert hits[0].similarity == pytest.approx(1.0, abs=1e-4)
    message = invalid(
        lambda: client.upsert(
            [Document("long", text=LONG)], text_options=TextOptions(long_text="reject")
        )
    )
    assert "over the model's context of 32" in message
    assert client.get(["long"], allow_missing=True) == []
