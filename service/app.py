"""The Serve application: `create_api` builds the HTTP API over a backend; `build_app` composes the graph.

One request: read images (`service.inputs`) → decode and preprocess (`service.pipeline`) →
`backend.infer` for all images concurrently (so they batch) → postprocess → one result per image,
in order. With the embedded backend's default placement the models run inside the gateway replica,
so this whole path is one process.
"""

# No `from __future__ import annotations` here: FastAPI reads the generated routes' annotations at run time.

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import numpy as np
import torch
from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader
from pydantic import BaseModel
from ray import serve
from ray.serve.config import BackpressureConfig
from ray.serve.deployment import Deployment
from ray.serve.handle import DeploymentHandle
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from service.admission import Admission, Limits, Ticket
from service.answer_formats import encode_answer
from service.asgi import ResponseStatus, route_path
from service.backends.base import Backend, BackendTimeout, MalformedAnswer, check_outputs
from service.backends.embedded import EmbeddedBackend, LocalBackend, model_deployments
from service.backends.torchscript import latest_version
from service.contract import load_contract
from service.errors import CLIENT_CLOSED, ERROR_KINDS, ERROR_RESPONSES, ApiError, install_error_handlers
from service.handlers.common import Geometry, Handler
from service.images import ImageError, configure_pillow
from service.inputs import ImageInputs, read_images
from service.metrics import GatewayMetrics
from service.oip import install_oip
from service.pipeline import TaskPipeline
from service.routes_demo import annotated_or_json, install_demo
from service.schemas import HealthResponse, ImageSize, ModelInfo, ModelsResponse, ReadyResponse
from service.settings import Settings
from service.streams import install_streams
from service.timing import BatchTiming, Timings, stage
from service.tracing import Tracing, TracingMiddleware
from service.video import answer_video, is_video_request
from tasks import HANDLERS

log = logging.getLogger(__name__)
T = TypeVar("T")

ENDPOINTS = (*(h.endpoint for h in HANDLERS.values()), "/health", "/ready", "/models")

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

_SUMMARIES = {"/classify": "Top-k classes per image.", "/detect": "Boxes (xyxy, original-image pixels), labels and "
              "scores per image.", "/segment": "Per-class COCO RLE masks at original size, pixel fractions, "
              "optionally a PNG."}


def _endpoint_of(scope: Scope) -> str:
    """The route a request is for, as a bounded metric tag (`other` for unknown paths)."""
    path = route_path(scope)
    if path in ENDPOINTS:
        return path
    if path == "/v2" or path.startswith("/v2/"):  # the Open Inference Protocol: inference per model, the rest as one
        parts = path.split("/")  # "", "v2", "models", NAME, ["versions", V,] "infer"
        if len(parts) in (5, 7) and parts[2] == "models" and parts[-1] == "infer" and parts[3] in HANDLERS:
            return f"/v2/models/{parts[3]}/infer"
        return "/v2"
    return "other"


