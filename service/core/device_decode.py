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

import contextlib
import io
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode

from service.backends.base import Encoded
from service.contract import ModelContract
from service.core.pipeline import TaskPipeline
from service.handlers import HANDLERS
from service.settings import Settings
from service.handlers.common import Geometry, Handler, center_crop_plan, input_geometry, letterbox_plan
from service.imaging.images import EXIF_ORIENTATION, ImageError


@dataclass(frozen=True)
class Tolerance:
    """How far the device path's model input may be from the CPU path's, in uint8 levels."""

    mean_abs: float = 2.0
    p99_abs: float = 12.0


TOLERANCE = Tolerance()
_END_OF_IMAGE = b"\xff\xd9"


def jpeg_header(data: bytes, max_pixels: int, allowed_formats: Sequence[str]) -> tuple[int, int, int] | None:
    """(width, height, EXIF orientation 1-8) of a JPEG the device can decode, as stored, read by Pillow
    from the header only; None when the CPU path must take it (another format, CMYK, MPO, too large,
    unreadable, or a file that does not end where a JPEG ends: truncated, or with data after it. The CPU
    path then refuses it with the right error, or decodes it)."""
    if "JPEG" not in allowed_formats or not data.endswith(_END_OF_IMAGE):
        return None
    try:
        with Image.open(io.BytesIO(data), formats=("JPEG",)) as image:
            if image.format != "JPEG" or image.mode not in ("RGB", "L"):
                return None
            if image.width * image.height > max_pixels:
                return None
            orientation = int(image.getexif().get(EXIF_ORIENTATION, 1))
            width, height = image.size
    except Exception:  # noqa: BLE001 - the CPU path decodes it again and says what is wrong
        return None
    return width, height, orientation if 1 <= orientation <= 8 else 1


def device_jpeg_orientation(data: bytes, max_pixels: int, allowed_formats: Sequence[str]) -> int | None:
    """The EXIF orientation (1-8) of a JPEG the device can decode (`jpeg_header`); None for the CPU path."""
    header = jpeg_header(data, max_pixels, allowed_formats)
    return None if header is None else header[2]


def plan_on_device(pipeline: TaskPipeline, data: bytes) -> tuple[Encoded, Geometry] | None:
    """What the receiving process does for an image the model's owner decodes on its device: read the
    header (cheap, no pixels), and work out the geometry the model input will have from the upright size
    alone. None: the CPU path takes the image (`TaskPipeline.prepare`)."""
    settings = pipeline.settings
    header = jpeg_header(data, settings.max_pixels, settings.allowed_formats)
    if header is None:
        return None
    width, height, orientation = header
    if orientation >= 5:  # a quarter turn: the upright image is the stored one transposed
        width, height = height, width
    return Encoded(data, orientation), input_geometry(pipeline.contract, width, height)


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
    """`service.handlers.common.letterbox` for a `[...,3,H,W]` uint8 tensor (one image, or a batch of one
    size), on its device."""
    height, width = image.shape[-2:]
    content_h, content_w, geometry = letterbox_plan(width, height, size)
    canvas = torch.zeros((*image.shape[:-2], *size), dtype=torch.uint8, device=image.device)
    canvas[..., :content_h, :content_w] = _resize(image, content_h, content_w)
    return canvas, geometry


