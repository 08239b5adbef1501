"""The benchmark's baselines run the gateway's own pipeline object, reduced JPEG decoding included."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from loadtests.baselines.pipeline import ModelPipeline
from service.app import create_api
from service.backends.local import LocalBackend
from service.imaging.images import decode_image
from service.core.pipeline import TaskPipeline
from service.settings import Settings
from service.handlers import HANDLERS
from tasks import MODELS
from training.shapes import make_scene


def big_jpeg() -> bytes:
    """A 1280x960 JPEG: large enough that every model's input is made from a reduced decode."""
    scene = np.asarray(Image.fromarray(make_scene(7, 320, 2, 3).image).resize((1280, 960)))
    buffer = io.BytesIO()
    Image.fromarray(scene).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.mark.parametrize("model", MODELS)
def test_baselines_prepare_exactly_what_the_gateway_prepares(model_repository: Path, model: str) -> None:
    settings = Settings(model_repository=model_repository)
    baseline = ModelPipeline.load(settings, model)
    assert isinstance(baseline.pipeline, TaskPipeline)  # the object, not a copy of its code
    data = big_jpeg()
    tensor, geometry = baseline.prepare(data)
    gateway_tensor, gateway_geometry = TaskPipeline.load(settings, model).prepare(data)
    np.testing.assert_array_equal(tensor, gateway_tensor)
    assert geometry == gateway_geometry and (geometry.width, geometry.height) == (1280, 960)

    # The decode was reduced: the same image decoded in full gives a (slightly) different input.
    full, _ = HANDLERS[model].preprocess(decode_image(data, settings.max_pixels, settings.allowed_formats), baseline.contract)
    assert full.shape == tensor.shape and not np.array_equal(full, tensor)


def test_baseline_answers_are_the_gateways_answers(model_repository: Path) -> None:
    """The baseline's whole path (prepare, its own forward pass, answer) and the gateway's HTTP answer
    (request decoding, batching backend, handler) to the same JPEG agree."""
    settings = Settings(model_repository=model_repository, models=("detector",), device="cpu")
    data = big_jpeg()
    baseline = ModelPipeline.load(settings, "detector")
    tensor, geometry = baseline.prepare(data)
    (outputs,) = baseline.infer([tensor])
    answer = baseline.answer(outputs, geometry)
    with TestClient(create_api(settings, LocalBackend(settings))) as client:
        response = client.post("/detect", content=data, headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 200, response.text
    (served,) = response.json()["results"]

    assert answer["detections"], "the detector found none of the scene's shapes: nothing to compare"
    assert served["image"] == answer["image"] == {"width": 1280, "height": 960}
    assert [(d["class_id"], d["label"]) for d in served["detections"]] == [
        (d["class_id"], d["label"]) for d in answer["detections"]
    ]
    for ours, theirs in zip(answer["detections"], served["detections"], strict=True):
        assert ours["box"] == pytest.approx(theirs["box"], abs=1e-2)
        assert ours["score"] == pytest.approx(theirs["score"], abs=1e-4)
        x0, y0, x1, y1 = ours["box"]  # in full-size pixels
        assert 0 <= x0 < x1 <= 1280 and 0 <= y0 < y1 <= 960
