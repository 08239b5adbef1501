"""The shapes generator: seeded, consistent labels/boxes/masks, fair contrast, real occlusion."""

from __future__ import annotations

import time

import numpy as np
import pytest

from training.shapes import (
    CLASSES,
    MIN_VISIBLE_FRACTION,
    Shape,
    make_scene,
    paint_instances,
    place_shapes,
)


def test_same_seed_same_scene_and_different_seeds_differ() -> None:
    a, b, c = make_scene(7, 128, 1, 4), make_scene(7, 128, 1, 4), make_scene(8, 128, 1, 4)
    for field in ("image", "boxes", "labels", "mask"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.image, c.image)


@pytest.mark.parametrize(("size", "lo", "hi"), [(64, 1, 1), (128, 1, 4), (160, 2, 3), (256, 1, 6)])
def test_scene_types_and_shape_counts(size: int, lo: int, hi: int) -> None:
    for seed in range(40):
        scene = make_scene(seed, size, lo, hi)
        assert scene.image.shape == (size, size, 3) and scene.image.dtype == np.uint8
        assert scene.mask.shape == (size, size) and scene.mask.dtype == np.uint8
        assert scene.boxes.dtype == np.float32 and scene.boxes.shape == (len(scene.labels), 4)
        assert scene.labels.dtype == np.int64
        assert lo <= len(scene.labels) <= hi
        assert set(scene.labels.tolist()) <= set(range(1, len(CLASSES) + 1))
        assert np.all(scene.boxes[:, :2] >= 0) and np.all(scene.boxes[:, 2:] <= size)
        assert np.all(scene.boxes[:, 2:] - scene.boxes[:, :2] >= 8), "shapes are big enough to see"


def test_masks_agree_with_boxes_and_labels() -> None:
    for seed in range(100):
        scene = make_scene(seed, 128, 1, 4)
        assert set(np.unique(scene.mask).tolist()) - {0} == set(scene.labels.tolist())
        covered = np.zeros_like(scene.mask, dtype=bool)
        for (x0, y0, x1, y1), label in zip(scene.boxes.astype(int), scene.labels, strict=True):
            inside = scene.mask[y0:y1, x0:x1] == label
            covered[y0:y1, x0:x1] |= inside
            # tight box: every edge row/column holds a pixel of the box's class
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
        assert np.array_equal(covered, scene.mask > 0), (
            f"seed {seed}: mask pixels outside their class's boxes"
        )


def test_single_shape_scene_is_a_classification_sample() -> None:
    scene = make_scene(3, 64, 1, 1)
    assert len(scene.labels) == 1
    x0, y0, x1, y1 = scene.boxes[0]
    assert (x1 - x0) >= 0.3 * 64 or (y1 - y0) >= 0.3 * 64, "the one shape fills a good part of the image"


def test_classes_appear_roughly_uniformly() -> None:
    single = np.array([make_scene(seed, 64, 1, 1).labels[0] for seed in range(1000)])
    multi = np.concatenate([make_scene(seed, 128, 1, 4).labels for seed in range(300)])
    for labels in (single, multi):
        share = np.bincount(labels, minlength=len(CLASSES) + 1)[1:] / len(labels)
        expected = 1 / len(CLASSES)
        assert np.all(np.abs(share - expected) < 0.3 * expected), share  # 4+ standard deviations


def test_later_shapes_hide_earlier_ones() -> None:
    under = Shape(cls=0, cx=40, cy=40, radius=20, angle=0.0)
    over = Shape(cls=1, cx=55, cy=40, radius=20, angle=0.3)
    instances = paint_instances([under, over], 96)
    alone_under = paint_instances([under], 96) > 0
    alone_over = paint_instances([over], 96) > 0
    overlap = alone_under & alone_over
    assert overlap.sum() > 100
    assert np.all(instances[overlap] == 2)
    assert np.all(instances[alone_under & ~alone_over] == 1)


def test_placement_keeps_every_shape_mostly_visible_but_overlaps_happen() -> None:
    scenes_with_overlap = 0
    for seed in range(200):
        shapes = place_shapes(np.random.default_rng(seed), 128, 4, single=False)
        visible = np.bincount(paint_instances(shapes, 128).ravel(), minlength=len(shapes) + 1)[1:]
        full = np.array([np.count_nonzero(paint_instances([s], 128)) for s in shapes])
        assert np.all(visible >= MIN_VISIBLE_FRACTION * full), f"seed {seed}: a shape is mostly hidden"
        scenes_with_overlap += bool(np.any(visible < full))
    assert scenes_with_overlap >= 20, "occlusion is part of the data"


def _dilate(region: np.ndarray, pixels: int) -> np.ndarray:
    """Binary dilation with a (2 * pixels + 1) square, numpy only."""
    padded = np.pad(region, pixels)
    h, w = region.shape
    out = np.zeros_like(region)
    for dy in range(2 * pixels + 1):
        for dx in range(2 * pixels + 1):
            out |= padded[dy : dy + h, dx : dx + w]
    return out


def test_shapes_contrast_with_their_surroundings() -> None:
    checked = 0
    for seed in range(60):
        scene = make_scene(seed, 128, 1, 4)
        image = scene.image.astype(np.float32)
        for (x0, y0, x1, y1), label in zip(scene.boxes.astype(int), scene.labels, strict=True):
            blob = np.zeros_like(scene.mask, dtype=bool)
            blob[y0:y1, x0:x1] = scene.mask[y0:y1, x0:x1] == label
            ring = _dilate(blob, 2) & (scene.mask != label)
            colour = np.median(image[blob], axis=0)
            distance = np.median(np.linalg.norm(image[ring] - colour, axis=1))
            assert distance >= 40, f"seed {seed}: a {CLASSES[label - 1]} blends into its surroundings"
            checked += 1
    assert checked > 100


def test_rendering_is_fast() -> None:
    start = time.process_time()  # CPU time: rendering is single-threaded, and the machine may be shared
    for seed in range(200):
        make_scene(seed, 128, 1, 4)
    per_minute = 200 / (time.process_time() - start) * 60
    assert per_minute >= 6000, f"only {per_minute:.0f} scenes per minute"


@pytest.mark.parametrize(("lo", "hi"), [(0, 1), (3, 2)])
def test_bad_shape_counts_are_refused(lo: int, hi: int) -> None:
    with pytest.raises(ValueError, match="min_shapes"):
        make_scene(0, 64, lo, hi)
