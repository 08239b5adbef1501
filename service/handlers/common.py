"""The handler shape every task shares, and the geometry both backends' inputs go through.

A handler turns one decoded image into the model's `[3,H,W]` uint8 input (`preprocess`, done
once here whatever the backend) and the model's outputs back into an answer about the original
image (`postprocess`). The gateway does decode → preprocess → backend.infer → postprocess.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import numpy as np
import torch
from pydantic import BaseModel
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from service.contract import ModelContract

OptionsT = TypeVar("OptionsT", bound=BaseModel)
ResultT = TypeVar("ResultT", bound=BaseModel)


@dataclass(frozen=True)
class Geometry:
    """How the model input relates to the original image (enough to map answers back).

    The image was scaled by (`scale_x`, `scale_y`) and then shifted by (-`offset_x`, -`offset_y`)
    (a centre crop); letterboxing has zero offsets and a `content_width`×`content_height` area at
    the top-left, the rest being padding.
    """

    width: int
    height: int
    scale_x: float
    scale_y: float
    offset_x: float
    offset_y: float
    content_width: int
    content_height: int


def at_full_size(geometry: Geometry, width: int, height: int) -> Geometry:
    """The same mapping, for answers about the full `width`×`height` image when the model input was
    made from a reduced decode of it (see `service.imaging.images.decode_image_reduced`)."""
    if (width, height) == (geometry.width, geometry.height):
        return geometry
    return replace(
        geometry,
        width=width,
        height=height,
        scale_x=geometry.scale_x * geometry.width / width,
        scale_y=geometry.scale_y * geometry.height / height,
    )


def to_chw_tensor(image: np.ndarray) -> torch.Tensor:
    """View an (H, W, 3) uint8 array as a [3, H, W] tensor (no copy)."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)


def letterbox(image: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, Geometry]:
    """Scale `image` to fit inside `size` (H, W) keeping aspect ratio; pad right/bottom with 0."""
    height, width = image.shape[:2]
    target_h, target_w = size
    content_h, content_w, geometry = letterbox_plan(width, height, size)
    resized = F.resize(
        to_chw_tensor(image), [content_h, content_w], interpolation=InterpolationMode.BILINEAR, antialias=True
    )
    canvas = torch.zeros((3, target_h, target_w), dtype=torch.uint8)
    canvas[:, :content_h, :content_w] = resized
    return canvas.numpy(), geometry


def letterbox_plan(width: int, height: int, size: tuple[int, int]) -> tuple[int, int, Geometry]:
    """Letterboxing of a `width`×`height` image into `size` (H, W): the content's (height, width) and the
    geometry (shared by the CPU path above and the device path, `service.core.device_decode`)."""
    target_h, target_w = size
    scale = min(target_h / height, target_w / width)
    content_h = min(target_h, max(1, round(height * scale)))
    content_w = min(target_w, max(1, round(width * scale)))
    geometry = Geometry(width, height, content_w / width, content_h / height, 0.0, 0.0, content_w, content_h)
    return content_h, content_w, geometry


def input_geometry(contract: ModelContract, width: int, height: int) -> Geometry:
    """The geometry `preprocess_image` gives a `width`×`height` image, from its size alone."""
    if contract.preprocess == "resize_center_crop":
        return center_crop_plan(width, height, contract.resize_size or min(contract.input_size), contract.input_size)[2]
    if contract.preprocess == "letterbox":
        return letterbox_plan(width, height, contract.input_size)[2]
    raise ValueError(f"model {contract.name}: unknown preprocess {contract.preprocess!r} in config.pbtxt")


def center_crop_plan(width: int, height: int, resize_size: int, size: tuple[int, int]) -> tuple[int, int, Geometry]:
    """Resize-then-centre-crop of a `width`×`height` image: the resized (height, width) and the geometry
    (shared by the CPU path below and the device path, `service.core.device_decode`)."""
    scale = resize_size / min(height, width)
    new_h, new_w = (resize_size, int(width * scale)) if height <= width else (int(height * scale), resize_size)
    target_h, target_w = size
    geometry = Geometry(
        width,
        height,
        new_w / width,
        new_h / height,
        (new_w - target_w) / 2,
        (new_h - target_h) / 2,
        target_w,
        target_h,
    )
    return new_h, new_w, geometry


