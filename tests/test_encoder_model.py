"""Unit tests for encoder_service.model.ClipEncoder against transformers itself (the oracle)."""

from __future__ import annotations

import resource
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

import clipsearch
from encoder_service.model import ClipEncoder, resolve_model
from tests.encoder_fixtures import TINY_CONTEXT, make_tiny_clip, make_tiny_siglip

TEXTS = [
    "the cat",
    "a dog on the beach at sunset",
    "x",
    "photograph of a red bicycle leaning on a wall",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("tiny-clip"), dim=32)


@pytest.fixture(scope="module")
def encoder(model_dir: Path) -> ClipEncoder:
    return ClipEncoder(str(model_dir))


@pytest.fixture(scope="module")
def oracle(model_dir: Path) -> tuple[Any, Any, Any]:
    """transformers' own model, tokenizer and processor for the same checkpoint."""
    model = AutoModel.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    processor = AutoImageProcessor.from_pretrained(model_dir, backend="pil")
    return model, tokenizer, processor


def images(count: int = 4) -> list[Image.Image]:
    """Random RGB images of varied sizes and aspect ratios."""
    rng = np.random.default_rng(7)
    sizes = [(40, 30), (32, 32), (50, 64), (33, 45), (120, 80), (20, 20)]
    return [
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in sizes[:count]
    ]


def unit(features: Any) -> np.ndarray:
    """The normalised embedding from a transformers features output (object or tensor)."""
    tensor = features if isinstance(features, torch.Tensor) else features.pooler_output
    return torch.nn.functional.normalize(tensor.float(), dim=-1).detach().numpy()


def assert_same_directions(a: np.ndarray, b: np.ndarray, min_cosine: float = 0.9999) -> None:
    cosines = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cosines.min() >= min_cosine, cosines


def assert_unit_float32(vectors: np.ndarray, rows: int, dim: int) -> None:
    assert vectors.dtype == np.float32
    assert vectors.shape == (rows, dim)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


# --- loading -------------------------------------------------------------------------


def test_reports_what_it_loaded(encoder: ClipEncoder, model_dir: Path) -> None:
    assert encoder.model_id == str(model_dir)
    assert encoder.dim == 32
    assert encoder.max_text_tokens == TINY_CONTEXT


def test_resolve_model_maps_demo_to_the_bundled_directory() -> None:
    expected = Path(clipsearch.__file__).parent / "demo" / "model"
    assert resolve_model("demo") == str(expected)
    assert resolve_model("openai/clip-vit-base-patch32") == "openai/clip-vit-base-patch32"
    assert resolve_model("/models/mine") == "/models/mine"


def test_missing_directory_is_a_runtime_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(RuntimeError, match=f"from_pretrained.*{missing.name}.*does not exist"):
        ClipEncoder(str(missing))


def test_directory_without_a_model_is_a_runtime_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(RuntimeError, match=f"could not load model.*{tmp_path.name}"):
        ClipEncoder(str(tmp_path))


def test_fp16_on_cpu_is_refused_clearly(model_dir: Path) -> None:
    with pytest.raises(ValueError, match="'fp16' needs device 'cuda'"):
        ClipEncoder(str(model_dir), dtype="fp16")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_refused(model_dir: Path) -> None:
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        ClipEncoder(str(model_dir), device="cuda")


# --- parity with transformers ----------------------------------------------------------


def test_text_matches_transformers(encoder: ClipEncoder, oracle: Sequence[Any]) -> None:
    model, tokenizer, _ = oracle
    # The oracle pads to the full context as the original CLIP code does.
    tokens = tokenizer(
        TEXTS, padding="max_length", truncation=True, max_length=TINY_CONTEXT, return_tensors="pt"
    )
    with torch.no_grad():
        expected = unit(model.get_text_features(**tokens))
        forward = model(**tokens, pixel_values=torch.zeros(1, 3, 32, 32)).text_embeds.numpy()
    ours = encoder.encode_texts(TEXTS)
    assert_unit_float32(ours, len(TEXTS), 32)
    assert_same_directions(ours, expected)
    assert_same_directions(ours, forward)


