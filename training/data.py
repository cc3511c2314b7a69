"""What `clipsearch finetune` trains and validates on: image–caption pairs from a dataset
on disk (split by image, shuffled per epoch from the seed), or generated demo scenes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from clipsearch.datasets import Item
from clipsearch.demo import scenes as sc
from training import contrastive
from training.config import FinetuneConfig


@dataclass
class Split:
    """Validation images with their captions, every caption a query (see clipsearch.recall)."""

    images: list[Image.Image]
    image_captions: list[tuple[str, ...]]
    texts: list[str]


def split_items(items: list[Item], cfg: FinetuneConfig) -> tuple[list[Item], list[Item]]:
    """Karpathy-style `split` fields when present, else a seeded random split by image."""
    if any(item.split in ("val", "test") for item in items):
        val = [i for i in items if i.split == "val"] or [i for i in items if i.split == "test"]
        return [i for i in items if i.split in ("", "train", "restval")], val
    order = np.random.default_rng([cfg.seed, 7]).permutation(len(items))
    n_val = max(1, round(len(items) * cfg.val_fraction))
    val_set = set(order[:n_val].tolist())
    train = [it for n, it in enumerate(items) if n not in val_set]
    return train, [it for n, it in enumerate(items) if n in val_set]


def load_image(item: Item) -> Image.Image:
    with Image.open(item.image_path) as image:  # type: ignore[arg-type]
        return image.convert("RGB")


def val_split_of(items: list[Item], limit: int) -> Split:
    items = items[:limit]
    texts = [t for item in items for t in item.texts]
    return Split([load_image(i) for i in items], [i.texts for i in items], texts)


def generated_val_split(n: int) -> Split:
    scenes = sc.random_scenes(n, sc.HELDOUT_SEED)
    images = [sc.render(s, seed=sc.render_seed(sc.HELDOUT_SEED, i)) for i, s in enumerate(scenes)]
    captions = [s.caption for s in scenes]
    return Split(images, [(c,) for c in captions], captions)


class PairBatches:
    """Per-epoch shuffled (image, caption) pairs; batch `step` is a pure function of the seed."""

    def __init__(self, items: list[Item], objects: contrastive.DemoObjects, cfg: FinetuneConfig):
        self.items = items
        self.pairs = [(n, t) for n, item in enumerate(items) for t in item.texts]
        if len(self.pairs) < 2:
            raise ValueError("fine-tuning needs at least two training pairs")
        self.batch_size = min(cfg.batch_size, len(self.pairs))
        self.per_epoch = len(self.pairs) // self.batch_size
        self.seed = cfg.seed
        _, self.tokenizer, self.processor = objects
        self._pixels: dict[int, torch.Tensor] = {}  # preprocessed once per image

    def pixels(self, numbers: list[int]) -> torch.Tensor:
        missing = sorted({n for n in numbers if n not in self._pixels})
        if missing:
            images = [load_image(self.items[n]) for n in missing]
            values = self.processor(images=images, return_tensors="pt")["pixel_values"]
            self._pixels.update(zip(missing, values, strict=True))
        return torch.stack([self._pixels[n] for n in numbers])

    def __call__(self, step: int) -> dict[str, Any]:
        epoch, index = divmod(step, self.per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.pairs))
        chosen = [self.pairs[i] for i in order[index * self.batch_size :][: self.batch_size]]
        captions = [t for _, t in chosen]
        groups = np.asarray([n for n, _ in chosen])
        texts = np.asarray(captions, dtype=object)
        positives = (groups[:, None] == groups[None, :]) | (texts[:, None] == texts[None, :])
        pixel_values = self.pixels([n for n, _ in chosen])
        view = {
            **contrastive.tokenize(self.tokenizer, captions),
            "positives": torch.from_numpy(positives.astype(bool)),
        }
        return {"pixel_values": pixel_values, "views": [view]}


def generated_batches(objects: contrastive.DemoObjects, tcfg: contrastive.TrainConfig) -> Any:
    _, tokenizer, processor = objects

    def batch(step: int) -> dict[str, Any]:
        return contrastive.make_batch(
            step, tcfg, tokenizer, processor.image_mean, processor.image_std
        )

    return batch
