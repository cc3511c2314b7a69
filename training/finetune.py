"""`clipsearch finetune`: contrastive training of a CLIP-family model on image–caption pairs.

The optimisation step is :func:`training.contrastive.optimisation_step` (symmetric InfoNCE
with the model's learnable temperature, optional mean-matching alignment term, AdamW with
warmup + linear decay, gradient clipping); this module adds the data, the train/validation
split, validation Recall@K with a progress bar, checkpoints and resume.

Two kinds of data:

* a dataset on disk (`clipsearch.datasets.open_source`): split by image, one pair per
  caption, shuffled per epoch from the seed;
* ``generated``: a fresh batch of demo scenes per step exactly as the demo model is trained
  (`make demo-model`), validated on held-out scenes.

A checkpoint is a transformers directory (model, tokenizer, image processor) plus
``trainer_state.pt`` (step, optimiser, schedule, history, config); ``--resume`` continues
from it and ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from tqdm import tqdm
from transformers import CLIPModel

from clipsearch import recall
from clipsearch.datasets import open_source
from training import contrastive
from training.config import FinetuneConfig, config_from_args
from training.data import (
    PairBatches,
    Split,
    generated_batches,
    generated_val_split,
    split_items,
    val_split_of,
)
from training.demo_model import demo_config, demo_image_processor, seed_everything
from training.tokenizer import build_tokenizer

STATE_FILE = "trainer_state.pt"
TEMPERATURE_INIT = 0.07


@dataclass
class State:
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


# ----------------------------------------------------------------------------- model


def build_model(init: str, seed: int) -> contrastive.DemoObjects:
    """Model, tokenizer and processor to start from (fresh ones with temperature 0.07)."""
    seed_everything(seed)
    if init in ("fresh", "tiny"):
        tokenizer = build_tokenizer()
        image_size, hidden, layers = (32, 64, 2) if init == "tiny" else (64, 128, 3)
        config = demo_config(tokenizer, image_size=image_size, hidden=hidden, layers=layers)
        # CLIPConfig's default logit scale, 2.6592 = log(1 / 0.07) to four places: the
        # temperature starts at 0.07.
        assert abs(math.exp(-float(config.logit_scale_init_value or 0)) - TEMPERATURE_INIT) < 1e-4
        model = CLIPModel(config)
        model.eval()
        return model, tokenizer, demo_image_processor(image_size)
    from encoder_service.model import resolve_model

    return contrastive.load_demo(resolve_model(init))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where it is native (a GPU with bf16), or when asked; else None."""
    if amp == "bf16":
        return torch.bfloat16
    if amp == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    if device.type == "cpu":
        return batch
    views = [{k: v.to(device) for k, v in view.items()} for view in batch["views"]]
    return {"pixel_values": batch["pixel_values"].to(device), "views": views}


# ----------------------------------------------------------------------------- validation


@torch.no_grad()
def validate(objects: contrastive.DemoObjects, split: Split, ks: tuple[int, ...]) -> dict:
    """Recall@K both ways on the validation split (exact search over the embeddings)."""
    model, tokenizer, processor = objects
    was_training = model.training
    model.eval()
    image_chunks, text_chunks = [], []
    for i in range(0, len(split.images), 128):
        pixels = processor(images=split.images[i : i + 128], return_tensors="pt")["pixel_values"]
        image_chunks.append(contrastive.image_embeddings(model, pixels.to(model.device)))
    for i in range(0, len(split.texts), 256):
        tokens = contrastive.tokenize(tokenizer, split.texts[i : i + 256])
        tokens = {k: v.to(model.device) for k, v in tokens.items()}
        text_chunks.append(contrastive.text_embeddings(model, **tokens))
    model.train(was_training)
    images = torch.nn.functional.normalize(torch.cat(image_chunks).float(), dim=-1).cpu().numpy()
    texts = torch.nn.functional.normalize(torch.cat(text_chunks).float(), dim=-1).cpu().numpy()
    return recall.both_directions(texts, images, split.texts, split.image_captions, ks)


