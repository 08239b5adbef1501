"""A real Prometheus scraping real servers: counts that add up, and PromQL errors that surface."""

from __future__ import annotations

import pytest

from stack.prometheus import PrometheusServer, PromQLError, render_config
from stack.triton import TritonServer
from support.waiting import wait_for
from tests.ops.conftest import scalar, triton_infer


def test_every_scrape_target_is_up(prometheus: PrometheusServer, ray_session: None) -> None:
    def all_up() -> bool:
        targets = prometheus.targets()
        return {t["scrapePool"] for t in targets} == {"gateway", "triton", "prometheus"} and all(
            t["health"] == "up" for t in targets
        )

    wait_for(
        all_up,
        60,
        lambda: f"targets: {[(t['scrapePool'], t['health'], t['lastError']) for t in prometheus.targets()]}",
    )


def test_triton_inference_count_adds_up(prometheus: PrometheusServer, tiny_triton: TritonServer) -> None:
    query = 'sum(nv_inference_request_success{model="echo"})'
    before = wait_for(lambda: prometheus.query(query), 30, "Triton's echo counters never reached Prometheus")
    baseline = float(before[0]["value"][1])
    triton_infer(tiny_triton, "echo", 7)
    wait_for(
        lambda: scalar(prometheus, query) == baseline + 7,
        30,
        lambda: f"{query} = {scalar(prometheus, query)}, expected {baseline + 7}",
    )


def test_invalid_promql_is_an_error_not_empty_data(prometheus: PrometheusServer) -> None:
    with pytest.raises(PromQLError, match="parse"):
        prometheus.query("sum by (endpoint (rate(x[1m]))")


def test_render_config_rejects_unknown_jobs() -> None:
    with pytest.raises(ValueError, match="gatway"):
        render_config({"gatway": ["127.0.0.1:1"]})


def test_render_config_keeps_jobs_and_rewrites_only_targets() -> None:
    config = render_config(
        {"gateway": ["127.0.0.1:18090"], "triton": ["127.0.0.1:18012"]}, scrape_interval="1s"
    )
    assert [job["job_name"] for job in config["scrape_configs"]] == ["gateway", "triton"]
    assert config["scrape_configs"][0]["static_configs"] == [{"targets": ["127.0.0.1:18090"]}]
    assert config["global"]["scrape_interval"] == "1s"
