"""Every PromQL query of the Grafana dashboard, run against the real Prometheus after traffic.

Each query must parse, and return at least one real number once the gateway and Triton have
served requests. nv_gpu_* only exists where Triton sees a GPU: on CPU machines those queries are
checked for validity only, and the test says so (skip with reason) rather than pretending.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image
from websockets.sync.client import connect

from stack.prometheus import PrometheusServer
from stack.triton import TritonServer
from support.waiting import wait_for
from support.seeds import fresh_seeds
from support.versions import CLASSIFIER, one_version_repository, swap_classes, write_version
from tests.conftest import Deploy, delete_app
from tests.ops.conftest import has_finite_value, png_image, scalar, triton_infer
from training.shapes import make_scene
from tests.video.clips import encode_video, jpeg, moving_shapes

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards" / "cvserve.json"

# Grafana's built-in variables, replaced as Grafana would for a 1 s scrape interval.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "5s", "$__range": "5m"}

REQUIRED_METRICS = {
    "ray_cvserve_requests_total",
    "ray_cvserve_request_latency_seconds_bucket",
    "ray_cvserve_errors_total",
    "ray_cvserve_batch_size_sum",
    "ray_cvserve_model_latency_seconds_bucket",
    "ray_cvserve_images_per_request_sum",
    "ray_cvserve_in_flight_requests",
    "ray_cvserve_stage_seconds_sum",
    "ray_cvserve_streams_open",
    "ray_cvserve_stream_frames_total",
    "ray_cvserve_stream_dropped_frames_total",
    "ray_cvserve_video_frames_total",
    "ray_cvserve_candidate_agreement_total",
    "ray_cvserve_candidate_images_total",
    "ray_cvserve_candidate_requests_total",
    "ray_cvserve_model_version",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_count",
    "nv_gpu_utilization",
}


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(panel title, refId, PromQL with Grafana variables substituted) for every panel target."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        assert panel.get("targets"), f"panel {panel['title']!r} has no queries"
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            queries.append((panel["title"], target["refId"], expr))
    return queries


QUERIES = dashboard_queries()


def panels_from(source: str) -> pytest.MarkDecorator:
    """Parametrise a test over the dashboard's queries whose series come from `source`."""
    chosen = [q for q in QUERIES if source_of(q[2]) == source]
    return pytest.mark.parametrize(("title", "ref", "expr"), chosen, ids=[f"{t}/{r}" for t, r, _ in chosen])


def wait_for_panel_data(prometheus: PrometheusServer, title: str, ref: str, expr: str, timeout_s: float) -> None:
    """Poll until `expr` returns a finite value in Prometheus (TimeoutError naming the panel if not)."""
    wait_for(lambda: has_finite_value(prometheus.query(expr)), timeout_s, lambda: f"{title}/{ref}: no data for {expr}")


def source_of(expr: str) -> str:
    """Which server's metrics a query reads: 'gpu' (Triton on GPU only), 'triton', 'candidate' (a gateway
    with a candidate version: the lifecycle panels) or 'gateway'."""
    if "nv_gpu_" in expr:
        return "gpu"
    if "cvserve_candidate_" in expr or "cvserve_model_version" in expr:
        return "candidate"
    return "triton" if "nv_" in expr else "gateway"


def test_dashboard_covers_the_issue_metrics() -> None:
    used = {name for _, _, expr in QUERIES for name in re.findall(r"[a-z_]+", expr)}
    assert REQUIRED_METRICS <= used, f"dashboard lacks {REQUIRED_METRICS - used}"


def test_no_unsubstituted_variables() -> None:
    assert [expr for _, _, expr in QUERIES if "$" in expr] == []


@pytest.fixture(scope="module")
def triton_traffic(prometheus: PrometheusServer, tiny_triton: TritonServer) -> None:
    """Inferences on Triton's echo model, visible in Prometheus as a rate.

    Triton creates a model's series at its first inference, and rate() cannot see the jump from
    nothing to the first value: so warm up, wait for the series, then send the traffic proper.
    """
    query = 'sum(nv_inference_count{model="echo"})'
    triton_infer(tiny_triton, "echo", 1)
    first = wait_for(lambda: scalar(prometheus, query), 30, "Triton's echo counts never reached Prometheus")
    triton_infer(tiny_triton, "echo", 20)
    wait_for(
        lambda: (scalar(prometheus, query) or 0) >= first + 20,
        30,
        "Triton's traffic never reached Prometheus",
    )


