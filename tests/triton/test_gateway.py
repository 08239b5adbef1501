"""A triton-mode gateway (real tritonserver behind it) gives the embedded gateway's answers and
fails cleanly: 503 while Triton is absent or down, recovery without a restart, 504 past a deadline."""

from __future__ import annotations

import base64
import io
import shutil
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from service.deploy.serve import build_app
from service.settings import Settings
from stack.triton import TritonServer, start_tritonserver
from support.assertions import box_iou
from support.ports import free_ports
from support.seeds import fresh_seeds
from support.triton_metrics import triton_metric
from support.waiting import wait_for
from tests.conftest import Deploy, delete_app
from tests.triton.conftest import MODEL_LOAD_TIMEOUT_S
from training.shapes import make_scene

TIMEOUT_S = 120.0
SCENE_SEEDS = fresh_seeds(6)
CLASSIFY_SEEDS = fresh_seeds(6, offset=100)


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def as_files(images: list[bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]


@pytest.fixture(scope="module")
def scenes() -> list[bytes]:
    """Detection/segmentation scenes (several shapes), PNG-encoded."""
    return [png(make_scene(seed, 160, 1, 4).image) for seed in SCENE_SEEDS]


@pytest.fixture(scope="module")
def singles() -> list[bytes]:
    """Classification samples (one shape each), PNG-encoded."""
    return [png(make_scene(seed, 96, 1, 1).image) for seed in CLASSIFY_SEEDS]


def triton_settings(model_repository: Path, url: str, **overrides: object) -> Settings:
    return Settings(backend="triton", triton_url=url, model_repository=model_repository, **overrides)


def is_ready(base_url: str) -> bool:
    try:
        return httpx.get(f"{base_url}/ready", timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def triton_gateway(deploy: Deploy, model_repository: Path, cpu_triton: TritonServer) -> Iterator[str]:
    """Base URL of a gateway in Triton mode (gRPC) talking to the session's tritonserver."""
    settings = triton_settings(model_repository, cpu_triton.grpc_url, request_timeout_s=TIMEOUT_S)
    url = deploy(build_app(settings), "triton", "/triton")
    wait_for(lambda: is_ready(url), 60, "the triton-mode gateway never became ready")
    yield url
    delete_app("triton")


def post(base_url: str, endpoint: str, images: list[bytes], **params: object) -> dict:
    response = httpx.post(f"{base_url}{endpoint}", files=as_files(images), params=params, timeout=TIMEOUT_S)
    assert response.status_code == 200, response.text
    return response.json()


def test_ready_reports_triton_backend(triton_gateway: str) -> None:
    body = httpx.get(f"{triton_gateway}/ready", timeout=10).json()
    assert body["ready"] is True and body["backend"] == "triton"


def test_classify_matches_embedded(triton_gateway: str, embedded_gateway: str, singles: list[bytes]) -> None:
    triton = post(triton_gateway, "/classify", singles, top_k=1000)
    embedded = post(embedded_gateway, "/classify", singles, top_k=1000)
    assert triton["backend"] == "triton" and embedded["backend"] == "embedded"
    for ours, theirs in zip(triton["results"], embedded["results"], strict=True):
        assert ours["predictions"][0]["class_id"] == theirs["predictions"][0]["class_id"]
        ours_scores = {p["class_id"]: p["score"] for p in ours["predictions"]}
        theirs_scores = {p["class_id"]: p["score"] for p in theirs["predictions"]}
        assert ours_scores.keys() == theirs_scores.keys()
        assert max(abs(ours_scores[c] - theirs_scores[c]) for c in ours_scores) <= 1e-4


def test_detect_matches_embedded(triton_gateway: str, embedded_gateway: str, scenes: list[bytes]) -> None:
    triton = post(triton_gateway, "/detect", scenes)
    embedded = post(embedded_gateway, "/detect", scenes)
    total = 0
    for ours, theirs in zip(triton["results"], embedded["results"], strict=True):
        assert len(ours["detections"]) == len(theirs["detections"])
        unmatched = list(ours["detections"])
        for detection in theirs["detections"]:
            same_class = [d for d in unmatched if d["class_id"] == detection["class_id"]]
            assert same_class, f"no triton detection of class {detection['label']}"
            best = max(same_class, key=lambda d: box_iou(d["box"], detection["box"]))
            assert box_iou(best["box"], detection["box"]) >= 0.99
            unmatched.remove(best)
        total += len(theirs["detections"])
    assert total > 0, "no detections at all: the comparison proved nothing"


def decode_mask(result: dict) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(base64.b64decode(result["png"]))))


def test_segment_matches_embedded(triton_gateway: str, embedded_gateway: str, scenes: list[bytes]) -> None:
    triton = post(triton_gateway, "/segment", scenes, return_png=True)
    embedded = post(embedded_gateway, "/segment", scenes, return_png=True)
    for i, (ours, theirs) in enumerate(zip(triton["results"], embedded["results"], strict=True)):
        ours_mask, theirs_mask = decode_mask(ours), decode_mask(theirs)
        assert theirs["segments"] and theirs_mask.any(), f"scene {i}: no segments, nothing to compare"
        assert ours_mask.shape == theirs_mask.shape == (ours["image"]["height"], ours["image"]["width"])
        assert (ours_mask == theirs_mask).mean() >= 0.999


