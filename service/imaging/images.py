"""Decode uploaded bytes into the one image form every handler takes: RGB uint8 H×W×3.

Normalisation rules (documented for clients in the API description):
* EXIF orientation is applied, so the answer is in the image's *displayed* coordinates.
* Transparent pixels (RGBA, LA, palette with transparency) are composited on white.
* Grayscale, CMYK, YCbCr, LAB, 1-bit and palette images are converted to RGB.
* 16/32-bit integer images are scaled to 8 bit by their bit depth (65535 → 255), never clipped.
* Animated images (GIF, WebP, APNG, multi-page TIFF) use their first frame.

Work is bounded: sizes are read from the header before any pixel is decoded, conversions go band
by band (no full-size float or int64 copy of an image), and any failure inside Pillow on client
bytes is an `ImageError` (a 4xx), never an unhandled exception.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from typing import get_args

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.settings import ImageFormat

# Only these Pillow readers ever see client bytes (no EPS/PDF/PSD/... parsers on untrusted input).
READABLE_FORMATS: tuple[str, ...] = get_args(ImageFormat)
# Pillow's name for camera JPEGs carrying extra pictures (MPO): to clients they are JPEGs.
_FORMAT_ALIASES = {"MPO": "JPEG"}
EXIF_ORIENTATION = 0x0112
# Annotated images (`annotate=`) and `return_png` masks are rendered at most this large.
RENDER_MAX_PIXELS = 4_000_000
# Pixels converted per step when turning a decoded image into an array: bounds temporary copies.
_BAND_PIXELS = 1 << 20


class ImageError(ValueError):
    """An uploaded image the gateway will not process; `status_code` is the HTTP answer."""

    status_code = 400
    code = "bad_image"
    index: int | None = None  # which of a request's images, when it was found out of order (device decode)


class UndecodableImage(ImageError):
    """Bytes that are not a readable image (or a truncated one)."""

    status_code = 400
    code = "undecodable_image"


class ImageTooLarge(ImageError):
    """An image with more pixels than `max_pixels` (also guards against decompression bombs)."""

    status_code = 413
    code = "image_too_large"


class UnsupportedImageFormat(ImageError):
    """A readable image in a format outside `allowed_formats`."""

    status_code = 415
    code = "unsupported_image_format"


def configure_pillow(max_pixels: int) -> None:
    """Make Pillow refuse images above `max_pixels` in this process (call once per replica)."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.simplefilter("error", Image.DecompressionBombWarning)


def fit_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """(width, height) scaled down, aspect kept, to at most `max_pixels`; unchanged when already within."""
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    new_width, new_height = max(1, int(width * scale)), max(1, int(height * scale))
    if new_width * new_height > max_pixels:  # a side was raised to 1 pixel: the other gets the budget
        if new_height == 1:
            return max(1, max_pixels), 1
        return 1, max(1, max_pixels)
    return new_width, new_height


def decode_image(data: bytes, max_pixels: int, allowed_formats: Collection[str]) -> np.ndarray:
    """Decode `data` to an RGB uint8 array of shape (H, W, 3), upright and opaque."""
    return decode_image_reduced(data, max_pixels, allowed_formats, None)[0]


def decode_image_reduced(
    data: bytes, max_pixels: int, allowed_formats: Collection[str], min_side: int | None
) -> tuple[np.ndarray, tuple[int, int]]:
    """Like `decode_image`, but a large JPEG is decoded at a reduced DCT scale (1/2, 1/4 or 1/8) whose
    shorter side stays >= `min_side`: a model never needs more, and decoding costs up to 64x less.
    Also returns the upright full size (width, height) that answers must refer to."""
    with _opened(data, max_pixels, allowed_formats) as image:
        full_size = _upright_size(image)
        _draft(image, _reduced_size(image.size, min_side))
        return _decoded(image), full_size


