"""Tests for the generated demo data, the demo tokenizer, the shipped demo CLIP model and
the contrastive training code.  No network, no Ray; CPU only."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipsearch.demo.scenes import (
    BACKGROUNDS,
    COLORS,
    HELDOUT_SEED,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    random_scenes,
    render,
    render_png,
)

MODEL_DIR = Path(__file__).resolve().parents[1] / "clipsearch" / "demo" / "model"


# ----------------------------------------------------------------------------- scenes


def test_random_scenes_are_deterministic_per_seed() -> None:
    assert random_scenes(60, seed=3) == random_scenes(60, seed=3)
    assert random_scenes(60, seed=3) != random_scenes(60, seed=4)
    assert len(random_scenes(7, seed=0)) == 7
    assert random_scenes(0, seed=0) == []


def test_scene_attributes_are_valid_and_stratified() -> None:
    scenes = random_scenes(240, seed=HELDOUT_SEED)
    for s in scenes:
        assert s.color in COLORS and s.shape in SHAPES and s.size in SIZES
        assert s.position in POSITIONS and s.background in BACKGROUNDS
    counts = {(c, sh): 0 for c in COLORS for sh in SHAPES}
    for s in scenes:
        counts[(s.color, s.shape)] += 1
    assert set(counts.values()) == {240 // len(counts)}
    assert not set(COLORS) & set(BACKGROUNDS)


def test_captions_match_attributes() -> None:
    scene = Scene("red", "circle", "small", "top left", "white")
    assert scene.caption == "a small red circle at the top left on a white background"
    centred = Scene("blue", "star", "large", "center", "black")
    assert centred.caption == "a large blue star in the center on a black background"
    for s in random_scenes(50, seed=1):
        words = s.caption.split()
        assert words[:4] == ["a", s.size, s.color, s.shape]
        assert s.position in s.caption and f"on a {s.background} background" in s.caption


def test_render_is_deterministic_rgb_and_draws_the_colour() -> None:
    scene = Scene("red", "square", "large", "center", "white")
    image = render(scene, size=64, seed=5)
    assert image.mode == "RGB" and image.size == (64, 64)
    assert render(scene, seed=5).tobytes() == image.tobytes()
    assert render(scene, seed=6).tobytes() != image.tobytes()
    pixels = np.asarray(render(scene), dtype=int)
    assert pixels[32, 32, 0] > 180 and pixels[32, 32, 1] < 80  # red shape in the centre
    assert pixels[2, 2].min() > 230  # white background in the corner
    assert render(scene, size=128).size == (128, 128)


def test_render_png_roundtrips() -> None:
    scene = Scene("green", "triangle", "small", "bottom right", "gray")
    data = render_png(scene, seed=1)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    decoded = Image.open(io.BytesIO(data)).convert("RGB")
    assert decoded.tobytes() == render(scene, seed=1).tobytes()


# ----------------------------------------------------------------------------- tokenizer


def test_bytes_to_unicode_is_a_printable_bijection() -> None:
    from training.tokenizer import bytes_to_unicode

    mapping = bytes_to_unicode()
    assert sorted(mapping) == list(range(256))
    assert len(set(mapping.values())) == 256
    assert mapping[ord("a")] == "a" and mapping[ord(" ")] == "Ġ"
    assert all(ch.isprintable() for ch in mapping.values())


@pytest.fixture(scope="module")
def tokenizer():
    from training.tokenizer import build_tokenizer

    return build_tokenizer()


def test_tokenizer_roundtrips_through_save_and_load(tokenizer, tmp_path: Path) -> None:
    from transformers import AutoTokenizer, CLIPTokenizer

    tokenizer.save_pretrained(tmp_path)
    texts = [s.caption for s in random_scenes(30, seed=2)] + [
        "a red circle",
        "zebra ünïcode 123",
        "Hello, World!",
    ]
    expected = tokenizer(texts, padding="max_length", max_length=32, truncation=True)["input_ids"]
    for loaded in (
        CLIPTokenizer.from_pretrained(tmp_path),
        AutoTokenizer.from_pretrained(tmp_path),
    ):
        assert len(loaded) == len(tokenizer) > 256 * 2
        assert (
            loaded(texts, padding="max_length", max_length=32, truncation=True)["input_ids"]
            == expected
        )
        assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (
            tokenizer.bos_token_id,
            tokenizer.eos_token_id,
            tokenizer.pad_token_id,
        )


def test_every_caption_word_is_one_token(tokenizer) -> None:
    from training.tokenizer import caption_words

    for word in caption_words():
        ids = tokenizer(word)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert tokenizer.convert_ids_to_tokens(ids[1:-1]) == [word + "</w>"], word
    caption = "a small red circle at the top left on a white background"
    assert len(tokenizer(caption)["input_ids"]) == len(caption.split()) + 2
    assert tokenizer.decode(tokenizer(caption)["input_ids"], skip_special_tokens=True) == caption


def test_unknown_text_uses_byte_fallback(tokenizer) -> None:
    ids = tokenizer("zebra ünïcode 123 🦓")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.eos_token_id not in ids[1:-1]  # unk == eos would break EOS pooling
    assert len(ids) > 8
    assert tokenizer.decode(ids, skip_special_tokens=True).startswith("zebra ünïcode")


def test_eos_is_last_id_and_long_text_is_truncated_to_32(tokenizer) -> None:
    assert tokenizer.eos_token_id == len(tokenizer) - 1
    ids = tokenizer("word " * 100, truncation=True)["input_ids"]
    assert len(ids) == 32 and ids[-1] == tokenizer.eos_token_id


# ----------------------------------------------------------------------------- shipped model


@pytest.fixture(scope="module")
def shipped():
    from training.contrastive import load_demo

    assert (MODEL_DIR / "model.safetensors").is_file(), "run: python -m training.demo_model"
    return load_demo(MODEL_DIR)


def test_shipped_model_files_are_small_and_consistent(shipped) -> None:
    model, tokenizer, processor = shipped
    total = sum(p.stat().st_size for p in MODEL_DIR.iterdir() if p.is_file())
    assert total < 6.5 * 1024 * 1024
    text_config = model.config.text_config
    assert text_config.eos_token_id == tokenizer.eos_token_id
    assert text_config.bos_token_id == tokenizer.bos_token_id
    assert text_config.vocab_size == len(tokenizer)
    assert text_config.max_position_embeddings == tokenizer.model_max_length == 32
    image_size = model.config.vision_config.image_size
    assert processor.crop_size == {"height": image_size, "width": image_size}
    metrics = json.loads((MODEL_DIR / "demo_metrics.json").read_text())
    assert metrics["precision_at_10_after"] >= 0.9 > metrics["precision_at_10_before"]


def test_shipped_model_retrieves_held_out_scenes(shipped) -> None:
    from training.contrastive import attribute_precision_at_10

    # HELDOUT_SEED + 1: a seed neither training nor the training-time evaluation used.
    precision = attribute_precision_at_10(shipped, n_scenes=360, seed=HELDOUT_SEED + 1)
    assert precision >= 0.9


def test_shipped_model_handles_larger_images_and_padding(shipped) -> None:
    from training.contrastive import encode_images, encode_texts

    model, tokenizer, _ = shipped
    scenes = random_scenes(48, seed=HELDOUT_SEED + 2)
    big = [render(s, size=160, seed=i) for i, s in enumerate(scenes)]  # resized by the processor
    queries = [(c, s) for c in COLORS for s in SHAPES]
    text = encode_texts(shipped, [f"a {c} {s}" for c, s in queries])
    best = (encode_images(shipped, big) @ text.t()).argmax(dim=1).tolist()
    correct = np.mean([queries[b] == (s.color, s.shape) for b, s in zip(best, scenes, strict=True)])
    assert correct >= 0.8
    # EOS pooling makes the text embedding independent of the padding strategy.
    from training.contrastive import text_embeddings

    texts = ["a red circle", scenes[0].caption]
    with torch.no_grad():
        longest = text_embeddings(model, **tokenizer(texts, padding=True, return_tensors="pt"))
        fixed = text_embeddings(
            model, **tokenizer(texts, padding="max_length", max_length=32, return_tensors="pt")
        )
    assert torch.allclose(longest, fixed, atol=1e-5)


# ----------------------------------------------------------------------------- training code


def test_clip_loss_prefers_aligned_embeddings() -> None:
    from training.contrastive import clip_loss

    torch.manual_seed(0)
    emb = torch.randn(8, 16)
    scale = torch.tensor(np.log(1 / 0.07), dtype=torch.float32)
    aligned = clip_loss(emb, emb.clone(), scale)
    shuffled = clip_loss(emb, emb[torch.randperm(8)], scale)
    assert aligned < 0.1 < shuffled
    # two identical texts that are both positives for both images: no penalty for confusing them
    pair = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    positives = torch.ones(2, 2, dtype=torch.bool)
    assert clip_loss(pair, pair, scale, positives) == pytest.approx(np.log(2), abs=1e-4)


def test_partial_captions_and_positives() -> None:
    from training.contrastive import PartialCaption, positives_matrix

    red_circle = PartialCaption(color="red", shape="circle")
    assert red_circle.text == "a red circle"
    scenes = [
        Scene("red", "circle", "small", "center", "white"),
        Scene("red", "square", "small", "center", "white"),
    ]
    full = PartialCaption(
        **{a: getattr(scenes[1], a) for a in ("size", "color", "shape", "position", "background")}
    )
    assert full.text == scenes[1].caption
    assert positives_matrix([red_circle, full], scenes).tolist() == [[True, False], [False, True]]


def test_short_training_run_lowers_contrastive_loss(tokenizer) -> None:
    from transformers import CLIPModel

    from training import contrastive
    from training.demo_model import demo_config, demo_image_processor, seed_everything

    seed_everything(0)
    processor = demo_image_processor()
    model = CLIPModel(demo_config(tokenizer))
    cfg = contrastive.TrainConfig(steps=40, batch_size=24, lr=1e-3, warmup_steps=5, log_every=0)
    held_out = contrastive.make_batch(
        9_999, cfg, tokenizer, processor.image_mean, processor.image_std
    )

    def loss() -> float:
        model.eval()
        with torch.no_grad():
            return contrastive.batch_loss(model, held_out).item()

    before = loss()
    losses = contrastive.train(model, tokenizer, processor, cfg, log=lambda _: None)
    assert len(losses) == 40 and all(np.isfinite(losses))
    assert loss() < before - 0.3
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