def test_image_matches_transformers(encoder: ClipEncoder, oracle: Sequence[Any]) -> None:
    model, _, processor = oracle
    pictures = images()
    pixels = processor(images=pictures, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = unit(model.get_image_features(pixel_values=pixels))
    ours = encoder.encode_pixels([encoder.prepare_image(p) for p in pictures])
    assert_unit_float32(ours, len(pictures), 32)
    assert_same_directions(ours, expected)


def test_prepare_image_gives_channels_first_float(encoder: ClipEncoder) -> None:
    for size in [(1, 1), (3, 1), (1, 3), (3, 3), (40, 30)]:
        (pixels,) = encoder.prepare_image(Image.new("RGB", size, (200, 30, 30)))
        assert pixels.shape == (3, 32, 32)
        assert pixels.dtype == torch.float32


def test_extreme_aspect_ratio_stays_small_and_keeps_the_centre(encoder: ClipEncoder) -> None:
    # Left third blue, centre red, right third blue: CLIP's centre crop sees only red.
    strip = Image.new("RGB", (3000, 10), (0, 0, 255))
    strip.paste((255, 0, 0), (1000, 0, 2000, 10))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (pixels,) = encoder.prepare_image(Image.new("RGB", (1, 200_000)))
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before < 200
    assert pixels.shape == (3, 32, 32)
    centre = encoder.prepare_image(strip)
    red = encoder.prepare_image(Image.new("RGB", (10, 10), (255, 0, 0)))
    torch.testing.assert_close(centre, red, atol=1e-3, rtol=0)


def test_mild_aspect_crop_matches_processor(encoder: ClipEncoder, oracle: Sequence[Any]) -> None:
    _, _, processor = oracle
    wide = images(5)[4]  # 120x80: inside the 2:1 bound, nothing is cropped beforehand
    expected = processor(images=[wide], return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(encoder.prepare_image(wide), (expected,))


# --- batching and truncation -------------------------------------------------------------


def test_text_batch_equals_singles(encoder: ClipEncoder) -> None:
    batched = encoder.encode_texts(TEXTS)
    singles = np.concatenate([encoder.encode_texts([t]) for t in TEXTS])
    np.testing.assert_allclose(batched, singles, atol=1e-5)


def test_image_batch_equals_singles(encoder: ClipEncoder) -> None:
    pixels = [encoder.prepare_image(p) for p in images(6)]
    batched = encoder.encode_pixels(pixels)
    singles = np.concatenate([encoder.encode_pixels([p]) for p in pixels])
    np.testing.assert_allclose(batched, singles, atol=1e-5)


def test_text_longer_than_the_context_is_truncated(encoder: ClipEncoder) -> None:
    long = "the cat sat on the mat " * 50
    vectors = encoder.encode_texts([long, long + " and then a dog arrived", "the cat"])
    assert_unit_float32(vectors, 3, 32)
    # Both long texts share their first tokens: after truncation they are the same text.
    np.testing.assert_allclose(vectors[0], vectors[1], atol=1e-6)
    assert not np.allclose(vectors[0], vectors[2], atol=1e-3)


def test_empty_batches_give_empty_arrays(encoder: ClipEncoder) -> None:
    assert encoder.encode_texts([]).shape == (0, 32)
    assert encoder.encode_pixels([]).shape == (0, 32)


def test_prepare_image_is_thread_safe(encoder: ClipEncoder) -> None:
    pictures = images(6) * 4
    expected = [encoder.prepare_image(p) for p in pictures]
    results: list[tuple[torch.Tensor, ...] | None] = [None] * len(pictures)

    def work(index: int) -> None:
        results[index] = encoder.prepare_image(pictures[index])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(pictures))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    for got, want in zip(results, expected, strict=True):
        assert got is not None
        torch.testing.assert_close(got, want)


# --- precision and other model families --------------------------------------------------


def test_bf16_is_close_to_fp32(encoder: ClipEncoder, model_dir: Path) -> None:
    half = ClipEncoder(str(model_dir), dtype="bf16")
    assert_unit_float32(half.encode_texts(TEXTS), len(TEXTS), 32)
    assert_same_directions(half.encode_texts(TEXTS), encoder.encode_texts(TEXTS), 0.99)
    pixels = [encoder.prepare_image(p) for p in images()]
    assert_same_directions(half.encode_pixels(pixels), encoder.encode_pixels(pixels), 0.99)


def test_siglip_checkpoint_loads_through_the_auto_classes(tmp_path: Path) -> None:
    directory = make_tiny_siglip(tmp_path)
    siglip = ClipEncoder(str(directory))
    assert siglip.dim == 64
    model = AutoModel.from_pretrained(directory).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    # SigLIP was trained on texts padded to the full context: the oracle does the same.
    tokens = tokenizer(
        TEXTS, padding="max_length", truncation=True, max_length=TINY_CONTEXT, return_tensors="pt"
    )
    with torch.no_grad():
        expected = unit(
            model.get_text_features(
                input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
            )
        )
    assert_same_directions(siglip.encode_texts(TEXTS), expected)
    np.testing.assert_allclose(
        siglip.encode_texts(TEXTS),
        np.concatenate([siglip.encode_texts([t]) for t in TEXTS]),
        atol=1e-5,
    )
    pixels = siglip.prepare_image(Image.new("RGB", (50, 20), (9, 99, 199)))
    assert_unit_float32(siglip.encode_pixels([pixels]), 1, 64)


# --- precision options -----------------------------------------------------------------


def test_int8_is_close_to_fp32_and_says_so(encoder: ClipEncoder, model_dir: Path) -> None:
    quantised = ClipEncoder(str(model_dir), dtype="int8")
    assert quantised.dtype == "int8"
    linears = [m for m in quantised._model.modules() if type(m).__name__ == "Linear"]
    assert linears and all(".quantized.dynamic." in type(m).__module__ for m in linears)
    assert_unit_float32(quantised.encode_texts(TEXTS), len(TEXTS), 32)
    assert_same_directions(quantised.encode_texts(TEXTS), encoder.encode_texts(TEXTS), 0.98)
    pixels = [encoder.prepare_image(p) for p in images()]
    assert_same_directions(quantised.encode_pixels(pixels), encoder.encode_pixels(pixels), 0.98)


def test_int8_on_cuda_and_unknown_dtypes_are_refused() -> None:
    from encoder_service.model import _check_dtype

    with pytest.raises(ValueError, match="'int8' .* runs on cpu"):
        _check_dtype("int8", "cuda")
    with pytest.raises(ValueError, match="dtype must be one of"):
        _check_dtype("fp8", "cpu")


# --- long texts ----------------------------------------------------------------------------

LONG = " ".join(f"word{i} the cat" for i in range(30))


def test_sliding_window_is_the_normalised_mean_of_its_windows(
    encoder: ClipEncoder, oracle: Sequence[Any]
) -> None:
    model, tokenizer, _ = oracle
    rows = encoder.prepare_text(LONG, "sliding_window")
    assert len(rows) >= 3
    batch = tokenizer.pad({"input_ids": rows}, padding="max_length", return_tensors="pt")
    with torch.no_grad():
        windows = unit(model.get_text_features(**batch))
    mean = windows.mean(axis=0)
    expected = mean / np.linalg.norm(mean)
    ours = encoder.encode_texts([LONG], "sliding_window")[0]
    assert float(ours @ expected) >= 0.9999
    truncated = encoder.encode_texts([LONG], "truncate")[0]
    assert float(ours @ truncated) < 0.9999  # the later windows changed the vector


def test_long_and_short_texts_batch_like_singles(encoder: ClipEncoder) -> None:
    texts = [LONG, "the cat", LONG + " and a dog", "x"]
    batched = encoder.encode_texts(texts, "sliding_window")
    singles = np.concatenate([encoder.encode_texts([t], "sliding_window") for t in texts])
    np.testing.assert_allclose(batched, singles, atol=1e-5)


def test_reject_refuses_only_texts_over_the_context(encoder: ClipEncoder) -> None:
    from clipsearch.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match=f"over the model's context of {TINY_CONTEXT}"):
        encoder.encode_texts([LONG], "reject")
    np.testing.assert_allclose(
        encoder.encode_texts(["the cat"], "reject"), encoder.encode_texts(["the cat"]), atol=1e-6
    )


