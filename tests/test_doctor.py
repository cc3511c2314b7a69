"""`clipsearch doctor`: passes on a healthy server, fails readably on drift and on index
counts that do not add up."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from clipsearch.cli import main
from clipsearch.datasets import write_generated
from clipsearch.doctor import check_integrity, js_divergence
from clipsearch.v1 import common_pb2


def _shard(n: int, docs: int, image: int, text: int, indexes: tuple = ()) -> SimpleNamespace:
    return SimpleNamespace(
        shard=n, documents=docs, image_vectors=image, text_vectors=text, indexes=indexes
    )


def test_integrity_names_the_shard_whose_counts_do_not_add_up() -> None:
    good = SimpleNamespace(shards=[_shard(0, 5, 5, 5), _shard(1, 3, 3, 0)], total_documents=8)
    assert check_integrity(good).ok
    bad = SimpleNamespace(shards=[_shard(0, 5, 5, 5), _shard(1, 3, 4, 0)], total_documents=8)
    check = check_integrity(bad)
    assert not check.ok and "shard 1: 3 documents but 4 image" in check.detail
    index = SimpleNamespace(modality=common_pb2.MODALITY_IMAGE, vectors=6)
    stale = SimpleNamespace(shards=[_shard(0, 5, 5, 5, (index,))], total_documents=5)
    assert "index holds 6, shard 5" in check_integrity(stale).detail
    lost = SimpleNamespace(shards=[_shard(0, 5, 5, 5)], total_documents=7)
    assert "the server reports 7" in check_integrity(lost).detail


def test_js_divergence_bounds() -> None:
    assert js_divergence([5, 5, 0], [5, 5, 0]) == pytest.approx(0.0)
    assert js_divergence([100, 0], [0, 100]) > 0.9


def _doctor(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_:
        main(["doctor", *args])
    return int(exit_.value.code or 0), capsys.readouterr().out


@pytest.mark.integration
def test_healthy_server_passes_and_drifted_data_fails(
    client, stack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write_generated(tmp_path / "data", 24, seed=20_006, layout="jsonl")
    with pytest.raises(SystemExit):
        main(
            [
                "ingest",
                str(source),
                "--server",
                stack.address,
                "--no-progress",
                "--failures",
                str(tmp_path / "failures.jsonl"),
            ]
        )
    capsys.readouterr()
    reference = tmp_path / "reference.json"
    code, out = _doctor(capsys, "--server", stack.address, "--save-reference", str(reference))
    assert code == 0, out
    assert "OK    index integrity: 2 shards, 24 documents" in out
    assert "OK    embedding norms" in out and "all checks passed" in out
    code, out = _doctor(capsys, "--server", stack.address, "--reference", str(reference))
    assert code == 0 and "OK    distribution shift" in out, out
    noise = tmp_path / "noise"
    noise.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        pixels = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(noise / f"{i}.png")
        (noise / f"{i}.txt").write_text(f"zebra {i} under the sea at midnight")
    code, out = _doctor(
        capsys, "--server", stack.address, "--reference", str(reference), "--probe", str(noise)
    )
    assert code == 1
    assert "FAIL  distribution shift vs reference" in out and "1 of 4 checks failed" in out
