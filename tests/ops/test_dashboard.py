"""Every PromQL query of the Grafana dashboard, run against the real Prometheus after traffic.

Each query must parse, and return at least one real number once the gateway and Triton have
served requests. nv_gpu_* only exists where Triton sees a GPU: on CPU machines those queries are
checked for validity only, and the test says so (skip with reason) rather than pretending.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from stack.prometheus import PrometheusServer
from stack.triton import TritonServer
from tests.ops.conftest import has_finite_value, scalar, triton_infer, wait_for

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


def source_of(expr: str) -> str:
    """Which server's metrics a query reads: 'gpu' (Triton on GPU only), 'triton' or 'gateway'."""
    if "nv_gpu_" in expr:
        return "gpu"
    return "triton" if "nv_" in expr else "gateway"


def test_dashboard_covers_the_issue_metrics() -> None:
    used = {name for _, _, expr in QUERIES for name in re.findall(r"[a-z_]+", expr)}
    assert REQUIRED_METRICS <= used, f"dashboard lacks {REQUIRED_METRICS - used}"


def test_no_unsubstituted_variables() -> None:
    assert [expr for _, _, expr in QUERIES if "$" in expr] == []


@pytest.fixture(scope="module")
def triton_traffic(prometheus: PrometheusServer, ops_triton: TritonServer) -> None:
    """Inferences on Triton's echo model, visible in Prometheus as a rate.

    Triton creates a model's series at its first inference, and rate() cannot see the jump from
    nothing to the first value: so warm up, wait for the series, then send the traffic proper.
    """
    query = 'sum(nv_inference_count{model="echo"})'
    triton_infer(ops_triton, "echo", 1)
    first = wait_for(lambda: scalar(prometheus, query), 30, "Triton's echo counts never reached Prometheus")
    triton_infer(ops_triton, "echo", 20)
    wait_for(lambda: (scalar(prometheus, query) or 0) >= first + 20, 30, "Triton's traffic never reached Prometheus")


@pytest.mark.parametrize(("title", "ref", "expr"), [q for q in QUERIES if source_of(q[2]) == "triton"],
                         ids=[f"{t}/{r}" for t, r, e in QUERIES if source_of(e) == "triton"])
def test_triton_panel_returns_data(prometheus: PrometheusServer, triton_traffic: None, title: str, ref: str,
                                   expr: str) -> None:
    wait_for(lambda: has_finite_value(prometheus.query(expr)), 30, lambda: f"{title}/{ref}: no data for {expr}")


@pytest.mark.parametrize(("title", "ref", "expr"), [q for q in QUERIES if source_of(q[2]) == "gpu"],
                         ids=[f"{t}/{r}" for t, r, e in QUERIES if source_of(e) == "gpu"])
def test_gpu_panel_is_valid_promql(prometheus: PrometheusServer, triton_traffic: None, title: str, ref: str,
                                   expr: str) -> None:
    result = prometheus.query(expr)  # raises PromQLError if the query does not parse
    if not prometheus.query("count(nv_gpu_utilization)"):
        pytest.skip(f"{title}: query is valid PromQL; nv_gpu_utilization exists only when Triton runs on a GPU")
    assert has_finite_value(result), f"{title}/{ref}: Triton exports GPU metrics but {expr} has no data"
