"""`clipsearch eval`: Recall@K through the live API beside the same figure computed offline.

The dataset's images and captions are upserted as separate documents (images carry only an
image embedding, captions only a text embedding) tagged with a run id, searched with that id
as a filter (text→image: each caption's top K images; image→text: each image's top K
captions), and deleted again. Offline, the same model (loaded locally with transformers)
embeds the same data and exact search ranks it: with an exact index the two agree within
0.5 points. Relevance is by group (`clipsearch.recall`).

The ANN part sends the offline query vectors without a filter and compares the served top-k
with the exact top-k, at each operating point of the configured index (IVF nprobe, HNSW
efSearch, via SearchRequest.search_params), timing client-side queries per second. It needs
a server holding only the evaluation documents (otherwise other documents are the true
neighbours); it says so and skips itself when that is not the case.
"""

from __future__ import annotations

import io
import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from PIL import Image

from clipsearch import recall
from clipsearch.ann_sweep import ann_recall, ann_sweep, plot, point_label
from clipsearch.client import Client, Document
from clipsearch.datasets import open_source

DEMO_MODEL_ID = "clipsearch-demo"
AGREEMENT_POINTS = 0.5
_RUN_KEY = "eval_run"


@dataclass
class EvalData:
    """Images with their captions, and every caption as a query of its own."""

    images: list[bytes]
    image_captions: list[tuple[str, ...]]
    texts: list[str]


def load_eval_data(source: Path, max_images: int = 0, split: str = "test") -> EvalData:
    """The `split` items when the dataset names splits, else all (relevance: recall.py)."""
    items = [i for i in open_source(source) if i.image_path is not None and i.texts]
    if any(i.split for i in items):
        items = [i for i in items if i.split == split] or items
    if max_images:
        items = items[:max_images]
    texts = [t for item in items for t in item.texts]
    return EvalData([i.read_image() or b"" for i in items], [i.texts for i in items], texts)


# ----------------------------------------------------------------------------- offline


class OfflineEncoder:
    """The served model loaded locally (transformers), embeddings L2-normalised."""

    def __init__(self, model: str) -> None:
        import torch
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        self._torch = torch
        self.model = AutoModel.from_pretrained(model).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        try:  # the PIL backend, as the encoder service uses
            self.processor = AutoImageProcessor.from_pretrained(model, backend="pil")
        except (TypeError, ValueError):
            self.processor = AutoImageProcessor.from_pretrained(model)

    def _normalise(self, out: Any) -> np.ndarray:
        tensor = out if isinstance(out, self._torch.Tensor) else out.pooler_output
        tensor = self._torch.nn.functional.normalize(tensor.float(), dim=-1)
        return tensor.numpy().astype(np.float32)

    def images(self, images: Sequence[bytes], batch: int = 64) -> np.ndarray:
        chunks = []
        with self._torch.no_grad():
            for i in range(0, len(images), batch):
                decoded = [Image.open(io.BytesIO(b)).convert("RGB") for b in images[i : i + batch]]
                pixels = self.processor(images=decoded, return_tensors="pt")["pixel_values"]
                chunks.append(self._normalise(self.model.get_image_features(pixel_values=pixels)))
        return np.concatenate(chunks)

    def texts(self, texts: Sequence[str], batch: int = 256) -> np.ndarray:
        chunks = []
        with self._torch.no_grad():
            for i in range(0, len(texts), batch):
                tokens = self.tokenizer(
                    list(texts[i : i + batch]), padding=True, truncation=True, return_tensors="pt"
                )
                chunks.append(self._normalise(self.model.get_text_features(**tokens)))
        return np.concatenate(chunks)


def resolve_served_model(model_id: str) -> str:
    """Where to load the served model from: the bundled directory for the demo model."""
    if model_id == DEMO_MODEL_ID:
        return str(Path(__file__).resolve().parent / "demo" / "model")
    return model_id


# ----------------------------------------------------------------------------- served


def _image_id(run: str, n: int) -> str:
    return f"eval-{run}-img-{n}"


def _text_id(run: str, n: int) -> str:
    return f"eval-{run}-txt-{n}"


def upload(client: Client, data: EvalData, run: str, batch: int = 64) -> None:
    """The evaluation documents, tagged with the run id."""
    meta = {_RUN_KEY: run}
    docs = [Document(_image_id(run, n), image=b, metadata=meta) for n, b in enumerate(data.images)]
    docs += [Document(_text_id(run, n), text=t, metadata=meta) for n, t in enumerate(data.texts)]
    for i in range(0, len(docs), batch):
        client.upsert(docs[i : i + batch])


def remove(client: Client, data: EvalData, run: str, batch: int = 512) -> None:
    ids = [_image_id(run, n) for n in range(len(data.images))]
    ids += [_text_id(run, n) for n in range(len(data.texts))]
    for i in range(0, len(ids), batch):
        client.delete(ids[i : i + batch])


