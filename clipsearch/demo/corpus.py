"""The demo corpus: generated scenes (never seen in training) with captions, metadata and
publish times spread over the last 90 days, so recency visibly changes rankings."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from clipsearch.client import Document
from clipsearch.demo.scenes import HELDOUT_SEED, random_scenes, render_png, render_seed

CORPUS_SEED = HELDOUT_SEED + 10_000
"""Scene-set seed of the demo corpus: held out from training like the evaluation seeds."""

SPREAD_DAYS = 90.0


def demo_documents(n: int, now: float, seed: int = CORPUS_SEED) -> Iterator[Document]:
    """`n` demo documents, each an image plus its caption, published within 90 days of `now`."""
    rng = np.random.default_rng(seed)
    ages = rng.uniform(0.0, SPREAD_DAYS * 86_400.0, size=n)
    for i, scene in enumerate(random_scenes(n, seed)):
        yield Document(
            id=f"demo-{i:05d}",
            image=render_png(scene, seed=render_seed(seed, i)),
            text=scene.caption,
            publish_time=now - float(ages[i]),
            metadata={
                "color": scene.color,
                "shape": scene.shape,
                "size": scene.size,
                "position": scene.position,
                "background": scene.background,
                "source": "demo",
            },
        )
