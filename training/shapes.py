"""Seeded, procedurally generated "shapes" scenes with class labels, boxes and pixel masks.

Every scene is a pure function of its seed, so training, evaluation and the service's tests can
all draw fresh images whose answers are known. Rendering is numpy + Pillow only (about a
millisecond per 128 px scene).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")

# A shape must keep at least this share of its own area visible after later shapes are painted.
MIN_VISIBLE_FRACTION = 0.6
# A shape's colour differs from every pixel it covers or borders (CONTRAST_MARGIN px around it) by
# at least this RGB distance where any tried colour can: no line or stripe of the shape's own colour
# can touch it and change its outline.
MIN_CONTRAST = 80.0
CONTRAST_MARGIN = 2
_PLACEMENT_TRIES = 40
_COLOUR_TRIES = 24


@dataclass(frozen=True)
class Shape:
    """One shape to paint: class index into CLASSES (0-based), centre, circumradius, rotation."""

    cls: int
    cx: float
    cy: float
    radius: float
    angle: float


@dataclass(frozen=True)
class Scene:
    """A rendered scene; `labels` and `mask` index `["background", *CLASSES]`."""

    image: np.ndarray  # H x W x 3 uint8
    boxes: np.ndarray  # N x 4 float32, xyxy in pixels (tight around the visible part)
    labels: np.ndarray  # N int64, 1-based
    mask: np.ndarray  # H x W uint8, 0 = background


def _regular(n: int, radius: float, phase: float = 0.0) -> np.ndarray:
    t = phase + 2 * math.pi * np.arange(n) / n
    return radius * np.stack([np.cos(t), np.sin(t)], axis=1)


def _unit_outline(cls: int) -> np.ndarray:
    """Vertices of class `cls` with circumradius 1, centred on the origin."""
    name = CLASSES[cls]
    if name == "circle":
        return _regular(48, 1.0)
    if name == "square":
        return _regular(4, 1.0, math.pi / 4)
    if name == "triangle":
        return _regular(3, 1.0, -math.pi / 2)
    if name == "star":
        outer, inner = _regular(5, 1.0, -math.pi / 2), _regular(5, 0.42, -math.pi / 2 + math.pi / 5)
        return np.stack([outer, inner], axis=1).reshape(10, 2)
    if name == "cross":
        a, b = 0.3, 0.95  # half arm width, half arm length (corner radius ~1)
        return np.array(
            [
                (a, b),
                (a, a),
                (b, a),
                (b, -a),
                (a, -a),
                (a, -b),
                (-a, -b),
                (-a, -a),
                (-b, -a),
                (-b, a),
                (-a, a),
                (-a, b),
            ]
        )
    raise ValueError(f"unknown shape class {cls}")


_OUTLINES = [_unit_outline(c) for c in range(len(CLASSES))]


def shape_polygon(shape: Shape) -> list[tuple[float, float]]:
    """The shape's outline in image pixels, ready for ImageDraw.polygon."""
    c, s = math.cos(shape.angle), math.sin(shape.angle)
    pts = _OUTLINES[shape.cls] @ np.array([[c, s], [-s, c]]) * shape.radius
    pts += (shape.cx, shape.cy)
    return [tuple(p) for p in pts.tolist()]


def _footprint(shape: Shape, size: int, margin: int) -> np.ndarray:
    """Boolean H x W map of the shape grown by `margin` pixels."""
    canvas = Image.new("1", (size, size), 0)
    ImageDraw.Draw(canvas).polygon(shape_polygon(shape), fill=1, outline=1, width=2 * margin + 1)
    return np.asarray(canvas)


