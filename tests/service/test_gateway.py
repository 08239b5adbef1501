"""The gateway with the embedded backend, over HTTP against the really running Serve application."""

from __future__ import annotations

import asyncio
import base64
import io
import re
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from ray import serve

from service.app import build_app
from service.contract import load_contract
from service.settings import Settings
from support.assertions import assert_error
from support.waiting import wait_for
from tests.conftest import Deploy

ENDPOINTS = {"classifier": "/classify", "detector": "/detect", "segmenter": "/segment"}
API_KEY = "test-key-0123456789abcdef"


def image_bytes(width: int, height: int, fmt: str = "PNG", seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def client(embedded_gateway: str) -> httpx.Client:
    with httpx.Client(base_url=embedded_gateway, timeout=60) as session:
        yield session


@pytest.fixture(scope="module")
def limited_gateway(deploy: Deploy, model_repository: Path) -> str:
    """A second gateway (classifier only) with tight limits and an API key."""
    settings = Settings(
        model_repository=model_repository,
        device="cpu",
        models=("classifier",),
        max_body_bytes=64 * 1024,
        max_pixels=100 * 100,
        max_images_per_request=2,
        allowed_formats=("PNG",),
        api_key=API_KEY,
        torch_threads=1,
    )
    return deploy(build_app(settings), "limited", "/limited")


def check_result(model: str, result: dict, width: int, height: int) -> None:
    assert result["image"] == {"width": width, "height": height}
    if model == "classifier":
        scores = [p["score"] for p in result["predictions"]]
        assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    elif model == "detector":
        for detection in result["detections"]:
            x1, y1, x2, y2 = detection["box"]
            assert 0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height
    else:
        assert sum(result["class_fractions"].values()) == pytest.approx(1.0)
        for segment in result["segments"]:
            assert segment["rle"]["size"] == [height, width]


# ---- every endpoint with every input style ----

SIZES = [(200, 120), (90, 160), (128, 128)]  # distinct sizes reveal the order of results


@pytest.mark.parametrize("model", list(ENDPOINTS))
def test_multipart_one_file(client: httpx.Client, model: str) -> None:
    response = client.post(ENDPOINTS[model], files={"file": ("a.png", image_bytes(200, 120), "image/png")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["model"], body["version"], body["backend"]) == (model, "1", "embedded")
    assert len(body["results"]) == 1
    check_result(model, body["results"][0], 200, 120)


@pytest.mark.parametrize("model", list(ENDPOINTS))
def test_multipart_several_files_keep_their_order(client: httpx.Client, model: str) -> None:
    files = [("files", (f"{i}.png", image_bytes(w, h, seed=i), "image/png")) for i, (w, h) in enumerate(SIZES)]
    response = client.post(ENDPOINTS[model], files=files)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [(r["image"]["width"], r["image"]["height"]) for r in results] == SIZES
    for result, (w, h) in zip(results, SIZES):
        check_result(model, result, w, h)


@pytest.mark.parametrize("fmt,media_type", [("JPEG", "image/jpeg"), ("PNG", "image/png"), ("WEBP", "image/webp")])
@pytest.mark.parametrize("model", list(ENDPOINTS))
def test_raw_body(client: httpx.Client, model: str, fmt: str, media_type: str) -> None:
    response = client.post(ENDPOINTS[model], content=image_bytes(90, 160, fmt), headers={"Content-Type": media_type})
    assert response.status_code == 200, response.text
    check_result(model, response.json()["results"][0], 90, 160)


@pytest.mark.parametrize("model", list(ENDPOINTS))
def test_json_base64_keeps_order_and_accepts_data_urls(client: httpx.Client, model: str) -> None:
    encoded = [base64.b64encode(image_bytes(w, h, seed=i)).decode() for i, (w, h) in enumerate(SIZES)]
    encoded[1] = "data:image/png;base64," + encoded[1]
    response = client.post(ENDPOINTS[model], json={"images": encoded})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [(r["image"]["width"], r["image"]["height"]) for r in results] == SIZES


def test_same_image_gets_the_same_answer_in_every_style(client: httpx.Client) -> None:
    data = image_bytes(150, 100, seed=7)
    styles = [
        client.post("/detect?score_threshold=0", files={"file": ("x.png", data, "image/png")}),
        client.post("/detect?score_threshold=0", content=data, headers={"Content-Type": "image/png"}),
        client.post("/detect", json={"images": [base64.b64encode(data).decode()], "score_threshold": 0}),
    ]
    answers = [r.json()["results"] for r in styles]
    assert answers[0] == answers[1] == answers[2]


# ---- options ----


def test_classify_top_k(client: httpx.Client, model_repository: Path) -> None:
    classes = len(load_contract(model_repository, "classifier").labels)
    data = image_bytes(64, 64)
    one = client.post("/classify?top_k=1", content=data, headers={"Content-Type": "image/png"}).json()
    assert len(one["results"][0]["predictions"]) == 1
    every = client.post("/classify?top_k=1000", content=data, headers={"Content-Type": "image/png"}).json()
    predictions = every["results"][0]["predictions"]
    assert len(predictions) == classes and sum(p["score"] for p in predictions) == pytest.approx(1.0, abs=1e-3)
    assert predictions[0] == one["results"][0]["predictions"][0]


def test_detect_options_filter(client: httpx.Client) -> None:
    data = image_bytes(128, 128, seed=3)
    everything = client.post("/detect?score_threshold=0", content=data, headers={"Content-Type": "image/png"}).json()
    detections = everything["results"][0]["detections"]
    capped = client.post("/detect?score_threshold=0&max_detections=1", content=data,
                         headers={"Content-Type": "image/png"}).json()
    assert capped["results"][0]["detections"] == detections[:1]
    nothing = client.post("/detect?score_threshold=1", content=data, headers={"Content-Type": "image/png"}).json()
    assert all(d["score"] >= 1 for d in nothing["results"][0]["detections"])
    json_style = client.post("/detect", json={"images": [base64.b64encode(data).decode()], "score_threshold": 0,
                                              "max_detections": 2}).json()
    assert json_style["results"][0]["detections"] == detections[:2]


def test_segment_png_option(client: httpx.Client, model_repository: Path) -> None:
    data = image_bytes(100, 60)
    response = client.post("/segment?return_png=true", content=data, headers={"Content-Type": "image/png"})
    result = response.json()["results"][0]
    png = Image.open(io.BytesIO(base64.b64decode(result["png"])))
    assert png.size == (100, 60) and png.mode == "P"
    classes = len(load_contract(model_repository, "segmenter").labels)
    assert int(np.asarray(png).max()) < classes
    plain = client.post("/segment", content=data, headers={"Content-Type": "image/png"}).json()["results"][0]
    assert plain["png"] is None


# ---- health, readiness, models, docs ----


def test_health_and_ready(client: httpx.Client) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json() == {"ready": True, "backend": "embedded"}


def test_models_describe_the_contracts(client: httpx.Client, model_repository: Path) -> None:
    models = {m["name"]: m for m in client.get("/models").json()["models"]}
    assert set(models) == set(ENDPOINTS)
    for name, info in models.items():
        contract = load_contract(model_repository, name)
        assert info["labels"] == list(contract.labels)
        assert (info["input_size"]["height"], info["input_size"]["width"]) == contract.input_size
        assert info["backend"] == "embedded" and info["version"] == "1" and info["task"] == contract.task
        assert info["endpoint"] == ENDPOINTS[name]


def test_openapi_documents_inputs_and_examples(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    for endpoint in ENDPOINTS.values():
        operation = spec["paths"][endpoint]["post"]
        assert {"multipart/form-data", "image/jpeg", "application/json"} <= set(operation["requestBody"]["content"])
        assert {"200", "400", "413", "415", "422", "503", "504"} <= set(operation["responses"])
    assert "examples" in spec["components"]["schemas"]["Detection"]["properties"]["box"]
    assert client.get("/docs").status_code == 200


# ---- batching ----


def batch_sizes(model: str) -> Counter[int]:
    handle = serve.get_deployment_handle("Gateway", app_name="embedded")  # the models run inside it
    return Counter(handle.batch_sizes.remote(model).result(timeout_s=30))


def new_batches(before: Counter[int], after: Counter[int]) -> Counter[int]:
    return Counter({size: after[size] - before[size] for size in after if after[size] > before[size]})


def test_images_of_one_request_are_batched_together(client: httpx.Client) -> None:
    before = batch_sizes("segmenter")
    files = [("files", (f"{i}.png", image_bytes(64, 64, seed=i), "image/png")) for i in range(6)]
    assert client.post("/segment", files=files).status_code == 200
    batches = new_batches(before, batch_sizes("segmenter"))
    assert sum(size * n for size, n in batches.items()) == 6
    assert max(batches) > 1, f"6 images of one request ran in batches {dict(batches)}"


def test_concurrent_requests_are_batched(embedded_gateway: str) -> None:
    before = batch_sizes("classifier")
    data = image_bytes(64, 64)

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=embedded_gateway, timeout=60) as session:
            calls = [session.post("/classify", content=data, headers={"Content-Type": "image/png"}) for _ in range(16)]
            return [r.status_code for r in await asyncio.gather(*calls)]

    assert asyncio.run(burst()) == [200] * 16
    batches = new_batches(before, batch_sizes("classifier"))
    assert sum(size * n for size, n in batches.items()) == 16
    assert max(batches) > 1, f"16 concurrent requests ran in batches {dict(batches)}"


# ---- client mistakes get a clear 4xx ----


@pytest.mark.parametrize(
    "query",
    ["/classify?top_k=0", "/classify?top_k=many", "/detect?score_threshold=1.5", "/detect?max_detections=0",
     "/segment?return_png=maybe", "/classify?topk=3"],
)
def test_invalid_options_are_422(client: httpx.Client, query: str) -> None:
    response = client.post(query, content=image_bytes(32, 32), headers={"Content-Type": "image/png"})
    assert_error(response, 422, "invalid_request")


def test_invalid_json_options_are_422(client: httpx.Client) -> None:
    image = base64.b64encode(image_bytes(32, 32)).decode()
    assert_error(client.post("/classify", json={"images": [image], "top_k": -1}), 422)
    assert_error(client.post("/classify", json={"images": [image], "unknown": 1}), 422)
    assert_error(client.post("/classify", json={"images": []}), 422)
    assert_error(client.post("/classify", json={"pictures": [image]}), 422)


@pytest.mark.parametrize(
    "kwargs,status,code",
    [
        ({"content": b"\x00garbage", "headers": {"Content-Type": "image/png"}}, 400, "undecodable_image"),
        ({"content": b"", "headers": {"Content-Type": "image/png"}}, 400, "no_image"),
        ({"content": b"{not json", "headers": {"Content-Type": "application/json"}}, 400, "bad_request"),
        ({"json": {"images": ["@@@"]}}, 400, "bad_request"),
        ({"files": {"photo": ("a.png", b"x", "image/png")}}, 400, "no_image"),
        ({"content": b"hello", "headers": {"Content-Type": "text/plain"}}, 415, "unsupported_media_type"),
    ],
    ids=["garbage", "empty", "bad-json", "bad-base64", "wrong-field", "text"],
)
def test_bad_input_is_4xx(client: httpx.Client, kwargs: dict, status: int, code: str) -> None:
    assert_error(client.post("/detect", **kwargs), status, code)


def test_bad_image_among_good_ones_names_its_index(client: httpx.Client) -> None:
    files = [("files", ("a.png", image_bytes(32, 32), "image/png")), ("files", ("b.png", b"nope", "image/png"))]
    error = assert_error(client.post("/classify", files=files), 400, "undecodable_image")
    assert error["message"].startswith("image 1:")


def test_unknown_path_and_wrong_method(client: httpx.Client) -> None:
    assert_error(client.get("/nothing-here"), 404, "not_found")
    assert_error(client.get("/classify"), 405, "method_not_allowed")


def test_limits_give_413_and_415(limited_gateway: str) -> None:
    png = {"Content-Type": "image/png"}
    with httpx.Client(base_url=limited_gateway, timeout=60, headers={"X-API-Key": API_KEY}) as session:
        assert session.post("/classify", content=image_bytes(100, 100), headers=png).status_code == 200
        assert_error(session.post("/classify", content=image_bytes(101, 100), headers=png), 413, "image_too_large")
        assert_error(session.post("/classify", content=b"\x00" * (64 * 1024 + 1), headers=png), 413, "body_too_large")
        assert_error(session.post("/classify", content=image_bytes(20, 20, "JPEG"),
                                  headers={"Content-Type": "image/jpeg"}), 415, "unsupported_image_format")
        files = [("files", (f"{i}.png", image_bytes(10, 10), "image/png")) for i in range(3)]
        assert_error(session.post("/classify", files=files), 413, "too_many_images")
        assert_error(session.post("/detect", content=image_bytes(10, 10), headers=png), 404, "model_disabled")
        assert session.get("/models").json()["models"][0]["name"] == "classifier"


def test_api_key_is_required_when_configured(limited_gateway: str) -> None:
    data = image_bytes(10, 10)
    with httpx.Client(base_url=limited_gateway, timeout=60) as session:
        assert_error(session.post("/classify", content=data, headers={"Content-Type": "image/png"}), 401)
        wrong = {"Content-Type": "image/png", "X-API-Key": "wrong-key-0123456789"}
        assert_error(session.post("/classify", content=data, headers=wrong), 401)
        bearer = {"Content-Type": "image/png", "Authorization": f"Bearer {API_KEY}"}
        assert session.post("/classify", content=data, headers=bearer).status_code == 200
        assert session.get("/health").status_code == 200


# ---- metrics reach Ray's Prometheus endpoint ----


def test_metrics_are_exported(client: httpx.Client, ray_metrics_port: int) -> None:
    client.post("/classify", content=image_bytes(32, 32), headers={"Content-Type": "image/png"})
    client.post("/classify?top_k=0", content=image_bytes(32, 32), headers={"Content-Type": "image/png"})
    url = f"http://127.0.0.1:{ray_metrics_port}/metrics"
    wanted = [
        r'ray_cvserve_requests_total\{[^}]*endpoint="/classify"[^}]*status="200"',
        r'ray_cvserve_requests_total\{[^}]*endpoint="/classify"[^}]*status="422"',
        r'ray_cvserve_errors_total\{[^}]*endpoint="/classify"[^}]*kind="invalid_request"',
        r"ray_cvserve_request_latency_seconds_bucket\{",
        r"ray_cvserve_images_per_request_bucket\{",
        r"ray_cvserve_in_flight_requests\{",
        r'ray_cvserve_batch_size_bucket\{[^}]*model="classifier"',
        r'ray_cvserve_model_latency_seconds_bucket\{[^}]*backend="embedded"',
    ]

    def exported() -> bool:
        try:
            text = httpx.get(url, timeout=5).text
        except httpx.HTTPError:
            return False
        return all(re.search(pattern, text) for pattern in wanted)

    wait_for(exported, 60, f"not all of {wanted} at {url}", interval_s=1.0)
