"""Occlusion explanations on the Triton backend: a real CPU tritonserver (python backend over the same
model.pt) gives the embedded backend's maps, for the classifier and per detection for the detector, and
the gradient methods are refused there with 422."""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_api
from service.backends.local import LocalBackend
from service.backends.triton import TritonBackend
from service.settings import Settings
from stack.triton import TritonServer
from support.seeds import fresh_seeds
from tests.triton.conftest import MODEL_LOAD_TIMEOUT_S, start_on_free_ports
from training.shapes import make_scene

PNG = {"Content-Type": "image/png"}
SEEDS = fresh_seeds(3, offset=24_000)
MODELS = ("classifier", "detector")


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def classifier_triton(cpu_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """A tritonserver serving the classifier and the detector of the CPU repository (two python-backend
    stubs: quicker than the session's three)."""
    repository = tmp_path_factory.mktemp("classifier_detector")
    for model in MODELS:
        shutil.copytree(cpu_repository / model, repository / model, ignore=shutil.ignore_patterns("__pycache__"))
    server = start_on_free_ports(repository, tmp_path_factory.mktemp("classifier_triton"), MODEL_LOAD_TIMEOUT_S)
    yield server
    server.stop()


def grids(client: TestClient, endpoint: str, query: str) -> list[np.ndarray]:
    """Every explained answer's grid over the scenes, in order (the classifier's, or each detection's)."""
    maps = []
    for seed in SEEDS:
        scene = make_scene(seed, 96, 1, 1) if endpoint == "/classify" else make_scene(seed, 128, 1, 3)
        response = client.post(f"{endpoint}?{query}", content=png(scene.image), headers=PNG)
        assert response.status_code == 200, response.text
        result = response.json()["results"][0]
        answers = [result] if endpoint == "/classify" else result["detections"]
        maps += [np.array(answer["explanation"]["grid"], dtype=np.float64) for answer in answers]
    return maps


def test_triton_and_embedded_give_the_same_occlusion_maps(
    classifier_triton: TritonServer, model_repository: Path
) -> None:
    print(f"scene seeds {SEEDS.start}..{SEEDS.stop - 1}")
    queries = {"/classify": "explain=occlusion&explain_grid=6", "/detect": "explain=occlusion&explain_grid=4"}
    triton = Settings(
        backend="triton", triton_url=classifier_triton.grpc_url, model_repository=model_repository, models=MODELS
    )
    with TestClient(create_api(triton, TritonBackend(triton))) as client:
        from_triton = {endpoint: grids(client, endpoint, query) for endpoint, query in queries.items()}
        refused = client.post(
            "/classify?explain=gradcam", content=png(make_scene(SEEDS[0], 96, 1, 1).image), headers=PNG
        )
        assert refused.status_code == 422 and "only the embedded backend" in refused.json()["error"]["message"]
    embedded = Settings(
        model_repository=model_repository, models=MODELS, device="cpu", runtime="torchscript",
        warm_up_batch_sizes=False,
    )  # fmt: skip
    with TestClient(create_api(embedded, LocalBackend(embedded))) as client:
        from_embedded = {endpoint: grids(client, endpoint, query) for endpoint, query in queries.items()}
    for endpoint, size, tolerance in (("/classify", 6, 1e-5), ("/detect", 4, 1e-3)):
        ours, theirs = from_triton[endpoint], from_embedded[endpoint]
        print(f"{endpoint}: {len(ours)} maps from Triton, {len(theirs)} embedded")
        assert len(ours) == len(theirs) >= len(SEEDS)
        for a, b in zip(ours, theirs, strict=True):
            assert a.shape == b.shape == (size, size)
            assert np.ptp(a) > 100 * tolerance, a  # a map with something in it, not two flat ones
            np.testing.assert_allclose(a, b, atol=tolerance)
            assert np.argmax(a) == np.argmax(b)
