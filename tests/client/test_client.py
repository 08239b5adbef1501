"""`cvserve.client` against the session's Ray Serve gateway: the same answers as raw HTTP, right answers, typed errors."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from cvserve.client import AnnotatedAnswer, AsyncClient, Client, GatewayError
from service.schemas import ClassifyResponse, DetectResponse, SegmentResponse
from tests.client.conftest import png, single_shape
from training.shapes import CLASSES, make_scene

SEED = 3_000_000  # fresh scenes: training used small seeds


@pytest.fixture(scope="module")
def client(embedded_gateway: str) -> Client:
    with Client(embedded_gateway, timeout=120) as session:
        yield session


def raw(url: str, endpoint: str, images: list[bytes], **params: object) -> dict:
    """The gateway's answer to a plain multipart POST, as JSON."""
    files = [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    response = httpx.post(url + endpoint, params=params, files=files, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


CASES = [
    ("/classify", "classify", {"top_k": 3}),
    ("/detect", "detect", {"score_threshold": 0.3, "max_detections": 10}),
    ("/segment", "segment", {"return_polygons": True, "polygon_tolerance": 0.5}),
]


@pytest.mark.parametrize(("endpoint", "method", "options"), CASES, ids=[c[1] for c in CASES])
def test_sync_and_async_answers_equal_the_raw_http_answer(
    embedded_gateway: str, client: Client, endpoint: str, method: str, options: dict, tmp_path: Path
) -> None:
    scenes = [make_scene(SEED + i, 128, 1, 3).image for i in range(3)]
    expected = raw(embedded_gateway, endpoint, [png(s) for s in scenes], **options)
    answer = getattr(client, method)(scenes, **options)
    assert (
        type(answer)
        is {"classify": ClassifyResponse, "detect": DetectResponse, "segment": SegmentResponse}[method]
    )
    assert answer.model_dump(mode="json") == expected

    async def via_async() -> dict:
        async with AsyncClient(embedded_gateway, timeout=120) as session:
            return (await getattr(session, method)(scenes, **options)).model_dump(mode="json")

    assert asyncio.run(via_async()) == expected
    # one image, however it is given: a path, bytes, a PIL image, an array (the last two sent as PNG)
    path = tmp_path / "scene.png"
    path.write_bytes(png(scenes[0]))
    single = raw(embedded_gateway, endpoint, [path.read_bytes()], **options)
    for given in (path, str(path), path.read_bytes(), Image.fromarray(scenes[0]), scenes[0]):
        assert getattr(client, method)(given, **options).model_dump(mode="json") == single, type(given)


MSGPACK_CASES = [*CASES[:2], ("/segment", "segment", {"return_polygons": True, "return_png": True})]


@pytest.mark.parametrize(("endpoint", "method", "options"), MSGPACK_CASES, ids=[c[1] for c in MSGPACK_CASES])
def test_msgpack_answers_are_the_same_models(
    embedded_gateway: str, endpoint: str, method: str, options: dict
) -> None:
    scenes = [make_scene(SEED + 10 + i, 128, 1, 3).image for i in range(2)]
    expected = raw(embedded_gateway, endpoint, [png(s) for s in scenes], **options)
    seen: list[str] = []

    def record(response: httpx.Response) -> None:
        seen.append(response.headers["content-type"])

    with Client(embedded_gateway, timeout=120, answers="msgpack") as packed:
        packed._http.event_hooks["response"].append(record)  # what actually came over the wire
        assert getattr(packed, method)(scenes, **options).model_dump(mode="json") == expected
        assert packed.models().models  # non-task calls stay JSON
    assert seen == ["application/msgpack", "application/json"]

    async def via_async() -> dict:
        async with AsyncClient(embedded_gateway, timeout=120, answers="msgpack") as session:
            return (await getattr(session, method)(scenes, **options)).model_dump(mode="json")

    assert asyncio.run(via_async()) == expected
    with pytest.raises(ValueError, match="answers must be"):
        Client(embedded_gateway, answers="xml")  # type: ignore[arg-type]


def test_known_scenes_get_their_known_classes_and_boxes(client: Client) -> None:
    images, labels = zip(*(single_shape(SEED + 100 + i) for i in range(8)), strict=True)
    said = [r.predictions[0].label for r in client.classify(list(images), top_k=1).results]
    assert sum(s == t for s, t in zip(said, labels, strict=True)) >= 7, (said, labels)

    scenes = [make_scene(SEED + 200 + i, 128, 1, 4) for i in range(8)]
    found, drawn = 0, 0
    for scene, result in zip(scenes, client.detect([s.image for s in scenes]).results, strict=True):
        for box, label in zip(scene.boxes, scene.labels, strict=True):
            drawn += 1
            name = CLASSES[int(label) - 1]
            found += any(d.label == name and box_iou(box, d.box) >= 0.7 for d in result.detections)
    assert found >= 0.9 * drawn, f"{found} of {drawn} drawn boxes found"


def box_iou(a: np.ndarray, b: list[float]) -> float:
    x1, y1, x2, y2 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_annotate_returns_the_answer_and_the_drawn_images(embedded_gateway: str, client: Client) -> None:
    image = make_scene(SEED + 300, 160, 2, 3).image
    plain = client.detect(image)
    drawn = client.detect(image, annotate="png")
    assert isinstance(drawn, AnnotatedAnswer) and drawn.response == plain and drawn.media_type == "image/png"
    picture = Image.open(io.BytesIO(drawn.images[0]))
    assert picture.format == "PNG" and picture.size == (160, 160)
    # the same drawing the gateway sends as the body when asked for the image alone
    body = httpx.post(
        embedded_gateway + "/detect?annotate=png",
        content=png(image),
        headers={"Content-Type": "image/png"},
        timeout=60,
    )
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(body.content))), np.asarray(picture))
    several = client.segment([image, image[:80]], annotate="jpeg")
    assert [Image.open(io.BytesIO(i)).format for i in several.images] == ["JPEG", "JPEG"]
    assert [r.image.height for r in several.response.results] == [160, 80]


def test_health_ready_and_models(client: Client) -> None:
    assert client.health().status == "ok"
    assert client.ready().ready is True
    models = {m.name: m for m in client.models().models}
    assert set(models) == {"classifier", "detector", "segmenter"}
    assert models["detector"].endpoint == "/detect" and "circle" in models["detector"].labels


def test_bad_input_raises_the_gateways_error_code(client: Client) -> None:
    cases = [
        (lambda: client.classify(b"this is not an image"), 400, "undecodable_image"),
        (lambda: client.classify(single_shape(1)[0], top_k=0), 422, "invalid_request"),
        (lambda: client.detect(single_shape(1)[0], verbose=True), 422, "invalid_request"),
        (lambda: client.segment([png(np.zeros((8, 8, 3), np.uint8))] * 17), 413, "too_many_images"),
    ]
    for call, status, code in cases:
        with pytest.raises(GatewayError) as refused:
            call()
        assert (refused.value.status_code, refused.value.code) == (status, code), refused.value
        assert refused.value.message and "Traceback" not in refused.value.message
    with pytest.raises(ValueError, match="uint8"):
        client.classify(np.zeros((8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="no images"):
        client.classify([])
    with pytest.raises(TypeError, match="not an image"):
        client.classify(42)  # type: ignore[arg-type]


def test_the_client_imports_without_torch_or_ray() -> None:
    code = "import sys, cvserve.client, cvserve.cli; print(sorted({'torch', 'ray', 'fastapi'} & set(sys.modules)))"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        == "[]\n"
    )
