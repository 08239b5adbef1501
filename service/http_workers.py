"""The owner app's HTTP side: N uvicorn processes, each listening on a socket of its own (SO_REUSEPORT).

    python -m service.http_workers --workers 8 --host 0.0.0.0 --port 8000   # service.owner_app:from_environment

uvicorn's `--workers` shares one listening socket: each new connection wakes every idle worker, and the
first to run accepts all that are queued. A burst of connections (a load balancer filling its pool, a load
generator starting) then lands on a few workers while others get none: with 8 workers and 128 connections
opened in 4 bursts, the busiest had 44-59 and two or three had none (measured here, 2026-12-05). With a
socket each and SO_REUSEPORT, the kernel spreads connections over the workers by their addresses: 19-23 on
the busiest of the 8, none idle, in the same test. Linux only: elsewhere this runs uvicorn's `--workers`.

Before starting them, the parent binds the port once without SO_REUSEPORT, so a port anything else holds
(another cvserve's workers included, which would otherwise share its connections) is an error at once.
It then watches them: a worker that exits is started again, unless it exits within START_GRACE_S of its
start (it cannot import or bind: a crash loop), and then every worker stops and the parent exits with that
status. SIGTERM or SIGINT stops them all (SIGTERM; SIGKILL after STOP_TIMEOUT_S) and the parent exits 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from service.sockets import bind_error, listening_socket

log = logging.getLogger("service.http_workers")

APP = "service.owner_app:from_environment"
START_GRACE_S = 30.0
STOP_TIMEOUT_S = 30.0


def serve_one(host: str, port: int, log_level: str) -> int:
    """One worker: the app on a SO_REUSEPORT socket of its own, until SIGTERM or SIGINT (uvicorn's)."""
    import uvicorn

    try:
        sock = listening_socket(host, port, reuse_port=True)
    except OSError as error:
        log.error("HTTP worker: cannot listen on %s:%d: %s", host, port, error.strerror or error)
        return 1
    config = uvicorn.Config(APP, factory=True, host=host, port=port, access_log=False, log_level=log_level)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def supervise(workers: int, host: str, port: int, log_level: str, stop: threading.Event | None = None) -> int:
    """Start `workers` workers and keep them running until `stop` is set (by default: SIGTERM or SIGINT);
    the exit status."""
    error = bind_error(host, port)
    if error is not None:
        log.error("cannot listen on %s:%d: %s", host, port, error.strerror or error)
        return 1
    if stop is None:
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())  # type: ignore[union-attr]
    command = [sys.executable, "-m", "service.http_workers", "--one", "--host", host, "--port", str(port),
               "--log-level", log_level]  # fmt: skip

    def start() -> tuple[subprocess.Popen[bytes], float]:
        return subprocess.Popen(command), time.monotonic()

    running = [start() for _ in range(workers)]
    log.info("%d HTTP workers on %s:%d, a listening socket each (SO_REUSEPORT)", workers, host, port)
    status = 0
    while not stop.is_set():
        for index, (process, started) in enumerate(running):
            code = process.poll()
            if code is None:
                continue
            if time.monotonic() - started < START_GRACE_S:
                log.error("HTTP worker %d exited with %s within %.0f s of its start: stopping them all",
                          process.pid, code, START_GRACE_S)  # fmt: skip
                status = code or 1
                stop.set()
                break
            log.warning("HTTP worker %d exited with %s: starting another", process.pid, code)
            running[index] = start()
        stop.wait(0.2)
    for process, _ in running:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for process, _ in running:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return status


def uvicorn_workers(workers: int, host: str, port: int, log_level: str) -> int:
    """Without SO_REUSEPORT: this process becomes uvicorn's own `--workers` (one shared socket)."""
    command = [sys.executable, "-m", "uvicorn", "--factory", APP, "--host", host, "--port", str(port),
               "--workers", str(workers), "--no-access-log", "--log-level", log_level]  # fmt: skip
    os.execv(sys.executable, command)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m service.http_workers",
        description=f"N uvicorn processes of {APP}, a SO_REUSEPORT socket each (models from the owner at "
        "$CVSERVE_OWNER_SOCKET, settings from CVSERVE_*)",
    )
    parser.add_argument("--workers", type=int, default=1, metavar="N", help="HTTP processes (default: 1)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                        help="uvicorn's log level (default: %(default)s)")  # fmt: skip
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a worker, started by the parent
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if not 1 <= args.port <= 65535:
        parser.error("--port must be a port number (each worker binds it: an OS-picked port 0 cannot be shared)")
    logging.basicConfig(
        stream=sys.stdout, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.one:
        return serve_one(args.host, args.port, args.log_level)
    if not hasattr(socket, "SO_REUSEPORT") or not sys.platform.startswith("linux"):
        return uvicorn_workers(args.workers, args.host, args.port, args.log_level)
    return supervise(args.workers, args.host, args.port, args.log_level)


if __name__ == "__main__":
    sys.exit(main())
