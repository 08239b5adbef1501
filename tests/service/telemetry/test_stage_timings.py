"""Every answered request says where its time went: a `Server-Timing` header with each stage."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_api
from service.backends.local import LocalBackend
from service.settings import Settings
from service.timing import STAGES
from training.shapes import make_scene

ENTRY = re.compile(r'^(?P<name>\w+);dur=(?P<dur>[0-9.]+)(?:;desc="batch (?P<batch>\d+)")?$')


def png(seed: int, images: int = 1) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(make_scene(seed, 160, 1, 3).image).save(buffer, "PNG")
    return buffer.getvalue()


def parse(header: str) -> tuple[dict[str, float], int | None]:
    durations, batch = {}, None
    for part in header.split(", "):
        match = ENTRY.match(part)
        assert match, f"not a Server-Timing entry: {part!r}"
        durations[match["name"]] = float(match["dur"])
        if match["batch"]:
            batch = int(match["batch"])
    return durations, batch


@pytest.fixture(scope="module")
def client(model_repository: Path) -> Iterator[TestClient]:
    settings = Settings(model_repository=model_repository, models=("detector",), device="cpu")
    with TestClient(create_api(settings, LocalBackend(settings))) as session:
        yield session


def test_a_request_reports_every_stage_and_its_batch(client: TestClient) -> None:
    response = client.post("/detect", content=png(11), headers={"Content-Type": "image/png"})
    assert response.status_code == 200
    durations, batch = parse(response.headers["Server-Timing"])
    assert list(durations) == [*STAGES, "total"]
    assert batch == 1
    assert durations["model"] > 0 and durations["decode"] > 0
    assert sum(durations[s] for s in STAGES) <= durations["total"] * 1.01  # the stages fit in the whole


def test_images_of_one_request_share_a_batch_and_add_up_their_decodes(client: TestClient) -> None:
    files = [("files", (f"{i}.png", png(20 + i), "image/png")) for i in range(3)]
    response = client.post("/detect", files=files)
    assert response.status_code == 200
    durations, batch = parse(response.headers["Server-Timing"])
    assert batch == 3
    assert set(STAGES) <= set(durations)


def test_timings_can_be_switched_off(model_repository: Path) -> None:
    settings = Settings(model_repository=model_repository, models=("detector",), device="cpu", stage_timings=False)
    with TestClient(create_api(settings, LocalBackend(settings))) as quiet:
        response = quiet.post("/detect", content=png(12), headers={"Content-Type": "image/png"})
    assert response.status_code == 200 and "server-timing" not in response.headers
