"""Safe image decoding: bytes from a caller in, one RGB `PIL.Image` out.

Every failure becomes `InvalidArgument` with a message a caller can act on. The order of the
checks is the defence: byte cap, then the header's pixel count (before any pixel is decoded,
so a 100 KB file that claims 20000x20000 costs nothing), then `load()` inside the guard
(Pillow opens a truncated file happily and only fails while decoding it).
"""

from __future__ import annotations

import contextlib
import io
import re
import threading
import warnings
from collections.abc import Iterator
from typing import Any, cast

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from clipsearch.errors import InvalidArgument

ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
"""Pillow format names we decode; everything else is refused before decoding."""

# Leading bytes of the allowed formats: a file that starts like one of them but does not
# open is reported as corrupt rather than as "not an image".
_SIGNATURES: tuple[bytes, ...] = (
    b"\xff\xd8\xff",
    b"\x89PNG\r\n\x1a\n",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
)
_CORRUPT = "image is truncated or corrupt"
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_BOMB_PIXELS = re.compile(r"Image size \((\d+) pixels\)")


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int, min_side: int = 0) -> Image.Image:
    """Decode caller-supplied bytes into an RGB image, refusing anything unsafe.

    Args:
        data: The encoded image (JPEG, PNG, WebP, GIF (first frame), BMP or TIFF).
        max_bytes: Largest accepted encoded size.
        max_pixels: Largest accepted width x height, checked from the header before decoding.
        min_side: 0 decodes every pixel. Otherwise a JPEG whose short side is at least
            twice this is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, which
            skips most of the inverse transform) with its short side kept >= `min_side`;
            other formats decode in full.

    Returns:
        A fully loaded image in mode RGB with its EXIF orientation applied; transparent
        pixels are composited on white.

    Raises:
        InvalidArgument: The bytes are empty, too large, not an image, a format outside
            `ALLOWED_FORMATS`, over the pixel limit, truncated or corrupt.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidArgument("image must be bytes")
    _check_byte_count(len(data), max_bytes)
    with _bomb_warning_is_error():
        image = _open(bytes(data), max_pixels)
        _check_pixels(image.size, max_pixels)
        if min_side > 0 and image.format == "JPEG":
            _draft(image, min_side)
        _load(image, max_pixels)
        # GIF and TIFF frames may be larger than the size the header announced.
        _check_pixels(image.size, max_pixels)
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a loaded image of any Pillow mode to RGB, with orientation and alpha handled."""
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except Exception as exc:  # a malformed EXIF block must not fail differently from pixels
        raise InvalidArgument(_CORRUPT) from exc
    image = _to_eight_bit(image)
    if _has_alpha(image):
        return _composite_on_white(image)
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise InvalidArgument(f"unsupported image color mode '{image.mode}'") from exc


def _check_byte_count(size: int, max_bytes: int) -> None:
    """Refuse empty input and input over the byte cap."""
    if size == 0:
        raise InvalidArgument("image is empty (0 bytes)")
    if size > max_bytes:
        raise InvalidArgument(f"image is {size} bytes, over the limit of {max_bytes}")


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    """Refuse images with no pixels or more than `max_pixels`."""
    width, height = size
    if width <= 0 or height <= 0:
        raise InvalidArgument(f"image is {width}x{height}: it has no pixels")
    if width * height > max_pixels:
        raise InvalidArgument(
            f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}"
        )


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Parse the header with only the allowed decoders; no pixel data is decoded yet."""
    try:
        return Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidArgument(_bomb_message(str(exc), max_pixels)) from exc
    except UnidentifiedImageError as exc:
        raise InvalidArgument(_unidentified_message(data)) from exc
    except Exception as exc:  # Pillow raises many types for a damaged header
        raise InvalidArgument(_CORRUPT) from exc


def _draft(image: Image.Image, min_side: int) -> None:
    """Ask the JPEG decoder for the smallest DCT scale that keeps the short side >= min_side."""
    width, height = image.size
    short = min(width, height)
    if short < 2 * min_side:
        return
    # Pillow picks the largest scale 1/s (s in 8, 4, 2) with s <= min(w // rw, h // rh) and
    # the decoder rounds up, so asking for each side times min_side / short (rounded up)
    # gives s <= short / min_side: the short side stays >= min_side.
    wanted = (-(-width * min_side // short), -(-height * min_side // short))
    try:
        image.draft(None, wanted)
    except Exception as exc:  # a header Pillow parsed but cannot scale: report it as corrupt
        raise InvalidArgument(_CORRUPT) from exc


def _load(image: Image.Image, max_pixels: int) -> None:
    """Decode the pixels (first frame only), mapping every decoder failure to one message."""
    try:
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidArgument(_bomb_message(str(exc), max_pixels)) from exc
    except Exception as exc:  # truncated data surfaces as OSError, SyntaxError, ValueError...
        raise InvalidArgument(_CORRUPT) from exc


def _bomb_message(pillow_text: str, max_pixels: int) -> str:
    """The caller-facing message for Pillow's own decompression-bomb check."""
    match = _BOMB_PIXELS.search(pillow_text)
    if match is None:
        return f"image has too many pixels; the limit is {max_pixels}"
    return f"image is {match.group(1)} pixels, over the limit of {max_pixels}"


