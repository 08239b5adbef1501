"""Decode uploaded bytes into the one image form every handler takes: RGB uint8 H×W×3.

Normalisation rules (documented for clients in the API description):
* EXIF orientation is applied, so the answer is in the image's *displayed* coordinates.
* Transparent pixels (RGBA, LA, palette with transparency) are composited on white.
* Grayscale, CMYK, YCbCr, LAB, 1-bit and palette images are converted to RGB.
* 16/32-bit integer images are scaled to 8 bit by their bit depth (65535 → 255), never clipped.
* Animated images (GIF, WebP, APNG, multi-page TIFF) use their first frame.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Collection
from typing import get_args

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.settings import ImageFormat

# Only these Pillow readers ever see client bytes (no EPS/PDF/PSD/... parsers on untrusted input).
READABLE_FORMATS: tuple[str, ...] = get_args(ImageFormat)
# Pillow's name for camera JPEGs carrying extra pictures (MPO): to clients they are JPEGs.
_FORMAT_ALIASES = {"MPO": "JPEG"}
EXIF_ORIENTATION = 0x0112


class ImageError(ValueError):
    """An uploaded image the gateway will not process; `status_code` is the HTTP answer."""

    status_code = 400
    code = "bad_image"


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


def decode_image(data: bytes, max_pixels: int, allowed_formats: Collection[str]) -> np.ndarray:
    """Decode `data` to an RGB uint8 array of shape (H, W, 3), upright and opaque."""
    return decode_image_reduced(data, max_pixels, allowed_formats, None)[0]


def decode_image_reduced(
    data: bytes, max_pixels: int, allowed_formats: Collection[str], min_side: int | None
) -> tuple[np.ndarray, tuple[int, int]]:
    """Like `decode_image`, but a large JPEG is decoded at a reduced DCT scale (1/2, 1/4 or 1/8) whose
    shorter side stays >= `min_side`: a model never needs more, and decoding costs up to 64x less.
    Also returns the upright full size (width, height) that answers must refer to."""
    if not data:
        raise UndecodableImage("the image is empty")
    try:
        with Image.open(io.BytesIO(data), formats=READABLE_FORMATS) as image:
            image_format = _FORMAT_ALIASES.get(image.format or "", image.format)
            if image_format not in allowed_formats:
                raise UnsupportedImageFormat(
                    f"image format {image_format} is not accepted; use one of {', '.join(allowed_formats)}"
                )
            if image.width * image.height > max_pixels:
                raise ImageTooLarge(
                    f"image has {image.width}x{image.height} pixels; the limit is {max_pixels} pixels"
                )
            image.seek(0)  # first frame of animations
            full_size = _upright_size(image)
            if min_side is not None and image_format == "JPEG" and min(image.size) >= 2 * min_side:
                factor = min_side / min(image.size)
                image.draft(None, (max(1, int(image.width * factor)), max(1, int(image.height * factor))))
            image.load()
            upright = ImageOps.exif_transpose(image)
            return to_rgb_array(upright), full_size
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageTooLarge(f"image has too many pixels; the limit is {max_pixels} pixels") from error
    except UnidentifiedImageError as error:
        raise UndecodableImage("the data is not an image in a format the gateway can read") from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:  # Pillow's errors for corrupt/truncated files
        raise UndecodableImage("the image is corrupt or truncated") from error


def _upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) after EXIF orientation: orientations 5-8 swap the sides."""
    orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    return (image.height, image.width) if orientation in (5, 6, 7, 8) else (image.width, image.height)


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """Convert any Pillow mode to an RGB uint8 (H, W, 3) array (see the module docstring)."""
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _high_bit_depth_to_rgb(image)
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    elif mode in ("PA", "LA", "La", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8).copy()


def _high_bit_depth_to_rgb(image: Image.Image) -> np.ndarray:
    """Scale a single-channel 16/32-bit image to 8 bit by its nominal range, then gray → RGB."""
    values = np.asarray(image)
    if image.mode == "F":
        full_scale = 1.0 if float(np.nanmax(values, initial=0.0)) <= 1.0 else 255.0
    elif image.mode.startswith("I;16") or int(values.max(initial=0)) > 255:
        full_scale = 65535.0
    else:  # mode "I" holding 8-bit values
        full_scale = 255.0
    scaled = np.clip(np.nan_to_num(values.astype(np.float64)) * (255.0 / full_scale), 0, 255)
    gray = np.rint(scaled).astype(np.uint8)
    return np.repeat(gray[:, :, np.newaxis], 3, axis=2)
