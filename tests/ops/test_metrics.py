"""The gateway's metrics, through Ray's metrics agent and a real Prometheus, add up to the truth.

The gateway under test has two ingress and two model replicas, so every count is the sum of
several processes' series. Ray's agent exports every `metrics_report_interval_ms` (10 s by
default), so the tests poll until Prometheus has settled instead of sleeping a fixed time.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import ray

from stack.prometheus import PrometheusServer
from support.waiting import wait_for
from tests.ops.conftest import SCRAPE_INTERVAL_S, png_image, scalar

N_REQUESTS = 16
CLASSIFY_OK = 'sum(ray_cvserve_requests_total{endpoint="/classify", status="200"})'


def settled(prometheus: PrometheusServer, *exprs: str, timeout_s: float = 90.0) -> list[float]:
    """The values of `exprs` once none has changed for one Ray report interval plus two scrapes."""
    quiet_s = ray._raylet.Config.metrics_report_interval_ms() / 1000 + 2 * SCRAPE_INTERVAL_S
    values, since = [scalar(prometheus, e) for e in exprs], time.monotonic()

    def quiet() -> list[float] | None:
        nonlocal values, since
        now = [scalar(prometheus, e) for e in exprs]
        if now != values:
            values, since = now, time.monotonic()
            return None
        return [value or 0.0 for value in values] if time.monotonic() - since >= quiet_s else None

    return wait_for(quiet, timeout_s, lambda: f"{exprs} kept changing (last {values})", interval_s=0.5)


def send(url: str, count: int, concurrency: int = 8) -> list[int]:
    """POST `count` PNGs to `url` from `concurrency` threads; return the status codes."""
    image = png_image()

    def one(_: int) -> int:
        return httpx.post(url, content=image, headers={"content-type": "image/png"}, timeout=120).status_code

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, range(count)))


def test_request_counter_adds_up_across_replicas(
    prometheus: PrometheusServer, replicated_gateway: str
) -> None:
    [baseline] = settled(prometheus, CLASSIFY_OK)
    statuses = send(f"{replicated_gateway}/classify", N_REQUESTS)
    assert statuses == [200] * N_REQUESTS

    wait_for(
        lambda: scalar(prometheus, CLASSIFY_OK) == baseline + N_REQUESTS,
        60,
        lambda: f"{CLASSIFY_OK} = {scalar(prometheus, CLASSIFY_OK)}, expected {baseline + N_REQUESTS}",
    )
    assert settled(prometheus, CLASSIFY_OK) == [baseline + N_REQUESTS]  # and no late extra counts

    replicas = prometheus.query('count(sum by (WorkerId) (ray_cvserve_requests_total{endpoint="/classify"}))')
    assert float(replicas[0]["value"][1]) >= 2, "only one ingress replica reported: the sum proved nothing"


def test_model_batches_are_counted_across_model_replicas(
    prometheus: PrometheusServer, replicated_gateway: str
) -> None:
    batches = 'sum(ray_cvserve_batch_size_count{model="classifier"})'
    latencies = 'sum(ray_cvserve_model_latency_seconds_count{model="classifier", backend="embedded"})'
    before = settled(prometheus, batches, latencies)
    assert send(f"{replicated_gateway}/classify", N_REQUESTS) == [200] * N_REQUESTS
    added_batches, added_latencies = (a - b for a, b in zip(settled(prometheus, batches, latencies), before))
    # every image is in exactly one batch of at most max_batch_size (8) images, timed once
    assert N_REQUESTS / 8 <= added_batches <= N_REQUESTS
    assert added_latencies == added_batches
    replicas = prometheus.query('count(sum by (WorkerId) (ray_cvserve_batch_size_count{model="classifier"}))')
    assert float(replicas[0]["value"][1]) >= 2, "only one model replica reported: the sum proved nothing"


@pytest.mark.parametrize(
    ("kind", "body", "media_type"),
    [("bad_request", b"not an image", "image/png"), ("unsupported_media", b"x", "text/plain")],
)
def test_errors_are_counted_by_kind(
    prometheus: PrometheusServer, replicated_gateway: str, kind: str, body: bytes, media_type: str
) -> None:
    query = f'sum(ray_cvserve_errors_total{{endpoint="/classify", kind="{kind}"}})'
    [before] = settled(prometheus, query)
    response = httpx.post(
        f"{replicated_gateway}/classify", content=body, headers={"content-type": media_type}
    )
    assert 400 <= response.status_code < 500
    wait_for(lambda: scalar(prometheus, query) == before + 1, 60, f"{query} never counted the {kind} error")
