"""`python -m stack` (`make stack`): the docker-compose services without Docker, all on loopback.

* tritonserver on CPU serving build/triton_cpu_repository (python backend), via stack.triton;
* the gateway in Triton mode (`python -m service`, configured with CVSERVE_* variables);
* Prometheus with deploy/prometheus/prometheus.yml, only the scrape targets rewritten.

Grafana is not run (no package here); import deploy/grafana/dashboards/cvserve.json into a Grafana
pointed at the printed Prometheus URL, or use `docker compose up`. Logs go to build/stack/.
Waits until every service is ready, prints the URLs, and stops everything on Ctrl-C / SIGTERM or
as soon as one service dies.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from stack.prometheus import PrometheusServer, render_config, start_prometheus
from stack.triton import TritonServer, start_tritonserver
from support.process import HttpServer, spawn

log = logging.getLogger("stack")

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Ports:
    """Where each service listens on 127.0.0.1 (defaults as in docs/ARCHITECTURE.md)."""

    gateway: int = 8000
    ray_metrics: int = 8090
    triton_http: int = 8010
    triton_grpc: int = 8011
    triton_metrics: int = 8012
    prometheus: int = 9090
    haproxy_stats: int = 8404  # the gateway's HAProxy (ingress=haproxy, the default)
    haproxy_metrics: int = 9101
    serve_fallback: int = 8500  # Ray Serve's fallback HTTP proxy beside HAProxy (Ray's default port)

    def busy(self) -> list[str]:
        """Names and ports that something else already listens on."""
        taken = []
        for name, port in vars(self).items():
            with socket.socket() as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    taken.append(f"{name}={port}")
        return taken


@dataclass
class Gateway(HttpServer):
    """The `python -m service` subprocess (own process group, so Ray's children stop with it), ready
    once /ready answers 200 (it reached Triton and every model). stop() SIGTERMs the gateway only: it
    shuts Serve and Ray down itself."""

    label: ClassVar[str] = "gateway"
    poll_interval_s: ClassVar[float] = 0.5
    stop_timeout_s: ClassVar[float] = 15.0


def gateway_environment(ports: Ports, model_repository: Path, trace_url: str | None = None) -> dict[str, str]:
    """This environment plus the CVSERVE_* settings of the compose gateway, on loopback (tracing to
    `trace_url` when given, then over Triton's HTTP port as deploy/env.example says: its gRPC frontend
    drops some calls' trace context, `service.backends.triton.GRPC_TRACE_CONTEXT_WARNING`)."""
    tracing = {"CVSERVE_TRACING": "true", "CVSERVE_OTLP_ENDPOINT": trace_url} if trace_url else {}
    protocol, port = ("http", ports.triton_http) if trace_url else ("grpc", ports.triton_grpc)
    return {
        **os.environ,
        "CVSERVE_BACKEND": "triton",
        "CVSERVE_TRITON_URL": f"127.0.0.1:{port}",
        "CVSERVE_TRITON_PROTOCOL": protocol,
        "CVSERVE_MODEL_REPOSITORY": str(model_repository),
        "CVSERVE_HOST": "127.0.0.1",
        "CVSERVE_PORT": str(ports.gateway),
        "CVSERVE_RAY_METRICS_PORT": str(ports.ray_metrics),
        "CVSERVE_HAPROXY_STATS_PORT": str(ports.haproxy_stats),
        "CVSERVE_HAPROXY_METRICS_PORT": str(ports.haproxy_metrics),
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(ports.serve_fallback),
        **tracing,
    }


def start_gateway(ports: Ports, model_repository: Path, log_path: Path, trace_url: str | None = None) -> Gateway:
    """Start `python -m service` in Triton mode; return without waiting for readiness."""
    environment = gateway_environment(ports, model_repository, trace_url)
    process = spawn([sys.executable, "-m", "service"], log_path, cwd=ROOT, env=environment)
    return Gateway(process=process, log_path=log_path, port=ports.gateway)


def prometheus_targets(ports: Ports) -> dict[str, list[str]]:
    """The compose scrape jobs, pointed at this machine's loopback ports."""
    return {
        "gateway": [f"127.0.0.1:{ports.ray_metrics}"],
        "triton": [f"127.0.0.1:{ports.triton_metrics}"],
        "prometheus": [f"127.0.0.1:{ports.prometheus}"],
    }


def _announce(
    ports: Ports, triton: TritonServer, gateway: Gateway, prometheus: PrometheusServer, logs: Path
) -> None:
    lines = [
        "cvserve stack is ready (Ctrl-C stops everything):",
        f"  gateway      {gateway.url}   (API docs {gateway.url}/docs, demo page {gateway.url}/)",
        f"  triton       http {triton.http_url}  grpc {triton.grpc_url}  metrics {triton.metrics_url}",
        f"  ray metrics  http://127.0.0.1:{ports.ray_metrics}/metrics",
        f"  prometheus   {prometheus.url}   (config {prometheus.config_path})",
        "  grafana      not run here (no Grafana on this machine): `docker compose up grafana`, or import",
        f"               deploy/grafana/dashboards/cvserve.json into a Grafana with Prometheus at {prometheus.url}",
        f"  logs         {logs}/",
    ]
    log.info("\n".join(lines))


def run(
    ports: Ports,
    repository: Path,
    model_repository: Path,
    logs: Path,
    ready_timeout_s: float,
    trace_url: str | None = None,
) -> int:
    """Start the three services together, wait for a signal or a death, stop them all.
    With `trace_url`, tritonserver and the gateway send OpenTelemetry spans there (OTLP/HTTP)."""
    for path, hint in ((repository, "build/triton_cpu_repository"), (model_repository, "model_repository")):
        if not any(path.glob("*/config.pbtxt")):
            log.error("%s has no models: run `make models` first (it writes %s)", path, hint)
            return 2
    busy = ports.busy()
    if busy:
        log.error("ports already in use: %s (pick others with the --*-port options)", ", ".join(busy))
        return 2

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    triton: TritonServer | None = None
    gateway: Gateway | None = None
    prometheus: PrometheusServer | None = None
    try:
        log.info(
            "starting tritonserver on CPU (%s), log %s",
            repository,
            logs / "tritonserver" / "tritonserver.log",
        )
        triton = start_tritonserver(
            repository,
            ports.triton_http,
            ports.triton_grpc,
            ports.triton_metrics,
            work_dir=logs / "tritonserver",
            wait=False,
            trace_url=trace_url,
        )
        prometheus = start_prometheus(
            render_config(prometheus_targets(ports), scrape_interval="5s"),
            ports.prometheus,
            logs / "prometheus",
        )
        # The gateway starts Ray and Serve while Triton loads its models (it answers 503 until Triton
        # is ready, so it is ready only after Triton; compose waits for Triton's healthcheck instead).
        log.info("starting the gateway (Triton mode), log %s", logs / "gateway.log")
        gateway = start_gateway(ports, model_repository, logs / "gateway.log", trace_url)
        triton.wait_ready(ready_timeout_s)
        gateway.wait_ready(ready_timeout_s)
        _announce(ports, triton, gateway, prometheus, logs)
        while not stop.wait(1.0):
            for name, alive in (
                ("tritonserver", triton.running()),
                ("gateway", gateway.running()),
                ("prometheus", prometheus.running()),
            ):
                if not alive:
                    log.error("%s exited; stopping the stack (logs in %s)", name, logs)
                    return 1
        log.info("stopping the stack")
        return 0
    except (RuntimeError, TimeoutError, FileNotFoundError) as error:
        log.error("%s", error)
        return 1
    finally:
        for service in (gateway, prometheus, triton):
            if service is not None:
                service.stop()


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the stack until Ctrl-C."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    defaults = Ports()
    for name, port in vars(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}-port", type=int, default=port, dest=name)
    parser.add_argument(
        "--repository",
        type=Path,
        default=ROOT / "build" / "triton_cpu_repository",
        help="Triton's CPU model repository",
    )
    parser.add_argument(
        "--model-repository",
        type=Path,
        default=ROOT / "model_repository",
        help="the I/O contract the gateway reads",
    )
    parser.add_argument("--logs", type=Path, default=ROOT / "build" / "stack")
    parser.add_argument("--ready-timeout", type=float, default=300.0, help="seconds each service may take")
    parser.add_argument(
        "--trace-url",
        help="send OpenTelemetry traces of the gateway and tritonserver to this OTLP/HTTP URL "
        "(e.g. http://127.0.0.1:4318/v1/traces); off by default",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    ports = Ports(**{name: getattr(args, name) for name in vars(defaults)})
    return run(
        ports,
        args.repository.resolve(),
        args.model_repository.resolve(),
        args.logs.resolve(),
        args.ready_timeout,
        args.trace_url,
    )


if __name__ == "__main__":
    sys.exit(main())
