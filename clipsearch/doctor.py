"""`clipsearch doctor`: checks a running server and says, readably, what is wrong.

* embedding norms: a probe set of images and texts goes through the live encoder; every
  embedding must be finite with norm 1 (the project's contract);
* distribution shift: the probe embeddings, projected on fixed random directions, are
  binned and compared with a saved reference (`--save-reference`) by Jensen–Shannon
  divergence; a model or preprocessing change, or data unlike the reference, raises it;
* index integrity: per shard, the image and text vectors its indexes hold must add up to
  the documents stored (every document has one or two vectors, an index never more
  vectors than its shard has documents), and the shard totals to the server's total;
* repeat-query consistency: the same queries asked again give the same ids and scores,
  and the same text encodes to the same vector.

Exit status 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipsearch.client import Client
from clipsearch.v1 import common_pb2

PROJECTIONS = 32
BINS = 20
NORM_TOLERANCE = 1e-3
SHIFT_THRESHOLD = 0.05
SCORE_TOLERANCE = 1e-4
_PROJECTION_SEED = 1234


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Probe:
    images: list[bytes]
    texts: list[str]


def generated_probe(n: int = 48, seed: int = 31_337) -> Probe:
    """Demo scenes held out from training (seed ≥ HELDOUT_SEED) and their captions."""
    from clipsearch.demo.scenes import random_scenes, render_png, render_seed

    scenes = random_scenes(n, seed)
    images = [render_png(s, seed=render_seed(seed, i)) for i, s in enumerate(scenes)]
    return Probe(images, [s.caption for s in scenes])


def probe_from(source: Path, n: int = 48) -> Probe:
    from clipsearch.datasets import open_source

    items = [i for i in open_source(source) if i.image_path is not None][:n]
    return Probe([i.read_image() or b"" for i in items], [i.text for i in items if i.text])


def embed(client: Client, probe: Probe) -> dict[str, np.ndarray]:
    out: dict[str, list[np.ndarray]] = {"image": [], "text": []}
    for i in range(0, len(probe.images), 32):
        out["image"].append(client.encode_image(probe.images[i : i + 32]))
    for i in range(0, len(probe.texts), 32):
        out["text"].append(client.encode_text(probe.texts[i : i + 32]))
    return {k: np.concatenate(v) if v else np.zeros((0, 1), np.float32) for k, v in out.items()}


# ----------------------------------------------------------------------------- checks


def check_norms(vectors: dict[str, np.ndarray]) -> Check:
    parts, ok = [], True
    for modality, v in vectors.items():
        if not len(v):
            continue
        norms = np.linalg.norm(v, axis=1)
        finite = bool(np.isfinite(v).all())
        ok &= finite and bool(np.all(np.abs(norms - 1) <= NORM_TOLERANCE))
        parts.append(
            f"{modality}: n={len(v)} norm min {norms.min():.5f} mean {norms.mean():.5f} "
            f"max {norms.max():.5f}{'' if finite else ' NON-FINITE values'}"
        )
    return Check("embedding norms", ok, "; ".join(parts))


def projection_histograms(vectors: np.ndarray, dim: int) -> dict[str, Any]:
    """Histograms of the vectors on fixed random unit directions (bins over [-1, 1])."""
    rng = np.random.default_rng(_PROJECTION_SEED)
    directions = rng.standard_normal((PROJECTIONS, dim)).astype(np.float32)
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    projected = vectors @ directions.T
    edges = np.linspace(-1.0, 1.0, BINS + 1)
    hists = [np.histogram(projected[:, j], bins=edges)[0].tolist() for j in range(PROJECTIONS)]
    return {"dim": dim, "histograms": hists}


def js_divergence(p: Sequence[float], q: Sequence[float]) -> float:
    """Jensen–Shannon divergence (base 2, in [0, 1]) of two histograms, lightly smoothed."""
    a = np.asarray(p, dtype=np.float64) + 0.5
    b = np.asarray(q, dtype=np.float64) + 0.5
    a, b = a / a.sum(), b / b.sum()
    m = (a + b) / 2
    return float(0.5 * np.sum(a * np.log2(a / m)) + 0.5 * np.sum(b * np.log2(b / m)))


def reference_of(vectors: dict[str, np.ndarray], model_id: str) -> dict[str, Any]:
    return {
        "model_id": model_id,
        "modalities": {
            m: projection_histograms(v, v.shape[1]) for m, v in vectors.items() if len(v)
        },
    }


def check_shift(current: dict[str, Any], reference: dict[str, Any]) -> Check:
    parts, ok = [], True
    for modality, ref in reference["modalities"].items():
        now = current["modalities"].get(modality)
        if now is None or now["dim"] != ref["dim"]:
            return Check("distribution shift", False, f"{modality}: dimension changed")
        jsd = float(
            np.mean(
                [
                    js_divergence(a, b)
                    for a, b in zip(now["histograms"], ref["histograms"], strict=True)
                ]
            )
        )
        ok &= jsd <= SHIFT_THRESHOLD
        parts.append(f"{modality}: mean JSD {jsd:.4f} (limit {SHIFT_THRESHOLD})")
    if reference.get("model_id") != current.get("model_id"):
        parts.append(f"model was {reference.get('model_id')}, now {current.get('model_id')}")
    return Check("distribution shift vs reference", ok, "; ".join(parts))


def check_integrity(stats: Any) -> Check:
    """Vectors per shard against documents per shard, and shard totals against the total."""
    problems, total = [], 0
    for s in stats.shards:
        total += s.documents
        most, least = max(s.image_vectors, s.text_vectors), s.image_vectors + s.text_vectors
        if most > s.documents or least < s.documents:
            problems.append(
                f"shard {s.shard}: {s.documents} documents but {s.image_vectors} image and "
                f"{s.text_vectors} text vectors"
            )
        for index in s.indexes:
            held = (
                s.image_vectors if index.modality == common_pb2.MODALITY_IMAGE else s.text_vectors
            )
            if index.vectors and index.vectors != held:
                problems.append(f"shard {s.shard}: index holds {index.vectors}, shard {held}")
    if total != stats.total_documents:
        problems.append(
            f"shards hold {total} documents, the server reports {stats.total_documents}"
        )
    detail = "; ".join(problems) or (
        f"{len(stats.shards)} shards, {total} documents, vectors match"
    )
    return Check("index integrity", not problems, detail)


def check_repeat(client: Client, probe: Probe, rounds: int = 3) -> Check:
    texts = probe.texts[:4]
    first = client.encode_text(texts)
    again = client.encode_text(texts)
    problems = []
    if not np.allclose(first, again, atol=1e-6):
        problems.append("the same texts encoded to different vectors")
    for text in texts:
        answers = [client.search(text, top_k=10) for _ in range(rounds)]
        ids = {tuple(a.ids) for a in answers}
        scores = np.array([[h.score for h in a.hits] for a in answers])
        if len(ids) > 1 or (scores.size and np.ptp(scores, axis=0).max() > SCORE_TOLERANCE):
            problems.append(f"{text!r} answered differently across {rounds} rounds")
    detail = "; ".join(problems) or f"{len(texts)} queries x {rounds} rounds identical"
    return Check("repeat-query consistency", not problems, detail)


def diagnose(client: Client, probe: Probe, reference: dict | None) -> tuple[list[Check], dict]:
    """Run every check; returns them and the current reference (for --save-reference)."""
    stats = client.stats()
    vectors = embed(client, probe)
    current = reference_of(vectors, stats.model_id)
    checks = [check_norms(vectors), check_integrity(stats), check_repeat(client, probe)]
    if reference is not None:
        checks.insert(1, check_shift(current, reference))
    return checks, current


def report(checks: Sequence[Check]) -> str:
    lines = [f"{'OK  ' if c.ok else 'FAIL'}  {c.name}: {c.detail}" for c in checks]
    bad = sum(not c.ok for c in checks)
    lines.append("all checks passed" if not bad else f"{bad} of {len(checks)} checks failed")
    return "\n".join(lines)


def add_arguments(parser) -> None:  # type: ignore[no-untyped-def]
    parser.add_argument("--server", default="127.0.0.1:50051")
    parser.add_argument("--reference", type=Path, help="compare with this saved reference")
    parser.add_argument("--save-reference", type=Path, help="write the current reference here")
    parser.add_argument("--probe", type=Path, help="dataset to probe with (default: generated)")


def run_command(args) -> None:  # type: ignore[no-untyped-def]
    import grpc

    probe = probe_from(args.probe) if args.probe else generated_probe()
    reference = json.loads(args.reference.read_text()) if args.reference else None
    with Client(args.server, timeout=60.0) as client:
        try:
            checks, current = diagnose(client, probe, reference)
        except grpc.RpcError as exc:
            sys.exit(f"FAIL  server: {exc.code().name}: {exc.details()}")
    if args.save_reference:
        args.save_reference.write_text(json.dumps(current) + "\n")
        print(f"reference written to {args.save_reference}")
    print(report(checks), flush=True)
    sys.exit(0 if all(c.ok for c in checks) else 1)