def paint_instances(shapes: Sequence[Shape], size: int) -> np.ndarray:
    """Paint shapes in order into an instance map (0 = none, i + 1 = shapes[i]); later ones hide earlier."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    for i, shape in enumerate(shapes):
        draw.polygon(shape_polygon(shape), fill=i + 1)
    return np.asarray(canvas)


def _shape_area(shape: Shape, size: int) -> int:
    return int(np.count_nonzero(paint_instances([shape], size)))


def _all_visible_enough(shapes: Sequence[Shape], areas: Sequence[int], size: int) -> bool:
    counts = np.bincount(paint_instances(shapes, size).ravel(), minlength=len(shapes) + 1)[1:]
    return bool(np.all(counts >= MIN_VISIBLE_FRACTION * np.asarray(areas)))


def place_shapes(rng: np.random.Generator, size: int, count: int, single: bool) -> list[Shape]:
    """Sample up to `count` shapes inside the image, in painting order.

    A placement is rejected when it would leave any shape (itself or an earlier one) with less than
    MIN_VISIBLE_FRACTION of its area visible, so no shape in a scene is mostly hidden.
    """
    r_lo, r_hi = (0.2 * size, 0.45 * size) if single else (max(6.0, 0.07 * size), 0.22 * size)
    shapes: list[Shape] = []
    areas: list[int] = []
    for _ in range(count * _PLACEMENT_TRIES):
        if len(shapes) == count:
            break
        radius = float(rng.uniform(r_lo, r_hi))
        shape = Shape(
            cls=int(rng.integers(len(CLASSES))),
            cx=float(rng.uniform(radius, size - radius)),
            cy=float(rng.uniform(radius, size - radius)),
            radius=radius,
            angle=float(rng.uniform(0, 2 * math.pi)),
        )
        area = _shape_area(shape, size)
        if _all_visible_enough([*shapes, shape], [*areas, area], size):
            shapes.append(shape)
            areas.append(area)
    return shapes


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, size=3).astype(np.float32)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A varied H x W x 3 float32 background: gradient, stripes, lines or smooth blotches."""
    kind = int(rng.integers(4))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c0, c1 = _random_colour(rng), _random_colour(rng)
    if kind == 0:  # linear gradient in a random direction
        t = np.cos(rng.uniform(0, 2 * math.pi)) * xx + np.sin(rng.uniform(0, 2 * math.pi)) * yy
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        bg = c0 + t[..., None] * (c1 - c0)
    elif kind == 1:  # soft or hard stripes at a random angle and period
        theta = rng.uniform(0, math.pi)
        period = rng.uniform(0.05, 0.3)
        wave = 0.5 + 0.5 * np.sin(2 * math.pi * (np.cos(theta) * xx + np.sin(theta) * yy) / period)
        if rng.random() < 0.5:
            wave = (wave > 0.5).astype(np.float32)
        bg = c0 + wave[..., None] * (c1 - c0)
    elif kind == 2:  # random lines over a flat colour
        img = Image.new("RGB", (size, size), tuple(int(v) for v in c0))
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(4, 16))):
            pts = rng.uniform(-0.2 * size, 1.2 * size, size=4).tolist()
            draw.line(pts, fill=tuple(int(v) for v in _random_colour(rng)), width=int(rng.integers(1, 4)))
        bg = np.asarray(img, dtype=np.float32)
    else:  # smooth blotches: a coarse random grid upsampled bilinearly
        cells = int(rng.integers(2, 7))
        coarse = rng.uniform(0, 255, size=(cells, cells, 3)).astype(np.uint8)
        bg = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR), dtype=np.float32)
    return bg


def _contrast(colour: np.ndarray, pixels: np.ndarray) -> float:
    """How far `colour` stands out from `pixels`: the smallest RGB distance to any of them."""
    return float(np.linalg.norm(pixels - colour, axis=1).min())


def _pick_colour(rng: np.random.Generator, pixels: np.ndarray) -> np.ndarray:
    """A random colour that contrasts with `pixels`, else the most contrasting one tried."""
    best, best_score = None, -1.0
    for _ in range(_COLOUR_TRIES):
        colour = _random_colour(rng)
        score = _contrast(colour, pixels)
        if score >= MIN_CONTRAST:
            return colour
        if score > best_score:
            best, best_score = colour, score
    corners = np.array([[r, g, b] for r in (0, 255) for g in (0, 255) for b in (0, 255)], dtype=np.float32)
    for colour in corners:  # the RGB cube's corners always include one far from any small pixel set
        score = _contrast(colour, pixels)
        if score > best_score:
            best, best_score = colour, score
    return best


def make_scene(seed: int, size: int = 128, min_shapes: int = 1, max_shapes: int = 4) -> Scene:
    """Render the scene for `seed`: `min_shapes`..`max_shapes` shapes on a textured, noisy background.

    `make_scene(seed, size, 1, 1)` is a classification sample: one large shape, class `labels[0] - 1`.
    """
    if not 1 <= min_shapes <= max_shapes:
        raise ValueError(f"need 1 <= min_shapes <= max_shapes, got {min_shapes}, {max_shapes}")
    rng = np.random.default_rng(seed)
    count = int(rng.integers(min_shapes, max_shapes + 1))
    shapes = place_shapes(rng, size, count, single=max_shapes == 1)
    image = _background(rng, size)
    for shape in shapes:
        covered = paint_instances([shape], size).astype(bool)
        image[covered] = _pick_colour(rng, image[_footprint(shape, size, CONTRAST_MARGIN)])
    image += rng.normal(0.0, rng.uniform(0.0, 10.0), size=image.shape).astype(np.float32)
    image = np.clip(image, 0, 255).astype(np.uint8)

    instances = paint_instances(shapes, size)
    classes = np.array([0] + [s.cls + 1 for s in shapes], dtype=np.uint8)
    boxes = np.zeros((len(shapes), 4), dtype=np.float32)
    for i in range(len(shapes)):
        ys, xs = np.nonzero(instances == i + 1)
        boxes[i] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    return Scene(
        image=image,
        boxes=boxes,
        labels=classes[1:].astype(np.int64),
        mask=classes[instances],
    )
