"""Contrastive (CLIP-style) training on generated scenes, and the retrieval metric.

* :func:`clip_loss` — symmetric InfoNCE over L2-normalised image/text embeddings,
  scaled by the model's learnable temperature ``logit_scale``.  It accepts a
  boolean ``positives`` matrix so that a partial caption ("a red circle") counts
  every matching image in the batch as a positive instead of a false negative.
* :func:`train` — AdamW, linear warmup + linear decay, gradient clipping, one
  freshly generated batch per step (scene-set seed = step, see
  :mod:`clipsearch.demo.scenes` for the seed convention).  Each batch's images are
  paired with several caption "views" (a random attribute subset / the full caption,
  "a {color} {shape}", "a {shape}"); the loss is the mean over views.
* :func:`attribute_precision_at_10` — held-out text->image precision@10 for all
  colour x shape queries ``"a {color} {shape}"``.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

from clipsearch.demo import scenes as sc

ATTRIBUTES: tuple[str, ...] = ("size", "color", "shape", "position", "background")
LOGIT_SCALE_MAX = math.log(100.0)

DemoObjects = tuple[CLIPModel, CLIPTokenizer, CLIPImageProcessor]


# ----------------------------------------------------------------------------- captions


@dataclass(frozen=True)
class PartialCaption:
    """A caption naming a subset of a scene's attributes (``None`` = not mentioned)."""

    size: str | None = None
    color: str | None = None
    shape: str | None = None
    position: str | None = None
    background: str | None = None

    @property
    def text(self) -> str:
        words = ["a", self.size, self.color, self.shape or "shape"]
        if self.position is not None:
            words.append(
                "in the center" if self.position == "center" else f"at the {self.position}"
            )
        if self.background is not None:
            words.append(f"on a {self.background} background")
        return " ".join(w for w in words if w)

    def matches(self, scene: sc.Scene) -> bool:
        return all(getattr(self, a) in (None, getattr(scene, a)) for a in ATTRIBUTES)


def sample_caption(
    scene: sc.Scene, rng: np.random.Generator, p_full: float = 0.35
) -> PartialCaption:
    """The full caption with probability ``p_full``, else a random subset of attributes.

    Colour and shape are usually kept (at least one always is); size, position and
    background are mentioned less often, so short queries like "a red circle" are common.
    """
    if rng.random() < p_full:
        return PartialCaption(**{a: getattr(scene, a) for a in ATTRIBUTES})
    keep_p = {"size": 0.3, "color": 0.85, "shape": 0.85, "position": 0.3, "background": 0.3}
    keep = {a: bool(rng.random() < keep_p[a]) for a in ATTRIBUTES}
    if not (keep["color"] or keep["shape"]):
        keep["color"] = True
    return PartialCaption(**{a: getattr(scene, a) if keep[a] else None for a in ATTRIBUTES})


CAPTION_VIEWS: dict[str, tuple[str, ...]] = {
    "full": ATTRIBUTES,
    "color_shape": ("color", "shape"),
    "shape": ("shape",),
    "color": ("color",),
}


def view_caption(
    view: str, scene: sc.Scene, rng: np.random.Generator, p_full: float
) -> PartialCaption:
    """Caption of ``scene`` for one text view: ``"random"`` (:func:`sample_caption`) or a
    fixed attribute subset from :data:`CAPTION_VIEWS`."""
    if view == "random":
        return sample_caption(scene, rng, p_full)
    return PartialCaption(**{a: getattr(scene, a) for a in CAPTION_VIEWS[view]})


def positives_matrix(
    captions: Sequence[PartialCaption], scenes: Sequence[sc.Scene]
) -> torch.Tensor:
    """``[n_text, n_image]`` bool matrix: caption ``i`` describes scene ``j``."""
    result = torch.ones(len(captions), len(scenes), dtype=torch.bool)
    for attribute in ATTRIBUTES:
        wanted = np.array([getattr(c, attribute) or "" for c in captions], dtype=object)[:, None]
        actual = np.array([getattr(s, attribute) for s in scenes], dtype=object)[None, :]
        result &= torch.from_numpy((wanted == "") | (wanted == actual))
    return result


# ----------------------------------------------------------------------------- encoding


def _embedding(output: Any) -> torch.Tensor:
    """transformers 5 returns an output object (embedding in ``pooler_output``); 4.x a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def image_embeddings(model: CLIPModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected (not normalised) image embeddings."""
    return _embedding(model.get_image_features(pixel_values=pixel_values))


