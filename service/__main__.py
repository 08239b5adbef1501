"""Start the gateway: `python -m service` (configure with CVSERVE_* environment variables).

Starts a local Ray (with its Prometheus metrics agent on `ray_metrics_port`), Serve's HTTP
proxy on `host:port`, deploys `build_app(settings)` and blocks until Ctrl-C.

Only `host:port` is meant for clients. Ray's own servers listen on loopback (`ray_node_ip`) and
require a token that exists only in this run's private 0700 directory (docs/SECURITY.md).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import secrets
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from pydantic import ValidationError

from service.deploy import haproxy as haproxy_launcher
from service.settings import Settings, is_loopback
from service.sockets import bind_error

log = logging.getLogger("service")

APP_NAME = "cvserve"
# Seconds HAProxy (ingress=haproxy) gives a client to send its request headers.
HAPROXY_HEADER_TIMEOUT_S = 10


def logical_cpus(settings: Settings) -> int:
    """Ray CPUs to declare: the machine's, or enough for every replica to be scheduled."""
    models = len(settings.models) if settings.backend == "embedded" else 0
    if settings.model_placement == "ingress":  # the models' CPUs are reserved by each gateway replica
        wanted = settings.ingress_replicas * (settings.ingress_num_cpus + models * settings.model_num_cpus)
    else:
        wanted = settings.ingress_replicas * settings.ingress_num_cpus
        wanted += models * settings.model_replicas * settings.model_num_cpus
    return max(os.cpu_count() or 1, math.ceil(wanted) + 1)