class MetricsMiddleware:
    """Count every HTTP request, its status and latency (plain ASGI: no per-request task or stream copy)."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = _endpoint_of(scope)
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
                "video/mp4": binary,  # every frame answered (service/video.py)
                "video/webm": binary,
            },
        }
    }


_READY_CACHE_S = 1.0
_API_KEY_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False, description="the gateway's CVSERVE_API_KEY")
# Failed key checks per client address; each failure in a row waits longer before its 401 (capped).
_BAD_KEY_DELAY_S, _BAD_KEY_MAX_DELAY_S, _BAD_KEY_CLIENTS = 0.05, 2.0, 10_000


def api_key_dependency(settings: Settings) -> Callable[..., Any]:
    """A FastAPI dependency that refuses requests without the right key (401), slowing repeated failures."""
    expected = settings.api_key.get_secret_value().encode() if settings.api_key is not None else b""
    failures: dict[str, int] = {}

    async def require_api_key(request: Request, key: Annotated[str | None, Depends(_API_KEY_HEADER)]) -> None:
        given = key or request.headers.get("authorization", "").removeprefix("Bearer ")
        client = request.client.host if request.client else "unknown"
        if secrets.compare_digest(given.encode(), expected):
            failures.pop(client, None)
            return
        if len(failures) >= _BAD_KEY_CLIENTS:
            failures.clear()
        failures[client] = count = failures.get(client, 0) + 1
        if count in (1, 10) or count % 100 == 0:
            log.warning("wrong or missing API key from %s (%d in a row)", client, count)
        await asyncio.sleep(min(_BAD_KEY_DELAY_S * 2 ** (count - 1), _BAD_KEY_MAX_DELAY_S))
        raise ApiError(401, "unauthorized", "missing or wrong API key; send it as header X-API-Key")

    return require_api_key


class Answerer:
    """Answers task requests: body read, admission, deadline, decode → backend → postprocess.

    The body is read under its own deadline (`body_timeout_s`, 408) before the request counts
    against admission (`service.admission`: requests, bytes and pixels in flight), so slow uploads
    hold nothing; the request's share is held until the threads working on its images are done."""

    def __init__(
        self, settings: Settings, backend: Backend, metrics: GatewayMetrics, tracing: Tracing | None = None
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.metrics = metrics
        self.tracing = tracing  # None: tracing off
        self.pipelines = {m: TaskPipeline.load(settings, m) for m in settings.models}
        self.versions = {m: latest_version(settings.model_repository, m) for m in settings.models}
        # Decode/preprocess/postprocess threads: as many as cores (Pillow and torch release the GIL).
        self._pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="images")
        limits = Limits(settings.admission_limit, settings.max_in_flight_bytes, settings.max_in_flight_pixels)
        self.admission = Admission(limits, settings.retry_after_s)
        self.malformed: dict[str, str] = {}  # model → why its last answer broke its contract (not ready)

    def pipeline(self, handler: Handler) -> TaskPipeline:
        """The enabled model's pipeline, or 404 model_disabled."""
        pipeline = self.pipelines.get(handler.model)
        if pipeline is None:
            raise ApiError(404, "model_disabled", f"model {handler.model} is not enabled on this gateway")
        return pipeline

    async def run(self, handler: Handler, request: Request, query_options: BaseModel) -> Response:
        """Read the images (408 past `body_timeout_s`), admit the request (503 + Retry-After past the
        limits) and answer it within its deadline (504)."""
        if is_video_request(request):  # a video body: per-frame answers (service/video.py)
            return await answer_video(self, handler, request, query_options)
        pipeline = self.pipeline(handler)
        settings = self.settings
        timings = self.timings()  # a trace's stage spans are made from the same timings as Server-Timing
        with stage(timings, "read"):
            inputs = await self.in_body_time(
                read_images(
                    request,
                    handler.request,
                    settings.max_body_bytes,
                    settings.max_images_per_request,
                    max_request_pixels=settings.max_request_pixels,
                    allowed_formats=settings.allowed_formats,
                    min_side=pipeline.min_side,  # a large JPEG counts at the size it is decoded to
                )
            )
        options = handler.options.model_validate({**query_options.model_dump(exclude_unset=True), **inputs.json_options})

        async def finish(response: BaseModel) -> BaseModel | Response:
            with stage(timings, "encode"):
                return await annotated_or_json(request, response, inputs.blobs, options, settings)

        deadline_s = request_deadline(request, settings.request_timeout_s)
        answer = await unless_gone(request, self.answer_admitted(handler, inputs, options, finish, timings, deadline_s))
        if not isinstance(answer, Response):
            with stage(timings, "encode"):
                answer = encode_answer(request, answer)  # JSON, or MessagePack when Accept asks for it
        self.report_stages(handler, answer, timings, {"cvserve.images": len(inputs.blobs)})
        return answer

    def timings(self) -> Timings | None:
        """A new request's `Timings`, or None when neither the header nor a trace wants them."""
        return Timings() if self.settings.stage_timings or self.tracing is not None else None

    def report_stages(
        self, handler: Handler, response: Response, timings: Timings | None, attributes: dict[str, str | int]
    ) -> None:
        """Where a finished request's time went, to each place that wants it: `Server-Timing` and the stage
        histograms (stage_timings), and its trace's stage spans (tracing), with `attributes` on its span."""
        if timings is None:
            return
        if self.settings.stage_timings:
            response.headers["Server-Timing"] = timings.header()
            self.metrics.observe_stages(handler.endpoint, timings)
        if self.tracing is not None:
            self.tracing.record_stages(
                timings,
                {
                    "cvserve.endpoint": handler.endpoint,
                    "cvserve.model": handler.model,
                    "cvserve.backend": self.settings.backend,
                    **attributes,
                },
            )

    async def in_body_time(self, reading: Awaitable[T]) -> T:
        """Await `reading` (the request body, parsed) within `body_timeout_s` (408 body_timeout past it)."""
        try:
            async with asyncio.timeout(self.settings.body_timeout_s):
                return await reading
        except TimeoutError as error:
            raise ApiError(
                408, "body_timeout", f"the request body did not arrive within {self.settings.body_timeout_s:g} s"
            ) from error

    async def answer_admitted(
        self,
        handler: Handler,
        inputs: ImageInputs,
        options: BaseModel,
        finish: Callable[[BaseModel], Awaitable[T]],
        timings: Timings | None = None,
        deadline_s: float | None = None,
    ) -> T:
        """Admit the request (503 + Retry-After past the limits), then answer it and `finish` the answer
        within its deadline (504); every route that runs a model goes through here."""
        ticket = self.admission.admit(sum(map(len, inputs.blobs)), inputs.pixels)
        timeout = deadline_s or self.settings.request_timeout_s
        try:
            async with asyncio.timeout(timeout):
                return await finish(await self.answer_images(handler, inputs.blobs, options, ticket, timings))
        except TimeoutError as error:
            raise BackendTimeout(f"the request did not finish within {timeout:g} s") from error
        finally:
            ticket.release()

    async def answer_images(
        self,
        handler: Handler,
        blobs: list[bytes],
        options: BaseModel,
        ticket: Ticket | None = None,
        timings: Timings | None = None,
    ) -> BaseModel:
        """The task's response for encoded images `blobs` (decode → backend → postprocess), as the
        route gives it; `ticket` holds admission until the image threads finish; `timings`, if given,
        receives each stage's duration."""
        pipeline = self.pipeline(handler)
        self.metrics.images.observe(len(blobs), tags={"endpoint": handler.endpoint})
        loop = asyncio.get_running_loop()

        def in_pool(function: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
            work = self._pool.submit(function, *args)
            if ticket is not None:
                ticket.hold(work)
            return asyncio.wrap_future(work, loop=loop)

        count = len(blobs)
        self.backend.announce(handler.model, count)  # an in-process batcher waits briefly for these
        try:
            prepared = await asyncio.gather(*(in_pool(_prepare, pipeline, blob, i) for i, blob in enumerate(blobs)))
        finally:
            self.backend.arrived(handler.model, count)
        batches = [BatchTiming() for _ in prepared] if timings is not None else None
        outputs = await self.backend.infer_many(handler.model, [image.tensor for image in prepared], batches)
        self._check(pipeline, outputs)
        geometries = [image.geometry for image in prepared]
        results, postprocess_s = await in_pool(_answer_all, pipeline, outputs, geometries, options)
        if timings is not None:
            for image in prepared:
                timings.add("decode", image.decode_s)
                timings.add("preprocess", image.preprocess_s)
            timings.batches(batches or [])
            timings.add("postprocess", postprocess_s)
        return handler.response(
            model=handler.model, version=self.versions[handler.model], backend=self.settings.backend, results=results
        )

    def _check(self, pipeline: TaskPipeline, outputs: list[dict[str, np.ndarray]]) -> None:
        """503 (and not ready) if the model's answer breaks its contract; a good answer makes it ready again."""
        try:
            for output in outputs:
                check_outputs(pipeline.contract, output)
        except MalformedAnswer as error:
            if pipeline.model not in self.malformed:
                log.error("%s; reporting not ready until it answers well again", error)
            self.malformed[pipeline.model] = str(error)
            raise MalformedAnswer(f"model {pipeline.model} gave a malformed answer; retry shortly") from error
        if self.malformed.pop(pipeline.model, None) is not None:
            log.info("model %s answers well again", pipeline.model)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.tracing is not None:
            self.tracing.shutdown()


REQUEST_TIMEOUT_HEADER = "x-request-timeout"


def request_deadline(request: Request, server_timeout_s: float) -> float:
    """Seconds this request may take once admitted: the server's deadline, or the client's shorter
    `X-Request-Timeout: <seconds>` (400 if it is not a positive number)."""
    given = request.headers.get(REQUEST_TIMEOUT_HEADER)
    if given is None:
        return server_timeout_s
    try:
        seconds = float(given)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise ApiError(400, "bad_request", f"X-Request-Timeout must be a positive number of seconds, got {given!r}")
    return min(seconds, server_timeout_s)


async def unless_gone(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, unless the client disconnects first: then cancel it (its images leave the batch
    queue before they run; a Triton call is cancelled) and raise `ClientDisconnect` (recorded as 499)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
        if not task.done():  # the client left first
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):  # nobody is there to tell
                await task
            raise ClientDisconnect()
        return task.result()
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()


async def _disconnected(request: Request) -> None:
    """Return when the client has gone (the body has been read: the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@dataclass(frozen=True)
class _Decoded:
    tensor: np.ndarray
    geometry: Geometry
    decode_s: float
    preprocess_s: float


def _prepare(pipeline: TaskPipeline, blob: bytes, index: int) -> _Decoded:
    """One image decoded and preprocessed (in a pool thread), timing both steps."""
    began = time.perf_counter()
    try:
        decoded = pipeline.decode(blob)
        decoded_at = time.perf_counter()
        tensor, geometry = pipeline.preprocess(*decoded)
    except ImageError as error:
        raise ApiError(error.status_code, error.code, f"image {index}: {error}") from error
    return _Decoded(tensor, geometry, decoded_at - began, time.perf_counter() - decoded_at)


def _answer_all(
    pipeline: TaskPipeline, outputs: list[dict[str, np.ndarray]], geometries: list[Geometry], options: BaseModel
) -> tuple[list[BaseModel], float]:
    """Every image's result (in a pool thread), and the seconds it took."""
    began = time.perf_counter()
    results = [pipeline.answer(out, geometry, options) for out, geometry in zip(outputs, geometries, strict=True)]
    return results, time.perf_counter() - began


def _task_route(router: APIRouter, answerer: Answerer, handler: Handler) -> None:
    """POST <handler.endpoint>: the task's options from the query string, the images from the body."""

    async def route(request: Request, options: Annotated[handler.options, Query()]) -> Response:  # type: ignore[name-defined]
        return await answerer.run(handler, request, options)

    router.add_api_route(
        handler.endpoint,
        route,
        methods=["POST"],
        response_model=handler.response,
        responses=ERROR_RESPONSES,
        openapi_extra=_image_body_openapi(handler.request),
        summary=f"{handler.task.capitalize()} of one or several images",
        description=_SUMMARIES.get(handler.endpoint, ""),
        name=handler.task,
    )


def create_api(settings: Settings, backend: Backend) -> FastAPI:
    """The gateway's HTTP API over `backend`: task routes generated from the handlers, health, demo page."""
    api = FastAPI(title="cvserve", version="0.1.0", description=DESCRIPTION)
    metrics = GatewayMetrics()
    tracing = Tracing.from_settings(settings)  # None unless CVSERVE_TRACING
    answerer = Answerer(settings, backend, metrics, tracing)
    api.state.answerer = answerer
    api.state.metrics = metrics
    api.state.tracing = tracing
    install_error_handlers(api)
    install_demo(api)
    install_streams(api)  # /stream/<task>: WebSocket frame streams (service/streams.py)
    api.add_middleware(MetricsMiddleware, metrics=metrics)
    if tracing is not None:
        api.add_middleware(TracingMiddleware, tracing=tracing)  # outermost: the request's span covers the rest

    # Every inference route sits behind the API key when one is set: a new task cannot forget it.
    guarded = [Depends(api_key_dependency(settings))] if settings.api_key is not None else []
    tasks = APIRouter(dependencies=guarded)
    for handler in HANDLERS.values():  # a disabled model's route answers 404 model_disabled
        _task_route(tasks, answerer, handler)
    api.include_router(tasks)
    install_oip(api, answerer, settings, guarded)  # /v2: the Open Inference Protocol

    @api.get("/health", response_model=HealthResponse)
    async def health() -> HealthResponse:
        """The gateway process is alive (says nothing about the models)."""
        return HealthResponse()

    checked: list[tuple[float, bool]] = []  # the last readiness check: probes within a second reuse it

    @api.get("/ready", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}})
    async def ready() -> JSONResponse:
        """Every enabled model can answer now (503 otherwise); checked at most once a second."""
        now = time.monotonic()
        if checked and now - checked[0][0] < _READY_CACHE_S:
            backend_ready = checked[0][1]
        else:
            backend_ready = await backend.ready()
            checked[:] = [(now, backend_ready)]
        is_ready = backend_ready and not answerer.malformed  # a malformed answer counts at once
        body = ReadyResponse(ready=is_ready, backend=settings.backend)
        return JSONResponse(body.model_dump(), status_code=200 if is_ready else 503)

    @api.get("/models", response_model=ModelsResponse)
    async def models() -> ModelsResponse:
        """The enabled models and their contracts."""
        return ModelsResponse(models=[_model_info(answerer, settings, name) for name in answerer.pipelines])

    return api


