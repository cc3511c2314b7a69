"""Image–text datasets on disk: what `ingest`, `eval` and `finetune` read.

Three layouts are recognised (`open_source` picks by path):

* a folder of images, each with an optional sidecar caption `NAME.txt` beside `NAME.png`;
  the id is the path relative to the folder;
* a JSONL or CSV manifest, one item per line/row: `id`, `image` (path, relative to the
  manifest's folder), `text`, optional `publish_time` (POSIX seconds or ISO 8601) and
  `metadata` (a JSON object in JSONL; in CSV every other column is metadata);
* a COCO captions JSON (`images` + `annotations`), several captions per image, with an
  optional Karpathy-style `split` field per image.

`write_generated` writes generated demo scenes in any of these layouts, for tests and demos.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp"})


class SourceError(ValueError):
    """A dataset that cannot be read at all (not one bad item)."""


@dataclass(frozen=True, slots=True)
class Item:
    """One image and its captions (the first caption is the one stored with the document)."""

    id: str
    image_path: Path | None
    texts: tuple[str, ...] = ()
    publish_time: float | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    split: str = ""

    @property
    def text(self) -> str | None:
        """The primary caption, or None."""
        return self.texts[0] if self.texts else None

    def read_image(self) -> bytes | None:
        """The image file's bytes (raises OSError if unreadable)."""
        return None if self.image_path is None else self.image_path.read_bytes()


def open_source(path: Path) -> Iterator[Item]:
    """Items of a folder, a .jsonl/.csv manifest or a COCO captions .json."""
    if path.is_dir():
        return _folder(path)
    if not path.is_file():
        raise SourceError(f"{path}: no such file or folder")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _jsonl(path)
    if suffix == ".csv":
        return _csv(path)
    if suffix == ".json":
        return _coco(path)
    raise SourceError(f"{path}: expected a folder, .jsonl, .csv or COCO .json")


def _folder(root: Path) -> Iterator[Item]:
    for image in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        sidecar = image.with_suffix(".txt")
        texts = (sidecar.read_text(encoding="utf-8").strip(),) if sidecar.is_file() else ()
        yield Item(image.relative_to(root).as_posix(), image, tuple(t for t in texts if t))


def parse_time(value: object) -> float | None:
    """POSIX seconds from a number, a numeric string or an ISO 8601 string; None if empty."""
    if value is None or value == "":
        return None
    if isinstance(value, int | float):
        return float(value)
    text = str(value).strip()
    try:
        return float(text)
    except ValueError:
        stamp = datetime.fromisoformat(text.replace("Z", "+00:00"))
        return stamp.timestamp()


def _manifest_item(row: dict, base: Path, line: int) -> Item:
    if not row.get("id"):
        raise SourceError(f"line {line}: every item needs an 'id'")
    image = row.get("image") or row.get("image_path")
    text = row.get("text") or row.get("caption")
    texts = tuple(text) if isinstance(text, list) else ((str(text),) if text else ())
    return Item(
        id=str(row["id"]),
        image_path=(base / str(image)) if image else None,
        texts=texts,
        publish_time=parse_time(row.get("publish_time")),
        metadata={str(k): str(v) for k, v in (row.get("metadata") or {}).items()},
        split=str(row.get("split") or ""),
    )


def _jsonl(path: Path) -> Iterator[Item]:
    with path.open(encoding="utf-8") as lines:
        for n, line in enumerate(lines, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise SourceError(f"{path.name} line {n}: not JSON ({exc.msg})") from exc
                yield _manifest_item(row, path.parent, n)


_CSV_FIELDS = frozenset({"id", "image", "image_path", "text", "caption", "publish_time", "split"})


def _csv(path: Path) -> Iterator[Item]:
    with path.open(encoding="utf-8", newline="") as handle:
        for n, row in enumerate(csv.DictReader(handle), 2):
            extra = {k: v for k, v in row.items() if k not in _CSV_FIELDS and v not in (None, "")}
            yield _manifest_item({**row, "metadata": extra}, path.parent, n)


def _coco(path: Path) -> Iterator[Item]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise SourceError(f"{path.name}: not a COCO captions file (needs images, annotations)")
    captions: dict[object, list[str]] = {}
    for ann in data["annotations"]:
        captions.setdefault(ann["image_id"], []).append(str(ann["caption"]).strip())
    for image in data["images"]:
        yield Item(
            id=str(image["id"]),
            image_path=path.parent / str(image["file_name"]),
            texts=tuple(captions.get(image["id"], ())),
            split=str(image.get("split", "")),
        )


# ----------------------------------------------------------------------------- generated


def write_generated(out: Path, n: int, seed: int, layout: str = "folder") -> Path:
    """Write `n` generated scenes as `layout` ("folder", "jsonl", "csv" or "coco").

    Returns the path to pass to `open_source`. Metadata carries the scene's attributes;
    COCO files get two captions per image (the full one and "a {color} {shape}").
    """
    from clipsearch.demo.scenes import random_scenes, render_png, render_seed

    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, scene in enumerate(random_scenes(n, seed)):
        name = f"scene-{i:05d}.png"
        (images / name).write_bytes(render_png(scene, seed=render_seed(seed, i)))
        meta = {"color": scene.color, "shape": scene.shape, "background": scene.background}
        rows.append((f"scene-{i:05d}", name, scene, meta))
        if layout == "folder":
            (images / name).with_suffix(".txt").write_text(scene.caption + "\n")
    if layout == "folder":
        return images
    if layout == "jsonl":
        target = out / "manifest.jsonl"
        with target.open("w", encoding="utf-8") as f:
            for id_, name, scene, meta in rows:
                row = {"id": id_, "image": f"images/{name}", "text": scene.caption}
                f.write(json.dumps({**row, "metadata": meta}) + "\n")
        return target
    if layout == "csv":
        target = out / "manifest.csv"
        with target.open("w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["id", "image", "text", "color", "shape", "background"])
            for id_, name, scene, meta in rows:
                writer.writerow([id_, f"images/{name}", scene.caption, *meta.values()])
        return target
    if layout == "coco":
        return _write_coco(out, rows)
    raise ValueError(f"unknown layout {layout!r}")


def _write_coco(out: Path, rows: list) -> Path:
    images: list[dict] = []
    annotations: list[dict] = []
    for number, (_id, name, scene, _meta) in enumerate(rows):
        images.append({"id": number, "file_name": f"images/{name}"})
        for caption in (scene.caption, f"a {scene.color} {scene.shape}"):
            annotations.append({"id": len(annotations), "image_id": number, "caption": caption})
    target = out / "captions.json"
    target.write_text(json.dumps({"images": images, "annotations": annotations}))
    return target
