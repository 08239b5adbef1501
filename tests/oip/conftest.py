"""The gateway's API (`create_api` over the real TorchScript models, all three) in a real uvicorn server,
for clients that need a socket: tritonclient speaks HTTP through geventhttpclient, not through ASGI."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from PIL import Image

from service.app import create_api
from service.backends.local import LocalBackend
from service.settings import Settings
from support.serving import served_in_thread
from training.shapes import CLASSES, Scene, make_scene

KEY = "oip-tests-key-0123456789"


def encoded(image: np.ndarray, image_format: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, image_format, **({"quality": 95} if image_format == "JPEG" else {}))
    return buffer.getvalue()


def scene(seed: int, size: int = 128, shapes: tuple[int, int] = (2, 4)) -> tuple[Scene, set[str]]:
    """A generated shapes scene (seeds far from training's) and the names of the shapes drawn in it."""
    drawn = make_scene(10**6 + seed, size, *shapes)
    return drawn, {CLASSES[int(label) - 1] for label in drawn.labels}


@contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """Run `app` under uvicorn on a free loopback port in a thread; yield `127.0.0.1:<port>`; stop it after."""
    with served_in_thread(app, stop_timeout_s=30) as url:
        yield url.removeprefix("http://")


def keyed_settings(model_repository: Path, **limits: object) -> Settings:
    return Settings(model_repository=model_repository, device="cpu", torch_threads=1, api_key=KEY, **limits)


@pytest.fixture(scope="package")
def api(model_repository: Path) -> FastAPI:
    """The gateway's API over all three real models, behind an API key."""
    settings = keyed_settings(model_repository)
    return create_api(settings, LocalBackend(settings))


@pytest.fixture(scope="package")
def oip_url(api: FastAPI) -> Iterator[str]:
    """`host:port` of a real HTTP server running `api` (what tritonclient's `url` takes)."""
    with serving(api) as url:
        yield url


@pytest.fixture(scope="package")
def http(oip_url: str) -> Iterator[httpx.Client]:
    """An HTTP client of the same server, with the key (the API's models serve one event loop: uvicorn's)."""
    with httpx.Client(base_url=f"http://{oip_url}", headers={"X-API-Key": KEY}, timeout=120) as client:
        yield client