def _model_info(answerer: Answerer, settings: Settings, name: str) -> ModelInfo:
    contract = answerer.pipelines[name].contract
    height, width = contract.input_size
    return ModelInfo(
        name=name,
        version=answerer.versions[name],
        task=contract.task,
        endpoint=HANDLERS[name].endpoint,
        backend=settings.backend,
        input_size=ImageSize(width=width, height=height),
        preprocess=contract.preprocess,
        max_batch_size=contract.max_batch_size,
        weights=contract.parameters.get("weights", "unknown"),
        labels=list(contract.labels),
    )


def make_backend(settings: Settings, models: dict[str, DeploymentHandle]) -> Backend:
    """The backend `settings` names (Triton's client is imported only when used)."""
    if settings.backend == "triton":
        from service.backends.triton import TritonBackend

        return TritonBackend(settings, models=settings.models)
    if settings.model_placement == "ingress":
        return LocalBackend(settings)
    return EmbeddedBackend(models, settings.request_timeout_s)


@serve.deployment
@serve.ingress()
class Gateway:
    """HTTP ingress: builds the backend once per replica, then the API over it (`create_api`)."""

    def __init__(self, settings: Settings, models: dict[str, DeploymentHandle]) -> None:
        self._settings = settings
        configure_pillow(settings.max_pixels)
        if not (settings.backend == "embedded" and settings.model_placement == "ingress"):
            torch.set_num_threads(1)  # only per-image preprocessing here; leave the cores to the models
        self._backend: Backend = make_backend(settings, models)

    def __serve_build_asgi_app__(self) -> FastAPI:
        self._api = create_api(self._settings, self._backend)
        return self._api

    def batch_sizes(self, model: str) -> dict[int, int]:
        """Batches of each size `model` ran in this replica (embedded backend in the ingress; tests use it)."""
        return self._backend.batch_sizes(model)

    async def __del__(self) -> None:
        api = getattr(self, "_api", None)
        if api is not None:
            api.state.answerer.close()
        backend = getattr(self, "_backend", None)
        if backend is not None:
            await backend.close()


