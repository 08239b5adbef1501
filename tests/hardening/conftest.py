"""Gateways for the hardening tests, deployed beside the session's default one (tests/conftest.py).

Each extra app runs only the classifier, so it costs one model replica and one ingress replica.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Deploy, delete_app

API_KEY = "hardening-key-0123456789"
STRICT_MAX_BODY = 64 * 1024
STRICT_MAX_PIXELS = 200 * 200
STRICT_MAX_IMAGES = 2
STRICT_MAX_REQUEST_PIXELS = 50_000  # one image of STRICT_MAX_PIXELS fits, two do not
STRICT_MAX_RESPONSE_BYTES = 48 * 1024  # an annotated PNG of a noisy 150x150 image is larger


def small_settings(model_repository: Path, **overrides: object) -> object:
    """Settings of a classifier-only CPU gateway; `overrides` set the limits a test is about."""
    from service.settings import Settings

    base: dict[str, object] = {
        "model_repository": model_repository,
        "device": "cpu",
        "models": ("classifier",),
        "torch_threads": 1,
        "max_batch_size": 4,
        "batch_wait_timeout_s": 0.005,
    }
    return Settings(**{**base, **overrides})


@pytest.fixture(scope="session")
def client(embedded_gateway: str) -> Iterator[httpx.Client]:
    """A client of the session's default gateway (all three models, default limits)."""
    with httpx.Client(base_url=embedded_gateway, timeout=60) as session:
        yield session


@pytest.fixture(scope="package")
def strict_gateway(deploy: Deploy, model_repository: Path) -> Iterator[str]:
    """A gateway with small limits (body, pixels per image and per request, images, answer bytes),
    PNG/JPEG only and an API key."""
    from service.deploy.serve import build_app

    settings = small_settings(
        model_repository,
        max_body_bytes=STRICT_MAX_BODY,
        max_pixels=STRICT_MAX_PIXELS,
        max_images_per_request=STRICT_MAX_IMAGES,
        max_request_pixels=STRICT_MAX_REQUEST_PIXELS,
        max_response_bytes=STRICT_MAX_RESPONSE_BYTES,
        allowed_formats=("PNG", "JPEG"),
        api_key=API_KEY,
    )
    yield deploy(build_app(settings), "hardening-strict", "/hardening-strict")
    delete_app("hardening-strict")


@pytest.fixture(scope="package")
def inprocess_gateway(model_repository: Path) -> Iterator[str]:
    """`host:port` of the API over the real detector under uvicorn in a thread (no Ray), for the surfaces'
    fuzz tests: OIP, video files and streams. Streams are not rate-capped (the fuzzers send in lock step)
    and a video has at most 16 frames, so a mutated header cannot make one example slow."""
    from service.app import create_api
    from service.backends.local import LocalBackend
    from tests.oip.conftest import serving

    settings = small_settings(
        model_repository, models=("detector",), stream_max_fps=1000.0, video_max_frames=16
    )
    with serving(create_api(settings, LocalBackend(settings))) as url:
        yield url
