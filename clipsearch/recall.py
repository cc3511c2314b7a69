"""Recall@K for cross-modal retrieval, shared by `clipsearch eval` and `clipsearch finetune`.

A query is answered correctly at K when any relevant target is among its first K results.
A caption is relevant to an image when it is one of that image's captions, compared as
strings: identical captions cannot be told apart by any model, so each of them counts for
every image it describes (a COCO caption for its own image; a generated caption for every
scene it describes exactly). Text→image queries are every caption; image→text queries are
every image.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

KS: tuple[int, ...] = (1, 5, 10)


def top_k(similarity: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k most similar targets per row, best first (exact, ties by index)."""
    k = min(k, similarity.shape[1])
    order = np.argsort(-similarity, axis=1, kind="stable")
    return order[:, :k]


def recall_at_k(
    rankings: Sequence[Sequence[int]] | np.ndarray,
    relevant: Sequence[set[int]],
    ks: Sequence[int] = KS,
) -> dict[str, float]:
    """Recall@K in percent for each K: `rankings[q]` are target indices, best first, and
    `relevant[q]` the targets that answer query q."""
    hits = {k: 0 for k in ks}
    for ranked, good in zip(rankings, relevant, strict=True):
        first = next((rank for rank, t in enumerate(ranked) if int(t) in good), None)
        for k in ks:
            hits[k] += first is not None and first < k
    n = max(1, len(relevant))
    return {f"R@{k}": round(100.0 * hits[k] / n, 2) for k in ks}


def relevance(
    texts: Sequence[str], image_captions: Sequence[Sequence[str]]
) -> tuple[list[set[int]], list[set[int]]]:
    """(images relevant to each text, texts relevant to each image)."""
    images_of: dict[str, set[int]] = {}
    for image, captions in enumerate(image_captions):
        for caption in captions:
            images_of.setdefault(caption, set()).add(image)
    texts_of: dict[str, set[int]] = {}
    for index, text in enumerate(texts):
        texts_of.setdefault(text, set()).add(index)
    for_text = [images_of.get(text, set()) for text in texts]
    for_image = [
        set().union(*(texts_of.get(c, set()) for c in captions)) for captions in image_captions
    ]
    return for_text, for_image


def both_directions(
    text_vectors: np.ndarray,
    image_vectors: np.ndarray,
    texts: Sequence[str],
    image_captions: Sequence[Sequence[str]],
    ks: Sequence[int] = KS,
) -> dict[str, dict[str, float]]:
    """Exact text→image and image→text Recall@K from L2-normalised embeddings."""
    similarity = text_vectors @ image_vectors.T
    depth = max(ks)
    for_text, for_image = relevance(texts, image_captions)
    return {
        "text_to_image": recall_at_k(top_k(similarity, depth), for_text, ks),
        "image_to_text": recall_at_k(top_k(similarity.T, depth), for_image, ks),
    }
