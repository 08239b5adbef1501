"""Draw a model's answer on the image it came from and encode the result as PNG or JPEG.

Boxes and masks are drawn with torchvision's utilities, text with Pillow's built-in scalable
font; nothing here rasterises by hand. A class keeps its colour in every image and every task
(the palette is indexed by class id, and detector and segmenter share ids: 0 is background).
Answers are drawn on a copy scaled down to a few megapixels (`fit_image`): boxes and masks, which
refer to the full-size image, are scaled to the copy.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from pycocotools import mask as mask_utils
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from service.imaging.images import fit_size
from service.schemas import ClassificationResult, DetectionResult, SegmentationResult

ImageFormat = Literal["png", "jpeg"]
MEDIA_TYPES: dict[ImageFormat, str] = {"png": "image/png", "jpeg": "image/jpeg"}

# Kelly's colours of maximum contrast (without black and white), then a few more: class id -> colour.
# /segment's return_png mask uses them too (service.handlers.segment), with background black.
_PALETTE: tuple[tuple[int, int, int], ...] = (
    (255, 179, 0), (128, 62, 117), (255, 104, 0), (166, 189, 215), (193, 0, 32), (206, 162, 98),
    (129, 112, 102), (0, 125, 52), (246, 118, 142), (0, 83, 138), (255, 122, 92), (83, 55, 122),
    (255, 142, 0), (179, 40, 81), (244, 200, 0), (127, 24, 13), (147, 170, 0), (89, 51, 21),
    (241, 58, 19), (35, 44, 22), (0, 180, 200), (120, 220, 120),
)
_PANEL = (20, 20, 20, 190)  # translucent dark backing for text that is not tied to a class


def class_color(class_id: int) -> tuple[int, int, int]:
    """Return the colour of `class_id`; the same id always gets the same colour."""
    return _PALETTE[class_id % len(_PALETTE)]


def fit_image(image: np.ndarray, max_pixels: int) -> np.ndarray:
    """`image` scaled down (bilinear, antialiased) to at most `max_pixels`; itself when it fits."""
    height, width = image.shape[:2]
    new_width, new_height = fit_size(width, height, max_pixels)
    if (new_width, new_height) == (width, height):
        return image
    chw = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    resized = F.resize(chw, [new_height, new_width], interpolation=InterpolationMode.BILINEAR, antialias=True)
    return np.ascontiguousarray(resized.permute(1, 2, 0).numpy())


def draw_classification(image: np.ndarray, result: ClassificationResult) -> np.ndarray:
    """The top-k classes and scores written on `image`."""
    return draw_top_k(image, [p.label for p in result.predictions], [p.score for p in result.predictions])


def draw_detection_result(
    image: np.ndarray, result: DetectionResult, labels: Sequence[str] | None = None
) -> np.ndarray:
    """`result`'s boxes on `image`, which may be a scaled-down copy of the image it is about; `labels`
    replace the detections' own (a tracker adds ids)."""
    height, width = image.shape[:2]
    found = result.detections
    scale = np.array([width, height, width, height], np.float32) / np.array(
        [result.image.width, result.image.height] * 2, np.float32
    )
    return draw_detections(
        image,
        np.array([d.box for d in found], dtype=np.float32).reshape(-1, 4) * scale,
        [d.class_id for d in found],
        list(labels) if labels is not None else [d.label for d in found],
        [d.score for d in found],
    )


def draw_segmentation(image: np.ndarray, result: SegmentationResult) -> np.ndarray:
    """`result`'s masks in class colours on `image` (its RLEs scaled to it)."""
    height, width = image.shape[:2]
    mask = np.zeros((height, width), dtype=np.int32)
    for segment in result.segments:
        rle = {"size": segment.rle.size, "counts": segment.rle.counts.encode()}
        mask[_nearest(mask_utils.decode(rle), height, width).astype(bool)] = segment.class_id
    return draw_mask(image, mask, {s.class_id: s.label for s in result.segments})


