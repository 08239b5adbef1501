"""`uvicorn --factory tests.video.flood_app:make_app`: the gateway's API over the real models, settings from CVSERVE_*."""

from __future__ import annotations

from fastapi import FastAPI

from service.app import create_api
from service.backends.local import LocalBackend
from service.settings import Settings


def make_app() -> FastAPI:
    """The API `create_api` builds, over the in-process TorchScript backend."""
    settings = Settings()
    return create_api(settings, LocalBackend(settings))
