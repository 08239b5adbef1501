"""Every surface goes through the one request core: the drifts its copies had are gone.

Each test names the drift it checks (issue 23): readiness after a malformed video answer, one Accept
parser (q=0 means "not this" on every surface), one readiness cache, one API-key check with one
slow-down for HTTP and WebSocket.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from service.app import create_api
from service.backends.local import LocalBackend
from service.core.accept import accept_weights, accepted, preferred
from service.core.auth import ApiKeyCheck
from service.settings import Settings
from service.timing import BatchTiming
from tests.service.test_api_contract import sample
from tests.video.clips import encode_video, moving_shapes

KEY = "k" * 24


class Breakable(LocalBackend):
    """The real in-process backend, whose answers can be made to break the contract (a missing output)."""

    broken = False
    readiness_checks = 0

    async def infer_many(
        self, model: str, images: Sequence[np.ndarray], timings: Sequence[BatchTiming] | None = None
    ) -> list[dict[str, np.ndarray]]:
        outputs = await super().infer_many(model, images, timings)
        return [{k: v for k, v in o.items() if k != "COUNT"} for o in outputs] if self.broken else outputs

    async def ready(self) -> bool:
        self.readiness_checks += 1
        return await super().ready()


@pytest.fixture(scope="module")
def served(model_repository: Path) -> Iterator[tuple[TestClient, Breakable]]:
    settings = Settings(model_repository=model_repository, models=("detector",), device="cpu",
                        warm_up_batch_sizes=False)  # fmt: skip
    backend = Breakable(settings)
    with TestClient(create_api(settings, backend)) as client:
        yield client, backend


def test_a_malformed_answer_to_a_video_makes_the_gateway_not_ready(served: tuple[TestClient, Breakable]) -> None:
    client, backend = served
    video = encode_video(moving_shapes(4).frames, "webm")
    backend.broken = True
    try:
        answer = client.post("/detect", content=video, headers={"Content-Type": "video/webm"})
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "unavailable", answer.text
        assert "COUNT" not in answer.text  # our words, not the contract check's details
        time.sleep(1.05)  # past the readiness cache: the malformed answer alone must say "not ready"
        assert client.get("/ready").status_code == 503
        assert client.get("/v2/health/ready").status_code == 503
        assert client.get("/v2/models/detector/ready").status_code == 503
    finally:
        backend.broken = False
    good = client.post("/detect", content=video, headers={"Content-Type": "video/webm"})
    assert good.status_code == 200 and good.json()["frames"]
    assert client.get("/ready").status_code == 200


def test_one_readiness_check_serves_every_probe(served: tuple[TestClient, Breakable]) -> None:
    client, backend = served
    time.sleep(1.05)
    before = backend.readiness_checks
    for path in ("/ready", "/v2/health/ready", "/v2/models/detector/ready", "/ready"):
        assert client.get(path).status_code == 200
    assert backend.readiness_checks == before + 1  # one backend check, cached for the others


@pytest.mark.parametrize(
    ("accept", "wanted"),
    [
        ("video/webm;q=0", None),  # q=0: not this (the video surface returned a video for it)
        ("video/webm;q=0, video/mp4", "video/mp4"),
        ("video/mp4;q=0.5, video/webm;q=0.9", "video/webm"),  # the most wanted, not the first named
        ("VIDEO/WEBM; Q=0.1", "video/webm"),
        ("*/*", None),
        ("", None),
    ],
)
def test_one_accept_parser_weighs_every_media_type(accept: str, wanted: str | None) -> None:
    assert preferred({"accept": accept}, ("video/webm", "video/mp4")) == wanted


def test_the_accept_parser_reads_weights() -> None:
    assert accept_weights({"accept": "a/b;q=0.2, a/b;q=0.7, c/d;q=x, e/f;q=nan"}) == {"a/b": 0.7, "c/d": 1, "e/f": 1}
    assert accepted({"accept": "a/b;q=0, c/d;q=0.5, e/f"}) == ["e/f", "c/d"]


def test_q_zero_is_refused_on_every_surface(served: tuple[TestClient, Breakable]) -> None:
    client, _ = served
    video = encode_video(moving_shapes(2).frames, "webm")
    answer = client.post("/detect", content=video, headers={"Content-Type": "video/webm", "Accept": "video/webm;q=0"})
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    image = sample(model="detector").data
    answer = client.post("/detect", content=image, headers={"Content-Type": "image/png", "Accept": "image/png;q=0"})
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    answer = client.post(
        "/detect", content=image, headers={"Content-Type": "image/png", "Accept": "application/msgpack;q=0"}
    )
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    drawn = client.post("/detect", content=image, headers={"Content-Type": "image/png", "Accept": "image/png"})
    assert drawn.status_code == 200 and drawn.headers["content-type"] == "image/png"  # and q>0 still works


def test_the_key_check_slows_each_clients_failures_alike() -> None:
    check = ApiKeyCheck(Settings(api_key=KEY))
    assert [check.delay_s(n) for n in (1, 2, 3, 10)] == [0.05, 0.1, 0.2, 2.0]
    began = time.perf_counter()
    assert not asyncio.run(check.verify("wrong", "10.0.0.1")) and not asyncio.run(check.verify("", "10.0.0.1"))
    assert time.perf_counter() - began >= 0.05 + 0.1
    assert asyncio.run(check.verify(KEY, "10.0.0.1"))  # the right key resets the client's count
    assert asyncio.run(ApiKeyCheck(Settings()).verify("", "anyone"))  # no key set: everyone is let in


def test_http_and_websocket_share_one_key_check(model_repository: Path) -> None:
    settings = Settings(model_repository=model_repository, models=("detector",), device="cpu",
                        warm_up_batch_sizes=False, api_key=KEY)  # fmt: skip
    api = create_api(settings, LocalBackend(settings))
    with TestClient(api) as client:
        for _ in range(3):  # three failures over HTTP ...
            assert client.post("/detect", content=b"x", headers={"X-API-Key": "wrong"}).status_code == 401
        began = time.perf_counter()
        with pytest.raises(WebSocketDisconnect) as closed, client.websocket_connect(
            "/stream/detect", headers={"X-API-Key": "wrong"}
        ) as stream:
            stream.receive_json()
        waited = time.perf_counter() - began
        assert closed.value.code == 4401
        assert waited >= api.state.answerer.keys.delay_s(4)  # ... so the WebSocket's is the fourth in a row
        with client.websocket_connect("/stream/detect", headers={"X-API-Key": KEY}) as stream:
            assert stream.receive_json()["type"] == "ready"
