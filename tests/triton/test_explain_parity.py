"""Occlusion explanations on the Triton backend: a real CPU tritonserver (python backend over the same
model.pt) gives the embedded backend's maps, and the gradient methods are refused there with 422."""

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


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def classifier_triton(cpu_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """A tritonserver serving only the classifier of the CPU repository (one python-backend stub: quicker
    than the session's three)."""
    repository = tmp_path_factory.mktemp("classifier_only")
    shutil.copytree(cpu_repository / "classifier", repository / "classifier", ignore=shutil.ignore_patterns("__pycache__"))
    server = start_on_free_ports(repository, tmp_path_factory.mktemp("classifier_triton"), MODEL_LOAD_TIMEOUT_S)
    yield server
    server.stop()


def grids(client: TestClient, query: str) -> list[np.ndarray]:
    maps = []
    for seed in SEEDS:
        response = client.post(f"/classify?{query}", content=png(make_scene(seed, 96, 1, 1).image), headers=PNG)
        assert response.status_code == 200, response.text
        explanation = response.json()["results"][0]["explanation"]
        maps.append(np.array(explanation["grid"], dtype=np.float64))
    return maps


def test_triton_and_embedded_give_the_same_occlusion_maps(
    classifier_triton: TritonServer, model_repository: Path
) -> None:
    print(f"scene seeds {SEEDS.start}..{SEEDS.stop - 1}")
    query = "explain=occlusion&explain_grid=6"
    triton = Settings(
        backend="triton", triton_url=classifier_triton.grpc_url, model_repository=model_repository, models=("classifier",)
    )
    with TestClient(create_api(triton, TritonBackend(triton))) as client:
        from_triton = grids(client, query)
        refused = client.post(
            "/classify?explain=gradcam", content=png(make_scene(SEEDS[0], 96, 1, 1).image), headers=PNG
        )
        assert refused.status_code == 422 and "only the embedded backend" in refused.json()["error"]["message"]
    embedded = Settings(
        model_repository=model_repository, models=("classifier",), device="cpu", runtime="torchscript",
        warm_up_batch_sizes=False,
    )  # fmt: skip
    with TestClient(create_api(embedded, LocalBackend(embedded))) as client:
        from_embedded = grids(client, query)
    assert len(from_triton) == len(from_embedded) == len(SEEDS)
    for a, b in zip(from_triton, from_embedded, strict=True):
        assert a.shape == b.shape == (6, 6)
        assert np.ptp(a) > 1e-3, a  # a map with something in it (100x the tolerance), not two flat ones
        np.testing.assert_allclose(a, b, atol=1e-5)
        assert np.argmax(a) == np.argmax(b)
