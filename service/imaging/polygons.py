"""Class masks → polygons with holes: contourpy's filled marching squares, shapely's simplification.

Polygons are traced on the segmenter's own mask (the letterboxed content at model resolution, at most
the model's input size), then scaled to original-image pixels: the original-size mask is only that
mask resized (nearest), so tracing it again at full size would cost up to 40 MP per class and tell no
more. Boundaries run half-way between inside and outside pixel centres, so a polygon's area is the
mask's pixel count up to the corners cut (1/8 pixel each) and the simplification; coordinates are
continuous, pixel (0, 0) covering [0, 1]×[0, 1].
"""

from __future__ import annotations

from itertools import pairwise

import contourpy
import numpy as np
import shapely

from service.schemas import Polygon

MAX_VERTICES_PER_CLASS = 10_000  # after simplification; the largest regions are kept first
_DECIMALS = 2  # coordinates rounded to 1/100 pixel


def class_polygons(
    mask: np.ndarray, class_id: int, scale: tuple[float, float], tolerance: float, size: tuple[int, int]
) -> list[Polygon]:
    """Polygons of the pixels of `mask` equal to `class_id`, in the coordinates of a `size` (width, height)
    image that `mask` maps onto with `scale` (x, y) per mask pixel, simplified with `tolerance` of those pixels
    (GEOS's topology-preserving Douglas-Peucker); the largest first, at most `MAX_VERTICES_PER_CLASS` vertices."""
    rows, cols = np.nonzero(mask == class_id)
    if rows.size == 0:
        return []
    top, left = int(rows.min()), int(cols.min())
    window = mask[top : int(rows.max()) + 1, left : int(cols.max()) + 1] == class_id
    field = np.pad(window, 1).astype(np.float64)  # outside is 0, so every boundary closes
    generator = contourpy.contour_generator(z=field, fill_type=contourpy.FillType.OuterOffset)
    points, offsets = generator.filled(0.5, 1.5)
    # padded index p is mask index p - 1 + top/left, and pixel index i covers [i, i + 1]: i + 0.5 is its centre
    shift = np.array([left - 0.5, top - 0.5])
    factor = np.array(scale, dtype=np.float64)
    width, height = size
    shapes = []
    for outline, starts in zip(points, offsets, strict=True):
        rings = [np.clip((outline[a:b] + shift) * factor, 0, [width, height]) for a, b in pairwise(starts)]
        shape = shapely.Polygon(rings[0], rings[1:])
        shapes.extend(_polygons_of(shape.simplify(tolerance) if tolerance > 0 else shape))
    shapes.sort(key=lambda s: s.area, reverse=True)
    kept, vertices = [], 0
    for shape in shapes:
        count = sum(len(ring.coords) - 1 for ring in (shape.exterior, *shape.interiors))
        if vertices + count > MAX_VERTICES_PER_CLASS:
            break
        vertices += count
        kept.append(_to_schema(shape))
    return kept


def _polygons_of(geometry: shapely.Geometry) -> list[shapely.Polygon]:
    """The non-empty polygons of a simplified geometry (it may have become empty or split)."""
    parts = getattr(geometry, "geoms", [geometry])
    return [p for p in parts if isinstance(p, shapely.Polygon) and not p.is_empty and p.area > 0]


def _ring(ring: shapely.LinearRing) -> list[list[float]]:
    """A ring's vertices as [[x, y], ...], rounded, without repeating the first at the end."""
    return np.round(np.asarray(ring.coords)[:-1], _DECIMALS).tolist()


def _to_schema(shape: shapely.Polygon) -> Polygon:
    return Polygon(exterior=_ring(shape.exterior), holes=[_ring(hole) for hole in shape.interiors])