@panels_from("triton")
def test_triton_panel_returns_data(
    prometheus: PrometheusServer, triton_traffic: None, title: str, ref: str, expr: str
) -> None:
    wait_for_panel_data(prometheus, title, ref, expr, 30)


@panels_from("gpu")
def test_gpu_panel_is_valid_promql(
    prometheus: PrometheusServer, triton_traffic: None, title: str, ref: str, expr: str
) -> None:
    result = prometheus.query(expr)  # raises PromQLError if the query does not parse
    if not prometheus.query("count(nv_gpu_utilization)"):
        pytest.skip(
            f"{title}: query is valid PromQL; nv_gpu_utilization exists only when Triton runs on a GPU"
        )
    assert has_finite_value(result), f"{title}/{ref}: Triton exports GPU metrics but {expr} has no data"


ENDPOINTS = ("/classify", "/detect", "/segment")
BAD_REQUESTS = {"bad_request": (b"not an image", "image/png"), "unsupported_media": (b"x", "text/plain")}


def _gateway_round(url: str, images: int, errors: int) -> None:
    """`images` good requests per endpoint (one with two images) and `errors` of each error kind."""
    image = png_image()
    for endpoint in ENDPOINTS:
        statuses = [
            httpx.post(
                f"{url}{endpoint}", content=image, headers={"content-type": "image/png"}, timeout=120
            ).status_code
            for _ in range(images)
        ]
        statuses.append(
            httpx.post(
                f"{url}{endpoint}", files=[("files", image), ("files", image)], timeout=120
            ).status_code
        )
        assert statuses == [200] * (images + 1), f"{endpoint}: {statuses}"
    for body, media in BAD_REQUESTS.values():
        for _ in range(errors):
            assert httpx.post(
                f"{url}/classify", content=body, headers={"content-type": media}
            ).status_code in (400, 415)


def _video_round(url: str, frames: int) -> None:
    """One WebSocket stream flooded with `frames` frames (most are dropped as stale), and one video upload."""
    images = [jpeg(frame) for frame in moving_shapes(10, width=640, height=480).frames]
    with connect("ws://" + url.removeprefix("http://") + "/stream/detect", open_timeout=30, max_size=None) as ws:
        assert json.loads(ws.recv(30))["type"] == "ready"
        for index in range(frames):  # far faster than the model answers
            ws.send(images[index % len(images)])
        answer = json.loads(ws.recv(30))
        while answer["frame"] != frames - 1:
            answer = json.loads(ws.recv(30))
    assert answer["stats"]["dropped_stale"] > 0, answer["stats"]
    video = encode_video(moving_shapes(6).frames, "webm")
    response = httpx.post(f"{url}/detect", content=video, headers={"content-type": "video/webm"}, timeout=120)
    assert response.status_code == 200, response.text


@pytest.fixture(scope="module")
def gateway_traffic(prometheus: PrometheusServer, embedded_gateway: str) -> None:
    """Good and bad requests on every endpoint, visible in Prometheus as rates.

    Ray creates a series at its first sample and rate() cannot see that first jump: warm up, wait
    until Prometheus has every series, then send the traffic proper and wait until it arrives.
    """
    totals = {
        **{e: f'sum(ray_cvserve_requests_total{{endpoint="{e}", status="200"}})' for e in ENDPOINTS},
        **{k: f'sum(ray_cvserve_errors_total{{endpoint="/classify", kind="{k}"}})' for k in BAD_REQUESTS},
        **{
            name: f'sum(ray_cvserve_{name}_total{{endpoint="/detect"}})'
            for name in ("stream_frames", "stream_dropped_frames", "video_frames")
        },
    }
    _gateway_round(embedded_gateway, images=1, errors=1)
    _video_round(embedded_gateway, frames=60)
    first = {
        name: wait_for(lambda q=query: scalar(prometheus, q), 60, f"{query} never reached Prometheus")
        for name, query in totals.items()
    }
    _gateway_round(embedded_gateway, images=3, errors=2)
    _video_round(embedded_gateway, frames=60)
    for name, query in totals.items():
        wait_for(lambda q=query, n=name: (scalar(prometheus, q) or 0) > first[n], 60, f"{query} did not grow")


