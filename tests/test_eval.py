"""`clipsearch eval`: served Recall@K equals the offline figure (exact index), the ANN part
and the report files; the recall arithmetic on hand-made rankings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from clipsearch import evaluate, recall
from clipsearch.ann_sweep import ann_recall, operating_points
from clipsearch.cli import main
from clipsearch.datasets import write_generated


def test_recall_counts_a_hit_when_any_relevant_target_is_within_k() -> None:
    rankings = [[2, 0, 1], [1, 2, 0], [0, 1, 2]]
    # query 0: targets 0 and 2 answer it, first at rank 0; query 1: target 1 at rank 0;
    # query 2: nothing answers it
    out = recall.recall_at_k(rankings, [{0, 2}, {1}, set()], ks=(1, 2))
    assert out == {"R@1": pytest.approx(66.67), "R@2": pytest.approx(66.67)}
    assert recall.recall_at_k([[1, 0]], [{0}], ks=(1, 2)) == {"R@1": 0.0, "R@2": 100.0}


def test_identical_captions_count_for_every_image_they_describe() -> None:
    texts = ["a red circle", "a big red circle", "a red circle", "a blue star"]
    captions = [("a red circle", "a big red circle"), ("a red circle",), ("a blue star",)]
    for_text, for_image = recall.relevance(texts, captions)
    assert for_text == [{0, 1}, {0}, {0, 1}, {2}]
    assert for_image == [{0, 1, 2}, {0, 2}, {3}]


def test_exact_recall_from_embeddings_is_perfect_for_identical_spaces() -> None:
    vectors = np.eye(6, dtype=np.float32)
    texts = list("abcdef")
    both = recall.both_directions(vectors, vectors, texts, [(t,) for t in texts])
    assert both["text_to_image"]["R@1"] == 100.0 == both["image_to_text"]["R@1"]


def test_operating_points_follow_the_index_type() -> None:
    assert operating_points("IVF16,Flat") == ("nprobe", [1, 2, 4, 8, 16])
    assert operating_points("HNSW32")[0] == "ef_search"
    assert operating_points("Flat") == ("", [0])


def test_ann_recall_against_exact_neighbours() -> None:
    sweep = {
        "index_type": "IVF4,Flat",
        "k": 2,
        "queries": 2,
        "exact": np.array([[0, 1], [2, 3]]),
        "points": [
            {"param": "nprobe", "value": 1, "qps": 10.0, "found": [["d0", "d9"], ["d2", "d9"]]},
            {"param": "nprobe", "value": 4, "qps": 5.0, "found": [["d0", "d1"], ["d3", "d2"]]},
        ],
    }
    out = ann_recall(sweep, [f"d{i}" for i in range(4)])
    assert [p["recall"] for p in out["points"]] == [0.5, 1.0] and not out["note"]


@pytest.mark.integration
def test_served_recall_matches_offline_and_reports_are_written(
    client, stack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write_generated(tmp_path, 96, seed=20_005, layout="coco")
    out, plot = tmp_path / "eval.json", tmp_path / "eval.png"
    main(["eval", str(source), "--server", stack.address, "--out", str(out), "--plot", str(plot)])
    report = json.loads(out.read_text())
    assert report["images"] == 96 and report["texts"] == 192
    assert report["max_abs_difference"] <= evaluate.AGREEMENT_POINTS, report
    # a trained model on its own kind of data: far above chance (10/96 ≈ 10 % at K=10)
    assert report["offline"]["text_to_image"]["R@10"] >= 50
    ann = report["ann"]
    assert ann["points"][0]["param"] == "exact" and ann["points"][0]["recall"] >= 0.99
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "text_to_image" in printed and "served" in printed
    assert client.stats().total_documents == 0  # the eval documents were removed
