"""Both runtimes of the embedded backend, through the in-process app: TorchScript (model.pt) and ONNX
Runtime (model.onnx) behind the same `LocalBackend` and `BatchedModel` give the same answers.

The same requests go to `create_api(settings, LocalBackend(settings))` once per runtime, on any
exported weights (CVSERVE_TEST_MODEL_REPOSITORY; trained ones make the answers meaningful). Tolerances
(ONNX Runtime's CPU kernels round differently from torch's): classifier scores within 1e-4 and the
same labels in the same order; detector as many detections, each matched by label and box (IoU >=
0.99) with corners within 0.05 px and scores within 1e-4; segmenter the same segments with the same RLE (masks equal).
"""

from __future__ import annotations

import io
import logging
import shutil
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_api
from service.backends.local import LocalBackend
from service.backends.runtimes import CPU_DEFAULTS, choose_runtime
from service.settings import Settings
from support.assertions import box_iou
from tasks import MODELS, TASKS
from tests.service.test_api_contract import sample

RUNTIMES = ("torchscript", "onnxruntime")


@pytest.fixture(scope="module")
def clients(model_repository: Path) -> Iterator[dict[str, TestClient]]:
    """The app over a LocalBackend per runtime, every model in it."""
    with ExitStack() as stack:
        sessions = {}
        for runtime in RUNTIMES:
            settings = Settings(
                model_repository=model_repository, device="cpu", torch_threads=1, runtime=runtime,
                warm_up_batch_sizes=False,
            )  # fmt: skip
            backend = LocalBackend(settings)
            assert backend.runtimes() == dict.fromkeys(MODELS, runtime)
            sessions[runtime] = stack.enter_context(TestClient(create_api(settings, backend)))
        yield sessions


@pytest.mark.parametrize("model", MODELS)
def test_both_runtimes_give_the_same_answers(clients: dict[str, TestClient], model: str) -> None:
    sizes = [(160, 128), (128, 128), (128, 176)]
    truths = [sample(width, height, seed=seed, model=model) for seed, (width, height) in enumerate(sizes)]
    files = [("files", (f"{i}.png", truth.data, "image/png")) for i, truth in enumerate(truths)]
    # A low threshold keeps detections of untrained weights too, and more of them to compare.
    query = "?score_threshold=0.05" if model == "detector" else ""
    answers = {}
    for runtime, client in clients.items():
        response = client.post(TASKS[model].endpoint + query, files=files)
        assert response.status_code == 200, response.text
        answers[runtime] = response.json()["results"]
    assert_not_trivial(model, answers["torchscript"])
    for ts, ort in zip(answers["torchscript"], answers["onnxruntime"], strict=True):
        assert_same_result(model, ts, ort)


def assert_not_trivial(model: str, results: list[dict]) -> None:
    """Answers that could show a difference: detections, several classes (any weights, trained or not;
    tests/service/test_api_contract.py checks that trained models' answers are right)."""
    if model == "detector":
        assert any(result["detections"] for result in results), "no detections: the comparison proves nothing"
    elif model == "segmenter":
        assert any(len(result["segments"]) > 1 for result in results), "one class everywhere proves nothing"


def assert_same_result(model: str, ts: dict, ort: dict) -> None:
    if model == "classifier":
        assert [p["label"] for p in ort["predictions"]] == [p["label"] for p in ts["predictions"]]
        for a, b in zip(ort["predictions"], ts["predictions"], strict=True):
            assert a["score"] == pytest.approx(b["score"], abs=1e-4)
    elif model == "detector":  # matched by label and box: near-equal scores may swap places
        assert len(ort["detections"]) == len(ts["detections"])
        for b in ts["detections"]:
            same = [a for a in ort["detections"] if a["label"] == b["label"] and box_iou(a["box"], b["box"]) >= 0.99]
            assert same, f"no ONNX Runtime detection for {b}"
            a = max(same, key=lambda a: box_iou(a["box"], b["box"]))
            assert a["box"] == pytest.approx(b["box"], abs=0.05)
            assert a["score"] == pytest.approx(b["score"], abs=1e-4)
    else:
        assert [(s["label"], s["rle"]) for s in ort["segments"]] == [(s["label"], s["rle"]) for s in ts["segments"]]
        assert ort["class_fractions"] == pytest.approx(ts["class_fractions"], abs=1e-6)


def test_the_answer_names_no_runtime_difference(clients: dict[str, TestClient]) -> None:
    """/models describes the same contracts whichever runtime runs them."""
    described = {runtime: client.get("/models").json() for runtime, client in clients.items()}
    assert described["torchscript"] == described["onnxruntime"]


def test_auto_takes_the_measured_default_per_model(model_repository: Path) -> None:
    settings = Settings(model_repository=model_repository, runtime="auto")
    assert {model: choose_runtime(settings, model, "cpu") for model in MODELS} == CPU_DEFAULTS
    assert {choose_runtime(settings, model, "cuda") for model in MODELS} == {"torchscript"}
    forced = settings.model_copy(update={"runtime": "onnxruntime"})
    assert {choose_runtime(forced, model, "cpu") for model in MODELS} == {"onnxruntime"}


def test_auto_keeps_torchscript_for_a_repository_without_onnx(
    model_repository: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A repository exported before model.onnx existed still serves, with TorchScript, and says why."""
    old = tmp_path / "repo"
    for model in MODELS:
        shutil.copytree(model_repository / model, old / model, ignore=shutil.ignore_patterns("model.onnx"))
    settings = Settings(model_repository=old, runtime="auto")
    with caplog.at_level(logging.WARNING, logger="service.backends.runtimes"):
        assert {choose_runtime(settings, model, "cpu") for model in MODELS} == {"torchscript"}
    if "onnxruntime" in CPU_DEFAULTS.values():
        assert "export again to use ONNX Runtime" in caplog.text
    with pytest.raises(FileNotFoundError, match=r"model\.onnx not found"):
        LocalBackend(settings.model_copy(update={"runtime": "onnxruntime", "models": ("classifier",)}))


def test_runtime_setting_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CVSERVE_RUNTIME", "onnxruntime")
    assert Settings().runtime == "onnxruntime"
    monkeypatch.setenv("CVSERVE_RUNTIME", "tensorrt")
    with pytest.raises(ValueError, match="runtime"):
        Settings()


def test_an_image_without_shapes_gets_the_same_answer(clients: dict[str, TestClient]) -> None:
    """Plain grey: the demo detector finds nothing there, so its ONNX graph must keep NMS's empty case."""
    buffer = io.BytesIO()
    Image.new("RGB", (128, 128), (127, 127, 127)).save(buffer, "PNG")
    answers = {}
    for runtime, client in clients.items():
        response = client.post("/detect", content=buffer.getvalue(), headers={"Content-Type": "image/png"})
        assert response.status_code == 200, response.text
        answers[runtime] = response.json()["results"][0]
    assert_same_result("detector", answers["torchscript"], answers["onnxruntime"])