def _nearest(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """`mask` sampled at the centres of a `height`×`width` grid (nearest neighbour); itself at that size."""
    if mask.shape == (height, width):
        return mask
    rows = ((np.arange(height) + 0.5) * (mask.shape[0] / height)).astype(np.intp)
    cols = ((np.arange(width) + 0.5) * (mask.shape[1] / width)).astype(np.intp)
    return mask[np.ix_(rows, cols)]


def draw_detections(
    image: np.ndarray,
    boxes: np.ndarray,
    class_ids: Sequence[int],
    names: Sequence[str],
    scores: Sequence[float],
) -> np.ndarray:
    """Draw xyxy `boxes` (original-image pixels) with "name score" labels in class colours."""
    _check_image(image)
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if not len(boxes) == len(class_ids) == len(names) == len(scores):
        raise ValueError("boxes, class_ids, names and scores must have one entry per detection")
    if len(boxes) == 0:
        return image.copy()
    height, width = image.shape[:2]
    boxes = _clip_boxes(boxes, width, height)
    colors = [class_color(int(c)) for c in class_ids]
    drawn = draw_bounding_boxes(
        torch.from_numpy(image).permute(2, 0, 1).contiguous(),
        torch.from_numpy(boxes),
        colors=colors,
        width=_line_width(height, width),
    )
    canvas = Image.fromarray(drawn.permute(1, 2, 0).numpy())
    draw = ImageDraw.Draw(canvas, "RGBA")
    font = _font(height, width)
    for (x0, y0, _, _), name, score, color in zip(boxes.tolist(), names, scores, colors):
        _label(draw, (x0, y0), f"{name} {score:.2f}", font, color, width)
    return np.asarray(canvas)


def draw_mask(
    image: np.ndarray, mask: np.ndarray, names: Mapping[int, str], alpha: float = 0.5
) -> np.ndarray:
    """Overlay a class-index `mask` (H×W, 0 = background) in class colours, with a legend of `names`."""
    _check_image(image)
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match image size {image.shape[:2]}")
    present = [int(c) for c in np.unique(mask) if c != 0]
    if not present:
        return image.copy()
    mask_t = torch.from_numpy(np.ascontiguousarray(mask))
    masks = mask_t[None] == torch.tensor(present, dtype=mask_t.dtype)[:, None, None]
    drawn = draw_segmentation_masks(
        torch.from_numpy(image).permute(2, 0, 1).contiguous(),
        masks,
        alpha=alpha,
        colors=[class_color(c) for c in present],
    )
    canvas = Image.fromarray(drawn.permute(1, 2, 0).numpy())
    draw = ImageDraw.Draw(canvas, "RGBA")
    font = _font(*image.shape[:2])
    x, y = 2.0, 2.0
    for class_id in present:
        name = names.get(class_id, str(class_id))
        _, bottom = _label(draw, (x, y), name, font, class_color(class_id), image.shape[1], above=False)
        y = bottom + 1
    return np.asarray(canvas)


def draw_top_k(image: np.ndarray, names: Sequence[str], scores: Sequence[float]) -> np.ndarray:
    """Write the top-k "rank. name score%" lines on a translucent panel at the top left."""
    _check_image(image)
    if len(names) != len(scores):
        raise ValueError("names and scores must have the same length")
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas, "RGBA")
    font = _font(*image.shape[:2])
    x, y = 2.0, 2.0
    line_height = _line_height(draw, font)
    for rank, (name, score) in enumerate(zip(names, scores), start=1):
        text = f"{rank}. {name} {100 * score:.1f}%"
        left, top, right, _ = draw.textbbox((0, 0), text, font=font)
        draw.rectangle((x, y, x + right - left + 4, y + line_height + 3), fill=_PANEL)
        draw.text((x + 2 - left, y + 1 - top), text, font=font, fill=(255, 255, 255))
        y += line_height + 4
    return np.asarray(canvas)


def encode_image(image: np.ndarray, fmt: ImageFormat, jpeg_quality: int = 90) -> bytes:
    """Encode an H×W×3 uint8 RGB array as PNG or JPEG bytes."""
    _check_image(image)
    buffer = io.BytesIO()
    if fmt == "png":
        # Fastest zlib level: about 3x quicker than the default for ~5% more bytes, on a response path.
        Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    elif fmt == "jpeg":
        Image.fromarray(image).save(buffer, format="JPEG", quality=jpeg_quality)
    else:
        raise ValueError(f"unsupported image format {fmt!r}: use one of {sorted(MEDIA_TYPES)}")
    return buffer.getvalue()


def _check_image(image: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an H×W×3 uint8 RGB image, got {image.dtype} {image.shape}")


def _clip_boxes(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Clip to the image and order corners so torchvision accepts every box."""
    xs = np.clip(boxes[:, [0, 2]], 0, width - 1)
    ys = np.clip(boxes[:, [1, 3]], 0, height - 1)
    return np.stack([xs.min(1), ys.min(1), xs.max(1), ys.max(1)], axis=1).astype(np.float32)


def _line_width(height: int, width: int) -> int:
    return max(2, round(min(height, width) / 160))


def _font(height: int, width: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's built-in font at a size that stays legible from 64 px thumbnails to photos."""
    return ImageFont.load_default(size=int(np.clip(min(height, width) / 20, 10, 32)))


def _line_height(draw: ImageDraw.ImageDraw, font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> int:
    """Height of a line with ascenders and descenders, so chips of one image line up."""
    _, top, _, bottom = draw.textbbox((0, 0), "Ag|y", font=font)
    return int(bottom - top)


def _label(
    draw: ImageDraw.ImageDraw,
    anchor: tuple[float, float],
    text: str,
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
    color: tuple[int, int, int],
    image_width: int,
    above: bool = True,
) -> tuple[float, float]:
    """Draw `text` on a chip of `color` at `anchor` (above it when there is room); return its bottom-right."""
    x, y = anchor
    left, top, right, _ = draw.textbbox((0, 0), text, font=font)
    chip_w, chip_h = right - left + 4, _line_height(draw, font) + 3
    if above and y - chip_h >= 0:
        y -= chip_h
    x = max(0.0, min(x, image_width - chip_w))
    draw.rectangle((x, y, x + chip_w, y + chip_h), fill=color)
    luminance = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
    ink = (0, 0, 0) if luminance > 140 else (255, 255, 255)
    draw.text((x + 2 - left, y + 1 - top), text, font=font, fill=ink)
    return x + chip_w, y + chip_h
