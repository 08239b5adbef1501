"""The GPU check's load generator (loadtests/gpu/http.py): prepared multipart requests on kept-alive
connections, against a real uvicorn server here; what the server parses is what an HTTP library sends,
and answers other than 200 are counted as errors with samples."""

from __future__ import annotations

import queue
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from fastapi import FastAPI, UploadFile
from fastapi.responses import JSONResponse

from loadtests.gpu.http import _client_process

received: list[tuple[str | None, str | None, bytes, int]] = []
app = FastAPI()


@app.post("/classify")
async def classify(file: UploadFile) -> dict[str, int]:
    data = await file.read()
    received.append((file.filename, file.content_type, data[:2], len(data)))
    return {"bytes": len(data)}


@app.post("/busy")
async def busy() -> JSONResponse:
    return JSONResponse({"error": {"code": "overloaded"}}, status_code=503)


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_prepared_requests_are_parsed_as_an_http_client_s(url: str) -> None:
    results: queue.Queue = queue.Queue()
    _client_process(f"{url}/classify", 3, 1.0, 0.0, [64, 48], 0, results)
    latencies, errors, samples = results.get(timeout=5)
    assert errors == 0 and samples == [] and len(latencies) >= 3
    assert len(received) >= len(latencies)
    assert {r[:3] for r in received} == {("image.jpg", "image/jpeg", b"\xff\xd8")}  # JPEGs, whole
    assert len({r[3] for r in received}) == 4  # the four distinct images, in turn


def test_answers_other_than_200_are_errors_with_samples(url: str) -> None:
    results: queue.Queue = queue.Queue()
    _client_process(f"{url}/busy", 2, 0.5, 0.0, [32, 32], 1, results)
    latencies, errors, samples = results.get(timeout=5)
    assert latencies == [] and errors > 0
    assert samples and samples[0].startswith("HTTP 503: ") and "overloaded" in samples[0]