def resize_center_crop(image: np.ndarray, resize_size: int, size: tuple[int, int]) -> tuple[np.ndarray, Geometry]:
    """Resize the shorter side to `resize_size` (bilinear, antialias), then centre-crop to `size`."""
    height, width = image.shape[:2]
    new_h, new_w, geometry = center_crop_plan(width, height, resize_size, size)
    scale = resize_size / min(height, width)
    band = _central_band(image, scale, max(size))
    if band is None:
        resized = F.resize(to_chw_tensor(image), [new_h, new_w], interpolation=InterpolationMode.BILINEAR, antialias=True)
    else:  # a very long image: resize only the part around the crop (same scale), not megapixels to throw away
        band_h, band_w = band.shape[:2]
        resized = F.resize(
            to_chw_tensor(band), [round(band_h * scale), round(band_w * scale)],
            interpolation=InterpolationMode.BILINEAR, antialias=True,
        )
    cropped = F.center_crop(resized, list(size))
    return np.ascontiguousarray(cropped.numpy()), geometry


def _central_band(image: np.ndarray, scale: float, target: int) -> np.ndarray | None:
    """The centre of the long side that covers a `target`-pixel crop after scaling (plus a filter margin),
    or None when the resized image would be small anyway (then the plain path is exact and cheap)."""
    height, width = image.shape[:2]
    long_side = max(height, width)
    if long_side * scale <= 16 * target:
        return None
    span = min(long_side, int(np.ceil((target + 8) / scale)) + 4)
    start = (long_side - span) // 2
    return image[:, start : start + span] if width >= height else image[start : start + span]


def preprocess_image(image: np.ndarray, contract: ModelContract) -> tuple[np.ndarray, Geometry]:
    """Bring an RGB (H, W, 3) image to the contract's `[3,H,W]` input the way config.pbtxt says."""
    if contract.preprocess == "resize_center_crop":
        return resize_center_crop(image, contract.resize_size or min(contract.input_size), contract.input_size)
    if contract.preprocess == "letterbox":
        return letterbox(image, contract.input_size)
    raise ValueError(f"model {contract.name}: unknown preprocess {contract.preprocess!r} in config.pbtxt")


def boxes_to_original(boxes: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Map xyxy boxes from model-input pixels back to original-image pixels, clipped to the image."""
    mapped = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    mapped[:, [0, 2]] = (mapped[:, [0, 2]] + geometry.offset_x) / geometry.scale_x
    mapped[:, [1, 3]] = (mapped[:, [1, 3]] + geometry.offset_y) / geometry.scale_y
    mapped[:, [0, 2]] = mapped[:, [0, 2]].clip(0, geometry.width)
    mapped[:, [1, 3]] = mapped[:, [1, 3]].clip(0, geometry.height)
    return mapped


def label_of(labels: tuple[str, ...], index: int) -> str:
    """Name of class `index`, or the index as text when labels.txt is shorter."""
    return labels[index] if 0 <= index < len(labels) else str(index)


TABLE_TYPES = {"FP32": np.dtype("<f4"), "INT32": np.dtype("<i4"), "BYTES": np.dtype(object)}


@dataclass(frozen=True)
class TableSpec:
    """One typed tensor of a task's answers as a table (the Open Inference Protocol's outputs beside `RESULT`);
    the first dimension is the request's images, -1 a size that varies."""

    name: str
    datatype: str  # BYTES | FP32 | INT32
    shape: tuple[int, ...]


