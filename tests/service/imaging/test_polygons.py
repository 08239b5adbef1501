"""/segment's polygons: traced from drawn masks exactly, and from the real segmenter in agreement with its RLEs."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import shapely
from fastapi.testclient import TestClient
from PIL import Image
from pycocotools import mask as mask_utils

from service.app import create_api
from service.backends.local import LocalBackend
from service.imaging.polygons import MAX_VERTICES_PER_CLASS, class_polygons
from service.schemas import Polygon
from service.settings import Settings
from training.shapes import make_scene


def as_shape(polygons: list[Polygon] | list[dict]) -> shapely.MultiPolygon:
    """The answer's polygons of one class as one shapely geometry."""
    parsed = [p if isinstance(p, Polygon) else Polygon.model_validate(p) for p in polygons]
    return shapely.MultiPolygon([shapely.Polygon(p.exterior, p.holes) for p in parsed])


def vertices(polygons: list[dict]) -> int:
    return sum(len(p["exterior"]) + sum(len(h) for h in p["holes"]) for p in polygons)


def test_a_square_with_a_hole_is_one_polygon_with_one_hole_of_the_right_area() -> None:
    mask = np.zeros((40, 50), dtype=np.uint8)
    mask[5:25, 5:30] = 2  # 25 x 20 pixels...
    mask[10:15, 10:15] = 0  # ...less a 5 x 5 hole: 475 pixels
    mask[30, 40] = 2  # and one lone pixel
    polygons = class_polygons(mask, 2, (1.0, 1.0), 0.0, (50, 40))
    assert len(polygons) == 2 and len(polygons[0].holes) == 1 and polygons[1].holes == []
    outer = shapely.Polygon(polygons[0].exterior, polygons[0].holes)
    assert outer.area == pytest.approx(475.0, abs=1.0)  # corners are cut by 1/8 pixel each
    assert outer.bounds == (5.0, 5.0, 30.0, 25.0)  # pixel i covers [i, i + 1]
    assert shapely.Polygon(polygons[1].exterior).area == pytest.approx(0.5)  # a pixel is a diamond
    assert class_polygons(mask, 1, (1.0, 1.0), 0.0, (50, 40)) == []


def test_coordinates_scale_to_the_original_image_and_stay_inside_it() -> None:
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[:16, 8:] = 1  # touches the top and right edges
    polygons = class_polygons(mask, 1, (10.0, 5.0), 0.5, (320, 160))
    shape = as_shape(polygons)
    assert shape.bounds == (80.0, 0.0, 320.0, 80.0)
    assert shape.area == pytest.approx(24 * 10 * 16 * 5, rel=0.01)


def test_a_larger_tolerance_gives_fewer_vertices_within_that_distance() -> None:
    yy, xx = np.mgrid[:200, :200]
    disc = (((xx - 100) ** 2 + (yy - 100) ** 2) < 80**2).astype(np.uint8)
    traced = as_shape(class_polygons(disc, 1, (1.0, 1.0), 0.0, (200, 200)))
    counts = []
    for tolerance in (0.0, 0.5, 2.0, 8.0):
        polygons = class_polygons(disc, 1, (1.0, 1.0), tolerance, (200, 200))
        counts.append(sum(len(p.exterior) for p in polygons))
        simplified = as_shape(polygons)
        assert simplified.is_valid
        corners = shapely.points(shapely.get_coordinates(traced))
        # Douglas-Peucker keeps every traced vertex within `tolerance`; GEOS may then drop a ring's start point too
        assert shapely.distance(corners, simplified.boundary).max() <= 2 * tolerance + 1e-6
    assert counts == sorted(counts, reverse=True) and len(set(counts)) == 4, counts
    assert as_shape(class_polygons(disc, 1, (1.0, 1.0), 0.0, (200, 200))).area == pytest.approx(
        disc.sum(), rel=0.005
    )


def test_speckle_is_capped_at_the_vertex_budget_largest_regions_first() -> None:
    speckle = np.zeros((256, 256), dtype=np.uint8)
    speckle[::2, ::2] = 1  # 16384 lone pixels, 4 vertices each
    speckle[100:140, 100:140] = 1  # and one large square
    polygons = class_polygons(speckle, 1, (1.0, 1.0), 0.0, (256, 256))
    assert MAX_VERTICES_PER_CLASS - 4 < sum(len(p.exterior) for p in polygons) <= MAX_VERTICES_PER_CLASS
    assert shapely.Polygon(polygons[0].exterior).area > 1000  # the square came first


