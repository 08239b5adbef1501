"""Servers the client tests talk to besides the session gateway: the real API in a uvicorn thread.

`keyed_url` serves `create_api` over the real classifier with an API key and an admission limit of
one request; `refusals` arms the ASGI layer in front of it to answer the next requests 503 (with a
chosen `Retry-After`) or late, as an overloaded or slow gateway does, before the real API answers.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.app import create_api
from service.backends.local import LocalBackend
from service.settings import Settings
from support.serving import served_in_thread
from training.shapes import CLASSES, make_scene

KEY = "client-tests-key-0123456789"
ROOT = Path(__file__).resolve().parents[2]


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


def single_shape(seed: int) -> tuple[np.ndarray, str]:
    """A one-shape scene (what the classifier learnt) and its class name."""
    scene = make_scene(seed, 128, 1, 1)
    return scene.image, CLASSES[int(scene.labels[0]) - 1]


served = served_in_thread  # tests/browser imports it from here


@dataclass
class Refusals:
    """ASGI layer: the next `count` POSTs answer 503 `overloaded` with `retry_after` (or wait `delay_s`
    first); every request's arrival time and status is recorded, so tests see what the client did."""

    app: ASGIApp
    count: int = 0
    retry_after: str | None = None
    delay_s: float = 0.0
    text: bool = False  # a plain-text 503, as Serve's own queue-full answer is
    seen: list[tuple[float, str, int]] = field(default_factory=list)

    def arm(
        self, count: int = 0, retry_after: str | None = None, delay_s: float = 0.0, text: bool = False
    ) -> None:
        self.count, self.retry_after, self.delay_s, self.text = count, retry_after, delay_s, text
        self.seen.clear()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        arrived = time.monotonic()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if scope["method"] == "POST" and self.count > 0:
            self.count -= 1
            self.seen.append((arrived, scope["path"], 503))
            headers = [(b"content-type", b"text/plain" if self.text else b"application/json")]
            if self.retry_after is not None:
                headers.append((b"retry-after", self.retry_after.encode()))
            body = (
                b"busy; retry later" if self.text else b'{"error": {"code": "overloaded", "message": "busy"}}'
            )
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return

        async def record(message: Message) -> None:
            if message["type"] == "http.response.start":  # before the client can see the answer
                self.seen.append((arrived, scope["path"], message["status"]))
            await send(message)

        await self.app(scope, receive, record)


@pytest.fixture(scope="package")
def keyed_server(model_repository: Path) -> Iterator[tuple[str, Refusals]]:
    """The real API over the classifier, with API key `KEY` and an admission limit of 1, behind `Refusals`."""
    settings = Settings(
        model_repository=model_repository,
        models=("classifier",),
        device="cpu",
        api_key=KEY,
        max_in_flight_requests=1,
        retry_after_s=1,
    )
    refusals = Refusals(create_api(settings, LocalBackend(settings)))
    with served(refusals) as url:
        yield url, refusals


@pytest.fixture
def keyed_url(keyed_server: tuple[str, Refusals]) -> Iterator[str]:
    url, refusals = keyed_server
    refusals.arm()
    yield url
    refusals.arm()


@pytest.fixture
def refusals(keyed_server: tuple[str, Refusals]) -> Refusals:
    return keyed_server[1]
