"""Bounded decoding: large JPEGs are decoded at a reduced DCT scale, answers still in full-size pixels."""

from __future__ import annotations

import numpy as np
import pytest

from service.handlers.common import at_full_size, boxes_to_original, letterbox, resize_center_crop
from service.imaging.images import decode_image, decode_image_reduced
from tests.hardening import payloads

BIG = np.zeros((3000, 4000, 3), np.uint8)
BIG[1000:2000, 1500:2500] = (200, 40, 40)


@pytest.mark.parametrize("orientation", [1, 6])
def test_large_jpeg_is_decoded_reduced_but_reports_its_full_upright_size(orientation: int) -> None:
    data = payloads.exif_jpeg(BIG, orientation)
    reduced, size = decode_image_reduced(data, 40_000_000, ["JPEG"], min_side=256)
    assert size == (4000, 3000)  # (width, height) as displayed
    assert reduced.shape == (375, 500, 3)  # 1/8 scale: the shorter side still >= 256
    full = decode_image(data, 40_000_000, ["JPEG"])
    assert full.shape == (3000, 4000, 3)
    # the same picture: the red square sits in the same place, in relative terms
    red = np.argwhere(reduced[:, :, 0] > 120)
    assert red.min(0) == pytest.approx([125, 187.5], abs=3) and red.max(0) == pytest.approx(
        [250, 312.5], abs=3
    )


@pytest.mark.parametrize("fmt,size", [("PNG", (1200, 1000)), ("JPEG", (500, 400))])
def test_small_jpegs_and_other_formats_are_decoded_in_full(fmt: str, size: tuple[int, int]) -> None:
    data = payloads.encode(payloads.noise(*size), fmt)
    image, full = decode_image_reduced(data, 40_000_000, [fmt], min_side=256)
    assert full == size and image.shape == (size[1], size[0], 3)


@pytest.mark.parametrize("preprocess", ["letterbox", "resize_center_crop"])
def test_geometry_of_a_reduced_decode_maps_boxes_like_the_full_one(preprocess: str) -> None:
    full, reduced = BIG, BIG[::8, ::8]
    if preprocess == "letterbox":
        _, g_full = letterbox(full, (128, 128))
        _, g_reduced = letterbox(reduced, (128, 128))
    else:
        _, g_full = resize_center_crop(full, 146, (128, 128))
        _, g_reduced = resize_center_crop(reduced, 146, (128, 128))
    mapped = at_full_size(g_reduced, 4000, 3000)
    assert (mapped.width, mapped.height) == (4000, 3000)
    model_box = np.array([[10.0, 20.0, 90.0, 70.0]])
    assert boxes_to_original(model_box, mapped) == pytest.approx(boxes_to_original(model_box, g_full), abs=8)
    assert at_full_size(g_full, 4000, 3000) is g_full
