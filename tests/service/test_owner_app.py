"""`python -m service.owner_app --workers N`: one command runs the model owner and N uvicorn workers in
front of it (the GPU deployment without Ray), here on the CPU with device decode on; the owner's metrics
are on their own port; SIGTERM stops every process and frees the port."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest
from PIL import Image

from service.owner_app import event_loop_factory, main
from support.ports import reserved_free_ports
from support.waiting import wait_for
from tests.conftest import ROOT
from training.shapes import make_scene


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(make_scene(41, 128, 1, 1).image).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def test_one_command_serves_and_one_signal_stops_it(model_repository: Path, tmp_path: Path) -> None:
    port, metrics_port = reserved_free_ports(2)
    env = {
        **os.environ, "CVSERVE_MODEL_REPOSITORY": str(model_repository), "CVSERVE_MODELS": "classifier",
        "CVSERVE_DEVICE": "cpu", "CVSERVE_DEVICE_DECODE": "on", "CVSERVE_PORT": str(port),
        "CVSERVE_WARM_UP_BATCH_SIZES": "false", "PYTHONPATH": str(ROOT),
    }  # fmt: skip
    log = (tmp_path / "owner.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "service.owner_app", "--workers", "2", "--metrics-port", str(metrics_port)],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            assert process.poll() is None, (tmp_path / "owner.log").read_text()[-2000:]
            try:
                return httpx.get(f"{url}/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, 120, "the owner app's /ready")
        tree = [process.pid, *(child.pid for child in psutil.Process(process.pid).children(recursive=True))]
        assert len(tree) >= 4  # the owner, uvicorn's supervisor and its two workers (and their helpers)
        jpeg = {"content": _jpeg(), "headers": {"Content-Type": "image/jpeg"}}
        # A connection each: the kernel hands them to either worker.
        answers = [httpx.post(f"{url}/classify", timeout=30, **jpeg) for _ in range(6)]  # type: ignore[arg-type]
        assert all(a.status_code == 200 for a in answers), answers[0].text
        labels = {a.json()["results"][0]["predictions"][0]["label"] for a in answers}
        assert len(labels) == 1
        # Every worker's /metrics answers for both: the six answered requests, whichever worker is asked.
        for _ in range(6):
            scraped = httpx.get(f"{url}/metrics/", timeout=5).text
            answered = [line for line in scraped.splitlines() if line.startswith("cvserve_requests_total{")]
            classified = [line for line in answered if 'endpoint="/classify"' in line and 'status="200"' in line]
            assert sum(float(line.rpartition(" ")[2]) for line in classified) == 6, answered
        # The owner's own metrics: the six images went through its batches.
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
        sums = [line for line in metrics.splitlines() if line.startswith("cvserve_batch_size_sum{")]
        (images,) = [line for line in sums if 'model="classifier"' in line]
        assert float(images.rpartition(" ")[2]) >= 6, images
    finally:
        process.send_signal(signal.SIGTERM)
        status = process.wait(timeout=60)
        log.close()
    assert status == 0, (tmp_path / "owner.log").read_text()[-2000:]
    assert not [pid for pid in tree if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert "device decode: on, event loop: uvloop" in (tmp_path / "owner.log").read_text()  # uvloop is installed
    with httpx.Client() as client:  # nobody listens any more
        try:
            client.get(f"{url}/health", timeout=2)
            raise AssertionError("the port still answers")
        except httpx.ConnectError:
            pass


def test_workers_that_cannot_start_stop_the_owner(model_repository: Path, tmp_path: Path) -> None:
    """The port is taken: uvicorn exits, and the owner follows with a non-zero status instead of serving
    nobody."""
    import socket

    (port,) = reserved_free_ports(1)
    env = {
        **os.environ, "CVSERVE_MODEL_REPOSITORY": str(model_repository), "CVSERVE_MODELS": "classifier",
        "CVSERVE_DEVICE": "cpu", "CVSERVE_PORT": str(port), "CVSERVE_WARM_UP_BATCH_SIZES": "false",
        "PYTHONPATH": str(ROOT),
    }  # fmt: skip
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        done = subprocess.run(
            [sys.executable, "-m", "service.owner_app", "--workers", "1"], cwd=ROOT, env=env,
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-2000:]
    assert "the HTTP workers exited" in output, output[-2000:]


def test_the_owner_s_event_loop_is_uvloop_where_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    import uvloop

    assert event_loop_factory("auto") is event_loop_factory("uvloop") is uvloop.new_event_loop
    assert event_loop_factory("asyncio") is None
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if it were not installed: asyncio's loop
    assert event_loop_factory("auto") is None
    with pytest.raises(SystemExit) as stopped:  # asked for by name: the usage error, before any model loads
        main(["--socket", "/tmp/unused.sock", "--loop", "uvloop"])
    assert stopped.value.code == 2


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_the_owner_stops_cleanly_while_http_processes_are_connected(
    model_repository: Path, tmp_path: Path, loop: str
) -> None:
    """SIGTERM to the owner alone, or to a whole process group at once (a container's stop, the GPU check's
    time limit): its connections' handlers end without a traceback in its log, and it exits with 0."""
    import asyncio

    from service.backends.owner import OwnerBackend

    path = tmp_path / "owner.sock"
    env = {
        **os.environ, "CVSERVE_MODEL_REPOSITORY": str(model_repository), "CVSERVE_MODELS": "classifier",
        "CVSERVE_DEVICE": "cpu", "CVSERVE_WARM_UP_BATCH_SIZES": "false", "PYTHONPATH": str(ROOT),
    }  # fmt: skip
    log_path = tmp_path / "owner.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.owner_app", "--socket", str(path), "--loop", loop],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    async def connected_while_it_stops() -> int:
        clients = [OwnerBackend(path) for _ in range(3)]
        try:
            assert all([await client.ready() for client in clients])  # each holds a connection open
            process.send_signal(signal.SIGTERM)
            return await asyncio.to_thread(process.wait, 60)
        finally:
            for client in clients:
                await client.close()

    try:
        wait_for(lambda: process.poll() is None and path.exists() or process.poll() is not None, 120, "the socket")
        assert process.poll() is None, log_path.read_text()[-2000:]
        status = asyncio.run(connected_while_it_stops())
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = log_path.read_text()
    assert status == 0, output[-2000:]
    assert f"event loop: {loop}" in output and "Traceback" not in output and " ERROR " not in output, output[-3000:]
