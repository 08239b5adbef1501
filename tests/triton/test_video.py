"""Streams and video files in Triton mode: the same frames, through a real tritonserver, tracked alike.

The app is `create_api` in process over `TritonBackend` and the session's CPU tritonserver, so the
frames of a stream and of an uploaded video reach the model through Triton's gRPC API.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_api
from service.backends.triton import TritonBackend
from service.settings import Settings
from stack.triton import TritonServer
from tests.video.clips import Clip, encode_video, moving_shapes
from tests.video.test_streams import assert_tracked, run_lock_step


@pytest.fixture(scope="module")
def clip() -> Clip:
    return moving_shapes(30)


@pytest.fixture(scope="module")
def triton_client(model_repository: Path, cpu_triton: TritonServer) -> Iterator[TestClient]:
    settings = Settings(
        backend="triton",
        triton_url=cpu_triton.grpc_url,
        model_repository=model_repository,
        models=("detector",),
    )
    backend = TritonBackend(settings)
    with TestClient(create_api(settings, backend)) as client:
        yield client
        client.portal.call(backend.close)  # the gRPC channel lives on the app's loop


def test_a_stream_through_triton_is_answered_and_tracked(triton_client: TestClient, clip: Clip) -> None:
    with triton_client.websocket_connect("/stream/detect") as ws:
        answers = run_lock_step(ws, clip.frames)
    assert_tracked(clip, answers, list(range(len(clip.frames))))


def test_a_video_file_through_triton(triton_client: TestClient, clip: Clip) -> None:
    response = triton_client.post(
        "/detect", content=encode_video(clip.frames, "webm"), headers={"Content-Type": "video/webm"}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["backend"] == "triton" and body["video"]["frames"] == len(clip.frames)
    frames = [frame["result"] for frame in body["frames"]]
    assert all(result["detections"] for result in frames)
    assert_tracked(clip, [{"result": result} for result in frames], list(range(len(clip.frames))))
