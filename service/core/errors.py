"""The gateway's error answers: `{"error": {"code", "message"}}` with the right HTTP status.

Client mistakes get a 4xx that says what to fix; backend failures get 503/504 with our own
words; anything else is a logged 500 that reveals nothing.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from service.backends.base import BackendTimeout, BackendUnavailable
from service.imaging.images import ImageError
from service.schemas import ErrorResponse
from service.telemetry.metrics import CLIENT_CLOSED, ERROR_KINDS

log = logging.getLogger(__name__)

# for the routes' `responses=` so /docs shows the error shape
ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    status: {"model": ErrorResponse, "description": kind.replace("_", " ")}
    for status, kind in ERROR_KINDS.items()
    if status not in (404, 405, 499)
}


class ApiError(Exception):
    """A request the gateway refuses: carries the status, a stable code and a helpful message."""

    def __init__(self, status_code: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.message = message
        self.headers = headers


def error_response(status_code: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON error body every failure uses."""
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status_code, headers=headers)


def describe_validation_errors(errors: list[dict]) -> str:
    """`loc: msg` for each pydantic error, without echoing the offending input back."""
    parts = []
    for error in errors:
        loc = ".".join(str(p) for p in error.get("loc", ()) if p not in ("body", "query"))
        parts.append(f"{loc}: {error.get('msg', 'invalid')}" if loc else str(error.get("msg", "invalid")))
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    """Register one handler per failure family on `app`."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError) -> JSONResponse:
        return error_response(error.status_code, error.code, error.message, headers=error.headers)

    @app.exception_handler(ImageError)
    async def _image_error(request: Request, error: ImageError) -> JSONResponse:
        return error_response(error.status_code, error.code, str(error))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(422, "invalid_request", describe_validation_errors(list(error.errors())))

    @app.exception_handler(ValidationError)
    async def _body_validation_error(request: Request, error: ValidationError) -> JSONResponse:
        return error_response(422, "invalid_request", describe_validation_errors(list(error.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = ERROR_KINDS.get(error.status_code, "http_error")
        message = error.detail if isinstance(error.detail, str) else code.replace("_", " ")
        return error_response(error.status_code, code, message, headers=getattr(error, "headers", None))

    @app.exception_handler(BackendUnavailable)
    async def _unavailable(request: Request, error: BackendUnavailable) -> JSONResponse:
        return error_response(503, "unavailable", str(error), headers={"Retry-After": "1"})

    @app.exception_handler(BackendTimeout)
    async def _timeout(request: Request, error: BackendTimeout) -> JSONResponse:
        return error_response(504, "timeout", str(error))

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, error: ClientDisconnect) -> Response:
        return Response(status_code=CLIENT_CLOSED)  # nobody reads it; the metrics record 499

    @app.exception_handler(Exception)
    async def _internal(request: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal", "internal error; the gateway log has the details")