@panels_from("gateway")
def test_gateway_panel_returns_data(
    prometheus: PrometheusServer, gateway_traffic: None, title: str, ref: str, expr: str
) -> None:
    wait_for_panel_data(prometheus, title, ref, expr, 60)


def _candidate_round(url: str, images: int) -> None:
    """`images` one-shape scenes classified (each compared with the shadow candidate after its answer)."""
    for seed in fresh_seeds(images, offset=700):
        buffer = io.BytesIO()
        Image.fromarray(make_scene(seed, 96, 1, 1).image).save(buffer, "PNG")
        response = httpx.post(f"{url}/classify", content=buffer.getvalue(), headers={"content-type": "image/png"}, timeout=120)
        assert response.status_code == 200 and response.json()["version"] == "2", response.text


@pytest.fixture(scope="module")
def candidate_traffic(
    prometheus: PrometheusServer, deploy: Deploy, model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A gateway under Serve serving the classifier's version 2 (classes 0 and 1 swapped, support/versions.py)
    with version 1 as its shadow candidate, after traffic that Prometheus has seen as rates."""
    from service.deploy.serve import build_app
    from service.settings import Settings

    folder = tmp_path_factory.mktemp("lifecycle")
    repository = one_version_repository(model_repository, folder / "repository")
    write_version(repository, CLASSIFIER, "2", swap_classes(model_repository / CLASSIFIER / "1" / "model.pt", folder / "v2.pt"))
    settings = Settings(
        model_repository=repository, models=(CLASSIFIER,), device="cpu", runtime="torchscript", torch_threads=1,
        shadow_max_pending=64, shadow_max_utilisation=1.0,
    )  # fmt: skip
    url = deploy(build_app(settings), "lifecycle", "/lifecycle")  # loopback, no admin key: /admin is open
    candidate = httpx.put(
        f"{url}/admin/repository/models/{CLASSIFIER}/candidate",
        json={"version": "1", "mode": "shadow", "share": 1.0},
        timeout=120,
    )
    assert candidate.status_code == 200, candidate.text
    totals = {
        measure: f'sum(ray_cvserve_candidate_images_total{{model="{CLASSIFIER}", measure="{measure}"}})'
        for measure in ("top1_agreement", "score_drift")
    }
    _candidate_round(url, 10)
    first = {m: wait_for(lambda q=q: scalar(prometheus, q), 60, f"{q} never reached Prometheus") for m, q in totals.items()}
    _candidate_round(url, 20)
    for measure, query in totals.items():
        wait_for(lambda q=query, m=measure: (scalar(prometheus, q) or 0) > first[m], 60, f"{query} did not grow")
    yield url
    delete_app("lifecycle")


@panels_from("candidate")
def test_lifecycle_panel_returns_data(
    prometheus: PrometheusServer, candidate_traffic: str, title: str, ref: str, expr: str
) -> None:
    wait_for_panel_data(prometheus, title, ref, expr, 60)


def test_the_agreement_series_show_the_candidate_differs(prometheus: PrometheusServer, candidate_traffic: str) -> None:
    """Version 1 agrees with version 2 on the images of the three unswapped classes only: the series the
    agreement panel graphs give a mean top-1 agreement below 1, the one the gateway's own summary counted.
    (Over all the traffic: the panel's 1-minute rate window may hold only part of it.)"""

    def compared() -> dict | None:  # the last comparisons may still run (after their answers, at low priority)
        answer = httpx.get(f"{candidate_traffic}/admin/candidate/summary", timeout=30).json()["models"][0]
        return answer["comparison"] if answer["comparison"]["compared_images"] >= 30 else None

    summary = wait_for(compared, 60, "30 comparisons never finished")
    assert 0 < summary["mean"]["top1_agreement"] < 1, summary
    selector = f'{{model="{CLASSIFIER}", measure="top1_agreement"}}'
    images = f"sum(ray_cvserve_candidate_images_total{selector})"
    wait_for(lambda: (scalar(prometheus, images) or 0) >= summary["compared_images"], 60, f"{images} never caught up")
    mean = scalar(prometheus, f"sum(ray_cvserve_candidate_agreement_total{selector}) / {images}")
    assert mean is not None and mean == pytest.approx(summary["mean"]["top1_agreement"]), (mean, summary)
