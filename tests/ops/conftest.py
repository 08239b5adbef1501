"""Session fixtures for the ops tests: a real Prometheus (Debian's `prometheus`) scraping the test
session's Ray metrics port (tests/conftest.py) and a real tritonserver (tiny python-backend model),
plus a gateway with two ingress and two model replicas so counts must add up across processes."""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton_http
from PIL import Image

from stack.prometheus import (
    PrometheusAPI,
    PrometheusServer,
    prometheus_binary,
    render_config,
    start_prometheus,
)
from stack.triton import TritonServer
from support.ports import free_port
from tests.conftest import Deploy, delete_app
from tests.triton.tiny_models import IMAGE_DIMS

SCRAPE_INTERVAL_S = 1


def scalar(prometheus: PrometheusAPI, expr: str) -> float | None:
    """The value of a query that yields at most one series (None when it has no data)."""
    result = prometheus.query(expr)
    assert len(result) <= 1, f"{expr} returned {len(result)} series"
    return float(result[0]["value"][1]) if result else None


def has_finite_value(result: list[dict]) -> bool:
    """Whether a query result holds at least one sample that is a real number (not NaN/Inf)."""
    return any(math.isfinite(float(series["value"][1])) for series in result)


def triton_infer(server: TritonServer, model: str, count: int) -> None:
    """Send `count` one-image requests to `model` over HTTP."""
    with triton_http.InferenceServerClient(server.http_url) as client:
        for i in range(count):
            image = triton_http.InferInput("IMAGE", [1, *IMAGE_DIMS], "UINT8")
            image.set_data_from_numpy(np.full((1, *IMAGE_DIMS), i % 256, dtype=np.uint8))
            client.infer(model, [image])


@pytest.fixture(scope="package")
def prometheus(
    tiny_triton: TritonServer, ray_metrics_port: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PrometheusServer]:
    """Prometheus with the compose scrape jobs, targets pointed at this session's servers."""
    prometheus_binary()  # a clear "install it with make system-deps" if missing
    port = free_port()
    config = render_config(
        {
            "gateway": [f"127.0.0.1:{ray_metrics_port}"],
            "triton": [f"127.0.0.1:{tiny_triton.metrics_port}"],
            "prometheus": [f"127.0.0.1:{port}"],
        },
        scrape_interval=f"{SCRAPE_INTERVAL_S}s",
    )
    server = start_prometheus(config, port, tmp_path_factory.mktemp("prometheus"))
    yield server
    server.stop()


def png_image(seed: int = 0, size: tuple[int, int] = (96, 120)) -> bytes:
    """A small random RGB PNG."""
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="package")
def replicated_gateway(deploy: Deploy, model_repository: Path) -> Iterator[str]:
    """Base URL of an embedded-backend gateway serving the classifier with 2 ingress and 2 model replicas."""
    from service.deploy.serve import build_app
    from service.settings import Settings

    settings = Settings(
        model_repository=model_repository,
        models=("classifier",),
        device="cpu",
        ingress_replicas=2,
        model_replicas=2,
        max_batch_size=8,
        batch_wait_timeout_s=0.05,
        torch_threads=1,
    )
    yield deploy(build_app(settings), "ops", "/ops")
    delete_app("ops")
