"""Device decode through the whole request core (`device_decode=on`, service/core/device_decode.py): the
in-process app over the trained models, here on the CPU, answers JPEGs handed to the backend undecoded as it
answers them decoded in the request's thread (`off`); other formats, explanations and refusals are as before."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_api
from service.backends.local import LocalBackend
from service.settings import Settings
from support.seeds import fresh_seeds
from training.shapes import make_scene

JPEG = {"Content-Type": "image/jpeg"}
Clients = dict[str, tuple[TestClient, LocalBackend]]  # one app per device_decode setting


def _jpeg(image: np.ndarray, orientation: int = 1) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90, exif=exif.tobytes())
    return buffer.getvalue()


@pytest.fixture(scope="module")
def clients(model_repository: Path) -> Iterator[Clients]:
    """One app per `device_decode` setting, over the same trained models on the CPU."""
    made: dict[str, tuple[TestClient, LocalBackend]] = {}
    for mode in ("on", "off"):
        settings = Settings(
            model_repository=model_repository, device="cpu", device_decode=mode, warm_up_batch_sizes=False,
            max_batch_size=4,
        )  # fmt: skip
        backend = LocalBackend(settings)
        made[mode] = (TestClient(create_api(settings, backend)).__enter__(), backend)
    yield made
    for client, _ in made.values():
        client.__exit__(None, None, None)


def _on_device(backend: LocalBackend) -> dict[str, int]:
    models = backend._models.items()
    return {model: batched.preparer.decoded_on_device for model, batched in models}  # type: ignore[union-attr]


def _scenes() -> list[tuple[bytes, str]]:
    """JPEG scenes of several sizes and EXIF turns (a quarter turn among them)."""
    seeds = fresh_seeds(4, offset=31_000)
    sizes = [(160, 1), (320, 6), (640, 3), (97, 8)]
    return [(_jpeg(make_scene(seed, size, 1, 4).image, turn), f"{size}px turn {turn}")
            for seed, (size, turn) in zip(seeds, sizes, strict=True)]  # fmt: skip


def _answers(client: TestClient, endpoint: str, data: bytes, headers: dict[str, str] = JPEG) -> dict[str, Any]:
    response = client.post(endpoint, content=data, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()["results"][0]


def _iou(a: list[float], b: list[float]) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_jpegs_decoded_by_the_model_owner_get_the_same_answers(clients: Clients) -> None:
    (on, backend), (off, _) = clients["on"], clients["off"]
    before = _on_device(backend)
    scenes = _scenes()
    for data, what in scenes:
        got, want = _answers(on, "/classify", data), _answers(off, "/classify", data)
        assert got["image"] == want["image"], what  # the full upright size, from the header alone
        assert got["predictions"][0]["label"] == want["predictions"][0]["label"], what
        assert abs(got["predictions"][0]["score"] - want["predictions"][0]["score"]) < 0.05, what

        got, want = _answers(on, "/detect", data), _answers(off, "/detect", data)
        for these, those in ((want, got), (got, want)):  # every confident box has its twin in the other answer
            for detection in (d for d in these["detections"] if d["score"] > 0.7):
                same = [d for d in those["detections"] if d["label"] == detection["label"]]
                twins = [_iou(detection["box"], d["box"]) for d in same]
                assert max(twins, default=0.0) > 0.85, (what, detection)

        got, want = _answers(on, "/segment", data), _answers(off, "/segment", data)
        for label, fraction in want["class_fractions"].items():
            assert abs(got["class_fractions"][label] - fraction) < 0.02, (what, label)
    after = _on_device(backend)
    assert {m: after[m] - before[m] for m in after} == dict.fromkeys(after, len(scenes))
    assert not clients["off"][1].decodes_on_device
    assert all(batched.preparer is None for batched in clients["off"][1]._models.values())


def test_other_formats_and_explanations_decode_in_the_request_s_process(
    clients: Clients,
) -> None:
    (on, backend), (off, _) = clients["on"], clients["off"]
    image = make_scene(fresh_seeds(1, offset=31_100)[0], 128, 1, 1).image
    png = io.BytesIO()
    Image.fromarray(image).save(png, format="PNG")
    before = _on_device(backend)
    assert _answers(on, "/classify", png.getvalue(), {"Content-Type": "image/png"}) == _answers(
        off, "/classify", png.getvalue(), {"Content-Type": "image/png"}
    )
    explained = _answers(on, "/classify?explain=occlusion&explain_grid=4", _jpeg(image))
    assert explained["explanation"] is not None
    assert _on_device(backend) == before


def test_a_jpeg_only_the_decode_finds_broken_is_the_same_4xx(clients: Clients) -> None:
    """A JPEG whose header is sound but that has no image data: the device path finds out only in the
    model's batch, and answers what the CPU path answers (and the next request is served)."""
    data = _jpeg(make_scene(7, 96, 1, 1).image)
    no_scan = data[: data.index(b"\xff\xda")] + b"\xff\xd9"
    answers = {mode: client.post("/detect", content=no_scan, headers=JPEG) for mode, (client, _) in clients.items()}
    assert answers["on"].status_code == answers["off"].status_code == 400
    assert answers["on"].json() == answers["off"].json()
    assert answers["on"].json()["error"]["message"].startswith("image 0: ")
    assert _answers(clients["on"][0], "/detect", data)["detections"]


def test_a_large_jpeg_has_its_header_read_in_a_thread_and_is_decoded_by_the_owner(
    clients: Clients,
) -> None:
    """Past INLINE_HEADER_BYTES the header is read in the image threads, not on the event loop; the file
    still goes to the backend undecoded."""
    from service.core.answerer import INLINE_HEADER_BYTES

    (on, backend), (off, _) = clients["on"], clients["off"]
    scene = make_scene(fresh_seeds(1, offset=31_200)[0], 1600, 1, 4).image
    noisy = np.clip(scene.astype(np.int16) + np.random.default_rng(0).integers(-40, 40, scene.shape), 0, 255)
    data = _jpeg(noisy.astype(np.uint8))
    assert len(data) > INLINE_HEADER_BYTES
    before = _on_device(backend)["classifier"]
    got, want = _answers(on, "/classify", data), _answers(off, "/classify", data)
    assert got["image"] == want["image"] == {"width": 1600, "height": 1600}
    assert got["predictions"][0]["label"] == want["predictions"][0]["label"]
    assert _on_device(backend)["classifier"] == before + 1
