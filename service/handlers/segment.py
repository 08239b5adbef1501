"""/segment: the segmenter's class-index `MASK` → original-size COCO RLEs (pycocotools), fractions, and
optionally polygons (`service.imaging.polygons`) and a palette PNG."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from service.imaging.annotate import class_color, draw_segmentation
from service.contract import ModelContract
from service.handlers.registry import register_handler
from service.handlers.common import ExplainTarget, Geometry, Handler, label_of
from service.imaging.images import RENDER_MAX_PIXELS, fit_size
from service.imaging.polygons import class_polygons
from service.schemas import (
    RLE,
    ImageSize,
    Polygon,
    Segment,
    SegmentationResult,
    SegmentOptions,
    SegmentRequest,
    SegmentResponse,
)

# The PNG's palette: each class in its `annotate=png` colour, class 0 (background) black.
_MASK_PALETTE = [0, 0, 0] + [channel for class_id in range(1, 256) for channel in class_color(class_id)]


def mask_to_original(mask: np.ndarray, geometry: Geometry, size: tuple[int, int] | None = None) -> np.ndarray:
    """Crop the letterbox padding off a model-resolution mask and resize it (nearest) to the original
    image, or to `size` (width, height) when given."""
    width, height = size or (geometry.width, geometry.height)
    content = np.asarray(mask, dtype=np.uint8)[: geometry.content_height, : geometry.content_width]
    resized = F.resize(
        torch.from_numpy(np.ascontiguousarray(content))[None],
        [height, width],
        interpolation=InterpolationMode.NEAREST_EXACT,
    )
    return resized[0].numpy()


def encode_rle(binary: np.ndarray) -> RLE:
    """COCO compressed RLE of a boolean H×W mask (pycocotools; counts as text). A Fortran-ordered
    mask (as `mask == c` of a Fortran-ordered one is) is encoded without another copy."""
    column_major = np.asfortranarray(binary)
    ones = column_major.view(np.uint8) if column_major.dtype == np.bool_ else column_major.astype(np.uint8)
    rle = mask_utils.encode(np.asfortranarray(ones))
    return RLE(size=[int(s) for s in rle["size"]], counts=rle["counts"].decode("ascii"))


def palette_png(mask: np.ndarray) -> str:
    """Base64 PNG whose pixel values are the class indices, with a palette so it is viewable."""
    height, width = mask.shape
    image = Image.frombytes("P", (width, height), np.ascontiguousarray(mask, dtype=np.uint8).tobytes())
    image.putpalette(_MASK_PALETTE)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class SegmentHandler(Handler[SegmentOptions, SegmentationResult]):
    task = "segmentation"
    model = "segmenter"
    endpoint = "/segment"
    options = SegmentOptions
    request = SegmentRequest
    response = SegmentResponse

    def postprocess(
        self, outputs: dict[str, np.ndarray], geometry: Geometry, options: SegmentOptions, contract: ModelContract
    ) -> SegmentationResult:
        """Return per-class RLEs and pixel fractions at original size (and polygons, and the PNG, at most 4 MP,
        if asked)."""
        mask = np.asfortranarray(mask_to_original(outputs["MASK"], geometry))  # column-major, as RLE runs go
        num_classes = max(len(contract.labels), int(mask.max(initial=0)) + 1)
        fractions = np.bincount(mask.ravel(order="K"), minlength=num_classes) / mask.size
        segments = [
            Segment(
                class_id=class_id,
                label=label_of(contract.labels, class_id),
                pixel_fraction=float(fractions[class_id]),
                rle=encode_rle(mask == class_id),
                polygons=self._polygons(outputs["MASK"], geometry, class_id, options.polygon_tolerance)
                if options.return_polygons
                else None,
            )
            for class_id in np.flatnonzero(fractions)
            if class_id != 0
        ]
        return SegmentationResult(
            image=ImageSize(width=geometry.width, height=geometry.height),
            class_fractions={label_of(contract.labels, i): float(f) for i, f in enumerate(fractions)},
            segments=segments,
            png=palette_png(self._png_mask(outputs["MASK"], geometry)) if options.return_png else None,
        )

    @staticmethod
    def _polygons(mask: np.ndarray, geometry: Geometry, class_id: int, tolerance: float) -> list[Polygon]:
        """Class `class_id`'s polygons, traced on the model's mask (its letterboxed content) in original pixels."""
        content = np.asarray(mask)[: geometry.content_height, : geometry.content_width]
        scale = (geometry.width / geometry.content_width, geometry.height / geometry.content_height)
        return class_polygons(content, class_id, scale, tolerance, (geometry.width, geometry.height))

    @staticmethod
    def _png_mask(mask: np.ndarray, geometry: Geometry) -> np.ndarray:
        """The mask for `return_png`: at original size, or scaled down to `RENDER_MAX_PIXELS` for larger images."""
        return mask_to_original(mask, geometry, fit_size(geometry.width, geometry.height, RENDER_MAX_PIXELS))

    def draw(self, image: np.ndarray, result: SegmentationResult) -> np.ndarray:
        return draw_segmentation(image, result)

    explain_methods = ("occlusion",)

    def explain_targets(
        self,
        outputs: dict[str, np.ndarray],
        geometry: Geometry,
        options: SegmentOptions,
        contract: ModelContract,
        top: int,
    ) -> list[ExplainTarget]:
        """The `top` largest predicted classes (background aside), with their regions in the model's mask."""
        mask = np.zeros_like(np.asarray(outputs["MASK"]))  # the content: the letterbox's padding is no answer
        height, width = geometry.content_height, geometry.content_width
        mask[:height, :width] = np.asarray(outputs["MASK"])[:height, :width]
        counts = np.bincount(mask.ravel(), minlength=len(contract.labels))
        present = [int(c) for c in np.flatnonzero(counts) if c != 0]
        largest = sorted(sorted(present, key=lambda c: -counts[c])[:top])
        return [ExplainTarget(c, label_of(contract.labels, c), 1.0, region=mask == c) for c in largest]

    def explain_scores(
        self, outputs: dict[str, np.ndarray], targets: Sequence[ExplainTarget], contract: ModelContract
    ) -> np.ndarray:
        """The share of each target's region still predicted as its class (occluded pixels included)."""
        mask = np.asarray(outputs["MASK"])
        kept = []
        for target in targets:
            assert target.region is not None
            still = np.count_nonzero(mask[target.region] == target.class_id)
            kept.append(float(still) / max(1, int(target.region.sum())))
        return np.array(kept)

    def with_explanations(
        self, result: SegmentationResult, explained: Sequence[tuple[ExplainTarget, Any]]
    ) -> SegmentationResult:
        by_class = {target.class_id: explanation for target, explanation in explained}
        segments = [  # a class too small to survive the mask's resize to the original has no segment
            s.model_copy(update={"explanation": by_class[s.class_id]}) if s.class_id in by_class else s
            for s in result.segments
        ]
        return result.model_copy(update={"segments": segments})


register_handler(SegmentHandler())
