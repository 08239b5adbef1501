"""Serve's GPU-style placement (`model_placement="deployment"`) with device decode, run here on the CPU: the
gateway replica reads JPEG headers only and sends a request's files to the model deployment in one call;
the deployment decodes them in its batch. Answers match the session's gateway (which decodes in the
gateway), a broken JPEG is the same 4xx with its index, and other formats still work."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from support.seeds import fresh_seeds
from tests.conftest import Deploy, delete_app
from training.shapes import make_scene

APP = "device-decode-deployments"


def _jpeg(seed: int, size: int = 160) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(make_scene(seed, size, 1, 3).image).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def gateway(deploy: Deploy, model_repository: Path) -> Iterator[str]:
    from service.deploy.serve import build_app
    from service.settings import Settings

    settings = Settings(
        model_repository=model_repository, device="cpu", models=("classifier",), model_placement="deployment",
        device_decode="on", max_batch_size=4, batch_wait_timeout_s=0.05, torch_threads=1,
        warm_up_batch_sizes=False,
    )  # fmt: skip
    yield deploy(build_app(settings), APP, f"/{APP}")
    delete_app(APP)


def test_a_request_s_jpegs_go_to_the_model_deployment_in_one_call(gateway: str, embedded_gateway: str) -> None:
    from ray import serve

    handle = serve.get_deployment_handle("classifier", app_name=APP)
    before, decoded = handle.batch_sizes.remote().result(), handle.decoded.remote().result()
    images = [_jpeg(seed) for seed in fresh_seeds(3, offset=32_000)]
    files = [("files", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(images)]
    with httpx.Client(timeout=60) as client:
        got = client.post(f"{gateway}/classify", files=files)
        want = client.post(f"{embedded_gateway}/classify", files=files)
    assert got.status_code == want.status_code == 200, got.text
    for mine, theirs in zip(got.json()["results"], want.json()["results"], strict=True):
        assert mine["image"] == theirs["image"]
        assert mine["predictions"][0]["label"] == theirs["predictions"][0]["label"]
        assert abs(mine["predictions"][0]["score"] - theirs["predictions"][0]["score"]) < 0.05
    after = handle.batch_sizes.remote().result()
    assert after.get(3, 0) == before.get(3, 0) + 1  # the three images in one batch
    assert handle.decoded.remote().result() == {"device": decoded["device"] + 3, "cpu": 0}  # as files


def test_broken_and_other_images(gateway: str) -> None:
    data = _jpeg(5)
    no_scan = data[: data.index(b"\xff\xda")] + b"\xff\xd9"  # a sound header, no image data
    png = io.BytesIO()
    Image.fromarray(make_scene(6, 96, 1, 1).image).save(png, format="PNG")
    with httpx.Client(timeout=60) as client:
        refused = client.post(
            f"{gateway}/classify",
            files=[("files", ("a.jpg", data, "image/jpeg")), ("files", ("b.jpg", no_scan, "image/jpeg"))],
        )
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert error["code"] == "undecodable_image" and error["message"].startswith("image 1: "), error
        assert "Traceback" not in refused.text and "ray" not in refused.text.lower()
        for body, media_type in ((png.getvalue(), "image/png"), (data, "image/jpeg")):
            answer = client.post(f"{gateway}/classify", content=body, headers={"Content-Type": media_type})
            assert answer.status_code == 200, answer.text
