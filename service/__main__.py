"""Start the gateway: `python -m service` (configure with CVSERVE_* environment variables).

Starts a local Ray (with its Prometheus metrics agent on `ray_metrics_port`), Serve's HTTP
proxy on `host:port`, deploys `build_app(settings)` and blocks until Ctrl-C.
"""

from __future__ import annotations

import logging
import signal
import threading

import ray
from ray import serve

from service.app import build_app
from service.settings import Settings

log = logging.getLogger("service")

APP_NAME = "cvserve"


def main() -> None:
    """Build settings from the environment, deploy, print how to call it, wait for a signal."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings()
    app = build_app(settings)  # fails here, with "run the export", if model_repository is missing
    ray.init(address="local", _metrics_export_port=settings.ray_metrics_port, include_dashboard=False)
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
