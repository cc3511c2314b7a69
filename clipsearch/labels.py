"""Zero-shot labels for cold start: each image gets the label whose prompts it matches best.

Every label is written into each prompt template ("a photo of a {}.", ...); the label's
embedding is the normalised mean of its prompts' text embeddings (prompt ensembling). An
image's label is the one with the highest cosine similarity, stored with that similarity as
metadata (`label`, `label_score`) so searches can filter on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from clipsearch.client import Client

DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.", "a {}.", "{}")
LABEL_KEY = "label"
SCORE_KEY = "label_score"


def read_labels(path: Path) -> list[str]:
    """One label a line; blank lines and lines starting with # are skipped."""
    labels = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    labels = list(dict.fromkeys(label for label in labels if label and not label.startswith("#")))
    if not labels:
        raise ValueError(f"{path}: no labels (one a line)")
    return labels


class ZeroShotLabeler:
    """Label embeddings built once through the server's text encoder."""

    def __init__(
        self, client: Client, labels: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES
    ) -> None:
        if any(t.count("{}") != 1 for t in templates):
            raise ValueError('every prompt template needs exactly one "{}"')
        self.labels = list(labels)
        prompts = [t.format(label) for label in self.labels for t in templates]
        vectors = np.concatenate(
            [client.encode_text(prompts[i : i + 64]) for i in range(0, len(prompts), 64)]
        )
        means = vectors.reshape(len(self.labels), len(templates), -1).mean(axis=1)
        self.vectors = means / np.linalg.norm(means, axis=1, keepdims=True)

    def label(self, image_vectors: np.ndarray) -> list[tuple[str, float]]:
        """(best label, cosine similarity) for each L2-normalised image embedding."""
        similarity = np.asarray(image_vectors, dtype=np.float32) @ self.vectors.T
        best = similarity.argmax(axis=1)
        return [(self.labels[b], float(similarity[i, b])) for i, b in enumerate(best)]

    def metadata(self, image_vectors: np.ndarray) -> list[dict[str, str]]:
        """The label metadata entries for each image."""
        return [
            {LABEL_KEY: label, SCORE_KEY: f"{score:.4f}"}
            for label, score in self.label(image_vectors)
        ]
