"""`clipsearch ingest` against the real stack: every layout, progress, a summary, failures
listed and written without stopping the run, and resume by skipping stored ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clipsearch.cli import main
from clipsearch.datasets import open_source, write_generated

pytestmark = pytest.mark.integration


def _ingest(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    if "--failures" not in args:
        args = (*args, "--failures", Path(str(args[0])).parent / "failures.jsonl")
    with pytest.raises(SystemExit) as exit_:
        main(["ingest", *map(str, args)])
    out, err = capsys.readouterr()
    return int(exit_.value.code or 0), out, err


@pytest.mark.parametrize("layout", ["folder", "jsonl", "csv", "coco"])
def test_every_layout_lands_with_captions_and_metadata(
    layout: str, client, stack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write_generated(tmp_path, 12, seed=20_001, layout=layout)
    items = list(open_source(source))
    code, out, err = _ingest(capsys, source, "--server", stack.address, "--batch-size", 5)
    assert code == 0, out
    assert "ingested 12, skipped 0 (already stored), failed 0" in out
    assert "12/12" in err and "doc/s" in err  # the progress bar with its rate
    stored = {d.id: d for d in client.get([i.id for i in items])}
    for item in items:
        assert stored[item.id].caption == item.texts[0]
        assert stored[item.id].has_image and stored[item.id].has_text
        assert stored[item.id].metadata == {**item.metadata}
    assert client.search("a red circle", top_k=3).hits[0].metadata.get("color", "red") == "red"


def test_rerun_resumes_by_skipping_stored_ids(
    client, stack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write_generated(tmp_path, 40, seed=20_002, layout="jsonl")
    ids = [i.id for i in open_source(source)]
    code, out, _ = _ingest(capsys, source, "--server", stack.address, "--concurrency", 3)
    assert code == 0 and "ingested 40, skipped 0" in out
    client.delete(ids[:7])  # as if the first run had stopped before these
    code, out, _ = _ingest(capsys, source, "--server", stack.address, "--batch-size", 8)
    assert code == 0 and "ingested 7, skipped 33" in out
    assert len(client.get(ids)) == 40
    code, out, _ = _ingest(capsys, source, "--server", stack.address)
    assert "ingested 0, skipped 40" in out


def test_bad_items_are_listed_and_written_while_the_rest_land(
    client, stack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = write_generated(tmp_path, 10, seed=20_003, layout="jsonl")
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with source.open("a") as manifest:
        manifest.write(json.dumps({"id": "missing-file", "image": "images/nope.png"}) + "\n")
        manifest.write(json.dumps({"id": "broken", "image": "images/broken.png", "text": "x"}))
    failures = tmp_path / "failed.jsonl"
    code, out, _ = _ingest(
        capsys, source, "--server", stack.address, "--failures", failures, "--batch-size", 4
    )
    assert code == 1
    assert "ingested 10, skipped 0 (already stored), failed 2" in out
    assert "failed missing-file: cannot read image" in out
    assert "failed broken: INVALID_ARGUMENT" in out
    written = {row["id"]: row["error"] for row in map(json.loads, failures.open())}
    assert set(written) == {"missing-file", "broken"}
    assert len(client.get([f"scene-{i:05d}" for i in range(10)])) == 10
    assert client.get(["broken", "missing-file"], allow_missing=True) == []