def recall_line(metrics: dict) -> str:
    return "  ".join(
        f"{direction.replace('_to_', '→').replace('text', 't').replace('image', 'i')} "
        + " ".join(f"{k}={v:.1f}" for k, v in values.items())
        for direction, values in metrics.items()
    )


# ----------------------------------------------------------------------------- the run


@dataclass
class Plan:
    """What one run iterates over."""

    batches: Any
    val: Split
    total_steps: int
    per_epoch: int


def plan(cfg: FinetuneConfig, objects: contrastive.DemoObjects) -> Plan:
    if cfg.data is None:
        tcfg = train_config(cfg, objects, cfg.steps)
        val = generated_val_split(cfg.val_items)
        return Plan(generated_batches(objects, tcfg), val, cfg.steps, cfg.eval_every)
    items = [i for i in open_source(Path(cfg.data)) if i.image_path is not None and i.texts]
    train, val_items = split_items(items, cfg)
    batches = PairBatches(train, objects, cfg)
    val = val_split_of(val_items, cfg.val_items)
    return Plan(batches, val, batches.per_epoch * cfg.epochs, batches.per_epoch)


def train_config(
    cfg: FinetuneConfig, objects: contrastive.DemoObjects, total: int
) -> contrastive.TrainConfig:
    warmup = cfg.warmup_steps if cfg.warmup_steps >= 0 else min(100, total // 10)
    crop = objects[2].crop_size
    return contrastive.TrainConfig(
        steps=total,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        warmup_steps=max(1, warmup),
        grad_clip=cfg.grad_clip,
        image_size=int(crop["height"]) if crop else 64,
        log_every=0,
        align_weight=cfg.align_weight,
    )


def finetune(cfg: FinetuneConfig, resume: Path | None = None, log: Any = print) -> dict:
    """Train as `cfg` says (or continue the checkpoint `resume`); returns the run summary."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    saved: dict[str, Any] | None = None
    if resume is not None:
        saved = torch.load(resume / STATE_FILE, weights_only=False)
        cfg = dataclasses.replace(
            FinetuneConfig(**saved["config"]), stop_after_steps=cfg.stop_after_steps
        )
        objects = contrastive.load_demo(resume)
    else:
        objects = build_model(cfg.init, cfg.seed)
    device = pick_device(cfg.device)
    model = objects[0]
    model.to(device)  # type: ignore[arg-type]  # nn.Module.to, not the transformers wrapper
    p = plan(cfg, objects)
    tcfg = train_config(cfg, objects, p.total_steps)
    optimizer, scheduler = contrastive.make_optimizer(model, tcfg)
    state = State()
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = State(saved["step"], saved["history"])
        log(f"resumed from {resume} at step {state.step}/{p.total_steps}")
    else:
        before = validate(objects, p.val, cfg.ks)
        state.history.append({"step": 0, "epoch": 0, **before})
        log(f"before training: {recall_line(before)}")
    started = time.perf_counter()
    _loop(cfg, objects, p, tcfg, optimizer, scheduler, state, log)
    model.eval()
    summary = {
        "steps": state.step,
        "total_steps": p.total_steps,
        "finished": state.step >= p.total_steps,
        "train_seconds": round(time.perf_counter() - started, 1),
        "recall_before": _strip(state.history[0]),
        "recall_after": _strip(state.history[-1]),
        "history": state.history,
        "out": cfg.out,
    }
    if summary["finished"]:
        save_final(objects, Path(cfg.out), cfg, summary)
    return summary


def _loop(
    cfg: FinetuneConfig,
    objects: contrastive.DemoObjects,
    p: Plan,
    tcfg: contrastive.TrainConfig,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: State,
    log: Any,
) -> None:
    model = objects[0]
    amp = amp_dtype(cfg.amp, model.device)
    stop = p.total_steps
    if cfg.stop_after_steps:
        stop = min(stop, state.step + cfg.stop_after_steps)
    epochs = math.ceil(p.total_steps / p.per_epoch)
    model.train()
    while state.step < stop:
        epoch = state.step // p.per_epoch
        end = min((epoch + 1) * p.per_epoch, stop)
        bar = tqdm(
            total=min(p.per_epoch, p.total_steps - epoch * p.per_epoch),
            initial=state.step - epoch * p.per_epoch,
            desc=f"epoch {epoch + 1}/{epochs}",
            unit="step",
            file=sys.stderr,
            dynamic_ncols=True,
        )
        for step in range(state.step, end):
            batch = to_device(p.batches(step), model.device)
            loss = contrastive.optimisation_step(model, batch, optimizer, scheduler, tcfg, amp)
            state.step = step + 1
            bar.set_postfix(loss=f"{loss:.3f}", temp=f"{1 / model.logit_scale.exp().item():.3f}")
            bar.update(1)
        bar.close()
        if state.step % p.per_epoch == 0 or state.step == p.total_steps:
            metrics = validate(objects, p.val, cfg.ks)
            state.history.append({"step": state.step, "epoch": epoch + 1, **metrics})
            log(f"epoch {epoch + 1}/{epochs} validation: {recall_line(metrics)}")
        save_checkpoint(objects, checkpoint_dir(cfg), cfg, optimizer, scheduler, state)


def _strip(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if k not in ("step", "epoch")}


def checkpoint_dir(cfg: FinetuneConfig) -> Path:
    if cfg.checkpoint_dir:
        return Path(cfg.checkpoint_dir)
    out = Path(cfg.out)
    return out.parent / f"{out.name}.checkpoint"


def save_pretrained(objects: contrastive.DemoObjects, out: Path) -> None:
    """The transformers directory `clipsearch serve` loads (encoder.model = out)."""
    model, tokenizer, processor = objects
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    processor.save_pretrained(out)


def save_checkpoint(
    objects: contrastive.DemoObjects,
    directory: Path,
    cfg: FinetuneConfig,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: State,
) -> None:
    """Model + trainer state, written beside and then renamed over the previous one."""
    staging = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    save_pretrained(objects, staging)
    torch.save(
        {
            "step": state.step,
            "history": state.history,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "config": dataclasses.asdict(cfg),
        },
        staging / STATE_FILE,
    )
    old = directory.with_name(directory.name + ".old")
    if directory.exists():
        directory.rename(old)
    staging.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


def save_final(
    objects: contrastive.DemoObjects, out: Path, cfg: FinetuneConfig, summary: dict
) -> None:
    """The trained model plus its metrics (`demo_metrics.json` for generated data)."""
    save_pretrained(objects, out)
    if cfg.data is None:
        name, metrics = "demo_metrics.json", _demo_metrics(objects, cfg, summary)
    else:
        name, metrics = "finetune_metrics.json", dict(summary)
    (out / name).write_text(json.dumps(metrics, indent=2) + "\n")


def _demo_metrics(objects: contrastive.DemoObjects, cfg: FinetuneConfig, summary: dict) -> dict:
    objects[0].to("cpu")  # type: ignore[arg-type]
    fresh = build_model(cfg.init, cfg.seed) if cfg.init in ("fresh", "tiny") else None
    before = contrastive.attribute_precision_at_10(fresh) if fresh else None
    after = contrastive.attribute_precision_at_10(objects)
    return {
        "seed": cfg.seed,
        "steps": summary["steps"],
        "precision_at_10_before": round(before, 4) if before is not None else None,
        "precision_at_10_after": round(after, 4),
        "recall_before": summary["recall_before"],
        "recall_after": summary["recall_after"],
        "train_seconds": summary["train_seconds"],
    }


# ----------------------------------------------------------------------------- command line


def run_command(args: Any) -> None:
    """`clipsearch finetune`: train, print the before/after Recall@K."""
    cfg = config_from_args(args)
    transformers.utils.logging.disable_progress_bar()  # its per-save bars drown ours
    summary = finetune(cfg, resume=args.resume, log=lambda m: print(m, flush=True))
    if not summary["finished"]:
        where = checkpoint_dir(cfg) if args.resume is None else args.resume
        print(
            f"stopped at step {summary['steps']}/{summary['total_steps']}; resume with "
            f"--resume {where}",
            flush=True,
        )
        return
    print(f"recall before: {recall_line(summary['recall_before'])}")
    print(f"recall after:  {recall_line(summary['recall_after'])}")
    print(f"model written to {summary.get('out', cfg.out)}", flush=True)
