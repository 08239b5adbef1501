"""Plain-ASGI pieces of the gateway's telemetry: the request-metrics middleware and what it shares with tracing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.telemetry.metrics import CLIENT_CLOSED, ERROR_KINDS

if TYPE_CHECKING:
    from service.telemetry.metrics import GatewayMetrics


class ResponseStatus:
    """An ASGI `send` that remembers the response's status: 500 until one is sent (an unhandled error)."""

    def __init__(self, send: Send) -> None:
        self.send = send
        self.code = 500

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.code = message["status"]
        await self.send(message)


def route_path(scope: Scope) -> str:
    """The request's path below the app's root path (Serve's route prefix), without a trailing slash."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return path.rstrip("/") or "/"


class MetricsMiddleware:
    """Count every HTTP request, its status and latency (plain ASGI: no per-request task or stream copy)."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics, endpoint_of: Callable[[str], str]) -> None:
        self.app = app
        self.metrics = metrics
        self.endpoint_of = endpoint_of  # a path below the root → a bounded metric tag

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = self.endpoint_of(route_path(scope))
        status = ResponseStatus(send)
        started = time.perf_counter()
        self.metrics.request_started(endpoint)
        try:
            await self.app(scope, receive, status)
        except asyncio.CancelledError:  # Serve cancels a request whose client went away
            status.code = CLIENT_CLOSED
            raise
        finally:
            code = status.code
            kind = ERROR_KINDS.get(code, "other") if code >= 400 else None
            self.metrics.request_finished(endpoint, code, time.perf_counter() - started, kind)
