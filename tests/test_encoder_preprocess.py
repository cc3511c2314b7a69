"""The fast CLIP preprocessing gives the processor's own pixels, or stays out of the way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from encoder_service.model import ClipEncoder
from encoder_service.preprocess import TOLERANCE, for_processor
from tests.encoder_fixtures import make_tiny_clip

SIZES = [(320, 240), (240, 320), (224, 224), (1, 1), (3, 500), (97, 61), (1000, 999)]


def pictures() -> list[Image.Image]:
    rng = np.random.default_rng(11)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in SIZES]


def processed(processor: Any, image: Image.Image, **overrides: Any) -> torch.Tensor:
    return processor(
        images=[image], return_tensors="pt", input_data_format="channels_last", **overrides
    )["pixel_values"][0]


@pytest.mark.parametrize(
    "processor",
    [CLIPImageProcessorPil(), CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size=32)],
    ids=["vit-b-224", "tiny-32"],
)
def test_fast_pixels_equal_the_processors_at_every_scale(processor: Any) -> None:
    fast = for_processor(processor, extra_sizes=[48])
    assert fast is not None
    for image in pictures():
        torch.testing.assert_close(fast(image), processed(processor, image), atol=TOLERANCE, rtol=0)
        scaled = processed(
            processor, image, size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48}
        )
        torch.testing.assert_close(fast(image, 48, (48, 48)), scaled, atol=TOLERANCE, rtol=0)


def test_other_recipes_keep_the_processor() -> None:
    assert for_processor(SiglipImageProcessorPil()) is None  # squashes to a square, no crop
    assert for_processor(CLIPImageProcessorPil(do_normalize=False)) is None
    assert for_processor(CLIPImageProcessorPil(do_center_crop=False)) is None


def test_a_processor_whose_output_differs_on_the_probes_keeps_its_own_path() -> None:
    class Shifted(CLIPImageProcessorPil):  # type: ignore[misc]
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            out = super().__call__(*args, **kwargs)
            out["pixel_values"] = out["pixel_values"] + 0.01
            return out

    assert for_processor(Shifted()) is None


def test_what_the_fast_path_does_not_cover_is_left_to_the_processor() -> None:
    fast = for_processor(CLIPImageProcessorPil())
    assert fast is not None
    assert fast(Image.new("L", (300, 200), 128)) is None  # not RGB
    assert fast(Image.new("RGB", (300, 200)), 100, (150, 150)) is None  # crop > resized: pad


def test_the_encoder_prepares_clip_images_without_calling_the_processor(tmp_path: Path) -> None:
    encoder = ClipEncoder(str(make_tiny_clip(tmp_path, dim=16)))
    image = pictures()[0]
    expected = encoder.prepare_image(image)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the processor was called")

    encoder._processor = refuse  # type: ignore[assignment]
    torch.testing.assert_close(encoder.prepare_image(image), expected)