# --- multi-scale images --------------------------------------------------------------------


def test_multiscale_fuses_the_model_and_the_larger_resolution(
    model_dir: Path, oracle: Sequence[Any]
) -> None:
    model, _, processor = oracle
    fused = ClipEncoder(str(model_dir), multiscale_sizes=[48, 32, 48])
    assert fused.scales == (32, 48)
    pictures = images()
    base = processor(images=pictures, return_tensors="pt")["pixel_values"]
    large = processor(
        images=pictures,
        size={"shortest_edge": 48},
        crop_size={"height": 48, "width": 48},
        return_tensors="pt",
    )["pixel_values"]
    with torch.no_grad():
        small_vecs = unit(model.get_image_features(pixel_values=base))
        large_vecs = unit(
            model.get_image_features(pixel_values=large, interpolate_pos_encoding=True)
        )
    mean = small_vecs + large_vecs
    expected = mean / np.linalg.norm(mean, axis=1, keepdims=True)
    ours = fused.encode_pixels([fused.prepare_image(p) for p in pictures])
    assert_unit_float32(ours, len(pictures), 32)
    assert_same_directions(ours, expected)
    assert not np.allclose(ours, small_vecs, atol=1e-3)


def test_multiscale_sizes_must_be_positive(model_dir: Path) -> None:
    with pytest.raises(ValueError, match="multiscale_sizes must be positive"):
        ClipEncoder(str(model_dir), multiscale_sizes=[0])


