"""The image mix every load test and benchmark sends: shapes scenes, several sizes, JPEG and PNG.

Generated once, in memory, from seeds, so every run and every server sees the same bytes.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image

from training.shapes import make_scene

# (width, height): small and large, square and both orientations, so resize and letterbox paths all run.
DEFAULT_SIZES: tuple[tuple[int, int], ...] = ((128, 128), (320, 240), (240, 320), (640, 480))
FORMATS = ("JPEG", "PNG")
CONTENT_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png"}


@dataclass(frozen=True)
class EncodedImage:
    """One encoded image as a client uploads it."""

    name: str
    content_type: str
    data: bytes


def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """Parse `"128x128,320x240"` into ((128, 128), (320, 240))."""
    sizes = []
    for item in text.split(","):
        width, _, height = item.strip().lower().partition("x")
        if not (width.isdigit() and height.isdigit()) or int(width) < 16 or int(height) < 16:
            raise ValueError(f"image size {item!r} is not WIDTHxHEIGHT with both sides >= 16, e.g. 320x240")
        sizes.append((int(width), int(height)))
    return tuple(sizes)


def encode(pixels: Image.Image, fmt: str) -> bytes:
    """Encode a PIL image as JPEG (quality 90) or PNG."""
    buffer = io.BytesIO()
    pixels.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def make_image_mix(
    count: int, sizes: tuple[tuple[int, int], ...] = DEFAULT_SIZES, seed: int = 0
) -> list[EncodedImage]:
    """Return `count` images cycling through `sizes` and JPEG/PNG, each a different seeded scene.

    A scene is rendered square at the longer side and cropped, so non-square images keep shapes
    at their natural scale.
    """
    if count < 1:
        raise ValueError("count must be >= 1")
    images = []
    for index in range(count):
        width, height = sizes[index % len(sizes)]
        fmt = FORMATS[(index // len(sizes)) % len(FORMATS)]
        scene = make_scene(seed + index, max(width, height), 1, 6)
        pixels = Image.fromarray(scene.image).crop((0, 0, width, height))
        name = f"scene{seed + index}_{width}x{height}.{'jpg' if fmt == 'JPEG' else 'png'}"
        images.append(EncodedImage(name, CONTENT_TYPES[fmt], encode(pixels, fmt)))
    return images
