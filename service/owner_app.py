"""The Ray-free app over a model owner: many uvicorn processes, one process owning the GPU's models.

    python -m service.owner_app --socket /tmp/cvserve-owner.sock &                # the models (CVSERVE_DEVICE=cuda)
    CVSERVE_OWNER_SOCKET=/tmp/cvserve-owner.sock \\
        uvicorn --factory service.owner_app:from_environment --workers 8          # HTTP, headers, answers

Each worker builds the same app as `service.app.from_environment`, with an `OwnerBackend` in place of
in-process models (service/backends/owner.py). The owner runs the models in a `LocalBackend` with the
request core's device decode (`CVSERVE_DEVICE_DECODE`, on with CUDA): workers then send JPEGs as files
and the owner decodes each batch's JPEGs on the device. Kept apart from service/app.py until its
`from_environment` takes `CVSERVE_BACKEND=owner`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

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
    instruments = Instruments.prometheus()
    backend = OwnerBackend(os.environ.get("CVSERVE_OWNER_SOCKET", DEFAULT_SOCKET))
    return closing(create_api(settings, backend, instruments), backend)


async def serve_forever(path: Path) -> None:
    """Load the models (Settings from CVSERVE_*) into a LocalBackend and answer on `path` until SIGTERM."""
    from service.backends.local import LocalBackend

    settings = Settings()
    configure_pillow(settings.max_pixels)  # the owner's CPU path decodes what its device rejects
    backend = LocalBackend(settings)
    backend.use_device_decode(device_preparers(settings))
    server = await ModelOwner(backend).serve(path)
    log.info("model owner ready on %s (device decode: %s)", path, "on" if backend.decodes_on_device else "off")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    await backend.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def main(argv: list[str] | None = None) -> int:
    """python -m service.owner_app --socket PATH (models and device from CVSERVE_*)."""
    parser = argparse.ArgumentParser(
        prog="python -m service.owner_app", description="The model owner: one process with the models."
    )
    parser.add_argument("--socket", type=Path, required=True, help="the Unix socket to answer on")
    args = parser.parse_args(argv)
    logging.basicConfig(
        stream=sys.stdout, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(serve_forever(args.socket))
    return 0


if __name__ == "__main__":
    sys.exit(main())
