"""In-process gateways for the video tests: `create_api` over the real TorchScript backend (no Ray)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_api
from service.backends.local import LocalBackend
from service.settings import Settings
from tests.video.clips import Clip, moving_shapes

KEY = "v" * 24
Gateway = Callable[..., AbstractContextManager[TestClient]]


@pytest.fixture(scope="session")
def clip() -> Clip:
    """Two shapes crossing the frame in opposite directions, 30 frames."""
    return moving_shapes(30)


@pytest.fixture(scope="session")
def gateway(model_repository: Path) -> Gateway:
    """`with gateway(**settings) as client`: a fresh in-process API with those settings over the real models."""

    @contextmanager
    def start(**overrides: Any) -> Iterator[TestClient]:
        settings = Settings(
            **{"model_repository": model_repository, "models": ("detector",), "device": "cpu", **overrides}
        )
        with TestClient(create_api(settings, LocalBackend(settings))) as client:
            yield client

    return start


@pytest.fixture(scope="module")
def detect_client(gateway: Gateway) -> Iterator[TestClient]:
    """One in-process API over the detector, the classifier and the segmenter; streams uncapped (the
    lock-step tests send as fast as the models answer, faster than the default 30 frames/s)."""
    with gateway(models=("detector", "classifier", "segmenter"), stream_max_fps=1000.0) as client:
        yield client