def padded(rows: Sequence[Sequence[Any]], fill: Any, datatype: str, tail: tuple[int, ...] = ()) -> np.ndarray:
    """Rows of different lengths as one [n, longest, *tail] array, short rows padded with `fill`."""
    longest = max((len(row) for row in rows), default=0)
    array = np.full((len(rows), longest, *tail), fill, dtype=TABLE_TYPES[datatype])
    for i, row in enumerate(rows):
        if row:
            array[i, : len(row)] = (
                row if datatype != "BYTES" else np.array(row, dtype=object).reshape(len(row), *tail)
            )
    return array


@dataclass(frozen=True, eq=False)
class ExplainTarget:
    """One answer an explanation is about: its class, its score on the whole image, which answer of the
    image's result it is (`index`: prediction, detection or segment), and what identifies it in another
    pass's outputs (the detector's box, the segmenter's region, both at model-input resolution)."""

    class_id: int
    label: str
    score: float
    index: int = 0
    box: np.ndarray | None = None  # xyxy, model-input pixels
    region: np.ndarray | None = None  # bool [H, W], model-input pixels


def box_ious(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one xyxy `box` with each row of `boxes`."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    x1, y1 = np.maximum(box[0], boxes[:, 0]), np.maximum(box[1], boxes[:, 1])
    x2, y2 = np.minimum(box[2], boxes[:, 2]), np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


class Handler(Generic[OptionsT, ResultT]):
    """One task: which model and options it uses, and how to get to and from that model."""

    task: ClassVar[str]
    model: ClassVar[str]
    endpoint: ClassVar[str]
    options: ClassVar[type[BaseModel]]
    request: ClassVar[type[BaseModel]]
    response: ClassVar[type[BaseModel]]
    tables: ClassVar[tuple[TableSpec, ...]] = ()  # typed outputs of `table`, in order

    def preprocess(self, image: np.ndarray, contract: ModelContract) -> tuple[np.ndarray, Geometry]:
        """Turn one RGB image into the model's `[3,H,W]` uint8 input and its geometry."""
        return preprocess_image(image, contract)

    def postprocess(
        self, outputs: dict[str, np.ndarray], geometry: Geometry, options: OptionsT, contract: ModelContract
    ) -> ResultT:
        """Turn one image's model outputs into its answer in original-image terms."""
        raise NotImplementedError

    def table(self, results: list[ResultT]) -> dict[str, np.ndarray]:
        """The results of one request as the typed tensors `tables` names (none by default)."""
        return {}

    def tracker(self, fps: float) -> Tracker | None:
        """A tracker of this task's results across one stream's or video's frames (None: not tracked)."""
        return None

    def draw(self, image: np.ndarray, result: ResultT) -> np.ndarray:
        """`result` drawn on `image` (the original, or a scaled-down copy of it)."""
        raise NotImplementedError

    # ---- explanations (service/core/explain.py runs them; a task without these has none) ----

    explain_methods: ClassVar[tuple[str, ...]] = ()  # "occlusion" (any backend), "saliency", "gradcam"

    def check_explain(self, options: OptionsT, contract: ModelContract) -> None:
        """Raise ValueError if `options` ask for an explanation this task cannot give (checked before admission)."""

    def explain_targets(
        self,
        outputs: dict[str, np.ndarray],
        geometry: Geometry,
        options: OptionsT,
        contract: ModelContract,
        top: int,
    ) -> list[ExplainTarget]:
        """The answers of one image to explain (at most `top`, in the order its result lists them)."""
        raise NotImplementedError

    def explain_scores(
        self, outputs: dict[str, np.ndarray], targets: Sequence[ExplainTarget], contract: ModelContract
    ) -> np.ndarray:
        """Each target's score in another pass's `outputs` (an occluded copy of the image)."""
        raise NotImplementedError

    def with_explanations(self, result: ResultT, explained: Sequence[tuple[ExplainTarget, Any]]) -> ResultT:
        """`result` with each (target, explanation) attached to the answer the target is about."""
        raise NotImplementedError


class Tracker(Protocol):
    """Gives a task's results identities across the frames of one stream or video."""

    def update(self, result: Any) -> Any:
        """`result` of the next frame, with what tracking adds (ids)."""
