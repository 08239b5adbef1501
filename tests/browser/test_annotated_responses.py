"""Annotated answers over plain HTTP: `annotate=png|jpeg` or `Accept: image/...`, against the running app."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image

from training.shapes import make_scene

SCENE = make_scene(10**6 + 809, 192, 2, 3)
TIMEOUT_S = 60


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = _png(SCENE.image)
RAW = {"Content-Type": "image/png"}


def _decode(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


@pytest.fixture(scope="module")
def client(embedded_gateway: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=embedded_gateway, timeout=TIMEOUT_S) as http:
        yield http


@pytest.mark.parametrize("endpoint", ["classify", "detect", "segment"])
def test_annotate_png_returns_the_drawn_image_at_the_upload_size(client: httpx.Client, endpoint: str) -> None:
    response = client.post(f"/{endpoint}", params={"annotate": "png"}, content=PNG, headers=RAW)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    drawn = np.asarray(_decode(response.content).convert("RGB"))
    assert drawn.shape == SCENE.image.shape
    assert np.any(drawn != SCENE.image, axis=2).mean() > 0.002


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_accept_header_alone_chooses_the_format(client: httpx.Client, fmt: str) -> None:
    response = client.post("/detect", content=PNG, headers={**RAW, "Accept": f"image/{fmt}"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == f"image/{fmt}"
    assert _decode(response.content).format == fmt.upper()


def test_json_accept_keeps_json_with_the_same_drawing_as_a_data_url(client: httpx.Client) -> None:
    image = client.post("/segment", params={"annotate": "png"}, content=PNG, headers=RAW)
    as_json = client.post(
        "/segment", params={"annotate": "png"}, content=PNG, headers={**RAW, "Accept": "application/json"}
    )
    assert as_json.status_code == 200, as_json.text
    result = as_json.json()["results"][0]
    prefix, _, data = result["annotated_image"].partition(",")
    assert prefix == "data:image/png;base64"
    assert np.array_equal(np.asarray(_decode(base64.b64decode(data))), np.asarray(_decode(image.content)))
    assert "segments" in result


def test_several_images_keep_json_with_one_drawing_each(client: httpx.Client) -> None:
    other = _png(make_scene(10**6 + 810, 128, 1, 2).image)
    files = [("files", ("a.png", PNG, "image/png")), ("files", ("b.png", other, "image/png"))]
    response = client.post("/detect", params={"annotate": "jpeg"}, files=files)
    assert response.status_code == 200, response.text
    sizes = []
    for result in response.json()["results"]:
        prefix, _, data = result["annotated_image"].partition(",")
        assert prefix == "data:image/jpeg;base64"
        sizes.append(_decode(base64.b64decode(data)).size)
    assert sizes == [(192, 192), (128, 128)]


def test_json_body_takes_annotate_too(client: httpx.Client) -> None:
    body = {"images": [base64.b64encode(PNG).decode()], "annotate": "png", "top_k": 2}
    response = client.post("/classify", json=body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"


def test_without_annotate_the_answer_is_plain_json(client: httpx.Client) -> None:
    response = client.post("/detect", content=PNG, headers=RAW)
    assert response.status_code == 200
    assert "annotated_image" not in response.json()["results"][0]


def test_unknown_annotate_format_is_a_clear_422(client: httpx.Client) -> None:
    response = client.post("/detect", params={"annotate": "gif"}, content=PNG, headers=RAW)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert "annotate" in error["message"] and "png" in error["message"]


def test_the_page_and_its_assets_are_served(client: httpx.Client, embedded_gateway: str) -> None:
    redirect = client.get(embedded_gateway)  # the page's links are relative: it must end in /
    assert redirect.status_code == 307
    assert redirect.headers["location"].endswith(urlsplit(embedded_gateway).path + "/")
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="file"' in page.text and 'src="static/app.js"' in page.text
    for asset, media_type in (("app.js", "text/javascript"), ("style.css", "text/css")):
        response = client.get(f"/static/{asset}")
        assert response.status_code == 200 and response.headers["content-type"].startswith(media_type)
