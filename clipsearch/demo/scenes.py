"""Generated image–caption pairs: one coloured shape on a plain background.

Every scene is a combination of five attributes (colour, shape, size, position,
background) and has a caption such as
``"a small red circle at the top left on a white background"``.
Images are drawn with PIL (4x supersampled, then downsampled) — pure numpy + PIL,
no torch.

Seed convention (keeps evaluation data disjoint from training data):

* ``random_scenes(n, seed)`` is deterministic for ``seed``.  Scene-set seeds in
  ``TRAIN_SEEDS`` (``0 .. 9_999``) are the only ones the training code uses:
  training batch ``k`` uses scene-set seed ``k`` (mod 10_000).
* Seeds ``>= HELDOUT_SEED`` (``10_000``) are never used for training; held-out
  evaluation uses ``HELDOUT_SEED`` (or any larger seed).
* Image ``i`` of a scene set with seed ``S`` is rendered with
  ``render(scene, seed=render_seed(S, i))`` so that image jitter is also
  disjoint between training and evaluation.
* ``render(scene, seed=None)`` draws the canonical scene without any jitter.

``random_scenes`` is stratified over colour x shape: in a set of ``n`` scenes each
of the ``len(COLORS) * len(SHAPES)`` combinations occurs ``n // 24`` or
``n // 24 + 1`` times (shuffled), and size/position/background are uniform.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right", "center")
BACKGROUNDS: tuple[str, ...] = ("white", "gray", "black")

TRAIN_SEEDS = range(0, 10_000)
HELDOUT_SEED = 10_000

_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 225),
    "yellow": (245, 220, 20),
    "purple": (140, 45, 190),
    "orange": (250, 140, 20),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
    "black": (0, 0, 0),
}
# Centre of the shape as a fraction of the image side (x, y).
_CENTERS: dict[str, tuple[float, float]] = {
    "top left": (0.28, 0.28),
    "top right": (0.72, 0.28),
    "bottom left": (0.28, 0.72),
    "bottom right": (0.72, 0.72),
    "center": (0.5, 0.5),
}
# Circumradius as a fraction of the image side.
_RADII: dict[str, float] = {"small": 0.12, "large": 0.23}
_SUPERSAMPLE = 4

assert not set(COLORS) & set(BACKGROUNDS), "a shape colour must never equal a background"


@dataclass(frozen=True)
class Scene:
    """One generated scene; every field is one of the module-level attribute tuples."""

    color: str
    shape: str
    size: str
    position: str
    background: str

    @property
    def caption(self) -> str:
        """Full caption, e.g. ``"a large blue star in the center on a black background"``."""
        where = "in the center" if self.position == "center" else f"at the {self.position}"
        return f"a {self.size} {self.color} {self.shape} {where} on a {self.background} background"


def random_scenes(n: int, seed: int) -> list[Scene]:
    """``n`` scenes, deterministic for ``seed``, stratified over colour x shape."""
    rng = np.random.default_rng(seed)
    combos = [(c, s) for c in COLORS for s in SHAPES]
    reps = -(-n // len(combos)) if n > 0 else 0
    pool: np.ndarray | list[int] = (
        np.concatenate([rng.permutation(len(combos)) for _ in range(reps)])[:n] if reps else []
    )
    scenes = []
    for combo_index in rng.permutation(np.asarray(pool, dtype=np.int64)):
        color, shape = combos[int(combo_index)]
        scenes.append(
            Scene(
                color=color,
                shape=shape,
                size=SIZES[int(rng.integers(len(SIZES)))],
                position=POSITIONS[int(rng.integers(len(POSITIONS)))],
                background=BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))],
            )
        )
    return scenes


def render_seed(set_seed: int, index: int) -> int:
    """Render seed for image ``index`` of the scene set generated with ``set_seed``."""
    return set_seed * 100_003 + index


def _jittered_rgb(name: str, rng: np.random.Generator | None, amount: int) -> tuple[int, int, int]:
    base = np.array(_RGB[name], dtype=np.int64)
    if rng is not None:
        base = base + rng.integers(-amount, amount + 1, size=3)
    r, g, b = (int(v) for v in np.clip(base, 0, 255))
    return (r, g, b)


def _polygon(
    shape: str, cx: float, cy: float, radius: float, angle: float
) -> list[tuple[float, float]]:
    """Vertices of a regular square / triangle / 5-point star around (cx, cy)."""
    if shape == "square":
        corners = [(math.pi / 4 + k * math.pi / 2, radius) for k in range(4)]
    elif shape == "triangle":
        # Lower the centre a little so the triangle looks visually centred.
        cy += radius * 0.15
        corners = [(-math.pi / 2 + k * 2 * math.pi / 3, radius * 1.1) for k in range(3)]
    elif shape == "star":
        corners = [
            (-math.pi / 2 + k * math.pi / 5, radius * (1.0 if k % 2 == 0 else 0.45))
            for k in range(10)
        ]
    else:
        raise ValueError(f"not a polygon shape: {shape!r}")
    return [(cx + r * math.cos(a + angle), cy + r * math.sin(a + angle)) for a, r in corners]


def render(scene: Scene, size: int = 64, seed: int | None = None) -> Image.Image:
    """Draw ``scene`` as a ``size`` x ``size`` RGB image; ``seed`` adds small jitter."""
    rng = np.random.default_rng(seed) if seed is not None else None
    jitter = (
        (lambda scale: float(rng.uniform(-scale, scale)))
        if rng is not None
        else (lambda scale: 0.0)
    )
    big = size * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), _jittered_rgb(scene.background, rng, 10))
    draw = ImageDraw.Draw(image)
    fx, fy = _CENTERS[scene.position]
    cx, cy = (fx + jitter(0.04)) * big, (fy + jitter(0.04)) * big
    radius = _RADII[scene.size] * (1.0 + jitter(0.12)) * big
    angle = math.radians(jitter(15.0) if scene.shape != "star" else jitter(36.0))
    fill = _jittered_rgb(scene.color, rng, 12)
    if scene.shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    else:
        # Squares/triangles of equal circumradius look smaller than circles; scale up a bit.
        scale = {"square": 1.15, "triangle": 1.1, "star": 1.2}[scene.shape]
        draw.polygon(_polygon(scene.shape, cx, cy, radius * scale, angle), fill=fill)
    # Box-filter downsampling of the supersampled drawing = anti-aliased edges.
    return image.reduce(_SUPERSAMPLE)


def render_png(scene: Scene, size: int = 64, seed: int | None = None) -> bytes:
    """PNG-encoded bytes of :func:`render`."""
    buffer = io.BytesIO()
    render(scene, size=size, seed=seed).save(buffer, format="PNG")
    return buffer.getvalue()
