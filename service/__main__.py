"""Start the gateway: `python -m service` (configure with CVSERVE_* environment variables).

Starts a local Ray (with its Prometheus metrics agent on `ray_metrics_port`), Serve's HTTP
proxy on `host:port`, deploys `build_app(settings)` and blocks until Ctrl-C.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import sys
import threading

from service.settings import Settings

log = logging.getLogger("service")

APP_NAME = "cvserve"


def port_is_free(host: str, port: int) -> bool:
    """Whether `host:port` can be bound now (Serve's proxy would otherwise retry forever)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def logical_cpus(settings: Settings) -> int:
    """Ray CPUs to declare: the machine's, or enough for every replica to be scheduled."""
    models = len(settings.models) if settings.backend == "embedded" else 0
    wanted = settings.ingress_replicas * settings.ingress_num_cpus
    wanted += models * settings.model_replicas * settings.model_num_cpus
    return max(os.cpu_count() or 1, math.ceil(wanted) + 1)


def ray_serve_environment(settings: Settings) -> dict[str, str]:
    """Environment that Ray reads for Serve's HTTP path: at import here, and in every process `ray.init` starts."""
    if settings.ingress == "proxy":
        return {}
    return {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_STATS_PORT": str(settings.haproxy_stats_port),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(settings.haproxy_metrics_port),
    }


def main() -> None:
    """Build settings from the environment, deploy, print how to call it, wait for a signal."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings()
    # Ray reads these when it is first imported, here as in every process it starts: set them before.
    os.environ.update(ray_serve_environment(settings))
    import ray
    from ray import serve

    from service.app import build_app

    try:
        app = build_app(settings)
    except FileNotFoundError as error:
        sys.exit(f"{error}\nno exported models: run `make models` (or set CVSERVE_MODEL_REPOSITORY)")
    ports = [("CVSERVE_PORT", settings.port), ("CVSERVE_RAY_METRICS_PORT", settings.ray_metrics_port)]
    if settings.ingress == "haproxy":
        ports += [
            ("CVSERVE_HAPROXY_STATS_PORT", settings.haproxy_stats_port),
            ("CVSERVE_HAPROXY_METRICS_PORT", settings.haproxy_metrics_port),
        ]
    for name, port in ports:
        if not port_is_free(settings.host if name == "CVSERVE_PORT" else "127.0.0.1", port):
            sys.exit(f"port {port} is in use (another gateway running?); free it or set {name}")
    ray.init(
        address="local",
        num_cpus=logical_cpus(settings),
        _metrics_export_port=settings.ray_metrics_port,
        include_dashboard=False,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(
            http_options={
                "host": settings.host,
                "port": settings.port,
                "request_timeout_s": settings.request_timeout_s + 5,
            }
        )
        serve.run(app, name=APP_NAME, route_prefix="/")
        url = f"http://{settings.host}:{settings.port}"
        log.info("cvserve (%s backend) is ready at %s  — API docs: %s/docs", settings.backend, url, url)
        log.info("try: curl -F file=@image.jpg '%s/classify?top_k=3'", url)
        log.info("Ray metrics for Prometheus: http://127.0.0.1:%d/metrics  — Ctrl-C stops", settings.ray_metrics_port)
        stop.wait()
    finally:
        log.info("shutting down")
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
