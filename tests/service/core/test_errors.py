"""The gateway's exception handlers: status codes and the JSON error body, never internal text."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.backends.base import BackendTimeout, BackendUnavailable
from service.core.errors import ApiError, install_error_handlers
from service.imaging.images import ImageTooLarge

SECRET = "tritonserver said: CUDA error at /opt/secret/path.cc:42"


@pytest.fixture(scope="module")
def client() -> TestClient:
    app = FastAPI()
    install_error_handlers(app)
    failures = {
        "unavailable": BackendUnavailable("model detector cannot answer now; retry shortly"),
        "timeout": BackendTimeout("model detector did not answer within 30 s"),
        "image": ImageTooLarge("image has 9000x9000 pixels; the limit is 40000000 pixels"),
        "api": ApiError(415, "unsupported_media_type", "send an image"),
        "bug": RuntimeError(SECRET),
    }

    @app.get("/fail/{kind}")
    async def fail(kind: str) -> None:
        raise failures[kind]

    @app.get("/typed")
    async def typed(n: int) -> dict[str, int]:
        return {"n": n}

    return TestClient(app, raise_server_exceptions=False)


@pytest.mark.parametrize(
    "kind,status,code",
    [("unavailable", 503, "unavailable"), ("timeout", 504, "timeout"), ("image", 413, "image_too_large"),
     ("api", 415, "unsupported_media_type"), ("bug", 500, "internal")],
)
def test_failures_map_to_status_and_code(client: TestClient, kind: str, status: int, code: str) -> None:
    response = client.get(f"/fail/{kind}")
    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    assert SECRET not in response.text


def test_unavailable_suggests_retry(client: TestClient) -> None:
    assert client.get("/fail/unavailable").headers["retry-after"] == "1"


def test_validation_and_routing_errors_use_the_same_body(client: TestClient) -> None:
    invalid = client.get("/typed?n=abc")
    assert invalid.status_code == 422 and invalid.json()["error"]["code"] == "invalid_request"
    assert invalid.json()["error"]["message"].startswith("n:")
    assert client.get("/missing").json() == {"error": {"code": "not_found", "message": "Not Found"}}
    assert client.post("/typed").json()["error"]["code"] == "method_not_allowed"
