"""The Serve application: a FastAPI ingress in front of the chosen backend, composed in `build_app`.

One request: read images (`service.inputs`) → decode (`service.images`) → the task's
`preprocess` (`service.handlers`) → `backend.infer` for all images concurrently (so they batch)
→ `postprocess` → one result per image, in order.
"""

# No `from __future__ import annotations` here: Serve rewrites the route signatures and needs real types.

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import FastAPI, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from ray import serve
from ray.serve.config import BackpressureConfig
from ray.serve.handle import DeploymentHandle

from service.backends.base import Backend, BackendTimeout
from service.backends.embedded import EmbeddedBackend, latest_version, model_deployments
from service.contract import ModelContract, load_contract
from service.errors import ERROR_KINDS, ERROR_RESPONSES, ApiError, install_error_handlers
from service.handlers import HANDLERS, Handler
from service.handlers.common import Geometry, at_full_size
from service.images import ImageError, configure_pillow, decode_image_reduced
from service.inputs import read_images
from service.metrics import GatewayMetrics
from service.routes_demo import annotated_or_json, install_demo
from service.schemas import (
    ClassifyOptions,
    ClassifyResponse,
    DetectOptions,
    DetectResponse,
    HealthResponse,
    ImageSize,
    ModelInfo,
    ModelsResponse,
    ReadyResponse,
    SegmentOptions,
    SegmentResponse,
)
from service.settings import Settings

log = logging.getLogger(__name__)

ENDPOINTS = ("/classify", "/detect", "/segment", "/health", "/ready", "/models")

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


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.metrics = GatewayMetrics()  # created in the replica process, never at import
    yield


api = FastAPI(title="cvserve", version="0.1.0", description=DESCRIPTION, lifespan=_lifespan)
install_error_handlers(api)
install_demo(api)


def _endpoint_of(request: Request) -> str:
    """The route a request is for, as a bounded metric tag (`other` for unknown paths)."""
    path = request.scope.get("path", "")
    root = request.scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    path = path.rstrip("/") or "/"
    return path if path in ENDPOINTS else "other"


@api.middleware("http")
async def _record_metrics(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    metrics: GatewayMetrics = request.app.state.metrics
    endpoint = _endpoint_of(request)
    started = time.perf_counter()
    metrics.request_started(endpoint)
    status = 500  # stays 500 if an unhandled exception escapes
    try:
        response = await call_next(request)
        status = response.status_code
        return response
    finally:
        kind = ERROR_KINDS.get(status, "other") if status >= 400 else None
        metrics.request_finished(endpoint, status, time.perf_counter() - started, kind)


def _image_body_openapi(body_model: type[BaseModel]) -> dict[str, Any]:
    """Describe the three accepted request bodies for /docs (the route reads the body itself)."""
    binary = {"schema": {"type": "string", "format": "binary"}}
    multipart = {
        "schema": {
            "type": "object",
            "properties": {
                "file": {"type": "string", "format": "binary", "description": "one image"},
                "files": {"type": "array", "items": {"type": "string", "format": "binary"}, "description": "several"},
            },
        }
    }
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": multipart,
                "image/jpeg": binary,
                "image/png": binary,
                "image/webp": binary,
                "application/json": {"schema": body_model.model_json_schema()},
            },
        }
    }


def _route(handler: Handler) -> dict[str, Any]:
    return {
        "response_model": handler.response,
        "responses": ERROR_RESPONSES,
        "openapi_extra": _image_body_openapi(handler.request),
        "summary": f"{handler.task.capitalize()} of one or several images",
    }


def _postprocess_all(
    handler: Handler, outputs: list[dict[str, np.ndarray]], geometries: list[Geometry], options: BaseModel, contract: ModelContract
) -> list[BaseModel]:
    return [handler.postprocess(out, geometry, options, contract) for out, geometry in zip(outputs, geometries, strict=True)]


