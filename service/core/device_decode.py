"""JPEG decode and resize on the model's device, a batch at a time (nvJPEG on a GPU), in the process
that owns the model.

Pillow still reads every header first: the format must be an accepted JPEG, the pixels within the
limit, and the EXIF orientation is read there and applied on the device. Anything else (PNG, WebP,
CMYK or MPO JPEGs, a header Pillow refuses, a stream the device decoder rejects) takes the CPU path,
`TaskPipeline.prepare`, which also raises the client's error (`ImageError`) where there is one. The
result is the model's uint8 `[N,3,H,W]` batch already on the device, and each image's geometry.

It matches the CPU path within `TOLERANCE`: the decoders differ (nvJPEG's IDCT and chroma upsampling,
and a large JPEG is decoded in full here where Pillow decodes it at a reduced DCT scale), and the
resize runs in float (the CPU path's uint8 kernel rounds in fixed point).
tests/service/core/test_device_decode.py checks it on the CPU; the GPU check measures it on the device.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode

from service.core.pipeline import TaskPipeline
from service.handlers.common import Geometry, center_crop_plan
from service.imaging.images import EXIF_ORIENTATION


@dataclass(frozen=True)
class Tolerance:
    """How far the device path's model input may be from the CPU path's, in uint8 levels."""

    mean_abs: float = 2.0
    p99_abs: float = 12.0


TOLERANCE = Tolerance()


def device_jpeg_orientation(data: bytes, max_pixels: int, allowed_formats: Sequence[str]) -> int | None:
    """The EXIF orientation (1-8) of a JPEG the device can decode, read by Pillow from the header only;
    None when the CPU path must take it (another format, CMYK, MPO, too large, unreadable: the CPU path
    then refuses it with the right error, or decodes it)."""
    if "JPEG" not in allowed_formats or not data:
        return None
    try:
        with Image.open(io.BytesIO(data), formats=("JPEG",)) as image:
            if image.format != "JPEG" or image.mode not in ("RGB", "L"):
                return None
            if image.width * image.height > max_pixels:
                return None
            orientation = int(image.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - the CPU path decodes it again and says what is wrong
        return None
    return orientation if 1 <= orientation <= 8 else 1


def upright(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """A `[C,H,W]` image turned as `PIL.ImageOps.exif_transpose` turns it for EXIF `orientation`."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-2, -1)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-2, -1)
    if orientation == 6:
        return image.transpose(-2, -1).flip(-1)
    if orientation == 7:
        return image.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return image.transpose(-2, -1).flip(-2)
    return image


def _resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear with antialias, in float on the image's device, rounded back to uint8."""
    if image.shape[-2:] == (height, width):
        return image
    resized = F.resize(
        image.float(), [height, width], interpolation=InterpolationMode.BILINEAR, antialias=True
    )
    return resized.round_().clamp_(0, 255).to(torch.uint8)


def letterbox(image: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, Geometry]:
    """`service.handlers.common.letterbox` for a `[3,H,W]` uint8 tensor, on its device."""
    _, height, width = image.shape
    target_h, target_w = size
    scale = min(target_h / height, target_w / width)
    content_h = min(target_h, max(1, round(height * scale)))
    content_w = min(target_w, max(1, round(width * scale)))
    canvas = torch.zeros((3, target_h, target_w), dtype=torch.uint8, device=image.device)
    canvas[:, :content_h, :content_w] = _resize(image, content_h, content_w)
    geometry = Geometry(width, height, content_w / width, content_h / height, 0.0, 0.0, content_w, content_h)
    return canvas, geometry


def resize_center_crop(
    image: torch.Tensor, resize_size: int, size: tuple[int, int]
) -> tuple[torch.Tensor, Geometry]:
    """`service.handlers.common.resize_center_crop` for a `[3,H,W]` uint8 tensor, on its device."""
    _, height, width = image.shape
    new_h, new_w, geometry = center_crop_plan(width, height, resize_size, size)
    cropped = F.center_crop(_resize(image, new_h, new_w), list(size))
    return cropped, geometry


class DevicePreparer:
    """A model's image preparation on `device`: batched JPEG decode there, the CPU path for the rest."""

    def __init__(self, pipeline: TaskPipeline, device: torch.device | str) -> None:
        self.pipeline = pipeline
        self.device = torch.device(device)
        self.decoded_on_device = 0  # counters: how many images took which path
        self.decoded_on_cpu = 0

    def prepare(self, blobs: Sequence[bytes]) -> tuple[torch.Tensor, list[Geometry]]:
        """Decode and preprocess `blobs` into the model's `[N,3,H,W]` uint8 batch on the device; raises
        the CPU path's `ImageError` for the first image it refuses."""
        settings = self.pipeline.settings
        orientations = [
            device_jpeg_orientation(b, settings.max_pixels, settings.allowed_formats) for b in blobs
        ]
        on_device = [i for i, o in enumerate(orientations) if o is not None]
        decoded = self._decode(blobs, on_device)
        inputs: list[torch.Tensor] = []
        geometries: list[Geometry] = []
        for i, blob in enumerate(blobs):
            image = decoded.get(i)
            if image is None:
                array, geometry = self.pipeline.prepare(blob)  # the CPU path, and its errors
                tensor = torch.from_numpy(np.ascontiguousarray(array)).to(self.device, non_blocking=True)
                self.decoded_on_cpu += 1
            else:
                tensor, geometry = self._preprocess(upright(image, orientations[i] or 1))
                self.decoded_on_device += 1
            inputs.append(tensor)
            geometries.append(geometry)
        return torch.stack(inputs), geometries

    def _decode(self, blobs: Sequence[bytes], indices: list[int]) -> dict[int, torch.Tensor]:
        """Decode the JPEGs at `indices` together on the device; one at a time when the batch fails (an
        image the device rejects is left out, for the CPU path to decode or refuse)."""
        if not indices:
            return {}
        data = [torch.frombuffer(bytearray(blobs[i]), dtype=torch.uint8) for i in indices]
        try:
            return dict(
                zip(indices, decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device), strict=True)
            )
        except RuntimeError:
            decoded = {}
            for i, tensor in zip(indices, data, strict=True):
                try:
                    decoded[i] = decode_jpeg(tensor, mode=ImageReadMode.RGB, device=self.device)
                except RuntimeError:
                    continue
            return decoded

    def _preprocess(self, image: torch.Tensor) -> tuple[torch.Tensor, Geometry]:
        contract = self.pipeline.contract
        if contract.preprocess == "resize_center_crop":
            return resize_center_crop(
                image, contract.resize_size or min(contract.input_size), contract.input_size
            )
        if contract.preprocess == "letterbox":
            return letterbox(image, contract.input_size)
        raise ValueError(f"model {contract.name}: unknown preprocess {contract.preprocess!r} in config.pbtxt")
