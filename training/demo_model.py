"""Train and save the tiny CLIP demo model shipped in ``clipsearch/demo/model``.

Usage (from the repository root)::

    make demo-model     # = clipsearch finetune --generated --init fresh --seed 0 ...
    python -m training.demo_model --out clipsearch/demo/model --seed 0

The output directory holds exactly what ``save_pretrained`` writes for
``CLIPModel`` (config.json, model.safetensors), ``CLIPTokenizer`` (tokenizer.json,
tokenizer_config.json) and ``CLIPImageProcessor`` (preprocessor_config.json), plus
``demo_metrics.json``.  It loads with the same ``from_pretrained`` calls as a hub
checkpoint such as ``openai/clip-vit-base-patch32``.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPTokenizer
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from training.tokenizer import MAX_TEXT_LENGTH

IMAGE_SIZE = 64
# 16 px patches (4 x 4 grid): far cheaper than 8 px on CPU and it learned shapes faster here.
PATCH = 16
HIDDEN = 128
LAYERS = 3
HEADS = 4
PROJECTION_DIM = 128


def demo_config(
    tokenizer: CLIPTokenizer,
    image_size: int = IMAGE_SIZE,
    hidden: int = HIDDEN,
    layers: int = LAYERS,
) -> CLIPConfig:
    """Tiny CLIP: ViT 64px/16px patches and a causal text transformer over 32 tokens.

    Smaller sizes (for fast tests) keep the same layout; the projection stays 128-d.
    """
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": HEADS,
        "max_position_embeddings": MAX_TEXT_LENGTH,
        "projection_dim": PROJECTION_DIM,
        # CLIP pools the text at the first eos_token_id; pad == eos is therefore harmless.
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision = {
        "image_size": image_size,
        "patch_size": PATCH,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": HEADS,
        "projection_dim": PROJECTION_DIM,
    }
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=PROJECTION_DIM)


def demo_image_processor(image_size: int = IMAGE_SIZE) -> CLIPImageProcessor:
    """Resize (shortest edge) + centre-crop to 64 px, CLIP mean/std."""
    return CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": image_size},
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


DEMO_MODEL_COMMAND = (
    "finetune --generated --init fresh --steps 1000 --seed {seed} --threads 2 "
    "--out {out} --checkpoint-dir build/demo-model-checkpoint"
)
"""The `clipsearch` command that builds the bundled model (`make demo-model` runs it)."""


def main(argv: list[str] | None = None) -> None:
    """`python -m training.demo_model [--out DIR] [--seed N]`: the same as `make demo-model`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("clipsearch/demo/model"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from clipsearch.cli import main as clipsearch

    clipsearch(DEMO_MODEL_COMMAND.format(seed=args.seed, out=args.out).split())


if __name__ == "__main__":
    main()
