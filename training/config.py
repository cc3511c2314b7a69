"""The `clipsearch finetune` settings and flags (no torch import: the CLI builds its parser
from here on every call)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipsearch import recall


@dataclass
class FinetuneConfig:
    """What `clipsearch finetune` is told (CLI flags map one to one)."""

    out: str
    data: str | None = None  # None: generated scenes
    init: str = "demo"  # a model directory, "demo" (bundled), "fresh" (untrained demo), "tiny"
    epochs: int = 3
    steps: int = 1000  # generated data only: total steps (an "epoch" = eval_every steps)
    eval_every: int = 250
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = -1  # -1: 10 % of the steps, at most 100
    grad_clip: float = 1.0
    align_weight: float = 0.0
    amp: str = "auto"  # auto (bf16 on a GPU that has it), off, bf16
    device: str = "auto"
    val_fraction: float = 0.1
    val_items: int = 240
    seed: int = 0
    checkpoint_dir: str | None = None
    stop_after_steps: int = 0  # stop (checkpointed) after this many steps; 0 = run to the end
    ks: tuple[int, ...] = recall.KS
    threads: int = 0


def add_arguments(parser: Any) -> None:
    """The `clipsearch finetune` flags (defaults are FinetuneConfig's)."""
    d = FinetuneConfig(out="")
    parser.add_argument("--out", required=False, help="directory for the trained model")
    parser.add_argument("--data", help="folder, .jsonl/.csv manifest or COCO .json")
    parser.add_argument(
        "--generated", action="store_true", help="train on freshly generated demo scenes"
    )
    parser.add_argument(
        "--init", default=d.init, help="model dir, 'demo', 'fresh' (untrained demo) or 'tiny'"
    )
    parser.add_argument("--resume", type=Path, help="continue from this checkpoint directory")
    parser.add_argument("--checkpoint-dir", help="default: OUT.checkpoint beside OUT")
    for flag, value, helptext in (
        ("epochs", d.epochs, "passes over the training pairs"),
        ("steps", d.steps, "--generated: total steps"),
        ("eval-every", d.eval_every, "--generated: steps between validations"),
        ("batch-size", d.batch_size, "pairs per step"),
        ("warmup-steps", d.warmup_steps, "-1: 10%% of the steps, at most 100"),
        ("val-items", d.val_items, "validation images used for Recall@K"),
        ("seed", d.seed, "data order, split and initialisation"),
        ("stop-after-steps", d.stop_after_steps, "stop after this many steps (resumable)"),
        ("threads", d.threads, "torch CPU threads; 0 = torch default"),
    ):
        parser.add_argument(f"--{flag}", type=int, default=value, help=helptext)
    for flag, fvalue, helptext in (
        ("lr", d.lr, "peak AdamW learning rate"),
        ("weight-decay", d.weight_decay, "AdamW weight decay (matrices only)"),
        ("grad-clip", d.grad_clip, "gradient norm clip"),
        ("align-weight", d.align_weight, "weight of the modality mean-matching term"),
        ("val-fraction", d.val_fraction, "share of images held out (no split field)"),
    ):
        parser.add_argument(f"--{flag}", type=float, default=fvalue, help=helptext)
    parser.add_argument("--amp", choices=("auto", "off", "bf16"), default=d.amp)
    parser.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:1 ...")


def config_from_args(args: Any) -> FinetuneConfig:
    if args.resume is None and not args.out:
        raise SystemExit("finetune: give --out DIR (or --resume CHECKPOINT)")
    if args.resume is None and (args.data is None) == (not args.generated):
        raise SystemExit("finetune: give --data SOURCE or --generated (one of them)")
    names = {f.name for f in dataclasses.fields(FinetuneConfig)} - {"ks"}
    return FinetuneConfig(**{n: getattr(args, n) for n in names if hasattr(args, n)})
