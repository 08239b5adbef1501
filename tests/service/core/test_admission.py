"""Admission counts requests, bytes and pixels in flight, and a request's share outlives it while
threads still work on its images; a model answer that breaks its contract is 503 and not ready."""

from __future__ import annotations

import io
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from service.core.admission import Admission, Limits
from service.app import create_api
from service.backends.local import LocalBackend
from service.core.errors import ApiError
from service.settings import Settings
from training.shapes import make_scene


def refused(admission: Admission, nbytes: int, pixels: int) -> str:
    with pytest.raises(ApiError) as caught:
        admission.admit(nbytes, pixels)
    assert caught.value.status_code == 503 and caught.value.headers == {"Retry-After": "1"}
    return caught.value.message


def test_each_budget_refuses_what_does_not_fit_and_a_lone_request_always_fits() -> None:
    admission = Admission(Limits(requests=3, bytes=1000, pixels=10_000), retry_after_s=1)
    alone = admission.admit(5000, 50_000)  # bigger than every budget, but alone: admitted
    assert "bytes" in refused(admission, 10, 10)
    alone.release()
    first = admission.admit(600, 4000)
    assert "bytes" in refused(admission, 500, 10)
    assert "pixels" in refused(admission, 10, 7000)
    second = admission.admit(300, 5000)
    third = admission.admit(10, 10)
    assert "requests" in refused(admission, 1, 1)
    for ticket in (first, second, third):
        ticket.release()
    assert (admission.requests, admission.bytes, admission.pixels) == (0, 0, 0)


def test_a_share_is_held_until_the_threads_working_for_it_finish() -> None:
    admission = Admission(Limits(requests=1, bytes=10**9, pixels=10**9), retry_after_s=1)
    gate = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        ticket = admission.admit(100, 100)
        ticket.hold(pool.submit(gate.wait, 10))  # a decode the request no longer waits for
        ticket.release()  # the request gave up (its deadline passed)
        assert admission.requests == 1
        refused(admission, 1, 1)
        gate.set()
    assert (admission.requests, admission.bytes, admission.pixels) == (0, 0, 0)
    admission.admit(1, 1).release()


class _WrongShape(torch.nn.Module):
    """A classifier whose logits have one class too few: its answer breaks the contract."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image.float().mean(dim=(2, 3))[:, :2].repeat(1, 2)


def test_a_malformed_model_answer_is_503_and_not_ready(model_repository: Path, tmp_path: Path) -> None:
    repository = tmp_path / "repository"
    shutil.copytree(model_repository / "classifier", repository / "classifier")
    for version in (repository / "classifier").iterdir():
        if version.is_dir():
            torch.jit.save(torch.jit.script(_WrongShape()), version / "model.pt")
    # model.pt is the broken file: run it whatever CVSERVE_RUNTIME=auto would pick for the classifier
    settings = Settings(model_repository=repository, models=("classifier",), device="cpu", runtime="torchscript")
    buffer = io.BytesIO()
    Image.fromarray(make_scene(3, 96, 1, 1).image).save(buffer, "PNG")
    with TestClient(create_api(settings, LocalBackend(settings))) as client:
        assert client.get("/ready").status_code == 200
        answer = client.post("/classify", content=buffer.getvalue(), headers={"Content-Type": "image/png"})
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"] == {
            "code": "unavailable", "message": "model classifier gave a malformed answer; retry shortly"
        }  # fmt: skip
        assert answer.headers["Retry-After"] == "1"
        ready = client.get("/ready")
        assert ready.status_code == 503 and ready.json()["ready"] is False
