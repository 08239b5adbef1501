"""`Accept: application/msgpack` on the task routes: the same answer as JSON, masks as raw bytes; JSON stays
the default and the answer to every other Accept; errors stay JSON. Against the real models in uvicorn."""

from __future__ import annotations

import base64

import httpx
import msgpack
import pytest

from tests.oip.conftest import encoded, scene

MSGPACK = "application/msgpack"


def post(
    http: httpx.Client, endpoint: str, images: list[bytes], accept: str | None, **options: object
) -> httpx.Response:
    files = [("files", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(images)]
    headers = {"Accept": accept} if accept is not None else {}
    response = http.post(endpoint, params=options, files=files, headers=headers)
    assert response.status_code == 200, response.text
    return response


def as_json(document: dict) -> dict:
    """A MessagePack answer with its raw-bytes masks back in base64, as the JSON answer has them."""
    for result in document["results"]:
        if isinstance(result.get("png"), bytes):
            result["png"] = base64.b64encode(result["png"]).decode()
    return document


def test_segment_masks_come_as_raw_bytes_and_the_rest_is_the_json_answer(http: httpx.Client) -> None:
    images = [encoded(scene(seed, 256)[0].image) for seed in (31, 32)]
    options = {"return_png": "true", "return_polygons": "true"}
    json_answer = post(http, "/segment", images, None, **options)
    packed = post(http, "/segment", images, MSGPACK, **options)
    assert packed.headers["content-type"] == MSGPACK and "accept" in packed.headers["vary"].lower()
    document = msgpack.unpackb(packed.content)
    for result in document["results"]:
        assert isinstance(result["png"], bytes) and result["png"].startswith(b"\x89PNG\r\n\x1a\n")
        assert result["segments"] and result["segments"][0]["polygons"]  # non-trivial masks
    assert as_json(document) == json_answer.json()
    assert len(packed.content) < len(json_answer.content)


@pytest.mark.parametrize(
    ("endpoint", "options"), [("/detect", {"score_threshold": 0.3}), ("/classify", {"top_k": 5})]
)
def test_detect_and_classify_answers_are_the_same_document(
    http: httpx.Client, endpoint: str, options: dict
) -> None:
    images = [encoded(scene(seed)[0].image) for seed in (41, 42, 43)]
    json_answer = post(http, endpoint, images, "application/json", **options).json()
    document = msgpack.unpackb(post(http, endpoint, images, MSGPACK, **options).content)
    assert document == json_answer
    assert any(result.get("detections") or result.get("predictions") for result in document["results"])


@pytest.mark.parametrize(
    ("accept", "media_type"),
    [
        ("application/x-msgpack", MSGPACK),
        ("application/vnd.msgpack;q=0.9, application/json;q=0.5", MSGPACK),
        ("application/json;q=1, application/msgpack;q=0.5", "application/json"),
        ("application/msgpack;q=0", "application/json"),
        ("*/*", "application/json"),
        ("text/html", "application/json"),
        ("", "application/json"),
    ],
)
def test_json_is_the_default_and_msgpack_only_when_asked_for(
    http: httpx.Client, accept: str, media_type: str
) -> None:
    response = post(http, "/detect", [encoded(scene(44)[0].image)], accept)
    assert response.headers["content-type"] == media_type
    body = msgpack.unpackb(response.content) if media_type == MSGPACK else response.json()
    assert body["model"] == "detector" and len(body["results"]) == 1


def test_errors_stay_json_and_annotations_stay_images(http: httpx.Client) -> None:
    jpeg = encoded(scene(45)[0].image)
    refused = http.post(
        "/classify",
        params={"top_k": 0},
        content=jpeg,
        headers={"Content-Type": "image/jpeg", "Accept": MSGPACK},
    )
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "invalid_request"
    drawn = post(http, "/detect", [jpeg], MSGPACK, annotate="png")
    assert drawn.headers["content-type"] == "image/png" and drawn.content.startswith(b"\x89PNG")
