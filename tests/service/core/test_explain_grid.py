"""The occlusion grid (service/core/explain.py) on its own: cells cover the content and only the content,
copies differ from the image in one cell each, and maps pool over the same cells."""

from __future__ import annotations

import numpy as np
import pytest

from service.core.explain import cell_edges, content_region, occluded_copies, pool_grid, scaled
from service.handlers.common import letterbox, resize_center_crop


@pytest.mark.parametrize(("size", "grid"), [(64, 8), (128, 16), (100, 7), (10, 16), (1, 4)])
def test_cells_cover_every_pixel_and_are_never_empty(size: int, grid: int) -> None:
    cells = cell_edges(size, grid)
    assert len(cells) == grid
    assert all(0 <= start < stop <= size for start, stop in cells), cells
    covered = np.zeros(size, dtype=bool)
    for start, stop in cells:
        covered[start:stop] = True
    assert covered.all()
    if size >= grid:  # then they do not overlap either
        assert sum(stop - start for start, stop in cells) == size


def test_letterboxed_copies_occlude_the_content_only() -> None:
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (40, 160, 3), dtype=np.uint8)  # wide: the letterbox pads below
    tensor, geometry = letterbox(image, (128, 128))
    assert geometry.content_height < 128
    copies = occluded_copies(tensor, geometry, 4)
    assert len(copies) == 16
    changed = np.zeros(tensor.shape[1:], dtype=bool)
    for copy in copies:
        differs = np.any(copy != tensor, axis=0)
        assert differs.any()
        changed |= differs
    assert not changed[geometry.content_height :].any()  # the padding is never occluded
    assert changed[: geometry.content_height, : geometry.content_width].mean() > 0.9
    fill = np.round(tensor[:, : geometry.content_height].reshape(3, -1).mean(axis=1))
    assert np.array_equal(copies[0][:, 0, 0], fill.astype(np.uint8))  # the content's mean colour
    assert np.allclose(content_region(geometry), [0, 0, 160, 40], atol=1)


def test_a_centre_crop_s_region_is_the_crop_in_original_pixels() -> None:
    image = np.zeros((100, 200, 3), dtype=np.uint8)
    _, geometry = resize_center_crop(image, 64, (64, 64))
    x1, y1, x2, y2 = content_region(geometry)
    assert (y1, y2) == (0, 100) and x1 == pytest.approx(50, abs=1) and x2 == pytest.approx(150, abs=1)


def test_pooling_follows_the_cells_and_scaling_keeps_zeros() -> None:
    _, geometry = letterbox(np.zeros((64, 64, 3), dtype=np.uint8), (64, 64))
    heat = np.zeros((64, 64), dtype=np.float32)
    heat[40:48, 8:16] = 2.0  # inside cell (row 5, column 1) of an 8x8 grid
    grid = pool_grid(heat, geometry, 8)
    assert grid.shape == (8, 8) and np.unravel_index(np.argmax(grid), grid.shape) == (5, 1)
    assert scaled(grid).max() == 1.0 and np.count_nonzero(grid) == 1
    assert not scaled(np.zeros((3, 3))).any()
