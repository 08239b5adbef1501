"""Run Debian's Prometheus (`apt-get install prometheus`) on deploy/prometheus/prometheus.yml without Docker.

The compose file's scrape jobs name compose hosts (`gateway:8090`, `tritonserver:8002`); here only
their `targets` are rewritten to wherever the services listen on this machine. `start_prometheus`
runs it in its own process group, logs to a file and waits until it is ready; `PrometheusServer.query`
runs an instant PromQL query.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import yaml

from support.process import ManagedProcess, ready_or_ended, spawn

log = logging.getLogger(__name__)

CONFIG_TEMPLATE = Path(__file__).resolve().parents[1] / "deploy" / "prometheus" / "prometheus.yml"


class PromQLError(RuntimeError):
    """Prometheus refused a query (bad PromQL, or an evaluation error)."""


def prometheus_binary() -> Path:
    """The `prometheus` executable, or a FileNotFoundError that says how to install it."""
    found = shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None
    )
    if found is None:
        raise FileNotFoundError(
            "prometheus not found: install it with `make system-deps` (apt-get install prometheus)"
        )
    return Path(found)


def render_config(
    targets: Mapping[str, Sequence[str]],
    *,
    template: Path = CONFIG_TEMPLATE,
    scrape_interval: str | None = None,
) -> dict[str, Any]:
    """The template's config with each named job's targets replaced; jobs not named are dropped.

    Raises ValueError for a job name the template does not have, so a renamed job cannot
    silently stop being scraped.
    """
    config = copy.deepcopy(yaml.safe_load(template.read_text()))
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    unknown = set(targets) - set(jobs)
    if unknown:
        raise ValueError(f"jobs {sorted(unknown)} are not in {template} (it has {sorted(jobs)})")
    config["scrape_configs"] = [
        {**jobs[name], "static_configs": [{"targets": list(addresses)}]}
        for name, addresses in targets.items()
    ]
    if scrape_interval is not None:
        config["global"]["scrape_interval"] = scrape_interval
        config["global"]["evaluation_interval"] = scrape_interval
    return config


@dataclass
class PrometheusAPI:
    """Prometheus's HTTP API on 127.0.0.1:`port`: readiness, instant queries, scrape targets."""

    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _get(self, path: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"{self.url}{path}", timeout=timeout_s) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def is_ready(self) -> bool:
        """Whether Prometheus answers /-/ready with 200."""
        try:
            return self._get("/-/ready", timeout_s=1.0)[0] == 200
        except OSError:  # refused / reset while starting
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Evaluate `expr` now; return the result vector (an empty list means no data)."""
        status, body = self._get(f"/api/v1/query?{urllib.parse.urlencode({'query': expr})}")
        answer = json.loads(body)
        if status != 200 or answer.get("status") != "success":
            raise PromQLError(
                f"{answer.get('errorType', status)}: {answer.get('error', body[:200])} in {expr!r}"
            )
        data = answer["data"]
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def targets(self) -> list[dict[str, Any]]:
        """Active scrape targets with their health (`up`, `down`, `unknown`)."""
        return json.loads(self._get("/api/v1/targets")[1])["data"]["activeTargets"]


@dataclass
class PrometheusServer(PrometheusAPI, ManagedProcess):
    """A running prometheus subprocess (own process group) and its API."""

    config_path: Path

    label: ClassVar[str] = "prometheus"


def start_prometheus(
    config: Mapping[str, Any],
    port: int,
    work_dir: Path | str,
    *,
    wait: bool = True,
    ready_timeout_s: float = 30.0,
) -> PrometheusServer:
    """Write `config` to `work_dir`, start Prometheus on 127.0.0.1:`port` with its data there."""
    work = Path(work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    config_path = work / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
    log_path = work / "prometheus.log"
    command = [
        str(prometheus_binary()),
        f"--config.file={config_path}",
        f"--storage.tsdb.path={work / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--storage.tsdb.retention.time=1d",
        "--log.level=warn",
    ]
    log.info("starting prometheus on 127.0.0.1:%d, log %s", port, log_path)
    process = spawn(command, log_path, cwd=work)
    server = PrometheusServer(port=port, process=process, log_path=log_path, config_path=config_path)
    return ready_or_ended(server, ready_timeout_s) if wait else server