def resize_center_crop(
    image: torch.Tensor, resize_size: int, size: tuple[int, int]
) -> tuple[torch.Tensor, Geometry]:
    """`service.handlers.common.resize_center_crop` for a `[...,3,H,W]` uint8 tensor (one image, or a batch
    of one size), on its device."""
    height, width = image.shape[-2:]
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
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    @contextlib.contextmanager
    def _own_stream(self) -> Iterator[None]:
        """Run the block on this preparer's own CUDA stream; the caller's stream then waits for it.

        torchvision's nvJPEG decode allocates its outputs on the current stream and writes them from its
        own stream without waiting for the current one (pytorch/vision#9606): a block freed on the current
        stream while queued kernels still read it can be handed to the decoder and overwritten. Only this
        preparer (one model's batch thread) queues work on its stream, and `_decode` waits for that work
        before each decode, so no such block exists there; other threads' work on the default stream stays
        apart. On the CPU, nothing changes."""
        if self._stream is None:
            yield
            return
        caller = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._stream):
            yield
        caller.wait_stream(self._stream)

    def prepare(self, blobs: Sequence[bytes]) -> tuple[torch.Tensor, list[Geometry]]:
        """Decode and preprocess `blobs` into the model's `[N,3,H,W]` uint8 batch on the device, with each
        image's geometry; raises the CPU path's `ImageError` for the first image it refuses."""
        with self._own_stream():
            return self._prepare(blobs)

    def _prepare(self, blobs: Sequence[bytes]) -> tuple[torch.Tensor, list[Geometry]]:
        planned = [plan_on_device(self.pipeline, blob) for blob in blobs]
        on_device = [p[0] for p in planned if p is not None]
        decoded = iter(self._prepare_each(on_device))
        inputs: list[torch.Tensor] = []
        geometries: list[Geometry] = []
        for blob, plan in zip(blobs, planned, strict=True):
            if plan is None:
                array, geometry = self.pipeline.prepare(blob)  # the CPU path, and its errors
                inputs.append(self._to_device(array))
                geometries.append(geometry)
                self.decoded_on_cpu += 1
                continue
            tensor = next(decoded)
            if isinstance(tensor, ImageError):
                raise tensor
            inputs.append(tensor)
            geometries.append(plan[1])
        return torch.stack(inputs), geometries

    def prepare_each(self, images: Sequence[Encoded]) -> list[torch.Tensor | ImageError]:
        """Each JPEG of `images` as the model's `[3,H,W]` uint8 input on the device, decoded together; an
        image the device decoder rejects goes through the CPU path, and an image that path refuses is its
        `ImageError` in the list (the other images are not held up by it)."""
        with self._own_stream():
            return self._prepare_each(images)

    def _prepare_each(self, images: Sequence[Encoded]) -> list[torch.Tensor | ImageError]:
        decoded = self._decode([image.data for image in images])
        prepared: list[torch.Tensor | ImageError] = []
        alike: dict[tuple[tuple[int, ...], int], list[int]] = {}  # (decoded shape, EXIF turn) → indices
        for i, image in enumerate(images):
            tensor = decoded.get(i)
            if tensor is None:
                try:
                    array, _ = self.pipeline.prepare(image.data)
                except ImageError as error:
                    prepared.append(error)
                    continue
                prepared.append(self._to_device(array))
                self.decoded_on_cpu += 1
            else:
                alike.setdefault((tuple(tensor.shape), image.orientation), []).append(i)
                prepared.append(tensor)  # replaced below
                self.decoded_on_device += 1
        # Images of one size and turn are turned and resized together: one set of kernels per group, not
        # per image (on a GPU each costs a launch), with the same arithmetic per pixel.
        for (_, orientation), indices in alike.items():
            group = torch.stack([prepared[i] for i in indices])  # type: ignore[misc]
            inputs = self._preprocess(upright(group, orientation))[0]
            for row, i in enumerate(indices):
                prepared[i] = inputs[row]
        return prepared

    def inputs(
        self, images: Sequence[np.ndarray | Encoded]
    ) -> tuple[list[int], torch.Tensor | None, dict[int, ImageError]]:
        """A batcher's batch of prepared arrays and `Encoded` JPEGs as one `[N,3,H,W]` uint8 tensor on the
        device: the indices in it, the tensor (None if every image was refused), and the refusals by index."""
        with self._own_stream():
            return self._inputs(images)

    def _inputs(
        self, images: Sequence[np.ndarray | Encoded]
    ) -> tuple[list[int], torch.Tensor | None, dict[int, ImageError]]:
        encoded = [i for i, image in enumerate(images) if isinstance(image, Encoded)]
        decoded = self._prepare_each([images[i] for i in encoded])  # type: ignore[misc]
        prepared = dict(zip(encoded, decoded, strict=True))
        kept: list[int] = []
        tensors: list[torch.Tensor] = []
        refused: dict[int, ImageError] = {}
        for i, image in enumerate(images):
            tensor = prepared[i] if i in prepared else self._to_device(image)  # type: ignore[arg-type]
            if isinstance(tensor, ImageError):
                refused[i] = tensor
            else:
                kept.append(i)
                tensors.append(tensor)
        return kept, (torch.stack(tensors) if tensors else None), refused

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device, non_blocking=True)

    def _decode(self, blobs: Sequence[bytes]) -> dict[int, torch.Tensor]:
        """Decode the JPEGs `blobs` together on the device, by index; one at a time when the batch fails (an
        image the device rejects is left out, for the CPU path to decode or refuse)."""
        if not blobs:
            return {}
        data = [torch.frombuffer(bytearray(blob), dtype=torch.uint8) for blob in blobs]
        if self._stream is not None:  # the stream's earlier work done: none of its free blocks is still read
            self._stream.synchronize()
        try:
            return dict(enumerate(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)))
        except RuntimeError:
            decoded = {}
            for i, tensor in enumerate(data):
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


def device_preparers(
    settings: Settings, handlers: Mapping[str, Handler] | None = None
) -> Callable[[str, ModelContract, str], DevicePreparer]:
    """What the request core hands its backend (`Backend.use_device_decode`): each model's `DevicePreparer`,
    with its task's handler (`handlers`, default the registry) for the CPU path and `settings`' image limits."""
    known = dict(HANDLERS if handlers is None else handlers)

    def make(model: str, contract: ModelContract, device: str) -> DevicePreparer:
        return DevicePreparer(TaskPipeline(model, contract, known[model], settings), device)

    return make