def decode_image_for_display(
    data: bytes,
    max_pixels: int,
    allowed_formats: Collection[str],
    max_display_pixels: int = RENDER_MAX_PIXELS,
) -> np.ndarray:
    """Decode `data` for drawing on: a large JPEG at the smallest DCT scale that still holds
    `max_display_pixels` (other formats in full; the caller scales the array down to fit)."""
    with _opened(data, max_pixels, allowed_formats) as image:
        _draft(image, fit_size(*image.size, max_display_pixels))
        return _decoded(image)


def decoded_pixels(data: bytes, allowed_formats: Collection[str], min_side: int | None = None) -> int:
    """Pixels `decode_image_reduced(data, ..., min_side)` will decode, from the header alone; 0 when
    no accepted reader opens `data` (its own decode then says why)."""
    try:
        with Image.open(io.BytesIO(data), formats=_readers(allowed_formats)) as image:
            width, height = _reduced_size(image.size, min_side) if _is_jpeg(image) else image.size
            if (width, height) != image.size:
                image.draft(None, (width, height))  # only computes the scale; nothing is decoded
            return image.width * image.height
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001 - unreadable or a bomb: its own decode reports it, with the reason
        return 0


def request_pixels(
    blobs: Sequence[bytes], allowed_formats: Collection[str], min_side: int | None = None
) -> int:
    """Pixels all of a request's images will decode to together (see `decoded_pixels`)."""
    return sum(decoded_pixels(blob, allowed_formats, min_side) for blob in blobs)


@contextmanager
def _opened(data: bytes, max_pixels: int, allowed_formats: Collection[str]) -> Iterator[Image.Image]:
    """Open `data` with the allowed readers only, check format and size from the header, and turn every
    failure while the caller decodes it (load, EXIF, conversion) into an `ImageError`."""
    if not data:
        raise UndecodableImage("the image is empty")
    try:
        with Image.open(io.BytesIO(data), formats=_readers(allowed_formats)) as image:
            image_format = _FORMAT_ALIASES.get(image.format or "", image.format)
            if image_format not in allowed_formats:
                raise _unsupported(image_format or "unknown", allowed_formats)
            if image.width * image.height > max_pixels:
                raise ImageTooLarge(
                    f"image has {image.width}x{image.height} pixels; the limit is {max_pixels} pixels"
                )
            image.seek(0)  # first frame of animations
            yield image
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageTooLarge(f"image has too many pixels; the limit is {max_pixels} pixels") from error
    except UnidentifiedImageError as error:
        raise _unidentified(data, allowed_formats) from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        # Pillow's errors for corrupt or truncated files
        raise UndecodableImage("the image is corrupt or truncated") from error
    except MemoryError:
        raise
    except Exception as error:
        # anything else a malformed file makes Pillow raise (struct.error, KeyError, IndexError, ...)
        raise ImageError("the image is malformed (its header, EXIF or pixel data cannot be read)") from error


def _readers(allowed_formats: Collection[str]) -> tuple[str, ...]:
    """The Pillow readers to try: the allowed formats only (JPEG's reader also opens camera MPO files)."""
    return tuple(f for f in READABLE_FORMATS if f in allowed_formats)


def _unsupported(image_format: str, allowed_formats: Collection[str]) -> UnsupportedImageFormat:
    return UnsupportedImageFormat(
        f"image format {image_format} is not accepted; use one of {', '.join(allowed_formats)}"
    )


def _unidentified(data: bytes, allowed_formats: Collection[str]) -> ImageError:
    """415 when the bytes start like a readable format that is not allowed (judged from the signature
    bytes only: that reader never parses them), else 400."""
    Image.init()  # registers every plugin's signature check; none of them reads `data` beyond its prefix
    prefix = data[:16]
    for image_format in READABLE_FORMATS:
        if image_format in allowed_formats or image_format not in Image.OPEN:
            continue
        accept = Image.OPEN[image_format][1]
        if accept is not None and accept(prefix) is True:
            return _unsupported(image_format, allowed_formats)
    return UndecodableImage("the data is not an image in a format the gateway can read")


def _is_jpeg(image: Image.Image) -> bool:
    return _FORMAT_ALIASES.get(image.format or "", image.format) == "JPEG"


