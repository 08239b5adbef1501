"""`OipErrors` on tiny ASGI apps: what no client input reaches (an unhandled exception, a streamed error
body) still gets the protocol's shape under /v2, and nothing outside /v2 is touched."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.testclient import TestClient

from service.core.errors import install_error_handlers
from service.surfaces.oip import OipErrors


def app() -> FastAPI:
    api = FastAPI()
    install_error_handlers(api)
    api.add_middleware(OipErrors)

    @api.get("/v2/crash")
    @api.get("/crash")
    async def crash() -> None:
        raise RuntimeError("secret backend detail")

    @api.get("/v2/streamed")
    async def streamed() -> StreamingResponse:
        parts = [b'{"error": {"code": "overloaded", ', b'"message": "busy"}}']
        return StreamingResponse(iter(parts), status_code=503, headers={"Retry-After": "1"})

    @api.get("/v2/other")
    async def other() -> JSONResponse:
        return JSONResponse({"ready": False}, status_code=503)

    return api


def test_an_unhandled_error_under_v2_is_an_oip_500_without_its_text() -> None:
    with TestClient(app(), raise_server_exceptions=False) as client:
        response = client.get("/v2/crash")
        assert response.status_code == 500
        assert response.json() == {"error": "internal: internal error; the gateway log has the details"}
        outside = client.get("/crash")
        assert outside.status_code == 500 and outside.json()["error"]["code"] == "internal"
        assert "secret" not in response.text + outside.text


def test_streamed_error_bodies_are_reshaped_and_other_bodies_kept() -> None:
    with TestClient(app()) as client:
        streamed = client.get("/v2/streamed")
        assert streamed.status_code == 503 and streamed.headers["retry-after"] == "1"
        assert streamed.json() == {"error": "overloaded: busy"}
        assert int(streamed.headers["content-length"]) == len(streamed.content)
        assert client.get("/v2/other").json() == {"ready": False}
        assert client.get("/v2/missing").json() == {"error": "not_found: Not Found"}
