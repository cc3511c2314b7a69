"""`clipsearch finetune` on generated data with a tiny model: it lifts validation Recall@K,
writes a checkpoint the encoder loads, and a resumed run ends where an uninterrupted one
does. No Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from clipsearch.datasets import write_generated
from training.config import FinetuneConfig
from training.contrastive import alignment_loss
from training.finetune import finetune


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Held-out scene seeds: never part of the demo model's training stream.
    return write_generated(tmp_path_factory.mktemp("pairs"), 240, seed=20_000, layout="jsonl")


def _config(out: Path, data: Path, **kw: object) -> FinetuneConfig:
    base = {"init": "tiny", "epochs": 3, "batch_size": 32, "val_fraction": 0.25, "lr": 2e-3}
    return FinetuneConfig(out=str(out), data=str(data), **{**base, **kw})  # type: ignore[arg-type]


def test_finetune_lifts_validation_recall_and_serves(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "model"
    summary = finetune(_config(out, dataset, epochs=8, batch_size=24), log=print)
    before, after = summary["recall_before"], summary["recall_after"]
    for direction in ("text_to_image", "image_to_text"):
        assert after[direction]["R@5"] >= before[direction]["R@5"] + 10, summary["history"]
    err = capsys.readouterr().err
    assert "epoch 1/8" in err and "epoch 8/8" in err
    assert "step/s" in err or "s/step" in err  # the progress bar's rate
    assert len(summary["history"]) == 9  # before training + one validation per epoch
    saved = json.loads((out / "finetune_metrics.json").read_text())
    assert saved["recall_after"] == after

    from encoder_service.model import ClipEncoder

    encoder = ClipEncoder(str(out))  # what `clipsearch serve` does with encoder.model = DIR
    assert encoder.dim == 128 and encoder.model_id == str(out)


def test_resumed_run_ends_with_the_uninterrupted_weights(dataset: Path, tmp_path: Path) -> None:
    small = {"epochs": 2, "batch_size": 48, "val_items": 24}
    whole = finetune(_config(tmp_path / "whole", dataset, **small), log=lambda _: None)
    cut = _config(tmp_path / "cut", dataset, stop_after_steps=3, **small)
    partial = finetune(cut, log=lambda _: None)
    assert not partial["finished"] and partial["steps"] == 3
    assert not (tmp_path / "cut" / "model.safetensors").exists()
    checkpoint = tmp_path / "cut.checkpoint"
    resumed = finetune(FinetuneConfig(out=""), resume=checkpoint, log=lambda _: None)
    assert resumed["finished"] and resumed["steps"] == whole["steps"]
    from transformers import CLIPModel

    a = CLIPModel.from_pretrained(tmp_path / "whole").state_dict()
    b = CLIPModel.from_pretrained(tmp_path / "cut").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert resumed["recall_after"] == whole["recall_after"]


def test_generated_mode_writes_demo_metrics(tmp_path: Path) -> None:
    cfg = FinetuneConfig(
        out=str(tmp_path / "demo"), init="tiny", steps=4, eval_every=2, batch_size=16, val_items=48
    )
    summary = finetune(cfg, log=lambda _: None)
    metrics = json.loads((tmp_path / "demo" / "demo_metrics.json").read_text())
    assert metrics["steps"] == 4 and len(summary["history"]) == 3
    assert set(metrics) >= {"precision_at_10_before", "precision_at_10_after", "recall_after"}


def test_alignment_term_measures_the_gap_between_modality_means() -> None:
    torch.manual_seed(0)
    images = torch.randn(16, 8)
    assert alignment_loss(images, images.clone()).item() == pytest.approx(0.0, abs=1e-7)
    shifted = images + torch.tensor([5.0] + [0.0] * 7)
    assert alignment_loss(images, shifted).item() > 0.1
