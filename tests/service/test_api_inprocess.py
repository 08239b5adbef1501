"""The HTTP API built by `create_api` in this process, over the real in-process TorchScript backend (no Ray)."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_api
from service.backends.local import LocalBackend
from service.settings import Settings
from support.seeds import fresh_seeds
from training.shapes import CLASSES, make_scene

KEY = "k" * 24


def png(seed: int) -> tuple[bytes, str]:
    """A one-shape scene as PNG, and the shape's class name: `fresh_seeds` number `seed`, a scene the
    classifier never saw (its training seeds draw the same shape, only at another size)."""
    (scene_seed,) = fresh_seeds(1, offset=seed)
    scene = make_scene(scene_seed, 96, 1, 1)
    buffer = io.BytesIO()
    Image.fromarray(scene.image).save(buffer, "PNG")
    return buffer.getvalue(), CLASSES[int(scene.labels[0]) - 1]


@pytest.fixture(scope="module")
def client(model_repository: Path) -> Iterator[TestClient]:
    settings = Settings(model_repository=model_repository, models=("classifier",), device="cpu", api_key=KEY)
    with TestClient(create_api(settings, LocalBackend(settings))) as session:
        yield session


def test_the_api_key_is_a_security_scheme_on_every_task_route(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["APIKeyHeader"] == {
        "type": "apiKey", "description": "the gateway's CVSERVE_API_KEY", "in": "header", "name": "X-API-Key",
    }  # fmt: skip
    for endpoint in ("/classify", "/detect", "/segment"):
        assert spec["paths"][endpoint]["post"]["security"] == [{"APIKeyHeader": []}]
    assert "security" not in spec["paths"]["/health"]["get"]


def test_wrong_keys_are_refused_and_slowed(client: TestClient) -> None:
    data, _ = png(1)
    durations = []
    for _ in range(4):
        began = time.perf_counter()
        response = client.post("/classify", content=data, headers={"Content-Type": "image/png", "X-API-Key": "x" * 24})
        durations.append(time.perf_counter() - began)
        assert response.status_code == 401 and response.json()["error"]["code"] == "unauthorized"
    assert durations[-1] > durations[0], durations  # each failure in a row waits longer
    ok = client.post("/classify", content=data, headers={"Content-Type": "image/png", "X-API-Key": KEY})
    assert ok.status_code == 200


def test_answers_come_from_the_real_model_in_this_process(client: TestClient) -> None:
    right = 0
    for seed in range(100, 112):
        data, label = png(seed)
        response = client.post("/classify?top_k=1", content=data, headers={"Content-Type": "image/png", "X-API-Key": KEY})
        assert response.status_code == 200, response.text
        right += response.json()["results"][0]["predictions"][0]["label"] == label
    assert right >= 10, f"{right}/12 scenes classified right"


def test_a_disabled_model_is_404_model_disabled(client: TestClient) -> None:
    data, _ = png(2)
    response = client.post("/detect", content=data, headers={"Content-Type": "image/png", "X-API-Key": KEY})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_disabled"
