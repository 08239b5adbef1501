"""The admin surface: model versions while serving, modelled on Triton's model repository extension.

    POST   /admin/repository/index                       every version on disk and loaded, with its state
    POST   /admin/repository/models/{m}/load             {"version": "2", "activate": true}: load, warm up,
                                                         check, then make current (422 + reason if refused)
    POST   /admin/repository/models/{m}/unload           {"version": "1"} (409 for the current or candidate)
    POST   /admin/repository/models/{m}/rollback         the previous version current again (409 if none)
    PUT    /admin/repository/models/{m}/candidate        {"version": "2", "mode": "shadow", "share": 0.2}
    DELETE /admin/repository/models/{m}/candidate        no candidate
    POST   /admin/repository/models/{m}/promote          the candidate becomes current
    GET    /admin/repository/models/{m}/candidate        the candidate and its agreement so far
    GET    /admin/candidate/summary                      the same for every model

Every route needs the admin key (`CVSERVE_ADMIN_KEY`, header `X-Admin-Key` or `Authorization: Bearer`),
never the client API key; without an admin key the surface exists only when the gateway listens on a
loopback address (`Settings.admin_open`). Each change is logged ("cvserve.lifecycle") with the key's
id (a hash prefix, never the key) and the client's address.
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations at run time.

import hashlib
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, FastAPI, Request
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, Field, SecretStr

from service.core.answerer import Answerer
from service.core.auth import ApiKeyCheck
from service.core.errors import ERROR_RESPONSES, ApiError
from service.core.versions import who_of
from service.settings import Settings

PREFIX = "/admin"
ADMIN_KEY_HEADER = APIKeyHeader(
    name="X-Admin-Key", scheme_name="AdminKeyHeader", auto_error=False, description="the gateway's CVSERVE_ADMIN_KEY"
)


class LoadRequest(BaseModel):
    version: str | None = Field(None, pattern=r"^[0-9]+$", description="default: the repository's highest")
    activate: bool = Field(True, description="make it current once loaded (false: load only)")


class UnloadRequest(BaseModel):
    version: str = Field(..., pattern=r"^[0-9]+$")


class CandidateRequest(BaseModel):
    version: str = Field(..., pattern=r"^[0-9]+$")
    mode: Literal["shadow", "canary"] = "shadow"
    share: float = Field(0.1, ge=0.0, le=1.0, description="share of requests copied (shadow) or routed (canary)")


def key_id(key: SecretStr | None) -> str | None:
    """A short, stable name of a key for the logs (a hash prefix: the key itself is never logged)."""
    return hashlib.sha256(key.get_secret_value().encode()).hexdigest()[:8] if key is not None else None


class AdminKeyCheck(ApiKeyCheck):
    """`ApiKeyCheck` over the admin key (same constant-time compare and slow-down of repeated failures)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings.model_copy(update={"api_key": settings.admin_key}))
        self.key_id = key_id(settings.admin_key)


def install_admin(api: FastAPI, answerer: Answerer) -> bool:
    """Add the admin routes when `Settings.admin_open`; return whether they were added."""
    settings = answerer.settings
    if not settings.admin_open:
        return False
    check = AdminKeyCheck(settings)
    lifecycle = answerer.lifecycle

    async def caller(request: Request, key: Annotated[str | None, Depends(ADMIN_KEY_HEADER)]) -> str:
        """Who asks (for the log), once the admin key is checked (401 otherwise)."""
        client = request.client.host if request.client else "unknown"
        given = key or request.headers.get("authorization", "").removeprefix("Bearer ")
        if not await check.verify(given, client):
            raise ApiError(401, "unauthorized", "missing or wrong admin key; send it as header X-Admin-Key")
        return who_of(check.key_id, client)

    Caller = Annotated[str, Depends(caller)]  # noqa: N806
    router = APIRouter(prefix=PREFIX, tags=["Model lifecycle (admin)"], responses=ERROR_RESPONSES)

    @router.post("/repository/index", summary="Every model version on disk and loaded")
    async def index(who: Caller) -> list[dict[str, Any]]:
        return lifecycle.index()

    @router.post("/repository/models/{model}/load", summary="Load a version (and make it current)")
    async def load(model: str, who: Caller, body: Annotated[LoadRequest | None, Body()] = None) -> dict[str, Any]:
        body = body or LoadRequest()
        return await lifecycle.load(model, body.version, who, activate=body.activate)

    @router.post("/repository/models/{model}/unload", summary="Unload a version that is not in use")
    async def unload(model: str, body: UnloadRequest, who: Caller) -> dict[str, Any]:
        return await lifecycle.unload(model, body.version, who)

    @router.post("/repository/models/{model}/rollback", summary="Make the previous version current again")
    async def rollback(model: str, who: Caller) -> dict[str, Any]:
        return await lifecycle.rollback(model, who)

    @router.put("/repository/models/{model}/candidate", summary="Shadow or canary a candidate version")
    async def set_candidate(model: str, body: CandidateRequest, who: Caller) -> dict[str, Any]:
        return await lifecycle.set_candidate(model, body.version, body.mode, body.share, who)

    @router.delete("/repository/models/{model}/candidate", summary="Stop shadowing or canarying")
    async def clear_candidate(model: str, who: Caller) -> dict[str, Any]:
        return await lifecycle.clear_candidate(model, who)

    @router.post("/repository/models/{model}/promote", summary="Make the candidate current")
    async def promote(model: str, who: Caller) -> dict[str, Any]:
        return await lifecycle.promote(model, who)

    @router.get("/repository/models/{model}/candidate", summary="The candidate and how it agrees so far")
    async def candidate(model: str, who: Caller) -> dict[str, Any]:
        lifecycle.describe(model)  # 404 for a model not served
        return lifecycle.summary(model)

    @router.get("/candidate/summary", summary="Every model's candidate and how it agrees so far")
    async def summary(who: Caller) -> dict[str, Any]:
        return {"models": [lifecycle.summary(model) for model in lifecycle.states]}

    api.include_router(router)
    return True