def served_recall(client: Client, data: EvalData, run: str, ks: Sequence[int]) -> dict:
    """Recall@K of the live search path, both directions."""
    depth, where = max(ks), {_RUN_KEY: run}
    image_index = {_image_id(run, n): n for n in range(len(data.images))}
    text_index = {_text_id(run, n): n for n in range(len(data.texts))}
    t2i = [
        [image_index[h] for h in client.search(t, target="image", top_k=depth, where=where).ids]
        for t in data.texts
    ]
    i2t = [
        [text_index[h] for h in client.search(image=b, target="text", top_k=depth, where=where).ids]
        for b in data.images
    ]
    for_text, for_image = recall.relevance(data.texts, data.image_captions)
    return {
        "text_to_image": recall.recall_at_k(t2i, for_text, ks),
        "image_to_text": recall.recall_at_k(i2t, for_image, ks),
    }


# ----------------------------------------------------------------------------- the run


def evaluate(
    server: str,
    source: Path,
    ks: Sequence[int] = recall.KS,
    max_images: int = 0,
    model: str | None = None,
    keep: bool = False,
) -> dict:
    """Served and offline Recall@K (and the ANN sweep when possible) as one report."""
    data = load_eval_data(source, max_images)
    run = uuid.uuid4().hex[:12]
    with Client(server, timeout=120.0) as client:
        stats = client.stats()
        encoder = OfflineEncoder(model or resolve_served_model(stats.model_id))
        text_vectors, image_vectors = encoder.texts(data.texts), encoder.images(data.images)
        offline = recall.both_directions(
            text_vectors, image_vectors, data.texts, data.image_captions, ks
        )
        upload(client, data, run)
        try:
            served = served_recall(client, data, run, ks)
            ann = _maybe_ann(server, client, data, run, text_vectors, image_vectors)
        finally:
            if not keep:
                remove(client, data, run)
    diff = {d: {k: round(served[d][k] - offline[d][k], 2) for k in served[d]} for d in served}
    return {
        "dataset": str(source),
        "model": stats.model_id,
        "index_type": stats.index_type,
        "images": len(data.images),
        "texts": len(data.texts),
        "served": served,
        "offline": offline,
        "served_minus_offline": diff,
        "max_abs_difference": max(abs(v) for d in diff.values() for v in d.values()),
        "ann": ann,
    }


def _settled_stats(client: Client, timeout_s: float = 120.0) -> Any:
    """Stats once no shard index is rebuilding (an ANN index trains in the background after
    the upload), so the sweep measures the configured type rather than the exact stand-in."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = client.stats()
        busy = any(i.rebuilding for s in stats.shards for i in s.indexes)
        if not busy or time.monotonic() > deadline:
            return stats
        time.sleep(0.5)


def _maybe_ann(
    server: str, client: Client, data: EvalData, run: str, texts: np.ndarray, images: np.ndarray
) -> dict:
    stats = _settled_stats(client)
    ours = len(data.images) + len(data.texts)
    if stats.total_documents != ours:
        return {
            "skipped": f"the server holds {stats.total_documents - ours} other documents; "
            "ANN recall needs a server holding only the evaluation set (--demo-corpus 0)"
        }
    active = [i.active_type for s in stats.shards for i in s.indexes if i.active_type]
    index_type = active[0] if active else stats.index_type
    sweep = ann_sweep(server, texts, images, index_type)
    ids = [_image_id(run, n) for n in range(len(data.images))]
    return ann_recall(sweep, ids)


def add_arguments(parser) -> None:  # type: ignore[no-untyped-def]
    parser.add_argument("source", type=Path, help="COCO captions .json, .jsonl/.csv or folder")
    parser.add_argument("--server", default="127.0.0.1:50051")
    parser.add_argument("--model", help="load this model offline (default: the served one)")
    parser.add_argument("--max-images", type=int, default=0, help="0 = all")
    parser.add_argument("--out", type=Path, default=Path("eval.json"), help="JSON report")
    parser.add_argument("--plot", type=Path, default=Path("eval.png"), help="PNG plot")
    parser.add_argument("--keep", action="store_true", help="leave the eval documents stored")


def format_report(report: dict) -> str:
    lines = [
        f"{report['images']} images, {report['texts']} captions, model {report['model']}, "
        f"index {report['index_type']}",
        "direction       K     served  offline   diff",
    ]
    for d in ("text_to_image", "image_to_text"):
        for k, served in report["served"][d].items():
            off = report["offline"][d][k]
            lines.append(f"{d:<15} {k:<5} {served:7.2f}  {off:7.2f}  {served - off:+6.2f}")
    ann = report["ann"]
    if "skipped" in ann:
        lines.append(f"ANN: skipped ({ann['skipped']})")
    else:
        for p in ann["points"]:
            lines.append(
                f"ANN {ann['index_type']} {point_label(p)}: "
                f"recall@{ann['k']} {p['recall']:.3f} at {p['qps']:.0f} QPS"
            )
        if ann["note"]:
            lines.append(f"ANN note: {ann['note']}")
    return "\n".join(lines)


def run_command(args) -> None:  # type: ignore[no-untyped-def]
    import sys

    try:
        report = evaluate(
            args.server, args.source, max_images=args.max_images, model=args.model, keep=args.keep
        )
    except grpc.RpcError as exc:
        sys.exit(f"{exc.code().name}: {exc.details()}")
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.plot)
    print(format_report(report))
    print(f"wrote {args.out} and {args.plot}", flush=True)
