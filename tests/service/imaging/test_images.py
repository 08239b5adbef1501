"""images.decode_image normalises every kind of upload to upright, opaque RGB uint8 (no server)."""

from __future__ import annotations

import io
import struct
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from service.imaging import images
from service.imaging.images import (
    ImageError,
    ImageTooLarge,
    UndecodableImage,
    UnsupportedImageFormat,
    decode_image,
    decode_image_for_display,
    decode_image_reduced,
    fit_size,
    request_pixels,
)
from tests.hardening import payloads

ALL = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
RED = (255, 0, 0)


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def decode(data: bytes, max_pixels: int = 10**7, formats: tuple[str, ...] = ALL) -> np.ndarray:
    return decode_image(data, max_pixels, formats)


def test_rgb_png_is_returned_unchanged() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    out = decode(encode(Image.fromarray(pixels), "PNG"))
    assert out.dtype == np.uint8 and out.shape == (20, 30, 3)
    np.testing.assert_array_equal(out, pixels)


def test_exif_orientation_is_applied() -> None:
    # stored 40 wide x 20 high, red on the left half; EXIF 6 means "rotate 90° clockwise to display"
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20] = RED
    exif = Image.Exif()
    exif[0x0112] = 6
    out = decode(encode(Image.fromarray(stored), "JPEG", exif=exif, quality=95))
    assert out.shape == (40, 20, 3)  # displayed upright: 20 wide x 40 high
    assert out[5, 10, 0] > 200 and out[5, 10, 2] < 60  # left half became the top half
    assert out[35, 10, 0] < 60


def test_grayscale_becomes_three_equal_channels() -> None:
    gray = np.tile(np.arange(0, 250, 10, dtype=np.uint8), (5, 1))
    out = decode(encode(Image.fromarray(gray), "PNG"))
    assert out.shape == (5, 25, 3)
    for channel in range(3):
        np.testing.assert_array_equal(out[:, :, channel], gray)


def test_rgba_is_composited_on_white() -> None:
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[:, :2] = (255, 0, 0, 255)  # opaque red
    rgba[:, 2:] = (0, 0, 255, 0)  # fully transparent blue
    out = decode(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    np.testing.assert_array_equal(out[0, 0], RED)
    np.testing.assert_array_equal(out[0, 3], (255, 255, 255))


def test_half_transparent_gray_alpha_blends_with_white() -> None:
    la = Image.new("LA", (2, 2), (0, 128))
    out = decode(encode(la, "PNG"))
    assert abs(int(out[0, 0, 0]) - 127) <= 1 and out[0, 0, 0] == out[0, 0, 1] == out[0, 0, 2]


def test_cmyk_jpeg_is_converted_to_rgb() -> None:
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    out = decode(encode(cmyk, "JPEG", quality=95))
    assert out.shape == (8, 8, 3)
    assert out[4, 4, 0] > 230 and out[4, 4, 1] < 30 and out[4, 4, 2] < 30


def test_16_bit_grayscale_is_scaled_not_clipped() -> None:
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    out = decode(encode(image, "PNG"))
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 128, 255])


def test_palette_with_transparency_uses_white_for_transparent_index() -> None:
    palette_image = Image.new("P", (4, 4), 0)
    palette_image.putpalette([0, 255, 0, 255, 0, 0] + [0] * (256 * 3 - 6))  # index 0 green, 1 red
    palette_image.paste(1, (0, 0, 2, 4))
    out = decode(encode(palette_image, "PNG", transparency=0))
    np.testing.assert_array_equal(out[0, 0], RED)
    np.testing.assert_array_equal(out[0, 3], (255, 255, 255))