def test_concurrent_images_are_batched_by_triton(triton_gateway: str, cpu_triton: TritonServer, scenes: list[bytes]) -> None:
    names = ("nv_inference_count", "nv_inference_exec_count")
    before = {name: triton_metric(cpu_triton.metrics_url, name, "detector") for name in names}
    images = (scenes * 3)[:16]

    def send(batch: list[bytes]) -> None:
        post(triton_gateway, "/detect", batch)

    threads = [threading.Thread(target=send, args=(images[i::2],)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    def delta(name: str) -> float:
        return triton_metric(cpu_triton.metrics_url, name, "detector") - before[name]

    wait_for(lambda: delta("nv_inference_count") >= 16, 10, "Triton's metrics never counted the 16 images")
    assert delta("nv_inference_count") == 16
    assert delta("nv_inference_exec_count") < 16, "Triton ran every image alone: no dynamic batching"


def test_request_past_its_deadline_is_504(
    deploy: Deploy, model_repository: Path, cpu_triton: TritonServer, scenes: list[bytes]
) -> None:
    """A real segmentation on CPU takes far longer than a 1 ms deadline."""
    settings = triton_settings(model_repository, cpu_triton.grpc_url, models=("segmenter",), request_timeout_s=0.001)
    url = deploy(build_app(settings), "triton-deadline", "/triton-deadline")
    try:
        response = httpx.post(f"{url}/segment", files=as_files(scenes[:1]), timeout=TIMEOUT_S)
        assert response.status_code == 504, response.text
        error = response.json()["error"]
        # The gateway's request deadline or the backend's call deadline, whichever trips first.
        assert error["code"] == "timeout" and "within 0.001 s" in error["message"]
        assert is_ready(url), "a deadline is not an outage: /ready must stay 200"
    finally:
        delete_app("triton-deadline")


def assert_clean_503(response: httpx.Response) -> None:
    """503 with our own message: no gRPC status names or Triton's raw text."""
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert error["code"] == "unavailable" and "Triton" in error["message"]
    for raw in ("StatusCode", "failed to connect", "Socket closed", "ipv4:", "Connection refused"):
        assert raw not in response.text


def test_outage_absent_at_start_then_killed_then_back(
    deploy: Deploy, model_repository: Path, cpu_repository: Path, singles: list[bytes], tmp_path: Path
) -> None:
    """One gateway, never restarted: Triton absent → 503; started → ready; killed mid-traffic →
    503 (never 500); restarted on the same ports → answers again."""
    repository = tmp_path / "repository"
    shutil.copytree(cpu_repository / "classifier", repository / "classifier")
    ports = free_ports(3)
    settings = triton_settings(
        model_repository, f"127.0.0.1:{ports[1]}", models=("classifier",), request_timeout_s=30.0
    )
    url = deploy(build_app(settings), "triton-outage", "/triton-outage")
    server: TritonServer | None = None

    def classify() -> httpx.Response:
        return httpx.post(f"{url}/classify", files=as_files(singles[:2]), timeout=TIMEOUT_S)

    try:
        ready = httpx.get(f"{url}/ready", timeout=10)
        assert ready.status_code == 503 and ready.json()["ready"] is False
        assert_clean_503(classify())

        server = start_tritonserver(repository, *ports, work_dir=tmp_path / "first", ready_timeout_s=MODEL_LOAD_TIMEOUT_S)
        wait_for(lambda: is_ready(url), 30, "gateway did not notice Triton starting")
        answer = classify()
        assert answer.status_code == 200, answer.text

        statuses: Counter[int] = Counter()
        stop = threading.Event()

        def traffic() -> None:
            while not stop.is_set():
                statuses[classify().status_code] += 1

        sender = threading.Thread(target=traffic)
        sender.start()
        try:
            wait_for(lambda: statuses[200] >= 2, 60, "no traffic got through before the kill")
            server.kill()
            wait_for(lambda: statuses[503] >= 2, 30, "requests did not turn into 503 after the kill")
        finally:
            stop.set()
            sender.join()
        assert set(statuses) <= {200, 503}, f"unexpected statuses during the outage: {statuses}"
        wait_for(lambda: not is_ready(url), 3, "/ready still true after Triton died (it is cached for 1 s)")
        assert_clean_503(classify())

        server = start_tritonserver(
            repository, *ports, work_dir=tmp_path / "second", ready_timeout_s=MODEL_LOAD_TIMEOUT_S
        )
        wait_for(lambda: is_ready(url), 30, "gateway did not recover after Triton came back")
        again = classify()
        assert again.status_code == 200, again.text
        assert again.json()["results"] == answer.json()["results"]
    finally:
        if server is not None:
            server.stop()
        delete_app("triton-outage")
