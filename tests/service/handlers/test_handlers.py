"""Pre/post-processing shared by both backends: geometry round trips, RLE, option handling."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from service.imaging import annotate
from service.contract import ModelContract, TensorSpec
from service.handlers.common import boxes_to_original, letterbox, resize_center_crop
from service.handlers.segment import encode_rle, mask_to_original
from service.schemas import ClassifyOptions, DetectOptions, SegmentOptions
from service.handlers import HANDLERS


def contract(task: str, size: tuple[int, int], labels: tuple[str, ...], **params: str) -> ModelContract:
    return ModelContract(
        name=task,
        task=task,
        inputs=(TensorSpec("IMAGE", "uint8", (3, *size)),),
        outputs=(),
        labels=labels,
        max_batch_size=8,
        parameters={"task": task, **params},
    )


def rectangle_image(height: int, width: int, box: tuple[int, int, int, int]) -> np.ndarray:
    image = np.zeros((height, width, 3), dtype=np.uint8)
    x1, y1, x2, y2 = box
    image[y1:y2, x1:x2] = 255
    return image


def bright_box(chw: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(chw.sum(axis=0) > 3 * 127)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)


@pytest.mark.parametrize("shape", [(300, 500), (500, 300), (128, 128), (50, 70)])
def test_letterbox_keeps_aspect_and_pads_bottom_right(shape: tuple[int, int]) -> None:
    height, width = shape
    image = np.full((height, width, 3), 200, dtype=np.uint8)
    chw, geometry = letterbox(image, (128, 160))
    assert chw.shape == (3, 128, 160) and chw.dtype == np.uint8
    assert abs(geometry.scale_x - geometry.scale_y) < 0.02  # aspect ratio kept
    assert (geometry.content_width == 160) or (geometry.content_height == 128)  # fills one side
    assert (chw[:, : geometry.content_height, : geometry.content_width] == 200).all()
    assert (chw[:, geometry.content_height :, :] == 0).all() and (chw[:, :, geometry.content_width :] == 0).all()


@pytest.mark.parametrize("shape", [(300, 500), (500, 300), (77, 1000)])
def test_letterbox_box_round_trip(shape: tuple[int, int]) -> None:
    height, width = shape
    drawn = (width // 5, height // 4, width // 2, (3 * height) // 4)
    chw, geometry = letterbox(rectangle_image(height, width, drawn), (128, 128))
    back = boxes_to_original(bright_box(chw)[None], geometry)[0]
    pixel = max(1 / geometry.scale_x, 1 / geometry.scale_y)  # one model pixel in original pixels
    np.testing.assert_allclose(back, drawn, atol=1.5 * pixel)


def test_boxes_are_clipped_to_the_image() -> None:
    _, geometry = letterbox(np.zeros((100, 200, 3), dtype=np.uint8), (128, 128))
    back = boxes_to_original(np.array([[-10.0, -5.0, 128.0, 128.0]]), geometry)[0]
    np.testing.assert_allclose(back, [0, 0, 200, 100])


def test_resize_center_crop_maps_back_through_the_crop() -> None:
    drawn = (180, 130, 320, 170)  # centred in a 500x300 image
    chw, geometry = resize_center_crop(rectangle_image(300, 500, drawn), 146, (128, 128))
    assert chw.shape == (3, 128, 128)
    assert geometry.offset_x > 0 and geometry.offset_y > 0  # 243x146 cropped to 128x128
    back = boxes_to_original(bright_box(chw)[None], geometry)[0]
    np.testing.assert_allclose(back, drawn, atol=2 / geometry.scale_x)


def test_rle_decodes_back_to_the_mask() -> None:
    rng = np.random.default_rng(1)
    binary = rng.random((37, 53)) > 0.6
    rle = encode_rle(binary)
    assert rle.size == [37, 53] and isinstance(rle.counts, str)
    decoded = mask_utils.decode({"size": rle.size, "counts": rle.counts.encode()})
    np.testing.assert_array_equal(decoded.astype(bool), binary)


def test_mask_is_cropped_and_resized_to_the_original() -> None:
    drawn = (50, 40, 250, 120)
    image = rectangle_image(160, 400, drawn)
    chw, geometry = letterbox(image, (128, 128))
    model_mask = (chw.sum(axis=0) > 3 * 127).astype(np.uint8) * 2  # what a perfect segmenter says
    original = mask_to_original(model_mask, geometry)
    truth = (image.sum(axis=2) > 0).astype(np.uint8) * 2
    assert original.shape == (160, 400)
    iou = ((original == 2) & (truth == 2)).sum() / ((original == 2) | (truth == 2)).sum()
    assert iou > 0.95


def test_classify_postprocess_returns_top_k_in_order() -> None:
    handler = HANDLERS["classifier"]
    labels = ("circle", "square", "triangle", "star")
    _, geometry = letterbox(np.zeros((10, 20, 3), dtype=np.uint8), (8, 8))
    result = handler.postprocess(
        {"PROBS": np.array([0.1, 0.6, 0.05, 0.25], dtype=np.float32)},
        geometry,
        ClassifyOptions(top_k=2),
        contract("classification", (8, 8), labels),
    )
    assert [(p.class_id, p.label) for p in result.predictions] == [(1, "square"), (3, "star")]
    assert result.predictions[0].score == pytest.approx(0.6)
    assert (result.image.width, result.image.height) == (20, 10)
    many = handler.postprocess({"PROBS": np.full(4, 0.25)}, geometry, ClassifyOptions(top_k=50), contract(
        "classification", (8, 8), labels))
    assert len(many.predictions) == 4


def test_detect_postprocess_filters_and_maps_boxes() -> None:
    handler = HANDLERS["detector"]
    _, geometry = letterbox(np.zeros((64, 256, 3), dtype=np.uint8), (128, 128))  # scale 0.5
    boxes = np.zeros((5, 4), dtype=np.float32)
    boxes[:3] = [[10, 10, 20, 20], [0, 0, 64, 16], [100, 0, 128, 32]]
    outputs = {
        "BOXES": boxes,
        "SCORES": np.array([0.9, 0.6, 0.3, 0, 0], dtype=np.float32),
        "LABELS": np.array([1, 2, 1, 0, 0], dtype=np.int64),
        "COUNT": np.array([3], dtype=np.int32),
    }
    labels = ("__background__", "circle", "square")
    detect_contract = contract("detection", (128, 128), labels)
    result = handler.postprocess(outputs, geometry, DetectOptions(score_threshold=0.5), detect_contract)
    assert [(d.label, d.score) for d in result.detections] == [("circle", pytest.approx(0.9)), ("square", pytest.approx(0.6))]
    assert result.detections[0].box == [20.0, 20.0, 40.0, 40.0]
    assert result.detections[1].box == [0.0, 0.0, 128.0, 32.0]
    capped = handler.postprocess(outputs, geometry, DetectOptions(score_threshold=0.0, max_detections=1), detect_contract)
    assert len(capped.detections) == 1
    everything = handler.postprocess(outputs, geometry, DetectOptions(score_threshold=0.0), detect_contract)
    assert len(everything.detections) == 3  # rows past COUNT are ignored even at threshold 0
    assert everything.detections[2].box == [200.0, 0.0, 256.0, 64.0]


def test_segment_postprocess_fractions_rles_and_png() -> None:
    handler = HANDLERS["segmenter"]
    _, geometry = letterbox(np.zeros((64, 64, 3), dtype=np.uint8), (32, 32))
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[:16, :8] = 1  # an eighth of the image
    mask[16:, 16:] = 3  # a quarter
    labels = ("background", "circle", "square", "triangle")
    result = handler.postprocess({"MASK": mask}, geometry, SegmentOptions(return_png=True), contract(
        "segmentation", (32, 32), labels))
    assert result.class_fractions == pytest.approx({"background": 0.625, "circle": 0.125, "square": 0.0, "triangle": 0.25})
    assert [(s.label, s.pixel_fraction) for s in result.segments] == [("circle", 0.125), ("triangle", 0.25)]
    triangle = mask_utils.decode({"size": result.segments[1].rle.size, "counts": result.segments[1].rle.counts})
    assert triangle.shape == (64, 64) and triangle[32:, 32:].all() and triangle.sum() == 32 * 32
    png = np.asarray(Image.open(io.BytesIO(base64.b64decode(result.png))))
    assert png.shape == (64, 64) and set(np.unique(png)) == {0, 1, 3}
    without = handler.postprocess({"MASK": mask}, geometry, SegmentOptions(), contract("segmentation", (32, 32), labels))
    assert without.png is None


def test_segment_png_colours_each_class_as_annotate_does() -> None:
    """`return_png` and `annotate=png` give a class the same colour; background is black in the mask PNG."""
    handler = HANDLERS["segmenter"]
    _, geometry = letterbox(np.zeros((32, 32, 3), dtype=np.uint8), (32, 32))
    mask = (np.arange(32 * 32) % 24).reshape(32, 32).astype(np.uint8)  # past the palette's length: it wraps
    labels = tuple(f"class{i}" for i in range(24))
    result = handler.postprocess(
        {"MASK": mask}, geometry, SegmentOptions(return_png=True), contract("segmentation", (32, 32), labels)
    )
    rgb = np.asarray(Image.open(io.BytesIO(base64.b64decode(result.png))).convert("RGB"))
    assert (rgb[mask == 0] == 0).all()
    for class_id in range(1, 24):
        assert (rgb[mask == class_id] == annotate.class_color(class_id)).all(), class_id
