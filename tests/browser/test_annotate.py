"""Unit tests for service.imaging.annotate: drawing lands where the answer is, nowhere else, at the same size."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from service.imaging import annotate
from service.handlers import HANDLERS
from service.schemas import (
    RLE,
    ClassificationResult,
    ClassScore,
    Detection,
    DetectionResult,
    ImageSize,
    Segment,
    SegmentationResult,
)
from training.shapes import CLASSES, make_scene

NAMES = ("background", *CLASSES)
NAME_OF = dict(enumerate(NAMES))


@pytest.fixture(scope="module")
def scene():
    return make_scene(seed=8, size=160, min_shapes=2, max_shapes=3)


def _changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.any(a != b, axis=2)


def test_detections_draw_box_outlines_in_class_colour_and_leave_the_rest(scene) -> None:
    image = scene.image
    boxes = np.array([[10.5, 30.0, 60.0, 80.0], [90.0, 100.0, 150.0, 150.0]], np.float32)
    ids = [2, 4]
    out = annotate.draw_detections(image, boxes, ids, [NAMES[c] for c in ids], [0.9, 0.4])

    assert out.shape == image.shape and out.dtype == np.uint8
    for (x0, y0, x1, y1), class_id in zip(boxes.astype(int).tolist(), ids):
        # Bottom and right edges are never covered by a label chip: they show the class colour.
        assert (out[y1, x0 + 1 : x1] == annotate.class_color(class_id)).all()
        assert (out[y0 + 1 : y1, x1] == annotate.class_color(class_id)).all()
    near = np.zeros(image.shape[:2], bool)
    for x0, y0, x1, y1 in boxes.astype(int).tolist():
        near[max(0, y0 - 20) : y1 + 1, x0 : max(x1 + 1, x0 + 70)] = True  # box and its label chip
    changed = _changed(out, image)
    assert not changed[~near].any()
    assert not changed[40:70, 20:50].any()  # the inside of a box is not filled


def test_detections_with_no_boxes_return_the_image_unchanged(scene) -> None:
    out = annotate.draw_detections(scene.image, np.zeros((0, 4)), [], [], [])
    assert np.array_equal(out, scene.image)


def test_detections_clip_boxes_outside_or_reversed() -> None:
    image = np.zeros((64, 96, 3), np.uint8)
    out = annotate.draw_detections(image, np.array([[90.0, 70.0, -5.0, 10.0]]), [2], ["square"], [0.5])
    assert out.shape == image.shape
    assert _changed(out, image).any()


def test_detections_refuse_mismatched_lengths(scene) -> None:
    with pytest.raises(ValueError, match="one entry per detection"):
        annotate.draw_detections(scene.image, scene.boxes, [1], ["circle"], [0.5])


def test_mask_overlay_tints_every_shape_pixel_and_keeps_background(scene) -> None:
    out = annotate.draw_mask(scene.image, scene.mask, NAME_OF)
    assert out.shape == scene.image.shape
    changed = _changed(out, scene.image)
    assert changed[scene.mask > 0].mean() > 0.99
    legend_rows = 2 + 18 * len(np.unique(scene.mask))  # the legend sits in the top-left corner
    background = scene.mask == 0
    background[:legend_rows, :80] = False
    assert not changed[background].any()


def test_mask_colours_are_stable_per_class() -> None:
    image = np.full((64, 64, 3), 255, np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[40:, 40:] = 3
    first = annotate.draw_mask(image, mask, NAME_OF, alpha=1.0)
    mask[40:, :20] = 1  # another class in the same image must not change class 3's colour
    second = annotate.draw_mask(image, mask, NAME_OF, alpha=1.0)
    assert tuple(first[60, 60]) == tuple(second[60, 60]) == annotate.class_color(3)
    assert tuple(second[60, 5]) == annotate.class_color(1)


def test_mask_of_another_size_is_refused(scene) -> None:
    with pytest.raises(ValueError, match="does not match"):
        annotate.draw_mask(scene.image, scene.mask[:-1], NAME_OF)


def test_top_k_text_is_written_on_the_top_left_only(scene) -> None:
    out = annotate.draw_top_k(scene.image, ["circle", "star"], [0.91, 0.05])
    assert out.shape == scene.image.shape
    changed = _changed(out, scene.image)
    assert changed[:20, :60].mean() > 0.5
    assert not changed[60:, :].any()


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_encode_round_trips_at_the_same_size(scene, fmt: str) -> None:
    data = annotate.encode_image(scene.image, fmt)
    decoded = Image.open(io.BytesIO(data))
    assert decoded.format == fmt.upper()
    assert decoded.size == (scene.image.shape[1], scene.image.shape[0])
    if fmt == "png":
        assert np.array_equal(np.asarray(decoded.convert("RGB")), scene.image)


def test_encode_refuses_unknown_formats_and_non_rgb(scene) -> None:
    with pytest.raises(ValueError, match="unsupported image format"):
        annotate.encode_image(scene.image, "gif")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="H×W×3 uint8"):
        annotate.encode_image(scene.image[..., 0], "png")


def test_each_handler_draws_its_tasks_api_result(scene) -> None:
    height, width = scene.mask.shape
    size = ImageSize(width=width, height=height)
    ids = [int(c) for c in scene.labels]
    detections = DetectionResult(
        image=size,
        detections=[
            Detection(box=box, class_id=c, label=NAMES[c], score=0.8)
            for box, c in zip(scene.boxes.tolist(), ids)
        ],
    )
    segments = []
    for class_id in sorted(set(ids)):
        rle = mask_utils.encode(np.asfortranarray((scene.mask == class_id).astype(np.uint8)))
        segments.append(
            Segment(
                class_id=class_id,
                label=NAMES[class_id],
                pixel_fraction=float((scene.mask == class_id).mean()),
                rle=RLE(size=list(rle["size"]), counts=rle["counts"].decode()),
            )
        )
    segmentation = SegmentationResult(image=size, class_fractions={}, segments=segments)
    top = ClassificationResult(image=size, predictions=[ClassScore(class_id=0, label="circle", score=0.9)])

    assert np.array_equal(
        HANDLERS["detector"].draw(scene.image, detections),
        annotate.draw_detections(scene.image, scene.boxes, ids, [NAMES[c] for c in ids], [0.8] * len(ids)),
    )
    assert np.array_equal(
        HANDLERS["segmenter"].draw(scene.image, segmentation),
        annotate.draw_mask(scene.image, scene.mask, NAME_OF),
    )
    assert np.array_equal(
        HANDLERS["classifier"].draw(scene.image, top), annotate.draw_top_k(scene.image, ["circle"], [0.9])
    )