def ray_environment(settings: Settings, private_dir: Path) -> dict[str, str]:
    """Environment Ray reads at import, here and in every process `ray.init` starts: where, how it listens."""
    environment = {
        # Every Ray RPC server (GCS, raylet, workers, agents, Serve's replica gRPC) checks this token;
        # it lives in this run's private directory rather than in ~/.ray/auth_token.
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(private_dir / "ray_auth_token"),
    }
    if ray_on_loopback(settings):
        # Ray's single-machine mode (its default on macOS and Windows): the node address is loopback, so the
        # GCS, raylet, object manager, workers, dashboard and runtime-env agents and metrics export bind it.
        environment["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    return environment | ray_serve_environment(settings, private_dir)


def ray_on_loopback(settings: Settings) -> bool:
    """Whether this run's Ray keeps its servers on loopback (the default) instead of the node's address."""
    return settings.ray_node_ip != "auto" and is_loopback(settings.ray_node_ip)


def ray_serve_environment(settings: Settings, private_dir: Path) -> dict[str, str]:
    """Environment that Ray reads for Serve's HTTP path (see `ray_environment`)."""
    if settings.ingress == "proxy":  # explicitly off, whatever the calling environment says
        return {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}
    # Ray adds a directory per node (56 hex characters) below private_dir. HAProxy takes unix socket paths
    # of at most 97 characters, so no level more: /tmp/cvserve-xxxxxxxx/<node id>/metrics.sock is 91.
    return {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        # A stopping replica keeps serving this long so HAProxy can drop it first (Ray's default: 30 s,
        # meant for remote HAProxies; here HAProxy is local and reloads in well under a second).
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_STATS_PORT": str(settings.haproxy_stats_port),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(settings.haproxy_metrics_port),
        # Config, admin socket (level admin), server state, metrics socket: private, not /tmp/haproxy-serve.
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(private_dir / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(private_dir / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(private_dir),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(private_dir / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(private_dir / "metrics.sock"),
        # HAProxy's access log: a unix socket nobody reads, unless the operator names a target. Ray's default
        # (UDP to 127.0.0.1:514) binds a UDP socket on every interface and usually reaches nobody either.
        "RAY_SERVE_HAPROXY_LOG_TARGET": os.environ.get(
            "RAY_SERVE_HAPROXY_LOG_TARGET", str(private_dir / "log.sock")
        ),
        # A client silent for longer than a whole request may take is dropped (Ray's default: 3600 s).
        "RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S": str(math.ceil(settings.request_timeout_s) + 5),
        # The launcher moves the stats and metrics ports to haproxy_monitor_host (see haproxy_launcher).
        "RAY_SERVE_HAPROXY_BINARY_PATH": str(private_dir / "haproxy-launcher"),
    }


def make_private_dir(settings: Settings) -> Path:
    """A 0700 directory for this run: Ray's token, and HAProxy's launcher, config and admin socket."""
    private_dir = Path(tempfile.mkdtemp(prefix="cvserve-"))
    _write_private(private_dir / "ray_auth_token", secrets.token_hex(32), mode=0o600)
    if settings.ingress == "haproxy":
        launcher = (
            f"{shlex.quote(sys.executable)} -I {shlex.quote(haproxy_launcher.__file__)}"
            f" --haproxy {shlex.quote(haproxy_launcher.find_haproxy())}"
            f" --monitor-host {shlex.quote(settings.haproxy_monitor_host)}"
            f" --http-request-timeout {HAPROXY_HEADER_TIMEOUT_S}"
        )
        _write_private(private_dir / "haproxy-launcher", f'#!/bin/sh\nexec {launcher} -- "$@"\n', mode=0o700)
    return private_dir


@contextlib.contextmanager
def haproxy_log_sink(settings: Settings, private_dir: Path) -> Iterator[None]:
    """Hold the unix datagram socket HAProxy logs to when no target was given; nobody reads it.

    HAProxy drops what does not fit (as with Ray's default of UDP to an unused 127.0.0.1:514) instead
    of failing on a missing socket.
    """
    target = ray_serve_environment(settings, private_dir).get("RAY_SERVE_HAPROXY_LOG_TARGET")
    if target != str(private_dir / "log.sock"):
        yield
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sink:
        sink.bind(target)
        yield


def _write_private(path: Path, text: str, mode: int) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(descriptor, "w") as file:
        file.write(text)


def main() -> None:
    """Build settings from the environment, deploy, print how to call it, wait for a signal."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings()
    except ValidationError as error:
        sys.exit(f"cvserve refuses these CVSERVE_* settings:\n{error}")
    private_dir = make_private_dir(settings)
    try:
        with haproxy_log_sink(settings, private_dir):
            serve_until_signal(settings, private_dir)
    finally:
        shutil.rmtree(private_dir, ignore_errors=True)


def serve_until_signal(settings: Settings, private_dir: Path) -> None:
    """Start Ray and Serve, deploy, log how to call it, block until SIGINT/SIGTERM, shut down."""
    # Ray reads these when it is first imported, here as in every process it starts: set them before.
    os.environ.update(ray_environment(settings, private_dir))
    import ray
    from ray import serve

    from service.deploy.serve import build_app

    try:
        app = build_app(settings)
    except FileNotFoundError as error:
        sys.exit(f"{error}\nno exported models: run `make models` (or set CVSERVE_MODEL_REPOSITORY)")
    ray_host = "127.0.0.1" if ray_on_loopback(settings) else "0.0.0.0"  # where Ray's metrics export binds
    ports = [
        ("CVSERVE_PORT", settings.host, settings.port),
        ("CVSERVE_RAY_METRICS_PORT", ray_host, settings.ray_metrics_port),
    ]
    if settings.ingress == "haproxy":
        ports += [
            ("CVSERVE_HAPROXY_STATS_PORT", settings.haproxy_monitor_host, settings.haproxy_stats_port),
            ("CVSERVE_HAPROXY_METRICS_PORT", settings.haproxy_monitor_host, settings.haproxy_metrics_port),
        ]
    for name, host, port in ports:
        if bind_error(host, port) is not None:  # Serve's proxy would otherwise retry forever
            sys.exit(f"port {port} is in use (another gateway running?); free it or set {name}")
    ray.init(
        address="local",
        num_cpus=logical_cpus(settings),
        _metrics_export_port=settings.ray_metrics_port,
        include_dashboard=False,
        _node_ip_address=None if settings.ray_node_ip == "auto" else settings.ray_node_ip,
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
        log.info(
            "Ray metrics for Prometheus: http://%s:%d/metrics  — Ctrl-C stops",
            ray_host,
            settings.ray_metrics_port,
        )
        where = "loopback" if ray_on_loopback(settings) else "this machine's network address"
        log.info("Ray's own ports listen on %s, with token authentication", where)
        if settings.ingress == "haproxy":
            log.info(
                "HAProxy stats http://%s:%d/stats, metrics http://%s:%d/metrics",
                settings.haproxy_monitor_host,
                settings.haproxy_stats_port,
                settings.haproxy_monitor_host,
                settings.haproxy_metrics_port,
            )
        stop.wait()
    finally:
        log.info("shutting down")
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
