"""Hostile and unusual request bodies for the hardening tests, built in memory (no files, no network)."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable

import numpy as np
from PIL import Image

from training.shapes import make_scene

# Display transform of each EXIF orientation, written with numpy (independent of Pillow's exif_transpose).
ORIENTATIONS: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}
# Stored pixels that display as the wanted image: every transform is its own inverse except 6 and 8.
_INVERSE = {**{k: k for k in ORIENTATIONS}, 6: 8, 8: 6}
EXIF_ORIENTATION_TAG = 0x0112


def encode(pixels: np.ndarray | Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    """Encode an array or a Pillow image with Pillow."""
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(np.ascontiguousarray(pixels))
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def noise(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Random RGB pixels (H, W, 3)."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def decode_plain(data: bytes) -> np.ndarray:
    """Pixels as stored in the file (no EXIF rotation), as RGB."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def padded_scene(seed: int, pad_right: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 128x128 shapes scene padded to a wider gray canvas: (pixels, xyxy boxes, 1-based labels).

    Non-square on purpose, so a missed or wrong rotation changes the answer's image size.
    """
    scene = make_scene(seed, 128)
    canvas = np.full((128, 128 + pad_right, 3), 128, dtype=np.uint8)
    canvas[:, :128] = scene.image
    return canvas, scene.boxes.astype(np.float64), scene.labels.astype(int)


def exif_jpeg(displayed: np.ndarray, orientation: int) -> bytes:
    """A JPEG whose stored pixels, rotated as its EXIF orientation says, show `displayed`."""
    stored = ORIENTATIONS[_INVERSE[orientation]](displayed)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = orientation
    return encode(stored, "JPEG", quality=95, exif=exif.tobytes())


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def _png_file(header: bytes, idat: bytes) -> bytes:
    """A PNG file from its IHDR fields and compressed image data."""
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def png_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """A valid 1-bit grayscale PNG of one colour: huge dimensions, a file of a few tens of KB."""
    row = b"\x00" + bytes((width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return _png_file(header, idat)


def animated_gif(width: int = 96, height: int = 64) -> tuple[bytes, np.ndarray]:
    """A 3-frame GIF and its first frame as RGB pixels (what the gateway must answer about)."""
    frames = [Image.fromarray(noise(width, height, seed)).quantize(64) for seed in range(3)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    with Image.open(io.BytesIO(data)) as gif:
        assert gif.n_frames == 3
        gif.seek(0)
        first = np.asarray(gif.convert("RGB"))
    return data, first


def cmyk_jpeg(width: int = 80, height: int = 60) -> bytes:
    """A CMYK JPEG (as Photoshop and print pipelines write them)."""
    return encode(Image.fromarray(noise(width, height, 5)).convert("CMYK"), "JPEG", quality=95)


def mpo_jpeg(width: int = 72, height: int = 48) -> bytes:
    """A two-picture MPO file, as cameras and phones write JPEGs (Pillow names its format MPO)."""
    first, second = (Image.fromarray(noise(width, height, seed)) for seed in (8, 9))
    return encode(first, "MPO", save_all=True, append_images=[second], quality=95)


def png16(width: int = 70, height: int = 50) -> tuple[bytes, np.ndarray]:
    """A 16-bit grayscale PNG and the 8-bit RGB pixels it means (value * 255 / 65535)."""
    values = np.random.default_rng(6).integers(0, 65536, (height, width), dtype=np.uint16)
    data = encode(Image.fromarray(values), "PNG")
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode.startswith("I;16") or image.mode == "I", image.mode
    gray = np.rint(values.astype(np.float64) * 255.0 / 65535.0).astype(np.uint8)
    return data, np.repeat(gray[:, :, None], 3, axis=2)


def palette_with_transparency(width: int = 64, height: int = 48) -> tuple[bytes, np.ndarray]:
    """A palette PNG whose index 0 is transparent, and its RGB meaning (transparent -> white)."""
    indices = (np.arange(width * height).reshape(height, width) % 4).astype(np.uint8)
    palette = [0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255]
    image = Image.fromarray(indices, "P")
    image.putpalette(palette)
    data = encode(image, "PNG", transparency=0)
    rgb = np.array(palette, dtype=np.uint8).reshape(4, 3)[indices]
    rgb[indices == 0] = 255
    return data, rgb


def truncated(data: bytes, keep: float = 0.5) -> bytes:
    """The first part of a file, as a dropped upload leaves it."""
    return data[: int(len(data) * keep)]


SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><rect width="64" height="64"/></svg>'


def png16_stripes(width: int, height: int) -> bytes:
    """A 16-bit grayscale PNG whose every row is the ramp 0..65535 left to right (vertical stripes).

    Rows after the first use PNG's "Up" filter, so they are zeros to deflate: a 6300x6300 image
    (79 MB of samples) is a file of about 80 KB.
    """
    ramp = (np.arange(width, dtype=np.uint64) * 65535 // max(1, width - 1)).astype(">u2").tobytes()
    compressor = zlib.compressobj(9)
    up_row = b"\x02" + bytes(2 * width)
    idat = compressor.compress(b"\x00" + ramp)
    idat += b"".join(compressor.compress(up_row) for _ in range(height - 1)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    return _png_file(header, idat)