def text_embeddings(
    model: CLIPModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Projected (not normalised) text embeddings."""
    return _embedding(model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


def pixels(
    images: Sequence[Image.Image], mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """Fast path equal to ``CLIPImageProcessor`` for images already at the model's size."""
    array: np.ndarray = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    array = array / 255.0
    array = (array - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(array.transpose(0, 3, 1, 2).copy())


def tokenize(tokenizer: CLIPTokenizer, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    return dict(tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt"))


# ----------------------------------------------------------------------------- loss


def clip_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    positives: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE; ``positives[i, j]`` marks text i / image j pairs (default: diagonal)."""
    image_embeds = torch.nn.functional.normalize(image_embeds, dim=-1)
    text_embeds = torch.nn.functional.normalize(text_embeds, dim=-1)
    logits = logit_scale.exp() * text_embeds @ image_embeds.t()
    if positives is None:
        positives = torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device)
    targets = positives.to(logits.dtype)
    text_to_image = (
        -(targets / targets.sum(1, keepdim=True) * logits.log_softmax(dim=1)).sum(1).mean()
    )
    image_to_text = (
        -(targets.t() / targets.t().sum(1, keepdim=True) * logits.t().log_softmax(dim=1))
        .sum(1)
        .mean()
    )
    return (text_to_image + image_to_text) / 2


# ----------------------------------------------------------------------------- training


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    grad_clip: float = 1.0
    image_size: int = 64
    log_every: int = 50
    p_full_caption: float = 0.35
    # Every batch pairs its images with one caption per view; the loss averages the views
    # (text encoding is cheap next to images, so extra views add signal almost for free).
    caption_views: tuple[str, ...] = ("random", "color_shape", "shape")
    # Weight of the modality-alignment (mean-matching) term; 0 leaves the loss pure InfoNCE.
    align_weight: float = 0.0


def batch_scenes(step: int, cfg: TrainConfig) -> tuple[list[sc.Scene], list[int]]:
    """Scenes of training batch ``step`` and their render seeds (scene-set seed step % 10_000)."""
    set_seed = sc.TRAIN_SEEDS[step % len(sc.TRAIN_SEEDS)]
    scenes = sc.random_scenes(cfg.batch_size, seed=set_seed)
    return scenes, [sc.render_seed(set_seed, i) for i in range(len(scenes))]


TextView = dict[str, torch.Tensor]


def make_batch(
    step: int,
    cfg: TrainConfig,
    tokenizer: CLIPTokenizer,
    mean: Sequence[float],
    std: Sequence[float],
) -> dict[str, Any]:
    """Pixels plus, per caption view, tokens and the text/image positives matrix."""
    scenes, seeds = batch_scenes(step, cfg)
    images = [
        sc.render(s, cfg.image_size, seed=seed) for s, seed in zip(scenes, seeds, strict=True)
    ]
    rng = np.random.default_rng([step, 1])
    views: list[TextView] = []
    for view in cfg.caption_views:
        captions = [view_caption(view, s, rng, cfg.p_full_caption) for s in scenes]
        text = tokenize(tokenizer, [c.text for c in captions])
        views.append({**text, "positives": positives_matrix(captions, scenes)})
    return {"pixel_values": pixels(images, mean, std), "views": views}


def alignment_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Squared distance between the mean normalised image and the mean normalised text.

    CLIP-style models keep images and texts in two separate cones of the sphere (the
    "modality gap"); pulling the two means together narrows it.
    """
    image_mean = torch.nn.functional.normalize(image_embeds, dim=-1).mean(0)
    text_mean = torch.nn.functional.normalize(text_embeds, dim=-1).mean(0)
    return (image_mean - text_mean).pow(2).sum()


def batch_loss(model: CLIPModel, batch: dict[str, Any], align_weight: float = 0.0) -> torch.Tensor:
    """Mean over caption views of :func:`clip_loss` (images are encoded once), plus
    ``align_weight`` x :func:`alignment_loss` when the weight is positive."""
    image = image_embeddings(model, batch["pixel_values"])
    losses = []
    for v in batch["views"]:
        text = text_embeddings(model, v["input_ids"], v["attention_mask"])
        loss = clip_loss(image, text, model.logit_scale, v["positives"])
        if align_weight > 0:
            loss = loss + align_weight * alignment_loss(image, text)
        losses.append(loss)
    return torch.stack(losses).mean()


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW (no decay on 1-D params: biases, norms, class embedding, logit_scale), warmup/decay."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        return max(0.0, (cfg.steps - step) / max(1, cfg.steps - cfg.warmup_steps))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def optimisation_step(
    model: CLIPModel,
    batch: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    cfg: TrainConfig,
    amp_dtype: torch.dtype | None = None,
) -> float:
    """One AdamW step on ``batch`` (gradient clipping, schedule, temperature clamp); the loss.

    ``amp_dtype`` (e.g. ``torch.bfloat16``) runs the forward pass under autocast on the
    model's device; None keeps full precision.
    """
    autocast = (
        torch.autocast(model.device.type, dtype=amp_dtype)
        if amp_dtype is not None
        else contextlib.nullcontext()
    )
    with autocast:
        loss = batch_loss(model, batch, cfg.align_weight)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    scheduler.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0.0, LOGIT_SCALE_MAX)
    return loss.item()


def train(
    model: CLIPModel,
    tokenizer: CLIPTokenizer,
    processor: CLIPImageProcessor,
    cfg: TrainConfig,
    log: Callable[[str], None] = print,
) -> list[float]:
    """Run ``cfg.steps`` optimisation steps; returns the per-step training loss."""
    optimizer, scheduler = make_optimizer(model, cfg)
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(cfg.steps):
        batch = make_batch(step, cfg, tokenizer, processor.image_mean, processor.image_std)
        losses.append(optimisation_step(model, batch, optimizer, scheduler, cfg))
        if cfg.log_every and (step + 1) % cfg.log_every == 0:
            recent = sum(losses[-cfg.log_every :]) / len(losses[-cfg.log_every :])
            log(
                f"step {step + 1}/{cfg.steps} loss {recent:.4f} "
                f"temp {model.logit_scale.exp().item():.1f} lr {scheduler.get_last_lr()[0]:.2e} "
                f"{time.perf_counter() - start:.0f}s"
            )
    model.eval()
    return losses


# ----------------------------------------------------------------------------- evaluation


def load_demo(model_dir: str | Path) -> DemoObjects:
    """Load model, tokenizer and image processor exactly as a serving process would."""
    model = CLIPModel.from_pretrained(model_dir)
    model.eval()
    return (
        model,
        CLIPTokenizer.from_pretrained(model_dir),
        CLIPImageProcessor.from_pretrained(model_dir),
    )


@torch.no_grad()
def encode_images(
    objects: DemoObjects, images: Sequence[Image.Image], batch_size: int = 128
) -> torch.Tensor:
    """L2-normalised image embeddings through the real image processor."""
    model, _, processor = objects
    chunks = []
    for i in range(0, len(images), batch_size):
        pixel_values = processor(images=list(images[i : i + batch_size]), return_tensors="pt")[
            "pixel_values"
        ]
        chunks.append(image_embeddings(model, pixel_values.to(model.dtype)))
    return torch.nn.functional.normalize(torch.cat(chunks).float(), dim=-1)


@torch.no_grad()
def encode_texts(objects: DemoObjects, texts: Sequence[str]) -> torch.Tensor:
    """L2-normalised text embeddings."""
    model, tokenizer, _ = objects
    tokens = tokenize(tokenizer, texts)
    return torch.nn.functional.normalize(text_embeddings(model, **tokens).float(), dim=-1)


def attribute_precision_at_10(
    model_dir_or_objects: str | Path | DemoObjects, n_scenes: int = 480, seed: int = sc.HELDOUT_SEED
) -> float:
    """Mean over all "a {color} {shape}" queries of the fraction of the top-10 images
    (cosine over normalised embeddings) whose scene has that colour and shape.

    Scenes come from ``random_scenes(n_scenes, seed)`` (stratified, so with
    ``n_scenes >= 240`` every query has at least 10 relevant images and 1.0 is reachable).
    """
    objects = (
        load_demo(model_dir_or_objects)
        if isinstance(model_dir_or_objects, (str, Path))
        else model_dir_or_objects
    )
    was_training = objects[0].training
    objects[0].eval()
    scenes = sc.random_scenes(n_scenes, seed)
    images = [sc.render(s, seed=sc.render_seed(seed, i)) for i, s in enumerate(scenes)]
    queries = [(c, s) for c in sc.COLORS for s in sc.SHAPES]
    similarity = (
        encode_texts(objects, [f"a {c} {s}" for c, s in queries])
        @ encode_images(objects, images).t()
    )
    top = similarity.topk(min(10, n_scenes), dim=1).indices
    hits = [
        [(scenes[j].color, scenes[j].shape) == q for j in row.tolist()]
        for q, row in zip(queries, top, strict=True)
    ]
    objects[0].train(was_training)
    return float(np.mean([sum(h) / 10 for h in hits]))
