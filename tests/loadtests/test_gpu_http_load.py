"""The GPU check's load generator (loadtests/gpu/http.py): prepared multipart requests on kept-alive
connections, against a real uvicorn server here; what the server parses is what an HTTP library sends,
and answers other than 200 are counted as errors with samples."""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from fastapi import FastAPI, UploadFile
from fastapi.responses import JSONResponse

from loadtests.gpu.http import (
    START_TIMEOUT_S,
    STEP_TIMEOUT_VARIABLE,
    _client_process,
    _gpu_index,
    load,
    owner_start_timeout,
)

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


def test_load_reports_what_each_role_used_in_its_window(url: str) -> None:
    """`load(observe=...)`: the server (this process, its thread) and the load generator's processes were
    busy in the measured window; their CPU per answered request follows from cores and throughput."""
    server = {"server": [os.getpid()]}
    result = load(f"{url}/classify", 1, 4, 3.0, 1.0, [64, 48], observe=server, gpu_index=None)
    assert result["errors"] == 0 and result["ok"] > 0
    usage = result["usage"]
    assert usage["gpu_utilization_pct"] is None and 0.5 < usage["window_s"] <= 3.0, usage
    assert set(usage["cpu_cores"]) == {"server", "load_generator"}
    assert all(0 < cores < 2 * (os.cpu_count() or 1) for cores in usage["cpu_cores"].values()), usage
    for role, cores in usage["cpu_cores"].items():
        expected = 1000 * cores / result["throughput_rps"]  # from cores rounded to 3 places
        slack = 1000 * 0.0005 / result["throughput_rps"] + 0.0005  # the two figures' rounding
        assert usage["cpu_ms_per_request"][role] == pytest.approx(expected, abs=slack)
    assert "usage" not in load(f"{url}/classify", 1, 1, 0.5, 0.0, [64, 48])  # only when asked


def test_the_gpu_s_nvml_index_follows_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert (_gpu_index("cpu"), _gpu_index("cuda"), _gpu_index("cuda:1")) == (None, 0, 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert (_gpu_index("cuda"), _gpu_index("cuda:1")) == (3, 5)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-8d1f")  # a UUID: NVML's index is not known from it
    assert _gpu_index("cuda") is None


def test_the_owner_gets_what_the_step_s_limit_leaves_after_the_first_model_s_load(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from loadtests.gpu_check import GPU

    config = GPU.http  # 10 s measured after 3 s of warm-up: 23 s for the first load; 20 s for the workers
    monkeypatch.delenv(STEP_TIMEOUT_VARIABLE, raising=False)
    assert owner_start_timeout(config) == START_TIMEOUT_S
    monkeypatch.setenv(STEP_TIMEOUT_VARIABLE, str(GPU.timeouts["http"]))
    assert owner_start_timeout(config) == GPU.timeouts["http"] - 20 - 23 > START_TIMEOUT_S
    monkeypatch.setenv(STEP_TIMEOUT_VARIABLE, "60")  # a step cut short by the budget: the owner keeps 90 s
    assert owner_start_timeout(config) == START_TIMEOUT_S
