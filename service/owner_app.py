"""The Ray-free app over a model owner: many uvicorn processes, one process owning the GPU's models.

    python -m service.backends.owner --socket /tmp/cvserve-owner.sock &          # loads the models (CVSERVE_DEVICE=cuda)
    CVSERVE_OWNER_SOCKET=/tmp/cvserve-owner.sock \\
        uvicorn --factory service.owner_app:from_environment --workers 8          # HTTP, decode, answers

Each worker builds the same app as `service.app.from_environment`, with an `OwnerBackend` in place of
in-process models (service/backends/owner.py). Kept apart from service/app.py until its
`from_environment` takes `CVSERVE_BACKEND=owner`.
"""

from __future__ import annotations

import os

from fastapi import FastAPI

from service.app import closing, create_api
from service.backends.owner import OwnerBackend
from service.imaging.images import configure_pillow
from service.settings import Settings
from service.telemetry.metrics import Instruments

DEFAULT_SOCKET = "/tmp/cvserve-owner.sock"


def from_environment() -> FastAPI:
    """The app for one uvicorn worker: `Settings()` from CVSERVE_*, the owner at $CVSERVE_OWNER_SOCKET."""
    settings = Settings()
    configure_pillow(settings.max_pixels)
    instruments = Instruments.prometheus()
    backend = OwnerBackend(os.environ.get("CVSERVE_OWNER_SOCKET", DEFAULT_SOCKET))
    return closing(create_api(settings, backend, instruments), backend)
