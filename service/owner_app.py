"""The Ray-free app over a model owner: many uvicorn processes, one process owning the GPU's models.

    python -m service.owner_app --workers 8                  # the owner, and 8 HTTP workers on CVSERVE_HOST:PORT
    make serve-owner WORKERS=8                               # the same

or the two halves apart (the workers find the owner at $CVSERVE_OWNER_SOCKET):

    python -m service.owner_app --socket /tmp/cvserve-owner.sock &                # the models (CVSERVE_DEVICE=cuda)
    CVSERVE_OWNER_SOCKET=/tmp/cvserve-owner.sock \
        python -m service.http_workers --workers 8 --port 8000                    # HTTP, headers, answers

The workers are uvicorn processes with a listening socket each (SO_REUSEPORT: the kernel spreads new
connections over them, where uvicorn's `--workers` lets a burst land on a few). Each worker builds the same
app as `service.app.from_environment`, with an `OwnerBackend` in place of
in-process models (service/backends/owner.py). The owner runs the models in a `LocalBackend` with the
request core's device decode (`CVSERVE_DEVICE_DECODE`, on with CUDA): workers then send JPEGs as files
and the owner decodes each batch's JPEGs on the device. With `--workers`, every worker's `/metrics`
answers for all of them (prometheus_client's multiprocess mode, PROMETHEUS_MULTIPROC_DIR); the owner's
own (batch sizes, model latency) are on `--metrics-port`. Every request passes through the owner's one
event loop: uvloop's where it is installed (`--loop`, as uvicorn's). Kept
apart from service/app.py until its `from_environment` takes `CVSERVE_BACKEND=owner`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import prometheus_client
from fastapi import FastAPI

from service.app import closing, create_api
from service.backends.owner import ModelOwner, OwnerBackend
from service.core.device_decode import device_preparers
from service.imaging.images import configure_pillow
from service.settings import Settings
from service.telemetry.metrics import Instruments

DEFAULT_SOCKET = "/tmp/cvserve-owner.sock"
log = logging.getLogger(__name__)


def from_environment() -> FastAPI:
    """The app for one uvicorn worker: `Settings()` from CVSERVE_*, the owner at $CVSERVE_OWNER_SOCKET."""
    settings = Settings()
    configure_pillow(settings.max_pixels)
    shared = os.environ.get("PROMETHEUS_MULTIPROC_DIR")  # the workers' metrics together (`--workers` sets it)
    instruments = Instruments.prometheus_multiprocess(shared) if shared else Instruments.prometheus()
    backend = OwnerBackend(os.environ.get("CVSERVE_OWNER_SOCKET", DEFAULT_SOCKET))
    return closing(create_api(settings, backend, instruments), backend)


async def serve_forever(path: Path, workers: int = 0, metrics_port: int = 0) -> int:
    """Load the models (Settings from CVSERVE_*) into a LocalBackend and answer on `path` until SIGTERM or
    SIGINT; with `workers`, also run that many uvicorn workers of this app on CVSERVE_HOST:CVSERVE_PORT,
    stopped first on the way out (and their exit stops the owner); with `metrics_port`, serve the owner's
    own Prometheus metrics (batch sizes, model latency) on CVSERVE_HOST:metrics_port. Returns the exit status."""
    from service.backends.local import LocalBackend

    settings = Settings()
    configure_pillow(settings.max_pixels)  # the owner's CPU path decodes what its device rejects
    instruments = Instruments.prometheus()
    backend = LocalBackend(settings, instruments)
    if metrics_port:
        prometheus_client.start_http_server(metrics_port, addr=settings.host, registry=instruments.registry)
        log.info("the owner's metrics: http://%s:%d/metrics", settings.host, metrics_port)
    backend.use_device_decode(device_preparers(settings))
    owner = ModelOwner(backend)
    server = await owner.serve(path)
    log.info("model owner ready on %s (device decode: %s, event loop: %s)", path,
             "on" if backend.decodes_on_device else "off", type(asyncio.get_running_loop()).__module__)  # fmt: skip
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    metrics = Path(tempfile.mkdtemp(prefix="cvserve-worker-metrics-")) if workers else None  # fresh: no stale files
    http = await _start_workers(settings, path, workers, metrics) if metrics is not None else None
    status = 0
    try:
        if http is None:
            await stop.wait()
        else:
            waiting = asyncio.ensure_future(http.wait())
            stopping = asyncio.ensure_future(stop.wait())
            await asyncio.wait((waiting, stopping), return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if waiting.done():
                status = waiting.result() or 1
                log.error("the HTTP workers exited with %s; stopping the owner", waiting.result())
            else:
                waiting.cancel()
    finally:
        if http is not None and http.returncode is None:
            http.terminate()  # uvicorn's parent stops its workers on SIGTERM
            try:
                await asyncio.wait_for(http.wait(), 30)
            except TimeoutError:
                http.kill()
                await http.wait()
        server.close()
        await owner.close_connections()
        await backend.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        if metrics is not None:
            shutil.rmtree(metrics, ignore_errors=True)
    return status


async def _start_workers(
    settings: Settings, path: Path, workers: int, metrics: Path
) -> asyncio.subprocess.Process:
    """`workers` uvicorn processes of `from_environment` on the settings' host and port, a listening socket
    each (service/http_workers.py), fed by `path`, their metrics written together into the empty directory
    `metrics`."""
    command = [
        sys.executable, "-m", "service.http_workers", "--workers", str(workers),
        "--host", settings.host, "--port", str(settings.port),
    ]  # fmt: skip
    log.info("starting %d HTTP workers on %s:%d", workers, settings.host, settings.port)
    env = {**os.environ, "CVSERVE_OWNER_SOCKET": str(path), "PROMETHEUS_MULTIPROC_DIR": str(metrics)}
    return await asyncio.create_subprocess_exec(*command, env=env)


def main(argv: list[str] | None = None) -> int:
    """python -m service.owner_app [--socket PATH] [--workers N] (models, device, host, port from CVSERVE_*)."""
    parser = argparse.ArgumentParser(
        prog="python -m service.owner_app", description="The model owner: one process with the models."
    )
    parser.add_argument("--socket", type=Path, help="the Unix socket to answer on (default: a private one "
                        "with --workers; without --workers it is needed)")  # fmt: skip
    parser.add_argument("--workers", type=int, default=0, metavar="N",
                        help="also run N HTTP workers in front (CVSERVE_HOST, CVSERVE_PORT; "
                        "service/http_workers.py)")  # fmt: skip
    parser.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto",
                        help="the owner's event loop, as uvicorn's --loop: auto is uvloop where it is "
                        "installed (every request passes through this one loop), asyncio otherwise")  # fmt: skip
    parser.add_argument("--metrics-port", type=int, default=0, metavar="PORT",
                        help="serve the owner's Prometheus metrics (batch sizes, model latency) on "
                        "CVSERVE_HOST:PORT (default: not served)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.workers < 0:
        parser.error("--workers must not be negative")
    if not 0 <= args.metrics_port <= 65535:
        parser.error("--metrics-port must be a port number (0: not served)")
    if args.socket is None and not args.workers:
        parser.error("--socket is needed without --workers (the workers started elsewhere must find it)")
    logging.basicConfig(
        stream=sys.stdout, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        loop_factory = event_loop_factory(args.loop)
    except ImportError:
        parser.error("--loop uvloop: uvloop is not installed")
    with contextlib.ExitStack() as stack:
        path = args.socket
        if path is None:  # a private directory (0700): only this user connects
            private = stack.enter_context(tempfile.TemporaryDirectory(prefix="cvserve-owner-"))
            path = Path(private) / "owner.sock"
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(serve_forever(path, args.workers, args.metrics_port))


def event_loop_factory(choice: str = "auto") -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The owner's event loop: uvloop's for "uvloop", and for "auto" where uvloop is installed (one
    core answered 10-25 % more requests/s with it: loadtests/RESULTS.md, "The model owner's own CPU");
    None (asyncio's own) for "asyncio" or without uvloop. ImportError: "uvloop" without uvloop."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise
        return None
    return uvloop.new_event_loop


if __name__ == "__main__":
    sys.exit(main())
