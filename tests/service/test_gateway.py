"""What only the Serve application shows: the same contract served through Ray Serve, batching across
requests inside the gateway replica, and metrics reaching Ray's Prometheus endpoint.

The HTTP contract itself (inputs, options, errors, limits, auth, OpenAPI) is tested in process
on the same app in `tests/service/test_api_contract.py`.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from support.waiting import wait_for
from tests.service.test_api_contract import ENDPOINTS, PNG, check_result, sample


@pytest.fixture(scope="module")
def client(embedded_gateway: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=embedded_gateway, timeout=60) as session:
        yield session


@pytest.mark.parametrize("model", list(ENDPOINTS))
def test_serve_answers_like_the_in_process_app(client: httpx.Client, model: str) -> None:
    truth = sample(160, 128, seed=1, model=model)  # the image test_multipart_one_file sends in process
    response = client.post(ENDPOINTS[model], files={"file": ("a.png", truth.data, "image/png")})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["model"], body["version"], body["backend"]) == (model, "1", "embedded")
    check_result(model, body["results"][0], truth)
    assert client.get("/ready").json() == {"ready": True, "backend": "embedded"}


# ---- batching ----


def batch_sizes(model: str) -> Counter[int]:
    handle = serve.get_deployment_handle("Gateway", app_name="embedded")  # the models run inside it
    return Counter(handle.batch_sizes.remote(model).result(timeout_s=30))


def new_batches(before: Counter[int], after: Counter[int]) -> Counter[int]:
    return Counter({size: after[size] - before[size] for size in after if after[size] > before[size]})


def test_images_of_one_request_are_batched_together(client: httpx.Client) -> None:
    before = batch_sizes("segmenter")
    files = [("files", (f"{i}.png", sample(seed=i).data, "image/png")) for i in range(6)]
    assert client.post("/segment", files=files).status_code == 200
    batches = new_batches(before, batch_sizes("segmenter"))
    assert sum(size * n for size, n in batches.items()) == 6
    assert max(batches) > 1, f"6 images of one request ran in batches {dict(batches)}"


def test_concurrent_requests_are_batched(embedded_gateway: str) -> None:
    before = batch_sizes("classifier")
    data = sample().data

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=embedded_gateway, timeout=60) as session:
            calls = [session.post("/classify", content=data, headers=PNG) for _ in range(16)]
            return [r.status_code for r in await asyncio.gather(*calls)]

    assert asyncio.run(burst()) == [200] * 16
    batches = new_batches(before, batch_sizes("classifier"))
    assert sum(size * n for size, n in batches.items()) == 16
    assert max(batches) > 1, f"16 concurrent requests ran in batches {dict(batches)}"


# ---- metrics reach Ray's Prometheus endpoint ----


def test_metrics_are_exported(client: httpx.Client, ray_metrics_port: int) -> None:
    client.post("/classify", content=sample().data, headers=PNG)
    client.post("/classify?top_k=0", content=sample().data, headers=PNG)
    url = f"http://127.0.0.1:{ray_metrics_port}/metrics"
    wanted = [
        r'ray_cvserve_requests_total\{[^}]*endpoint="/classify"[^}]*status="200"',
        r'ray_cvserve_requests_total\{[^}]*endpoint="/classify"[^}]*status="422"',
        r'ray_cvserve_errors_total\{[^}]*endpoint="/classify"[^}]*kind="invalid_request"',
        r"ray_cvserve_request_latency_seconds_bucket\{",
        r"ray_cvserve_images_per_request_bucket\{",
        r"ray_cvserve_in_flight_requests\{",
        r'ray_cvserve_batch_size_bucket\{[^}]*model="classifier"',
        r'ray_cvserve_model_latency_seconds_bucket\{[^}]*backend="embedded"',
    ]

    def exported() -> bool:
        try:
            text = httpx.get(url, timeout=5).text
        except httpx.HTTPError:
            return False
        return all(re.search(pattern, text) for pattern in wanted)

    wait_for(exported, 60, f"not all of {wanted} at {url}", interval_s=1.0)


# ---- one request's header and the dashboard's series agree ----


def stage_totals(metrics_url: str, endpoint: str) -> dict[str, list[float]]:
    """stage -> [seconds, observations] of `cvserve_stage_seconds` for `endpoint`, summed over replicas."""
    totals: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(httpx.get(metrics_url, timeout=5).text):
        if family.name != "ray_cvserve_stage_seconds":
            continue
        for series in family.samples:
            kind = series.name.removeprefix(family.name)
            if kind in ("_sum", "_count") and series.labels.get("endpoint") == endpoint:
                totals.setdefault(series.labels["stage"], [0.0, 0.0])[kind == "_count"] += series.value
    return totals


def settled_stage_totals(metrics_url: str, endpoint: str) -> dict[str, list[float]]:
    """`stage_totals` once two reads a few of Ray's report intervals (2 s in the suite) apart agree."""
    last = stage_totals(metrics_url, endpoint)
    for _ in range(10):
        time.sleep(5)
        now = stage_totals(metrics_url, endpoint)
        if now == last:
            return now
        last = now
    raise AssertionError(f"{endpoint}'s stage histograms kept changing: {last}")


def test_server_timing_and_the_stage_histograms_agree(client: httpx.Client, ray_metrics_port: int) -> None:
    """The dashboard's "where a request's time goes" reads `cvserve_stage_seconds`: over a few requests,
    its sums grow by what their Server-Timing headers said (Ray exports sums from bucket midpoints)."""
    from tests.service.telemetry.test_stage_timings import parse

    url = f"http://127.0.0.1:{ray_metrics_port}/metrics"
    before = settled_stage_totals(url, "/segment")  # earlier tests' requests exported, none pending
    said: dict[str, float] = {}
    requests = 8
    for seed in range(requests):
        response = client.post("/segment", content=sample(seed=seed, model="segmenter").data, headers=PNG)
        assert response.status_code == 200
        durations, _ = parse(response.headers["server-timing"])
        for stage, ms in durations.items():
            if stage != "total":
                said[stage] = said.get(stage, 0.0) + ms / 1000

    def grown() -> dict[str, list[float]] | None:
        now = stage_totals(url, "/segment")
        counted = now.get("model", [0.0, 0.0])[1] - before.get("model", [0.0, 0.0])[1]
        return now if counted >= requests else None

    after = wait_for(grown, 60, "the stage histograms to count the requests", interval_s=1.0)
    assert set(said) <= set(after), (said, after)
    for stage, seconds in said.items():
        recorded = after[stage][0] - before.get(stage, [0.0, 0.0])[0]
        assert after[stage][1] - before.get(stage, [0.0, 0.0])[1] == requests, stage
        assert recorded == pytest.approx(seconds, rel=0.25, abs=0.002 * requests), (stage, recorded, seconds)
