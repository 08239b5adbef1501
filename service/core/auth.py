"""The one API-key check, for every surface: HTTP routes (a FastAPI dependency) and WebSocket streams.

A client sends the key as `X-API-Key` or `Authorization: Bearer` (streams also as `?api_key=` or a
`cvserve.key.<key>` subprotocol; see `service.surfaces.streams`). Each wrong or missing key in a row
from one client address waits longer before it is refused (50 ms doubling, at most 2 s), so guessing
is slow on every surface alike.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader

from service.core.errors import ApiError
from service.settings import Settings

log = logging.getLogger(__name__)

API_KEY_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False, description="the gateway's CVSERVE_API_KEY")
BAD_KEY_DELAY_S, BAD_KEY_MAX_DELAY_S = 0.05, 2.0
_TRACKED_CLIENTS = 10_000  # failure counts kept per address; past that the table starts again


class ApiKeyCheck:
    """Compares keys in constant time and slows each client's repeated failures."""

    def __init__(self, settings: Settings) -> None:
        self.required = settings.api_key is not None
        self._expected = settings.api_key.get_secret_value().encode() if settings.api_key is not None else b""
        self._failures: dict[str, int] = {}

    def delay_s(self, failures: int) -> float:
        """How long the `failures`-th failure in a row waits before its refusal."""
        return min(BAD_KEY_DELAY_S * 2 ** (failures - 1), BAD_KEY_MAX_DELAY_S)

    async def verify(self, given: str, client: str) -> bool:
        """Whether `given` is the key (always True when none is set); a failure returns only after its delay."""
        if not self.required or secrets.compare_digest(given.encode(), self._expected):
            self._failures.pop(client, None)
            return True
        if len(self._failures) >= _TRACKED_CLIENTS:
            self._failures.clear()
        self._failures[client] = count = self._failures.get(client, 0) + 1
        if count in (1, 10) or count % 100 == 0:
            log.warning("wrong or missing API key from %s (%d in a row)", client, count)
        await asyncio.sleep(self.delay_s(count))
        return False

    def dependency(self) -> Callable[..., Any]:
        """A FastAPI dependency that refuses requests without the right key (401 unauthorized)."""

        async def require_api_key(request: Request, key: Annotated[str | None, Depends(API_KEY_HEADER)]) -> None:
            given = key or request.headers.get("authorization", "").removeprefix("Bearer ")
            if not await self.verify(given, request.client.host if request.client else "unknown"):
                raise ApiError(401, "unauthorized", "missing or wrong API key; send it as header X-API-Key")

        return require_api_key
