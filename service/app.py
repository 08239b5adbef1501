"""The gateway's HTTP app, without Ray: `create_api(settings, backend)` composes the surfaces over
one request core; `from_environment()` builds it for plain uvicorn.

    uvicorn --factory service.app:from_environment     # embedded models in this process, metrics at /metrics

Ray Serve deploys this same app (`service.deploy.serve`); nothing here imports Ray.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Mapping

from fastapi import APIRouter, Depends, FastAPI
from prometheus_client import make_asgi_app

from service.backends.base import Backend
from service.core.answerer import Answerer
from service.core.versions import RepositoryWatcher
from service.core.errors import install_error_handlers
from service.handlers.common import Handler
from service.imaging.images import configure_pillow
from service.settings import Settings
from service.surfaces.admin import PREFIX as ADMIN_PREFIX
from service.surfaces.admin import install_admin
from service.surfaces.demo import install_demo
from service.surfaces.oip import PREFIX as OIP_PREFIX
from service.surfaces.oip import install_oip, oip_endpoint
from service.surfaces.streams import install_streams
from service.surfaces.tasks import SERVICE_ENDPOINTS, install_service_routes, install_task_routes
from service.telemetry.asgi import MetricsMiddleware
from service.telemetry.metrics import GatewayMetrics, Instruments, LifecycleMetrics
from service.telemetry.tracing import Tracing, TracingMiddleware
from service.handlers import HANDLERS

log = logging.getLogger(__name__)

DESCRIPTION = """Classify, detect and segment images.

Send images to `/classify`, `/detect` or `/segment` in any of three ways:

* multipart: `curl -F file=@cat.jpg http://127.0.0.1:8000/classify` (several: repeat `-F files=@...`)
* raw body: `curl --data-binary @cat.jpg -H 'Content-Type: image/jpeg' http://127.0.0.1:8000/classify`
* JSON: `{"images": ["<base64>", ...], "top_k": 3}`

Options go in the query string (or in the JSON body). Images are normalised before inference:
EXIF orientation applied, transparency composited on white, grayscale/CMYK/16-bit/palette
converted to RGB, first frame of animations. Boxes and masks refer to the upright original image.
Errors are `{"error": {"code": ..., "message": ...}}`; every status and code is listed in docs/ERRORS.md
(busy: 503 with `Retry-After`; past the deadline: 504).
"""


def create_api(settings: Settings, backend: Backend, instruments: Instruments | None = None) -> FastAPI:
    """The gateway's HTTP API over `backend`: every surface (task routes, `/v2`, streams, video, the demo
    page) over one `Answerer`. Metrics are made by `instruments` (default: prometheus_client, served at
    `/metrics`); under Serve they are Ray's, which Ray exports itself."""
    instruments = instruments or Instruments.prometheus()
    handlers = dict(HANDLERS)  # the registry as it is now: a task registered before this call is served
    api = FastAPI(title="cvserve", version="0.1.0", description=DESCRIPTION)
    metrics = GatewayMetrics(instruments)
    tracing = Tracing.from_settings(settings)  # None unless CVSERVE_TRACING
    answerer = Answerer(settings, backend, metrics, handlers, tracing, LifecycleMetrics(instruments))
    api.state.answerer = answerer
    api.state.metrics = metrics
    api.state.tracing = tracing
    install_error_handlers(api)
    install_demo(api)
    install_streams(api, answerer, handlers.values())  # /stream/<task>: WebSocket frame streams
    api.add_middleware(MetricsMiddleware, metrics=metrics, endpoint_of=functools.partial(endpoint_tag, handlers=handlers))
    if tracing is not None:
        api.add_middleware(TracingMiddleware, tracing=tracing)  # outermost: the request's span covers the rest

    # Every inference route sits behind the API key when one is set: a new task cannot forget it.
    guarded = [Depends(answerer.keys.dependency())] if answerer.keys.required else []
    tasks = APIRouter(dependencies=guarded)
    install_task_routes(tasks, answerer, list(handlers.values()))
    api.include_router(tasks)
    install_oip(api, answerer, guarded)  # /v2: the Open Inference Protocol
    install_service_routes(api, answerer)
    if not install_admin(api, answerer):  # /admin: model versions while serving (its own key)
        log.warning(
            "no admin surface: the gateway listens on %s and CVSERVE_ADMIN_KEY is unset; model versions change "
            "only through the repository watcher (CVSERVE_REPOSITORY_POLL_S) or a restart",
            settings.host,
        )
    watcher = (
        RepositoryWatcher(answerer.lifecycle, settings.model_repository, settings.repository_poll_s)
        if settings.repository_poll_s > 0
        else None
    )
    api.state.watcher = watcher

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if watcher is not None:
            watcher.start()
        try:
            yield
        finally:
            if watcher is not None:
                await watcher.stop()

    api.router.lifespan_context = lifespan
    if instruments.registry is not None:  # outside Serve: this app's own metrics
        api.mount("/metrics", make_asgi_app(registry=instruments.registry))
    return api


def endpoint_tag(path: str, handlers: Mapping[str, Handler]) -> str:
    """A request's path (below the root path) as a bounded metric tag: a route, `/v2/models/<m>/infer`,
    `/v2`, or `other` for unknown paths."""
    if path in SERVICE_ENDPOINTS or any(path == h.endpoint for h in handlers.values()):
        return path
    if path == OIP_PREFIX or path.startswith(OIP_PREFIX + "/"):
        return oip_endpoint(path, handlers)
    if path.startswith(ADMIN_PREFIX + "/"):
        return ADMIN_PREFIX
    return "other"


def from_environment() -> FastAPI:
    """The app for plain uvicorn: `Settings()` from CVSERVE_* variables, the embedded models in this
    process (or the Triton backend), metrics at `/metrics`."""
    settings = Settings()
    configure_pillow(settings.max_pixels)
    instruments = Instruments.prometheus()
    backend: Backend
    if settings.backend == "triton":
        from service.backends.triton import TritonBackend  # tritonclient only when used

        backend = TritonBackend(settings, instruments=instruments)
    else:
        from service.backends.local import LocalBackend

        backend = LocalBackend(settings, instruments)
    return closing(create_api(settings, backend, instruments), backend)


def closing(api: FastAPI, backend: Backend) -> FastAPI:
    """`api` with a lifespan that closes its request core and then `backend` when the server stops."""

    inner = api.router.lifespan_context  # create_api's (the repository watcher)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with inner(app):
            yield
        api.state.answerer.close()
        await backend.close()

    api.router.lifespan_context = lifespan
    return api