def test_reports_its_resolution_and_context(encoder: ClipEncoder) -> None:
    assert (encoder.image_size, encoder.max_text_tokens) == (32, TINY_CONTEXT)
    assert (encoder.device, encoder.dtype, encoder.scales) == ("cpu", "fp32", (32,))


# --- reducing_gap ----------------------------------------------------------------------------


def smooth_photo(width: int, height: int) -> Image.Image:
    """Gradients and a block: the kind of picture a box pre-shrink barely changes (noise
    would alias, which no resampler keeps)."""
    x = np.linspace(0, 255, width, dtype=np.float32)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    pixels = np.stack([x + 0 * y, y + 0 * x, 255 - (x + y) / 2], axis=-1)
    pixels[height // 3 : height // 2, width // 5 : width // 2] = (250, 30, 30)
    return Image.fromarray(pixels.astype(np.uint8))


def test_reducing_gap_shrinks_large_images_close_to_the_exact_path(
    encoder: ClipEncoder, model_dir: Path
) -> None:
    quick = ClipEncoder(str(model_dir), reducing_gap=2, multiscale_sizes=[48])
    exact = ClipEncoder(str(model_dir), multiscale_sizes=[48])
    assert (encoder.min_image_side, quick.min_image_side) == (0, 96)
    pictures = [smooth_photo(640, 480), smooth_photo(480, 1000)]
    fast_pixels = [quick.prepare_image(p) for p in pictures]
    exact_pixels = [exact.prepare_image(p) for p in pictures]
    for fast, slow in zip(fast_pixels, exact_pixels, strict=True):
        for a, b in zip(fast, slow, strict=True):  # each scale
            assert a.shape == b.shape
            assert not torch.equal(a, b)  # the pre-shrink ran
            assert float((a - b).abs().mean()) < 0.02  # ~1 level in 255, normalised
    assert_same_directions(quick.encode_pixels(fast_pixels), exact.encode_pixels(exact_pixels))


def test_reducing_gap_leaves_images_under_twice_its_side_exact(model_dir: Path) -> None:
    quick = ClipEncoder(str(model_dir), reducing_gap=2)
    exact = ClipEncoder(str(model_dir))
    for picture in [*images(6), smooth_photo(127, 300)]:  # short sides < 2 x 64
        for a, b in zip(quick.prepare_image(picture), exact.prepare_image(picture), strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("gap", [0.5, -1, float("nan")])
def test_reducing_gap_is_off_or_at_least_one(model_dir: Path, gap: float) -> None:
    with pytest.raises(ValueError, match="reducing_gap must be"):
        ClipEncoder(str(model_dir), reducing_gap=gap)