# ---- the real segmenter, through the HTTP API in this process ----


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


def upscaled(seed: int, width: int, height: int) -> np.ndarray:
    """A shapes scene at the segmenter's size, stretched to `width` x `height` (maps coordinates non-trivially)."""
    return np.asarray(
        Image.fromarray(make_scene(seed, 128, 2, 4).image).resize((width, height), Image.BILINEAR)
    )


@pytest.fixture(scope="module")
def client(model_repository: Path) -> Iterator[TestClient]:
    settings = Settings(model_repository=model_repository, models=("segmenter",), device="cpu")
    with TestClient(create_api(settings, LocalBackend(settings))) as session:
        yield session


def segment(client: TestClient, image: np.ndarray, **params: object) -> dict:
    response = client.post(
        "/segment", params=params, content=png(image), headers={"Content-Type": "image/png"}
    )
    assert response.status_code == 200, response.text
    return response.json()["results"][0]


@pytest.mark.parametrize("size", [(128, 128), (300, 200)], ids=["native", "stretched"])
def test_polygons_cover_the_same_pixels_as_the_rle(client: TestClient, size: tuple[int, int]) -> None:
    checked = 0
    for seed in range(2_000_000, 2_000_006):
        result = segment(client, upscaled(seed, *size), return_polygons="true", polygon_tolerance=0.5)
        for item in result["segments"]:
            mask = mask_utils.decode(item["rle"]).astype(bool)
            shape = as_shape(item["polygons"])
            rows, cols = np.mgrid[: mask.shape[0], : mask.shape[1]]
            inside = shapely.contains_xy(shape, cols + 0.5, rows + 0.5)  # pixel centres
            # they differ only in a band along the boundary (the simplification, and the stretched mask's
            # nearest-neighbour staircase where the polygon follows the model's pixels)
            differ, perimeter = (inside ^ mask).sum(), shape.length
            assert differ <= 0.5 * perimeter, (seed, item["label"], differ, perimeter)
            # Tracing cuts each corner (1/8 of a model pixel) and nearest resizing moves each edge by up to
            # half a pixel. Along a segment's outline these mostly cancel, so its area is tighter than the
            # band; on a blob of a few model pixels they add up (bf16-trained weights gave a 2-pixel blob
            # stretched 2.3 x 1.6: polygon 5.5 px, mask 10 px), and the band above is the bound.
            if mask.sum() >= 100:
                assert abs(shape.area - mask.sum()) <= 0.25 * perimeter, (
                    seed,
                    item["label"],
                    shape.area,
                    mask.sum(),
                )
            if mask.sum() >= 1000:
                assert differ / (inside | mask).sum() <= 0.05, (seed, item["label"])
            checked += 1
    assert checked >= 10


def test_a_larger_tolerance_gives_fewer_vertices_from_the_gateway(client: TestClient) -> None:
    image = upscaled(2_000_100, 400, 400)
    counts = [
        sum(
            vertices(s["polygons"])
            for s in segment(client, image, return_polygons="true", polygon_tolerance=t)["segments"]
        )
        for t in (0, 1, 5)
    ]
    assert counts[0] > counts[1] > counts[2] > 0, counts


def test_polygons_only_when_asked_and_options_are_validated(client: TestClient) -> None:
    image = upscaled(2_000_200, 128, 128)
    plain = segment(client, image)["segments"]
    assert plain, "no segments: nothing to check for polygons"
    assert all(s["polygons"] is None for s in plain)
    body = {"images": [base64.b64encode(png(image)).decode()], "return_polygons": True}
    in_json = client.post("/segment", json=body).json()["results"][0]
    assert in_json["segments"] and all(s["polygons"] for s in in_json["segments"])
    for bad in ("-1", "1e9", "x"):
        refused = client.post(
            f"/segment?return_polygons=true&polygon_tolerance={bad}",
            content=png(image),
            headers={"Content-Type": "image/png"},
        )
        assert refused.status_code == 422 and refused.json()["error"]["code"] == "invalid_request", bad


def test_openapi_documents_the_polygon_options_and_shape(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    parameters = {p["name"]: p for p in spec["paths"]["/segment"]["post"]["parameters"]}
    assert parameters["return_polygons"]["schema"]["default"] is False
    assert parameters["polygon_tolerance"]["schema"]["maximum"] == 1000.0
    polygon = spec["components"]["schemas"]["Polygon"]
    assert (
        set(polygon["properties"]) == {"exterior", "holes"} and polygon["properties"]["exterior"]["examples"]
    )