def test_palette_without_transparency_keeps_colours() -> None:
    palette_image = Image.new("P", (4, 4), 1)
    palette_image.putpalette([0, 255, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    out = decode(encode(palette_image, "BMP"))
    np.testing.assert_array_equal(out[2, 2], RED)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animated_image_uses_first_frame(fmt: str) -> None:
    frames = [Image.new("RGB", (16, 16), colour) for colour in (RED, (0, 0, 255), (0, 255, 0))]
    data = encode(
        frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, lossless=True
    )
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    out = decode(data)
    assert out[8, 8, 0] > 230 and out[8, 8, 2] < 30


def test_too_many_pixels_is_refused_before_decoding() -> None:
    data = encode(Image.new("RGB", (100, 100)), "PNG")
    with pytest.raises(ImageTooLarge) as raised:
        decode(data, max_pixels=9_999)
    assert raised.value.status_code == 413
    assert decode(data, max_pixels=10_000).shape == (100, 100, 3)


def test_format_outside_allowed_formats_is_unsupported() -> None:
    data = encode(Image.new("RGB", (4, 4)), "TIFF")
    with pytest.raises(UnsupportedImageFormat) as raised:
        decode(data, formats=("JPEG", "PNG"))
    assert raised.value.status_code == 415 and "TIFF" in str(raised.value)


@pytest.mark.parametrize(
    "data",
    [b"", b"not an image at all", encode(Image.new("RGB", (64, 64), RED), "PNG")[:60]],
    ids=["empty", "text", "truncated-png"],
)
def test_garbage_is_undecodable(data: bytes) -> None:
    with pytest.raises(UndecodableImage) as raised:
        decode(data)
    assert raised.value.status_code == 400


# ---- bounded work: header sizes, band-wise conversion, narrowed readers, no 500s ----


def test_request_pixels_come_from_headers_with_jpegs_at_their_reduced_scale() -> None:
    png = encode(Image.new("RGB", (300, 200)), "PNG")
    jpeg = encode(Image.new("RGB", (4000, 3000)), "JPEG")
    assert request_pixels([png, png], ALL) == 2 * 300 * 200
    assert request_pixels([jpeg], ALL) == 4000 * 3000
    assert request_pixels([jpeg], ALL, min_side=256) == 500 * 375  # what decode_image_reduced decodes
    reduced, _ = decode_image_reduced(jpeg, 10**8, ALL, 256)
    assert reduced.shape == (375, 500, 3)
    assert request_pixels([b"not an image", png], ALL) == 300 * 200  # left to its own decode to refuse
    assert request_pixels([png], ("JPEG",)) == 0  # a reader that is not allowed never opens it


def test_fit_size_keeps_the_aspect_within_the_budget() -> None:
    assert fit_size(100, 50, 10_000) == (100, 50)
    width, height = fit_size(6300, 6300, 4_000_000)
    assert width == height and width * height <= 4_000_000 and width >= 1999
    assert fit_size(200_000, 1, 1000) == (1000, 1)


def test_16_bit_conversion_goes_band_by_band_and_matches_the_formula(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images, "_BAND_PIXELS", 64)  # many bands for a small image
    values = np.random.default_rng(1).integers(0, 65536, (37, 23), dtype=np.uint16)
    out = decode(encode(Image.fromarray(values), "PNG"))
    expected = np.rint(values.astype(np.float64) * 255.0 / 65535.0).astype(np.uint8)
    np.testing.assert_array_equal(out[:, :, 0], expected)
    np.testing.assert_array_equal(out[:, :, 2], expected)


@pytest.mark.parametrize(
    "values,expected",
    [
        (np.array([[0.0, 0.5, 1.0, np.nan]], np.float32), [0, 128, 255, 0]),  # 0..1 floats
        (np.array([[0.0, 127.6, 300.0, -5.0]], np.float32), [0, 128, 255, 0]),  # 0..255 floats, clipped
        (np.array([[0, 100, 255, -7]], np.int32), [0, 100, 255, 0]),  # 32-bit holding 8-bit values
        (np.array([[0, 257, 65535, 70000]], np.int32), [0, 1, 255, 255]),  # 32-bit holding 16-bit values
    ],
    ids=["float-unit", "float-255", "int32-8bit", "int32-16bit"],
)
def test_32_bit_images_are_scaled_by_their_range(values: np.ndarray, expected: list[int]) -> None:
    out = decode(encode(Image.fromarray(values), "TIFF"))
    np.testing.assert_array_equal(out[0, :, 0], expected)


def test_a_6300_square_16_bit_png_decodes_without_a_float64_copy() -> None:
    """39.7 MP of 16-bit samples: the old float64 path peaked near 1 GiB; band-wise, about the output."""
    data = payloads.png16_stripes(6300, 6300)
    tracemalloc.start()
    try:
        out = decode(data, max_pixels=40_000_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.shape == (6300, 6300, 3)
    assert (out[0, 0, 0], out[-1, -1, 0]) == (0, 255)
    assert peak < out.nbytes + 64 * 2**20, (
        f"numpy peak {peak / 2**20:.0f} MiB for a {out.nbytes / 2**20:.0f} MiB output"
    )


def test_only_allowed_readers_see_the_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    Image.init()
    opened = []
    factory, accept = Image.OPEN["TIFF"]
    monkeypatch.setitem(Image.OPEN, "TIFF", (lambda *a: opened.append(1) or factory(*a), accept))
    tiff = encode(Image.new("RGB", (4, 4)), "TIFF")
    with pytest.raises(UnsupportedImageFormat, match="TIFF"):  # told apart by its signature bytes only
        decode(tiff, formats=("JPEG", "PNG"))
    assert opened == []
    assert decode(tiff).shape == (4, 4, 3) and opened == [1]


def test_a_format_no_reader_is_allowed_for_and_not_one_of_ours_is_undecodable() -> None:
    with pytest.raises(UndecodableImage):
        decode(encode(Image.new("RGB", (4, 4)), "PPM"))


@pytest.mark.parametrize(
    "error", [KeyError("x"), struct.error("bad"), IndexError(), ZeroDivisionError(), TypeError()]
)
def test_any_failure_inside_pillow_on_client_bytes_is_a_400(
    monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(images.ImageOps, "exif_transpose", broken)
    with pytest.raises(ImageError) as raised:
        decode(encode(Image.new("RGB", (4, 4)), "PNG"))
    assert raised.value.status_code == 400


def test_display_decode_of_a_large_jpeg_is_reduced_to_about_the_render_size() -> None:
    data = encode(Image.new("RGB", (8000, 6000), RED), "JPEG")
    image = decode_image_for_display(data, 10**8, ALL, 4_000_000)
    assert image.shape == (3000, 4000, 3)  # 1/2 scale: 1/4 would be below the 2309x1732 that fits 4 MP
