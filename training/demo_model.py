"""Train and save the tiny CLIP demo model shipped in ``clipsearch/demo/model``.

Usage (from the repository root)::

    python -m training.demo_model --out clipsearch/demo/model --seed 0 [--steps N]

The output directory holds exactly what ``save_pretrained`` writes for
``CLIPModel`` (config.json, model.safetensors), ``CLIPTokenizer`` (tokenizer.json,
tokenizer_config.json) and ``CLIPImageProcessor`` (preprocessor_config.json), plus
``demo_metrics.json``.  It loads with the same ``from_pretrained`` calls as a hub
checkpoint such as ``openai/clip-vit-base-patch32``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from clipsearch.demo import scenes
from training import contrastive
from training.tokenizer import MAX_TEXT_LENGTH, build_tokenizer

IMAGE_SIZE = 64
# 16 px patches (4 x 4 grid): far cheaper than 8 px on CPU and it learned shapes faster here.
PATCH = 16
HIDDEN = 128
LAYERS = 3
HEADS = 4
MLP = 256
PROJECTION_DIM = 128


def demo_config(tokenizer: CLIPTokenizer) -> CLIPConfig:
    """Tiny CLIP: ViT 64px/16px patches and a causal text transformer over 32 tokens."""
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": HIDDEN,
        "intermediate_size": MLP,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "max_position_embeddings": MAX_TEXT_LENGTH,
        "projection_dim": PROJECTION_DIM,
        # CLIP pools the text at the first eos_token_id; pad == eos is therefore harmless.
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision = {
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH,
        "hidden_size": HIDDEN,
        "intermediate_size": MLP,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "projection_dim": PROJECTION_DIM,
    }
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=PROJECTION_DIM)


def demo_image_processor() -> CLIPImageProcessor:
    """Resize (shortest edge) + centre-crop to 64 px, CLIP mean/std."""
    return CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": IMAGE_SIZE},
        do_center_crop=True,
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_and_train(
    seed: int, cfg: contrastive.TrainConfig, eval_scenes: int = 480
) -> tuple[contrastive.DemoObjects, dict[str, float | int]]:
    """Fresh seeded model, trained; returns the objects and the metrics dict."""
    seed_everything(seed)
    tokenizer, processor = build_tokenizer(), demo_image_processor()
    model = CLIPModel(demo_config(tokenizer))
    model.eval()
    objects = (model, tokenizer, processor)
    before = contrastive.attribute_precision_at_10(objects, eval_scenes, scenes.HELDOUT_SEED)
    print(f"held-out attribute precision@10 before training: {before:.4f}", flush=True)
    start = time.perf_counter()
    contrastive.train(model, tokenizer, processor, cfg, log=lambda m: print(m, flush=True))
    seconds = time.perf_counter() - start
    after = contrastive.attribute_precision_at_10(objects, eval_scenes, scenes.HELDOUT_SEED)
    print(
        f"held-out attribute precision@10 after training: {after:.4f} ({seconds:.0f}s)", flush=True
    )
    metrics = {
        "seed": seed,
        "steps": cfg.steps,
        "precision_at_10_before": round(before, 4),
        "precision_at_10_after": round(after, 4),
        "train_seconds": round(seconds, 1),
    }
    return objects, metrics


def save(objects: contrastive.DemoObjects, metrics: dict[str, float | int], out: Path) -> None:
    model, tokenizer, processor = objects
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "demo_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("clipsearch/demo/model"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=contrastive.TrainConfig.steps)
    parser.add_argument("--batch-size", type=int, default=contrastive.TrainConfig.batch_size)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = contrastive.TrainConfig(steps=args.steps, batch_size=args.batch_size)
    objects, metrics = build_and_train(args.seed, cfg)
    save(objects, metrics, args.out)
    print(json.dumps(metrics), flush=True)


if __name__ == "__main__":
    main()
