"""Unit tests for encoder_service.images.decode_image: formats, modes, limits, damage."""

from __future__ import annotations

import io
import resource
import struct
import threading
import time
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from clipsearch.errors import InvalidArgument
from encoder_service.images import ALLOWED_FORMATS, decode_image

MAX_BYTES = 10 * 1024 * 1024
MAX_PIXELS = 25_000_000
RED = (220, 20, 20)


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    """Save an image to bytes in one format."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def decode(data: bytes, **limits: int) -> Image.Image:
    """decode_image with the production defaults unless a test overrides a limit."""
    return decode_image(
        data,
        max_bytes=limits.get("max_bytes", MAX_BYTES),
        max_pixels=limits.get("max_pixels", MAX_PIXELS),
    )


def png_claiming(width: int, height: int) -> bytes:
    """A tiny real PNG whose IHDR is rewritten to claim width x height (CRC fixed up)."""
    data = bytearray(encode(Image.new("L", (8, 8), 0), "PNG"))
    struct.pack_into(">II", data, 16, width, height)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def assert_close(pixel: object, expected: tuple[int, ...], tol: int = 12) -> None:
    """Pixel equality up to lossy-codec noise."""
    assert isinstance(pixel, tuple)
    assert all(abs(a - b) <= tol for a, b in zip(pixel, expected, strict=True)), pixel


# --- formats -------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ALLOWED_FORMATS)
def test_each_allowed_format_decodes_to_rgb(fmt: str) -> None:
    data = encode(Image.new("RGB", (16, 12), RED), fmt)
    image = decode(data)
    assert image.mode == "RGB"
    assert image.size == (16, 12)
    assert_close(image.getpixel((8, 6)), RED)


def test_animated_gif_gives_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), RED), Image.new("RGB", (8, 8), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert_close(decode(data).getpixel((4, 4)), RED)


def test_one_by_one_image_decodes() -> None:
    assert decode(encode(Image.new("RGB", (1, 1), RED), "PNG")).size == (1, 1)


@pytest.mark.parametrize("fmt", ["ICO", "PPM", "TGA"])
def test_disallowed_format_is_named(fmt: str) -> None:
    data = encode(Image.new("RGB", (16, 16), RED), fmt)
    with pytest.raises(InvalidArgument, match=f"unsupported image format '{fmt}'; allowed: JPEG"):
        decode(data)


# --- orientation and colour modes ----------------------------------------------------


def two_colour_wide(width: int = 20, height: int = 10) -> Image.Image:
    """Left half red, right half blue."""
    image = Image.new("RGB", (width, height), RED)
    image.paste((0, 0, 255), (width // 2, 0, width, height))
    return image


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_exif_orientation_is_applied(fmt: str) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the left (red) half ends on top
    data = encode(two_colour_wide(), fmt, exif=exif.tobytes())
    image = decode(data)
    assert image.size == (10, 20)
    assert_close(image.getpixel((5, 2)), RED, tol=40)
    assert_close(image.getpixel((5, 17)), (0, 0, 255), tol=40)


def test_two_by_one_rotated_by_tag_reads_back_one_by_two() -> None:
    exif = Image.Exif()
    exif[0x0112] = 8
    data = encode(Image.new("RGB", (2, 1), RED), "PNG", exif=exif.tobytes())
    assert decode(data).size == (1, 2)


def test_transparent_rgba_is_composited_on_white() -> None:
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    image.putpixel((1, 1), (255, 0, 0, 128))
    out = decode(encode(image, "PNG"))
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert_close(out.getpixel((1, 1)), (255, 127, 127), tol=2)


def test_grey_alpha_is_composited_on_white() -> None:
    image = Image.new("LA", (4, 4), (0, 0))
    assert decode(encode(image, "PNG")).getpixel((0, 0)) == (255, 255, 255)


def test_palette_with_transparency_is_composited_on_white() -> None:
    image = Image.new("P", (4, 4), 0)
    image.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    image.putpixel((0, 0), 1)
    data = encode(image, "PNG", transparency=0)
    out = decode(data)
    assert out.getpixel((1, 1)) == (255, 255, 255)
    assert out.getpixel((0, 0)) == (0, 255, 0)


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk_is_converted(fmt: str) -> None:
    data = encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), fmt)
    assert_close(decode(data).getpixel((4, 4)), (255, 0, 0), tol=20)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_sixteen_bit_mid_grey_is_not_white(fmt: str) -> None:
    image = Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16))
    assert image.mode == "I;16"
    out = decode(encode(image, fmt))
    assert out.getpixel((4, 4)) == (128, 128, 128)


def test_thirty_two_bit_integer_grey_is_scaled() -> None:
    image = Image.fromarray(np.full((8, 8), 16384, dtype=np.int32))
    assert image.mode == "I"
    assert decode(encode(image, "TIFF")).getpixel((4, 4)) == (64, 64, 64)


def test_float_grey_in_unit_range_is_scaled() -> None:
    image = Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32))
    assert image.mode == "F"
    assert decode(encode(image, "TIFF")).getpixel((4, 4)) == (128, 128, 128)


def test_black_and_white_is_converted() -> None:
    assert decode(encode(Image.new("1", (8, 8), 1), "PNG")).getpixel((0, 0)) == (255, 255, 255)


# --- damage and junk -----------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "TIFF", "BMP"])
def test_truncated_image_is_reported(fmt: str) -> None:
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), fmt)
    with pytest.raises(InvalidArgument, match="image is truncated or corrupt"):
        decode(data[: len(data) // 2])


def test_png_cut_inside_header_is_corrupt_not_unknown() -> None:
    data = encode(Image.new("RGB", (8, 8), RED), "PNG")
    with pytest.raises(InvalidArgument, match="truncated or corrupt"):
        decode(data[:20])


def test_random_bytes_are_not_an_image() -> None:
    junk = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    with pytest.raises(InvalidArgument, match="not an image"):
        decode(b"Q" + junk)


def test_text_is_not_an_image() -> None:
    with pytest.raises(InvalidArgument, match="not an image"):
        decode(b"hello, I am a caption")


def test_empty_bytes_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="image is empty"):
        decode(b"")


def test_non_bytes_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="image must be bytes"):
        decode("not bytes")  # type: ignore[arg-type]


# --- limits --------------------------------------------------------------------------


def test_byte_cap_is_checked_first() -> None:
    data = encode(Image.new("RGB", (64, 64), RED), "PNG")
    with pytest.raises(InvalidArgument, match=f"image is {len(data)} bytes, over the limit of 100"):
        decode(data, max_bytes=100)
    # Byte cap comes before parsing: junk over the cap is reported as too big.
    with pytest.raises(InvalidArgument, match="over the limit of 10"):
        decode(b"x" * 11, max_bytes=10)


def test_pixel_cap_names_the_size() -> None:
    data = encode(Image.new("RGB", (20, 20), RED), "PNG")
    with pytest.raises(InvalidArgument, match="image is 20x20 = 400 pixels, over the limit of 399"):
        decode(data, max_pixels=399)
    assert decode(data, max_pixels=400).size == (20, 20)


def max_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize(
    ("width", "height", "message"),
    [
        (20000, 20000, "image is 400000000 pixels, over the limit of 25000000"),
        (10000, 10000, "image is 100000000 pixels, over the limit of 25000000"),
        (6000, 5000, "image is 6000x5000 = 30000000 pixels, over the limit of 25000000"),
    ],
)
def test_header_claiming_huge_size_is_refused_before_decoding(
    width: int, height: int, message: str
) -> None:
    data = png_claiming(width, height)
    assert len(data) < 200
    rss_before, started = max_rss_mib(), time.perf_counter()
    with pytest.raises(InvalidArgument, match=message):
        decode(data)
    assert time.perf_counter() - started < 0.5
    assert max_rss_mib() - rss_before < 100  # a decode would need 400 MB to 1.2 GB


def test_bomb_warning_filter_is_scoped() -> None:
    before = list(warnings.filters)
    with pytest.raises(InvalidArgument):
        decode(png_claiming(10000, 10000))
    assert warnings.filters == before
    # Outside decode_image Pillow's bomb warning is still just a warning.
    with pytest.warns(Image.DecompressionBombWarning):
        Image.open(io.BytesIO(png_claiming(10000, 10000)))


def test_concurrent_decodes_leave_no_filter_behind() -> None:
    before = list(warnings.filters)
    good = encode(Image.new("RGB", (32, 32), RED), "PNG")
    bomb = png_claiming(10000, 10000)
    errors: list[BaseException] = []

    def work(index: int) -> None:
        for _ in range(20):
            try:
                decode(bomb if index % 2 else good)
            except InvalidArgument:
                pass
            except BaseException as exc:  # noqa: BLE001 - anything else fails the test
                errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors
    assert warnings.filters == before


def test_real_compression_bomb_is_refused_from_its_header() -> None:
    # Real pixel data, not a doctored header: 36 megapixels of zeros deflate to ~35 KB.
    data = encode(Image.new("L", (6000, 6000), 0), "PNG", optimize=True)
    assert len(data) < 100_000
    rss_before = max_rss_mib()
    with pytest.raises(InvalidArgument, match="36000000 pixels, over the limit of 25000000"):
        decode(data)
    assert max_rss_mib() - rss_before < 100


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "PNG"])
def test_palette_without_transparency_is_converted(fmt: str) -> None:
    image = Image.new("P", (6, 6), 1)
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert decode(encode(image, fmt)).getpixel((3, 3)) == (10, 200, 30)


def test_progressive_jpeg_decodes() -> None:
    data = encode(Image.new("RGB", (64, 48), RED), "JPEG", progressive=True)
    assert_close(decode(data).getpixel((10, 10)), RED)


# --- min_side: JPEG DCT scaling ------------------------------------------------------------


def photo(width: int, height: int) -> Image.Image:
    """A smooth picture with structure (gradients and blocks), like a downscaled photo."""
    x = np.linspace(0, 255, width, dtype=np.float32)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    pixels = np.stack([x + 0 * y, y + 0 * x, (x + y) / 2], axis=-1)
    pixels[height // 4 : height // 2, width // 4 : width // 2] = (250, 30, 30)
    return Image.fromarray(pixels.astype(np.uint8))


def decode_scaled(data: bytes, min_side: int) -> Image.Image:
    return decode_image(data, max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS, min_side=min_side)


@pytest.mark.parametrize(
    ("size", "min_side", "expected"),
    [
        ((1600, 1200), 224, (400, 300)),  # 1200 // 224 = 5: scale 1/4, not 1/8 (150 < 224)
        ((1600, 1200), 150, (200, 150)),  # exactly 1/8
        ((1200, 1600), 300, (300, 400)),  # portrait: the short side is the width
        ((1601, 1201), 150, (201, 151)),  # the decoder rounds up
        ((447, 300), 224, (447, 300)),  # short side under 2 x min_side: full size
    ],
)
def test_min_side_decodes_a_large_jpeg_at_the_smallest_scale_keeping_it(
    size: tuple[int, int], min_side: int, expected: tuple[int, int]
) -> None:
    data = encode(photo(*size), "JPEG", quality=95)
    image = decode_scaled(data, min_side)
    assert image.size == expected and image.mode == "RGB"
    assert min(image.size) >= min_side


def test_a_scaled_jpeg_is_the_picture_at_a_smaller_size() -> None:
    data = encode(photo(1600, 1200), "JPEG", quality=95)
    full = decode(data).reduce(4)
    scaled = decode_scaled(data, 224)
    assert scaled.size == full.size
    diff = np.abs(np.asarray(scaled, np.int16) - np.asarray(full, np.int16))
    assert diff.mean() < 2.0 and np.percentile(diff, 99) < 12


def test_min_side_leaves_other_formats_whole() -> None:
    data = encode(photo(1600, 1200), "PNG")
    assert decode_scaled(data, 224).size == (1600, 1200)


def test_min_side_keeps_exif_orientation() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(photo(1600, 1200), "JPEG", exif=exif.tobytes())
    assert decode_scaled(data, 224).size == (300, 400)


def test_min_side_still_refuses_bombs_and_damage_by_the_header() -> None:
    big = encode(photo(1600, 1200), "JPEG")
    with pytest.raises(InvalidArgument, match="1920000 pixels, over the limit of 1000000"):
        decode_image(big, max_bytes=MAX_BYTES, max_pixels=1_000_000, min_side=100)
    with pytest.raises(InvalidArgument, match="truncated or corrupt"):
        decode_scaled(big[: len(big) // 2], 100)
