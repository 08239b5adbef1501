"""Small plain-ASGI pieces the gateway's middlewares share (no per-request task or stream copy)."""

from __future__ import annotations

from starlette.types import Message, Scope, Send


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