def _unidentified_message(data: bytes) -> str:
    """Tell a damaged allowed file, a disallowed format and non-image bytes apart."""
    if data.startswith(_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
        return _CORRUPT
    try:
        # Header parse only (no load) and only to name the format in the message.
        with Image.open(io.BytesIO(data)) as probe:
            found = probe.format
    except Exception:  # noqa: BLE001 - any failure to parse means "not an image"
        return "not an image: the data is not in any supported image format"
    allowed = ", ".join(ALLOWED_FORMATS)
    return f"unsupported image format '{found}'; allowed: {allowed}"


def _to_eight_bit(image: Image.Image) -> Image.Image:
    """Map 16-bit, 32-bit integer and float greyscale to 8-bit 'L' without saturating."""
    if image.mode == "I" or image.mode.startswith("I;16"):
        # Pillow's own convert clips at 255, which turns any 16-bit image white.
        values = np.clip(np.asarray(image), 0, 65535).astype(np.uint16)
        return Image.fromarray((values >> 8).astype(np.uint8))
    if image.mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0)
        finite_max = float(values.max(initial=0.0))
        if finite_max <= 1.0:  # float images are usually scaled to [0, 1]
            values = values * 255.0
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
    return image


def _has_alpha(image: Image.Image) -> bool:
    """True when the image carries transparency (an alpha band or a transparent colour)."""
    return image.mode in _ALPHA_MODES or "transparency" in image.info


def _composite_on_white(image: Image.Image) -> Image.Image:
    """Flatten transparency onto white, as a browser would show it on a white page."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


_bomb_filter_lock = threading.Lock()
_bomb_filter_users = 0
_bomb_filter_installed = False
# The entry `warnings.filterwarnings("error", category=...)` puts in `warnings.filters`.
_BOMB_FILTER = ("error", None, Image.DecompressionBombWarning, None, 0)


@contextlib.contextmanager
def _bomb_warning_is_error() -> Iterator[None]:
    """Make Pillow's DecompressionBombWarning an exception only while images are decoded.

    `warnings.catch_warnings` is not thread-safe before Python 3.14 (it swaps the global
    filter list, so overlapping decodes in worker threads could restore the wrong one).
    Instead the first decoder in installs one filter and the last one out removes it.
    """
    global _bomb_filter_users, _bomb_filter_installed
    with _bomb_filter_lock:
        if _bomb_filter_users == 0 and _BOMB_FILTER not in warnings.filters:
            warnings.filterwarnings("error", category=Image.DecompressionBombWarning)
            _bomb_filter_installed = True
        _bomb_filter_users += 1
    try:
        yield
    finally:
        with _bomb_filter_lock:
            _bomb_filter_users -= 1
            if _bomb_filter_users == 0 and _bomb_filter_installed:
                _bomb_filter_installed = False
                with contextlib.suppress(ValueError):  # someone reset the filters meanwhile
                    cast("list[Any]", warnings.filters).remove(_BOMB_FILTER)
