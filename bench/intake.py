"""Image intake of large photos: transformers' processor vs the replica's path, side by side.

For JPEGs of 1, 3 and 12 megapixels this times, per image and in this process (one core):

  raw        PIL open + convert("RGB") + transformers' CLIPImageProcessor (PIL backend): what
             a hand-rolled CLIP script does
  exact      the replica's path with `encoder.reducing_gap: 0` (the default): the checked
             decode (`decode_image`) and `ClipEncoder.prepare_image`, the processor's pixels
  gap N      the same with `reducing_gap: N`: the JPEG decoded at a DCT scale and box-shrunk
             while its short side stays >= N x 224, then the processor's resize

and how far each path's pixels and embeddings are from raw's: mean and max pixel difference
in 8-bit levels (after undoing the normalisation), and the lowest cosine of the image
embedding to raw's, for a random-init ViT-B/32 (`CLIPConfig()`) and for the bundled demo
model (trained, 64 px). `speed-up` = raw ms / this path's ms.

Usage: PYTHONPATH=. python bench/intake.py [--images 3] [--repeats 5]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from transformers import AutoImageProcessor  # noqa: E402

from bench.encoder import build_vit_b32, raw_latency  # noqa: E402
from encoder_service.images import decode_image  # noqa: E402
from encoder_service.model import ClipEncoder, ImageInput, resolve_model  # noqa: E402

SIZES = ((1152, 864), (2048, 1536), (4032, 3024))
GAPS = (2.0, 3.0)
LIMIT = 1 << 28


def photo(width: int, height: int, seed: int) -> bytes:
    """A photo-like JPEG: a smooth colour field, shapes with hard edges, thin lines and
    sensor-like grain (so that the pre-shrink has detail and edges to get wrong)."""
    rng = np.random.default_rng(seed)
    field = rng.integers(0, 255, (height // 64 + 2, width // 64 + 2, 3), dtype=np.uint8)
    image = Image.fromarray(field).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(30):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        r = int(rng.integers(width // 60, width // 8))
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
    for _ in range(40):
        ends = [int(v) for v in rng.integers(0, [width, height, width, height])]
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        draw.line(ends, fill=colour, width=max(1, width // 500))
    grain = rng.normal(0, 6, (height, width, 3))
    pixels = np.clip(np.asarray(image, np.float32) + grain, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def unit_rows(features: object) -> np.ndarray:
    tensor = features if isinstance(features, torch.Tensor) else features.pooler_output  # type: ignore[attr-defined]
    return torch.nn.functional.normalize(tensor.float(), dim=-1).numpy()


def raw_pixels(processor: Any, data: bytes) -> torch.Tensor:
    """What a hand-rolled script does: PIL open + convert, then the checkpoint's processor."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    return processor(images=[image], return_tensors="pt")["pixel_values"][0]


def decoded(encoder: ClipEncoder, data: bytes) -> Image.Image:
    """The replica's checked decode, at the scale `encoder`'s reducing_gap allows."""
    return decode_image(data, max_bytes=LIMIT, max_pixels=LIMIT, min_side=encoder.min_image_side)


def served_input(encoder: ClipEncoder, data: bytes) -> ImageInput:
    """The replica's intake of one image: decode, then `prepare_image`."""
    return encoder.prepare_image(decoded(encoder, data))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=3, help="distinct photos per size")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per photo")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        vit = str(build_vit_b32(Path(tmp) / "vit-b32"))
        paths = {"ViT-B/32": vit, "demo": resolve_model("demo")}
        models = {
            name: {gap: ClipEncoder(path, reducing_gap=gap) for gap in (0.0, *GAPS)}
            for name, path in paths.items()
        }
        # Each model's own processor (the demo model's is 64 px), as transformers runs it.
        processors = {
            name: AutoImageProcessor.from_pretrained(path, backend="pil")
            for name, path in paths.items()
        }
        std = np.asarray(processors["ViT-B/32"].image_std, np.float32)
        levels = std[:, None, None] * 255

        print(
            "| photo | path | ms per image | speed-up | decoded at | pixel diff mean / max "
            "(levels) | min cosine to raw, ViT-B/32 / demo |"
        )
        print("|---|---|---|---|---|---|---|")
        for width, height in SIZES:
            photos = [photo(width, height, seed) for seed in range(args.images)]
            vit_processor = processors["ViT-B/32"]
            raw_ms = statistics.median(
                1000 * raw_latency(partial(raw_pixels, vit_processor, d), args.repeats)
                for d in photos
            )
            reference = {
                name: [raw_pixels(processor, d) for d in photos]
                for name, processor in processors.items()
            }
            raw_vectors = {
                name: models[name][0.0].encode_pixels([(p,) for p in pixels])
                for name, pixels in reference.items()
            }
            print(
                f"| {width}x{height} ({len(photos[0]) // 1024} KB) | raw | {raw_ms:.1f} | 1.00× "
                f"| {width}x{height} | 0 / 0 | 1 / 1 |"
            )
            for gap in (0.0, *GAPS):
                encoder = models["ViT-B/32"][gap]
                ms = statistics.median(
                    1000 * raw_latency(partial(served_input, encoder, d), args.repeats)
                    for d in photos
                )
                served = {
                    name: [served_input(m[gap], d) for d in photos] for name, m in models.items()
                }
                diffs = [
                    (ours[0] - raw).abs().numpy() * levels
                    for ours, raw in zip(served["ViT-B/32"], reference["ViT-B/32"], strict=True)
                ]
                mean = float(np.mean([d.mean() for d in diffs]))
                worst = float(max(d.max() for d in diffs))
                cosines = [
                    float(np.min(np.sum(m[gap].encode_pixels(served[name]) * raw_vectors[name], 1)))
                    for name, m in models.items()
                ]
                size = decoded(encoder, photos[0]).size
                label = "exact (gap 0)" if gap == 0 else f"gap {gap:g}"
                print(
                    f"| | {label} | {ms:.1f} | {raw_ms / ms:.2f}× | {size[0]}x{size[1]} "
                    f"| {mean:.2f} / {worst:.0f} | {cosines[0]:.5f} / {cosines[1]:.5f} |"
                )
    print(
        "\nraw = PIL open + convert + transformers CLIPImageProcessor; exact / gap N = the "
        "replica's decode_image + prepare_image with encoder.reducing_gap N; one core, median "
        f"of {args.repeats} runs per photo, median over {args.images} photos per size. "
        "'decoded at' and the pixel columns are ViT-B/32's (224 px); the demo model (64 px) "
        "shrinks further (from 2 x 64 px)."
    )


if __name__ == "__main__":
    main()
