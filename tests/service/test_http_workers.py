"""`python -m service.http_workers`: uvicorn processes of the owner app with a listening socket each
(SO_REUSEPORT), in front of a real model owner: a burst of connections spreads over every worker, they all
answer, a port already taken is refused at once, a worker that dies is replaced, and a stop ends them all."""

from __future__ import annotations

import asyncio
import collections
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from PIL import Image

from service import http_workers
from support.ports import reserved_free_ports
from support.waiting import wait_for
from tests.conftest import ROOT
from training.shapes import make_scene


@pytest.fixture(scope="module")
def owner(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A model owner on a Unix socket; the environment its HTTP workers need."""
    path = tmp_path_factory.mktemp("owner") / "owner.sock"
    env = {
        **os.environ, "CVSERVE_MODEL_REPOSITORY": str(model_repository), "CVSERVE_MODELS": "classifier",
        "CVSERVE_DEVICE": "cpu", "CVSERVE_WARM_UP_BATCH_SIZES": "false", "CVSERVE_OWNER_SOCKET": str(path),
        "PYTHONPATH": str(ROOT),
    }  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "service.owner_app", "--socket", str(path)], cwd=ROOT, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(lambda: path.exists() or process.poll() is not None, 120, "the owner's socket")
        assert process.poll() is None
        yield env
    finally:
        process.terminate()
        process.wait(timeout=60)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _connections_per_worker(pids: list[int], port: int) -> list[int]:
    counts = collections.Counter({pid: 0 for pid in pids})
    for pid in pids:
        for connection in psutil.Process(pid).net_connections(kind="tcp"):
            if connection.status == psutil.CONN_ESTABLISHED and connection.laddr.port == port:
                counts[pid] += 1
    return sorted(counts.values(), reverse=True)


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(make_scene(41, 128, 1, 1).image).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def test_a_burst_of_connections_reaches_every_worker(owner: dict[str, str]) -> None:
    (port,) = reserved_free_ports(1)
    process = subprocess.Popen(
        [sys.executable, "-m", "service.http_workers", "--workers", "4", "--port", str(port)], cwd=ROOT, env=owner
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _ready(url) or process.poll() is not None, 120, "the HTTP workers")
        workers = psutil.Process(process.pid).children()
        assert len(workers) == 4
        wait_for(lambda: all(any(c.status == psutil.CONN_LISTEN for c in w.net_connections("tcp")) for w in workers),
                 60, "every worker listening")  # fmt: skip

        async def burst() -> list[int]:
            opened = []
            for _ in range(2):  # two bursts of 48, as two load-generator processes starting
                opened += await asyncio.gather(*(asyncio.open_connection("127.0.0.1", port) for _ in range(48)))
            await asyncio.sleep(1.0)  # every worker has accepted what the kernel gave it
            counts = _connections_per_worker([w.pid for w in workers], port)
            for _, writer in opened:
                writer.close()
            return counts

        counts = asyncio.run(burst())
        # The kernel spreads them by address (24 each on average): every worker has some, none half. uvicorn's
        # --workers, one shared socket, gave 44-59 of 128 to one of 8 workers and none to two or three.
        assert sum(counts) == 96 and min(counts) >= 1 and max(counts) <= 48, counts
        jpeg = {"content": _jpeg(), "headers": {"Content-Type": "image/jpeg"}}
        answers = [httpx.post(f"{url}/classify", timeout=30, **jpeg) for _ in range(8)]  # type: ignore[arg-type]
        assert all(a.status_code == 200 for a in answers), answers[0].text
    finally:
        process.send_signal(signal.SIGTERM)
        status = process.wait(timeout=60)
    assert status == 0
    assert not [w.pid for w in workers if psutil.pid_exists(w.pid) and w.status() != psutil.STATUS_ZOMBIE]


def test_a_port_in_use_is_refused_before_any_worker_starts(owner: dict[str, str]) -> None:
    (port,) = reserved_free_ports(1)
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # even a socket the workers could join
        taken.bind(("127.0.0.1", port))
        taken.listen()
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "service.http_workers", "--workers", "2", "--port", str(port)], cwd=ROOT,
            env=owner, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert done.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in done.stdout, done.stdout + done.stderr
    assert time.monotonic() - started < 10  # no worker was started (each takes seconds to import the app)


def test_a_worker_that_dies_is_replaced_and_a_stop_ends_them_all(
    owner: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (port,) = reserved_free_ports(1)
    for name, value in owner.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(http_workers, "START_GRACE_S", 1.0)
    stop = threading.Event()
    status: list[int] = []
    supervisor = threading.Thread(
        target=lambda: status.append(http_workers.supervise(2, "127.0.0.1", port, "warning", stop)), daemon=True
    )
    supervisor.start()
    url = f"http://127.0.0.1:{port}"
    me = psutil.Process()
    try:
        wait_for(lambda: _ready(url), 120, "the HTTP workers")
        first = {p.pid for p in me.children() if "http_workers" in " ".join(p.cmdline())}
        assert len(first) == 2
        victim = sorted(first)[0]
        os.kill(victim, signal.SIGKILL)

        def replaced() -> bool:
            now = {p.pid for p in me.children() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                   and "http_workers" in " ".join(p.cmdline())}  # fmt: skip
            return len(now) == 2 and victim not in now

        wait_for(replaced, 60, "a new worker in place of the killed one")
        wait_for(lambda: _ready(url), 60, "the workers answering")
    finally:
        stop.set()
        supervisor.join(timeout=60)
    assert status == [0]
    assert not [p for p in me.children() if "http_workers" in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE]