def resolve_device(settings: Settings) -> Settings:
    """Turn `device="auto"` into cuda or cpu here, where Ray can still be asked for a GPU."""
    if settings.device != "auto":
        return settings
    return settings.model_copy(update={"device": "cuda" if torch.cuda.is_available() else "cpu"})


def serve_deployments(settings: Settings) -> tuple[Deployment, dict[str, Deployment]]:
    """The graph's deployments with their options: the ingress and, for embedded models placed apart,
    one per model (what `build_app` binds and the Serve config files describe)."""
    settings = resolve_device(settings)
    for model in settings.models:
        load_contract(settings.model_repository, model)  # fail here, clearly, if the export is missing
    models_inside = settings.backend == "embedded" and settings.model_placement == "ingress"
    separate = settings.backend == "embedded" and not models_inside
    actor_options: dict[str, float] = {"num_cpus": settings.ingress_num_cpus}
    if models_inside:
        actor_options["num_cpus"] += settings.model_num_cpus * len(settings.models)
        if settings.device == "cuda":
            actor_options["num_gpus"] = settings.model_num_gpus
    ingress = Gateway.options(
        num_replicas=settings.ingress_replicas,
        max_ongoing_requests=settings.max_ongoing_requests,
        max_queued_requests=settings.max_queued_requests,
        # Serve's own 503 when its queue in front of the gateway is full: say when to retry too
        backpressure_config=BackpressureConfig(retry_after_s=settings.retry_after_s),
        ray_actor_options=actor_options,
    )
    return ingress, (model_deployments(settings) if separate else {})


def build_app(settings: Settings) -> serve.Application:
    """Compose the whole graph: the ingress and, for embedded models placed apart, one deployment per model."""
    settings = resolve_device(settings)
    ingress, models = serve_deployments(settings)
    return ingress.bind(settings, {name: model.bind(name, settings) for name, model in models.items()})
