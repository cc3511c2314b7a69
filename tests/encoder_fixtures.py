"""Tiny randomly initialised CLIP-style checkpoints for tests (no hub access, ~1 MB, < 1 s).

`make_tiny_clip(dir)` writes a directory that `ClipEncoder(str(dir))` and transformers'
`from_pretrained` load like a real checkpoint: config + safetensors weights, a byte-level
BPE tokenizer and a CLIP image processor (PIL backend).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, SiglipConfig, SiglipModel
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
TINY_CONTEXT = 16
"""Text context length of the tiny models (CLIP's is 77): long-text tests stay cheap."""
TINY_IMAGE_SIZE = 32

# A few merges so that common words become single tokens, as in a real BPE vocabulary.
_MERGES = [("t", "h"), ("th", "e</w>"), ("a", "t</w>"), ("c", "at</w>"), ("o", "g</w>")]


def make_tiny_tokenizer(context: int = TINY_CONTEXT) -> CLIPTokenizer:
    """A CLIP byte-level BPE tokenizer over 256 byte symbols (+ end-of-word forms).

    transformers 5 ignores `vocab_file=`/`merges_file=` here; `vocab=`/`merges=` work.
    """
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in _MERGES] + [BOS, EOS]
    vocab = {token: index for index, token in enumerate(tokens)}
    # The signature says list[str]; a list of pairs is what the BPE model takes.
    merges: Any = list(_MERGES)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=context)


def _tower_sizes() -> dict[str, int]:
    return {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    }


def _tower_configs(tokenizer: CLIPTokenizer) -> tuple[dict[str, int], dict[str, int]]:
    """Text and vision tower configs shared by the tiny CLIP and SigLIP checkpoints."""
    text_config = {
        **_tower_sizes(),
        "vocab_size": len(tokenizer),
        "max_position_embeddings": TINY_CONTEXT,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    return text_config, {**_tower_sizes(), "image_size": TINY_IMAGE_SIZE, "patch_size": 8}


def make_tiny_clip(dir: Path, dim: int = 32, *, seed: int = 0) -> Path:
    """Write a tiny random CLIPModel checkpoint with tokenizer and image processor.

    Args:
        dir: Directory to write (created if missing).
        dim: Projection (embedding) dimension.
        seed: torch seed for the random weights.

    Returns:
        `dir`, loadable with `ClipEncoder(str(dir))`.
    """
    tokenizer = make_tiny_tokenizer()
    text_config, vision_config = _tower_configs(tokenizer)
    config = CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=dim)
    torch.manual_seed(seed)
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": TINY_IMAGE_SIZE},
        crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
    )
    return _save(dir, CLIPModel(config), tokenizer, processor)


def make_tiny_siglip(dir: Path, *, seed: int = 0) -> Path:
    """Write a tiny random SiglipModel checkpoint (CLIP tokenizer, SigLIP processor).

    SigLIP has no projection: the embedding dimension is the towers' hidden size (64).
    """
    tokenizer = make_tiny_tokenizer()
    text_config, vision_config = _tower_configs(tokenizer)
    config = SiglipConfig(text_config=text_config, vision_config=vision_config)
    torch.manual_seed(seed)
    processor = SiglipImageProcessorPil(size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE})
    return _save(dir, SiglipModel(config), tokenizer, processor)


def _save(dir: Path, *parts: Any) -> Path:
    """save_pretrained every part (model, tokenizer, processor) into one directory."""
    dir.mkdir(parents=True, exist_ok=True)
    for part in parts:
        part.save_pretrained(dir)
    return dir
