"""Parity and batch invariance at real size: a random-init ViT-B/32 (`CLIPConfig()`) loaded
through `from_pretrained`, against transformers' own get_*_features (slow: ~1 min)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, CLIPModel
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from bench.encoder import build_vit_b32
from encoder_service.model import ClipEncoder

pytestmark = pytest.mark.slow
TEXTS = ["a red circle", "a small blue star on a green square", "the cat", "x y z"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_vit_b32(tmp_path_factory.mktemp("vitb32"))


def pictures() -> list[Image.Image]:
    rng = np.random.default_rng(3)
    sizes = [(320, 240), (224, 224), (100, 300), (500, 400)]
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def unit(output: object) -> np.ndarray:
    tensor = output if isinstance(output, torch.Tensor) else output.pooler_output  # type: ignore[attr-defined]
    return torch.nn.functional.normalize(tensor.float(), dim=-1).numpy()


def test_vit_b32_matches_transformers_and_ignores_batch_mates(model_dir: Path) -> None:
    encoder = ClipEncoder(str(model_dir))
    assert (encoder.dim, encoder.image_size, encoder.max_text_tokens) == (512, 224, 77)
    model = CLIPModel.from_pretrained(model_dir).eval()
    tokens = AutoTokenizer.from_pretrained(model_dir)(TEXTS, padding=True, return_tensors="pt")
    pixels = CLIPImageProcessorPil.from_pretrained(model_dir)(
        images=pictures(), return_tensors="pt"
    )["pixel_values"]
    with torch.inference_mode():
        text_ref = unit(model.get_text_features(**tokens))
        image_ref = unit(model.get_image_features(pixel_values=pixels))
    texts = encoder.encode_texts(TEXTS)
    images = encoder.encode_pixels([encoder.prepare_image(p) for p in pictures()])
    assert np.sum(texts * text_ref, axis=1).min() >= 0.9999
    assert np.sum(images * image_ref, axis=1).min() >= 0.9999
    singles = np.concatenate([encoder.encode_texts([t]) for t in TEXTS])
    np.testing.assert_allclose(texts, singles, atol=1e-5)
    image_singles = np.concatenate(
        [encoder.encode_pixels([encoder.prepare_image(p)]) for p in pictures()]
    )
    np.testing.assert_allclose(images, image_singles, atol=1e-5)
