"""Cold start: `ingest --auto-label` gives each image its best zero-shot label and score as
metadata that searches can filter on."""

from __future__ import annotations

from pathlib import Path

import pytest

from clipsearch.cli import main
from clipsearch.datasets import open_source, write_generated
from clipsearch.demo.scenes import COLORS, SHAPES
from clipsearch.labels import read_labels

pytestmark = pytest.mark.integration


def test_read_labels_skips_blanks_comments_and_repeats(tmp_path: Path) -> None:
    path = tmp_path / "labels.txt"
    path.write_text("# colours\nred circle\n\nblue star\nred circle\n")
    assert read_labels(path) == ["red circle", "blue star"]
    path.write_text("# nothing\n")
    with pytest.raises(ValueError, match="no labels"):
        read_labels(path)


def test_auto_label_stores_best_label_usable_in_filters(
    client, stack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write_generated(tmp_path, 48, seed=20_004, layout="jsonl")
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"{c} {s}" for c in COLORS for s in SHAPES) + "\n")
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "ingest",
                str(source),
                "--server",
                stack.address,
                "--auto-label",
                str(labels),
                "--label-template",
                "a {}",
                "--label-template",
                "{}",
                "--no-progress",
                "--failures",
                str(tmp_path / "failures.jsonl"),
            ]
        )
    assert exit_.value.code == 0, capsys.readouterr().out
    items = {i.id: i for i in open_source(source)}
    stored = client.get(list(items))
    right = sum(
        d.metadata["label"] == f"{d.metadata['color']} {d.metadata['shape']}" for d in stored
    )
    assert right >= 0.8 * len(stored)
    assert all(0 < float(d.metadata["label_score"]) <= 1 for d in stored)
    red_circles = [d.id for d in stored if d.metadata["label"] == "red circle"]
    assert red_circles
    hits = client.search("a shape", top_k=48, where={"label": "red circle"}).hits
    assert sorted(h.id for h in hits) == sorted(red_circles)
