"""`CVSERVE_INGRESS=haproxy` (Ray Serve's throughput mode): `python -m service` as users start it.

HAProxy on host:port sends requests straight to the gateway replica's own HTTP server, and the
gateway reaches the model replicas over gRPC. The answers, the error answers and the loopback
binding must be those of the default path (Serve's Python proxy), which the rest of the suite tests.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from PIL import Image

from support.ports import free_port, reserved_free_port
from support.process import HttpServer, start_server
from training.shapes import make_scene

ROOT = Path(__file__).resolve().parents[2]
MODELS = "classifier,detector"


def png(seed: int, size: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(make_scene(seed, size, 1, 3).image).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def haproxy_gateway(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpServer]:
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "RAY_ADDRESS": "local",  # its own Ray, not the test session's
        "CVSERVE_INGRESS": "haproxy",
        "CVSERVE_MODELS": MODELS,
        "CVSERVE_MODEL_REPOSITORY": str(model_repository),
        "CVSERVE_DEVICE": "cpu",
        "CVSERVE_PORT": str(port),
        "CVSERVE_RAY_METRICS_PORT": str(free_port()),
        "CVSERVE_HAPROXY_STATS_PORT": str(reserved_free_port()),
        "CVSERVE_HAPROXY_METRICS_PORT": str(reserved_free_port()),
    }
    server = start_server(
        "gateway-haproxy", [sys.executable, "-m", "service"], port, "/ready", tmp_path_factory.mktemp("logs"), env
    )
    try:
        yield server
    finally:
        server.stop(90)  # Serve drains ~35 s here; a SIGKILL would leave the gateway's private dir


def test_haproxy_serves_the_gateway_on_loopback(haproxy_gateway: HttpServer) -> None:
    port = haproxy_gateway.port
    listeners = [c for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    assert listeners and all(c.laddr.ip == "127.0.0.1" for c in listeners), listeners
    owner = psutil.Process(listeners[0].pid).name() if listeners[0].pid else "?"
    assert "haproxy" in owner, f"port {port} is served by {owner}, not HAProxy"


@pytest.mark.parametrize("endpoint", ["/classify", "/detect"])
def test_haproxy_path_gives_the_default_paths_answers(
    haproxy_gateway: HttpServer, embedded_gateway: str, endpoint: str
) -> None:
    files = [("files", (f"{i}.png", png(4242 + i, 200), "image/png")) for i in range(4)]
    fast = httpx.post(haproxy_gateway.url + endpoint, files=files, timeout=60)
    default = httpx.post(embedded_gateway + endpoint, files=files, timeout=60)
    assert fast.status_code == default.status_code == 200, (fast.text, default.text)
    fast_results, default_results = fast.json()["results"], default.json()["results"]
    assert len(fast_results) == 4
    if endpoint == "/classify":
        for a, b in zip(fast_results, default_results, strict=True):
            assert [p["label"] for p in a["predictions"]] == [p["label"] for p in b["predictions"]]
            assert [p["score"] for p in a["predictions"]] == pytest.approx([p["score"] for p in b["predictions"]], abs=1e-4)
    else:
        for a, b in zip(fast_results, default_results, strict=True):
            assert [d["label"] for d in a["detections"]] == [d["label"] for d in b["detections"]]
            for da, db in zip(a["detections"], b["detections"], strict=True):
                assert da["box"] == pytest.approx(db["box"], abs=0.5)


def test_haproxy_path_keeps_the_error_contract(haproxy_gateway: HttpServer) -> None:
    url = haproxy_gateway.url
    bad = httpx.post(url + "/classify", content=b"not an image", headers={"Content-Type": "image/png"}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "undecodable_image", bad.text
    wrong_type = httpx.post(url + "/classify", content=b"x", headers={"Content-Type": "text/plain"}, timeout=30)
    assert wrong_type.status_code == 415 and wrong_type.json()["error"]["code"] == "unsupported_media_type"
    disabled = httpx.post(url + "/segment", content=png(1, 64), headers={"Content-Type": "image/png"}, timeout=30)
    assert disabled.status_code == 404 and disabled.json()["error"]["code"] == "model_disabled"
    ok = httpx.post(url + "/classify", content=png(7, 64), headers={"Content-Type": "image/png"}, timeout=30)
    assert ok.status_code == 200, ok.text


def test_haproxy_ports_in_use_are_refused_up_front(haproxy_gateway: HttpServer, model_repository: Path) -> None:
    """A second gateway on the first one's HAProxy stats port exits at once with a clear message."""
    stats_port = int(psutil.Process(haproxy_gateway.process.pid).environ()["CVSERVE_HAPROXY_STATS_PORT"])
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "CVSERVE_INGRESS": "haproxy",
        "CVSERVE_MODEL_REPOSITORY": str(model_repository),
        "CVSERVE_PORT": str(free_port()),
        "CVSERVE_RAY_METRICS_PORT": str(free_port()),
        "CVSERVE_HAPROXY_STATS_PORT": str(stats_port),
    }
    done = subprocess.run(
        [sys.executable, "-m", "service"], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode != 0
    assert f"port {stats_port} is in use" in done.stderr and "CVSERVE_HAPROXY_STATS_PORT" in done.stderr, done.stderr