def _reduced_size(size: tuple[int, int], min_side: int | None) -> tuple[int, int]:
    """The size to decode at so the shorter side stays >= `min_side` (reduce only from 2x `min_side` on)."""
    width, height = size
    if min_side is None or min(size) < 2 * min_side:
        return size
    factor = min_side / min(size)
    return max(1, int(width * factor)), max(1, int(height * factor))


def _draft(image: Image.Image, size: tuple[int, int]) -> None:
    """Ask a JPEG to decode at the smallest DCT scale that is still at least `size` (others: no-op)."""
    if _is_jpeg(image) and size != image.size:
        image.draft(None, size)


def _decoded(image: Image.Image) -> np.ndarray:
    """Load the first frame, apply EXIF orientation (in place: no second copy) and convert to RGB."""
    image.load()
    ImageOps.exif_transpose(image, in_place=True)
    return to_rgb_array(image)


def _upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) after EXIF orientation: orientations 5-8 swap the sides."""
    orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    return (image.height, image.width) if orientation in (5, 6, 7, 8) else (image.width, image.height)


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """Convert any Pillow mode to an RGB uint8 (H, W, 3) array (see the module docstring)."""
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _high_bit_depth_to_rgb(image)
    if (mode == "P" and "transparency" in image.info) or mode in ("PA", "LA", "La", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        image = _on_white(image)
    if image.mode != "RGB":
        image = image.convert("RGB")
    out = np.empty((image.height, image.width, 3), np.uint8)
    for top, band in _bands(image):
        out[top : top + len(band)] = band
    return out


def _on_white(image: Image.Image) -> Image.Image:
    """Composite an RGBA image on opaque white, straight into an RGB image (no RGBA intermediate)."""
    background = Image.new("RGB", image.size, (255, 255, 255))
    background.paste(image, mask=image)  # blends by the alpha band, like alpha_composite on white
    return background


def _bands(image: Image.Image) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, pixels) of horizontal bands of about `_BAND_PIXELS` each, copied one at a time."""
    width, height = image.size
    rows = max(1, _BAND_PIXELS // max(1, width))
    for top in range(0, height, rows):
        yield top, np.asarray(image.crop((0, top, width, min(height, top + rows))))


def _high_bit_depth_to_rgb(image: Image.Image) -> np.ndarray:
    """Scale a single-channel 16/32-bit image to 8 bit by its nominal range, then gray → RGB, band by band."""
    full_scale = _full_scale(image)
    out = np.empty((image.height, image.width, 3), np.uint8)
    for top, band in _bands(image):
        out[top : top + len(band)] = _to_8_bit(band, full_scale)[:, :, np.newaxis]
    return out


def _full_scale(image: Image.Image) -> float:
    """The value that means white: 1.0 or 255.0 for float images, 65535 for 16-bit, 255 or 65535 for 32-bit."""
    if image.mode == "F":
        peak = max(float(np.nanmax(band, initial=0.0)) for _, band in _bands(image))
        return 1.0 if peak <= 1.0 else 255.0
    if image.mode.startswith("I;16"):
        return 65535.0
    _, peak = image.getextrema()  # mode "I": 8-bit values stored wide, or 16-bit ones
    return 65535.0 if float(peak) > 255 else 255.0  # type: ignore[arg-type]


def _to_8_bit(band: np.ndarray, full_scale: float) -> np.ndarray:
    """rint(clip(value, 0, full_scale) * 255 / full_scale) as uint8 (NaN → 0); integers stay integers."""
    if band.dtype.kind == "f":
        clipped = np.clip(np.nan_to_num(band.astype(np.float64)), 0.0, full_scale)
        return np.rint(clipped * (255.0 / full_scale)).astype(np.uint8)
    wide = np.clip(band.astype(np.int64), 0, int(full_scale))
    if full_scale == 255.0:
        return wide.astype(np.uint8)
    return ((wide + 128) // 257).astype(np.uint8)  # = rint(v * 255 / 65535): v / 257 is never a tie