def make_backend(settings: Settings, models: dict[str, DeploymentHandle]) -> Backend:
    """The backend `settings.backend` names (Triton's client is imported only when used)."""
    if settings.backend == "triton":
        from service.backends.triton import TritonBackend

        return TritonBackend(settings, models=settings.models)
    return EmbeddedBackend(models, settings.request_timeout_s)


# Everything Gateway uses is defined above it on purpose: `serve.ingress` freezes (pickles by value)
# the FastAPI app and its route methods, with the module globals they use, when it decorates the class.
@serve.deployment
@serve.ingress(api)
class Gateway:
    """HTTP ingress: turns requests into per-image backend calls and answers in original-image terms."""

    def __init__(self, settings: Settings, models: dict[str, DeploymentHandle]) -> None:
        self._settings = settings
        configure_pillow(settings.max_pixels)
        torch.set_num_threads(1)  # per-image preprocessing is small; leave the cores to the models
        self._contracts: dict[str, ModelContract] = {m: load_contract(settings.model_repository, m) for m in settings.models}
        self._versions = {m: latest_version(settings.model_repository, m) for m in settings.models}
        # Shorter side a decode must keep: twice what any model input needs (JPEGs are decoded reduced to it).
        self._min_sides = {m: 2 * max(*c.input_size, c.resize_size or 0) for m, c in self._contracts.items()}
        self._backend: Backend = make_backend(settings, models)
        self._in_flight = 0  # inference requests admitted and not yet answered (admission control)

    async def __del__(self) -> None:
        close = getattr(getattr(self, "_backend", None), "close", None)
        if close is not None:
            await close()

    @api.post("/classify", **_route(HANDLERS["classifier"]))
    async def classify(self, request: Request, options: Annotated[ClassifyOptions, Query()]) -> ClassifyResponse:
        """Top-k classes per image."""
        return await self._run(HANDLERS["classifier"], request, options)

    @api.post("/detect", **_route(HANDLERS["detector"]))
    async def detect(self, request: Request, options: Annotated[DetectOptions, Query()]) -> DetectResponse:
        """Boxes (xyxy, original-image pixels), labels and scores per image."""
        return await self._run(HANDLERS["detector"], request, options)

    @api.post("/segment", **_route(HANDLERS["segmenter"]))
    async def segment(self, request: Request, options: Annotated[SegmentOptions, Query()]) -> SegmentResponse:
        """Per-class COCO RLE masks at original size, pixel fractions, optionally a PNG."""
        return await self._run(HANDLERS["segmenter"], request, options)

    @api.get("/health", response_model=HealthResponse)
    async def health(self) -> HealthResponse:
        """The gateway process is alive (says nothing about the models)."""
        return HealthResponse()

    @api.get("/ready", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}})
    async def ready(self) -> JSONResponse:
        """Every enabled model can answer now (503 otherwise)."""
        ready = await self._backend.ready()
        body = ReadyResponse(ready=ready, backend=self._settings.backend)
        return JSONResponse(body.model_dump(), status_code=200 if ready else 503)

    @api.get("/models", response_model=ModelsResponse)
    async def models(self) -> ModelsResponse:
        """The enabled models and their contracts."""
        return ModelsResponse(models=[self._model_info(name) for name in self._contracts])

    def _model_info(self, name: str) -> ModelInfo:
        contract = self._contracts[name]
        height, width = contract.input_size
        return ModelInfo(
            name=name,
            version=self._versions[name],
            task=contract.task,
            endpoint=HANDLERS[name].endpoint,
            backend=self._settings.backend,
            input_size=ImageSize(width=width, height=height),
            preprocess=contract.preprocess,
            max_batch_size=contract.max_batch_size,
            weights=contract.parameters.get("weights", "unknown"),
            labels=list(contract.labels),
        )

    def _check_api_key(self, request: Request) -> None:
        expected = self._settings.api_key
        if expected is None:
            return
        given = request.headers.get("x-api-key") or request.headers.get("authorization", "").removeprefix("Bearer ")
        if not secrets.compare_digest(given.encode(), expected.get_secret_value().encode()):
            raise ApiError(401, "unauthorized", "missing or wrong API key; send it as header X-API-Key")

    async def _run(self, handler: Handler, request: Request, query_options: BaseModel) -> Any:
        """Admit the request (503 + Retry-After past the limit) and answer it within its deadline (504)."""
        self._check_api_key(request)
        limit = self._settings.admission_limit
        if self._in_flight >= limit:
            raise ApiError(
                503,
                "overloaded",
                f"the gateway is working on {limit} requests already; retry after {self._settings.retry_after_s} s",
                headers={"Retry-After": str(self._settings.retry_after_s)},
            )
        self._in_flight += 1
        try:
            async with asyncio.timeout(self._settings.request_timeout_s):
                return await self._answer(handler, request, query_options)
        except TimeoutError as error:
            raise BackendTimeout(f"the request did not finish within {self._settings.request_timeout_s:g} s") from error
        finally:
            self._in_flight -= 1

    async def _answer(self, handler: Handler, request: Request, query_options: BaseModel) -> Any:
        """Read, decode and preprocess every image, infer them concurrently, postprocess in order."""
        contract = self._contracts.get(handler.model)
        if contract is None:
            raise ApiError(404, "model_disabled", f"model {handler.model} is not enabled on this gateway")
        inputs = await read_images(
            request, handler.request, self._settings.max_body_bytes, self._settings.max_images_per_request
        )
        options = handler.options.model_validate(
            {**query_options.model_dump(exclude_unset=True), **inputs.json_options}
        )
        request.app.state.metrics.images.observe(len(inputs.blobs), tags={"endpoint": handler.endpoint})
        prepared = await asyncio.gather(
            *(asyncio.to_thread(self._prepare, handler, contract, blob, i) for i, blob in enumerate(inputs.blobs))
        )
        outputs = await asyncio.gather(*(self._backend.infer(handler.model, tensor) for tensor, _ in prepared))
        geometries = [geometry for _, geometry in prepared]
        results = await asyncio.to_thread(_postprocess_all, handler, outputs, geometries, options, contract)
        response = handler.response(
            model=handler.model, version=self._versions[handler.model], backend=self._settings.backend, results=results
        )
        return await annotated_or_json(request, response, inputs.blobs, options, self._settings)

    def _prepare(
        self, handler: Handler, contract: ModelContract, blob: bytes, index: int
    ) -> tuple[np.ndarray, Geometry]:
        try:
            image, (width, height) = decode_image_reduced(
                blob, self._settings.max_pixels, self._settings.allowed_formats, self._min_sides[handler.model]
            )
        except ImageError as error:
            raise ApiError(error.status_code, error.code, f"image {index}: {error}") from error
        tensor, geometry = handler.preprocess(image, contract)
        return tensor, at_full_size(geometry, width, height)


def resolve_device(settings: Settings) -> Settings:
    """Turn `device="auto"` into cuda or cpu here, where Ray can still be asked for a GPU."""
    if settings.device != "auto":
        return settings
    return settings.model_copy(update={"device": "cuda" if torch.cuda.is_available() else "cpu"})


def build_app(settings: Settings) -> serve.Application:
    """Compose the whole graph: the ingress plus, for the embedded backend, one deployment per model."""
    settings = resolve_device(settings)
    for model in settings.models:
        load_contract(settings.model_repository, model)  # fail here, clearly, if the export is missing
    models = model_deployments(settings) if settings.backend == "embedded" else {}
    return Gateway.options(
        num_replicas=settings.ingress_replicas,
        max_ongoing_requests=settings.max_ongoing_requests,
        max_queued_requests=settings.max_queued_requests,
        # Serve's own 503 when its queue in front of the gateway is full: say when to retry too
        backpressure_config=BackpressureConfig(retry_after_s=settings.retry_after_s),
        ray_actor_options={"num_cpus": settings.ingress_num_cpus},
    ).bind(settings, models)
