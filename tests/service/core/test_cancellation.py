"""Work for clients that have gone is dropped: a disconnected request's images leave the batch
queue before they run, and a client's shorter deadline (`X-Request-Timeout`) is kept.

The API runs under a real uvicorn server in this process, over the real TorchScript detector,
one image per batch, so a queue forms behind the model.
"""

from __future__ import annotations

import io
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from service.app import create_api
from service.backends.local import LocalBackend
from service.settings import Settings
from support.serving import served_in_thread
from support.waiting import wait_for
from training.shapes import make_scene

SENT = 12


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(make_scene(seed, 160, 1, 3).image).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def served(model_repository: Path) -> Iterator[tuple[str, LocalBackend]]:
    settings = Settings(
        model_repository=model_repository, models=("detector",), device="cpu", max_batch_size=1,
        batch_wait_timeout_s=0.0, request_timeout_s=120.0,  # only a disconnect, not the deadline, drops images here
    )  # fmt: skip
    backend = LocalBackend(settings)
    with served_in_thread(create_api(settings, backend), lifespan="auto") as url:
        yield url, backend


def send(port: int, body: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (
        f"POST /detect HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    return sock


def test_disconnected_requests_are_dropped_before_they_are_batched(served: tuple[str, LocalBackend]) -> None:
    url, backend = served
    detector = backend._models["detector"]
    batches_before, dropped_before = sum(detector.batch_sizes.values()), detector.dropped
    port = int(url.rsplit(":", 1)[1])
    # Hold the model's thread so that a queue forms deterministically, whatever the machine's speed:
    # the first request's batch waits behind the gate, the others wait in the batch queue.
    gate = threading.Event()
    held = detector._executor.submit(gate.wait, 60)
    try:
        sockets = [send(port, png(seed)) for seed in range(SENT)]
        wait_for(lambda: detector._live >= SENT - 1, 30, "every request to be read, decoded and queued")
        for sock in sockets:
            sock.close()  # the clients give up
        wait_for(
            lambda: detector.dropped - dropped_before >= SENT - 1,
            20,
            "the queued images of the clients who left to be dropped",
        )
    finally:
        gate.set()
    held.result(timeout=30)
    wait_for(
        lambda: sum(detector.batch_sizes.values()) - batches_before >= 1,
        30,
        "the batch that was already running to end",
    )
    ran = sum(detector.batch_sizes.values()) - batches_before
    dropped = detector.dropped - dropped_before
    assert ran == 1, (
        f"the model ran {ran} batches for {SENT} requests whose clients left (only the one already batched should)"
    )
    assert dropped == SENT - 1
    assert detector._live == 0
    ok = httpx.post(f"{url}/detect", content=png(99), headers={"Content-Type": "image/png"}, timeout=30)
    assert ok.status_code == 200 and ok.json()["results"][0]["detections"]  # still serving, right answers


def test_a_clients_shorter_deadline_is_kept(served: tuple[str, LocalBackend]) -> None:
    url, _ = served
    with httpx.Client(base_url=url, timeout=30) as client:
        late = client.post(
            "/detect", content=png(5), headers={"Content-Type": "image/png", "X-Request-Timeout": "0.0005"}
        )
        assert late.status_code == 504 and late.json()["error"]["code"] == "timeout"
        assert "0.0005 s" in late.json()["error"]["message"]
        for bad in ("soon", "-1", "0", "nan", "inf"):
            wrong = client.post(
                "/detect", content=png(5), headers={"Content-Type": "image/png", "X-Request-Timeout": bad}
            )
            assert wrong.status_code == 400 and "X-Request-Timeout" in wrong.json()["error"]["message"], bad
        fine = client.post(
            "/detect", content=png(5), headers={"Content-Type": "image/png", "X-Request-Timeout": "20"}
        )
        assert fine.status_code == 200
