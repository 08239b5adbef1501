"""The task routes (`POST /classify`, `/detect`, `/segment`, one per registered handler) and the
service routes (`/health`, `/ready`, `/models`), over the request core.

A task route reads images in three styles (`service.core.inputs`), or a video body
(`service.surfaces.video`), and answers JSON, MessagePack (`service.core.answers`) or the answer
drawn on the image (`service.surfaces.demo`).
"""

# No `from __future__ import annotations` here: FastAPI reads the generated routes' annotations at run time.

from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from service.core.answerer import Answerer
from service.core.answers import encode_answer
from service.core.errors import ERROR_RESPONSES
from service.core.inputs import ImageInputs, read_images
from service.core.pipeline import TaskPipeline
from service.handlers.common import Handler
from service.core.versions import CANARY_HEADER, asked, version_weights
from service.schemas import HealthResponse, ImageSize, ModelInfo, ModelsResponse, ReadyResponse, VersionInfo
from service.surfaces.demo import annotated_or_json
from service.surfaces.video import answer_video, is_video_request
from service.timing import Timings, stage

_SUMMARIES = {"/classify": "Top-k classes per image.", "/detect": "Boxes (xyxy, original-image pixels), labels and "
              "scores per image.", "/segment": "Per-class COCO RLE masks at original size, pixel fractions, "
              "optionally a PNG."}  # fmt: skip
SERVICE_ENDPOINTS = ("/health", "/ready", "/models")


def image_body_openapi(body_model: type[BaseModel]) -> dict[str, Any]:
    """Describe the accepted request bodies for /docs (the route reads the body itself)."""
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
                "video/mp4": binary,  # every frame answered (service/surfaces/video.py)
                "video/webm": binary,
            },
        }
    }


async def answer_task(answerer: Answerer, handler: Handler, request: Request, query_options: BaseModel) -> Response:
    """One task request: images in any style (or a video body) → the answer in the format asked for."""
    if is_video_request(request):  # a video body: per-frame answers
        return await answer_video(answerer, handler, request, query_options)
    settings = answerer.settings

    async def read(pipeline: TaskPipeline) -> tuple[ImageInputs, BaseModel]:
        inputs = await read_images(
            request,
            handler.request,
            settings.max_body_bytes,
            settings.max_images_per_request,
            max_request_pixels=settings.max_request_pixels,
            allowed_formats=settings.allowed_formats,
            min_side=pipeline.min_side,  # a large JPEG counts at the size it is decoded to
        )
        merged = {**query_options.model_dump(exclude_unset=True), **inputs.json_options}
        return inputs, handler.options.model_validate(merged)

    async def encode(response: BaseModel, inputs: ImageInputs, options: BaseModel, timings: Timings | None) -> Response:
        with stage(timings, "encode"):
            answer = await annotated_or_json(request, handler, response, inputs.blobs, options, settings)
            return answer if isinstance(answer, Response) else encode_answer(request, answer)

    return await answerer.answer_request(request, handler, read, encode)


def install_task_routes(router: APIRouter, answerer: Answerer, handlers: Sequence[Handler]) -> None:
    """POST <handler.endpoint> for each handler: the task's options from the query string, the images from the body."""
    for handler in handlers:  # a disabled model's route answers 404 model_disabled
        _task_route(router, answerer, handler)


def _task_route(router: APIRouter, answerer: Answerer, handler: Handler) -> None:
    async def route(request: Request, options: Annotated[handler.options, Query()]) -> Response:  # type: ignore[name-defined]
        # `version=` (the query's) and the canary header say which version answers (service/core/versions.py)
        with asked(getattr(options, "version", None), request.headers.get(CANARY_HEADER)):
            return await answer_task(answerer, handler, request, options)

    router.add_api_route(
        handler.endpoint,
        route,
        methods=["POST"],
        response_model=handler.response,
        responses=ERROR_RESPONSES,
        openapi_extra=image_body_openapi(handler.request),
        summary=f"{handler.task.capitalize()} of one or several images",
        description=_SUMMARIES.get(handler.endpoint, ""),
        name=handler.task,
    )


def install_service_routes(api: FastAPI, answerer: Answerer) -> None:
    """/health, /ready (the core's one readiness check) and /models."""
    settings = answerer.settings

    @api.get("/health", response_model=HealthResponse)
    async def health() -> HealthResponse:
        """The gateway process is alive (says nothing about the models)."""
        return HealthResponse()

    @api.get("/ready", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}})
    async def ready() -> JSONResponse:
        """Every enabled model can answer now (503 otherwise); checked at most once a second."""
        is_ready = await answerer.ready()
        body = ReadyResponse(ready=is_ready, backend=settings.backend)
        return JSONResponse(body.model_dump(), status_code=200 if is_ready else 503)

    @api.get("/models", response_model=ModelsResponse)
    async def models() -> ModelsResponse:
        """The enabled models and their contracts."""
        return ModelsResponse(models=[model_info(answerer, name) for name in answerer.pipelines])


def model_info(answerer: Answerer, name: str) -> ModelInfo:
    """What `/models` says of one enabled model."""
    pipeline = answerer.pipelines[name]
    contract = pipeline.contract
    height, width = contract.input_size
    state = answerer.lifecycle.states[name]
    candidate = state.candidate
    default_weights = contract.parameters.get("weights", "unknown")
    versions = []
    for version in answerer.lifecycle.loaded(name):
        role = (
            "current" if version == state.current else "candidate" if candidate and version == candidate.version
            else "previous" if version == state.previous else "loaded"
        )  # fmt: skip
        versions.append(
            VersionInfo(
                version=version,
                role=role,
                candidate_mode=candidate.mode if role == "candidate" and candidate else None,
                candidate_share=candidate.share if role == "candidate" and candidate else None,
                weights=version_weights(answerer.settings.model_repository, name, version, default_weights),
                input_size=ImageSize(width=width, height=height),
                labels=list(contract.labels),
            )
        )
    return ModelInfo(
        name=name,
        version=answerer.versions[name],
        task=contract.task,
        endpoint=pipeline.handler.endpoint,
        backend=answerer.settings.backend,
        input_size=ImageSize(width=width, height=height),
        preprocess=contract.preprocess,
        max_batch_size=contract.max_batch_size,
        weights=version_weights(answerer.settings.model_repository, name, state.current, default_weights),
        labels=list(contract.labels),
        versions=versions,
    )
