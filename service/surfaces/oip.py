"""The Open Inference Protocol (KServe v2, Triton's HTTP/REST API) on the gateway, under `/v2`.

An unmodified `tritonclient.http` (or any OIP client) can talk to the gateway:

* `GET /v2` · `/v2/health/live` · `/v2/health/ready` · `/v2/models/{model}[/versions/{v}][/ready|/config]`
* `POST /v2/models/{model}[/versions/{v}]/infer`

Each enabled model (classifier, detector, segmenter) is one OIP model. Its one input is `IMAGE`,
BYTES, shape `[n]`: one encoded image file (JPEG, PNG, ...) per element, at most
`max_images_per_request`, sent as binary tensor data (the extension tritonclient uses: a JSON header of
`Inference-Header-Content-Length` bytes, then each element as a 4-byte little-endian length and its
bytes) or, in a plain JSON request, as base64 strings. The request's `parameters` are the task's
options (`top_k`, `score_threshold`, `max_detections`, `return_png`, `return_polygons`,
`polygon_tolerance`, `explain`, `explain_grid`, `explain_class`, `explain_top`, `explain_overlay`: the
explanation is in each image's `RESULT`; `annotate` is for the task routes only). A request may name its model in `model_name`
(KServe's Python client does); it must be the URL's model. Outputs, all with the images as the first
dimension (`RESULT` for every task, typed tensors where the answer is a table):

* `RESULT` BYTES `[n]`: per image, the same JSON document the task route gives in `results[i]`.
* classifier: `LABELS` BYTES, `SCORES` FP32, `CLASS_IDS` INT32, each `[n, k]` (best first).
* detector: `BOXES` FP32 `[n, m, 4]` (xyxy, original-image pixels), `SCORES` FP32 `[n, m]`,
  `LABELS` BYTES `[n, m]`, `CLASS_IDS` INT32 `[n, m]`, `COUNT` INT32 `[n]`: `m` is the largest
  detection count of the batch; rows past an image's `COUNT` are padding (0, "", -1).
* segmenter: `RESULT` only (the RLEs, fractions, polygons and PNG are in it).

The request runs exactly as on the task routes (`Answerer`): the same body limit and deadline,
image count and pixel budget, formats, admission and request deadline, API key (on `infer` only,
like the task routes). Every error under `/v2` has the protocol's shape `{"error": "<code>: <message>"}`
with the status and `code` the task routes would use (docs/ERRORS.md).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import math
import struct
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.core.answerer import Answerer
from service.core.errors import ApiError, describe_validation_errors
from service.core.inputs import ImageInputs, byte_count, check_images, read_body
from service.core.pipeline import TaskPipeline
from service.core.versions import CANARY_HEADER, asked
from service.handlers.common import TABLE_TYPES, Handler
from service.surfaces.demo import check_carried_images
from service.timing import Timings, stage

log = logging.getLogger(__name__)

PREFIX = "/v2"
HEADER_LENGTH = "Inference-Header-Content-Length"
IMAGE, RESULT = "IMAGE", "RESULT"
EXTENSIONS = ("binary_tensor_data", "parameters", "model_configuration")
_MAX_HEADER_COMMAS = 256  # beyond one per JSON-mode image: a real request header has a few dozen

# ---- the protocol's request ----

Scalar = bool | int | float | str


class InputTensor(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., examples=[IMAGE])
    shape: list[int] = Field(..., max_length=8, examples=[[1]])
    datatype: str = Field(..., examples=["BYTES"])
    parameters: dict[str, Scalar] | None = Field(None, examples=[{"binary_data_size": 12345}])
    data: list[str | list[str]] | None = Field(None, description="JSON form: base64-encoded image files.")


class OutputRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., examples=[RESULT])
    parameters: dict[str, Scalar] | None = Field(None, examples=[{"binary_data": True}])


class InferenceRequest(BaseModel):
    """The OIP inference request header (the JSON part of the body)."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = None
    model_name: str | None = Field(
        None, description="The model the request is for (KServe's client sends it); the URL's model if given."
    )
    parameters: dict[str, Scalar] | None = Field(
        None, description="The task's options, and binary_data_output."
    )
    inputs: list[InputTensor] = Field(..., min_length=1, max_length=8)
    outputs: list[OutputRequest] | None = Field(None, max_length=16)


# ---- the OIP view of a task ----


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # BYTES | FP32 | INT32
    shape: tuple[int, ...]

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


_NUMPY_TYPES = TABLE_TYPES
_CONFIG_TYPES = {"FP32": "TYPE_FP32", "INT32": "TYPE_INT32", "BYTES": "TYPE_STRING"}
INPUT_SPEC = TensorSpec(IMAGE, "BYTES", (-1,))
RESULT_SPEC = TensorSpec(RESULT, "BYTES", (-1,))


def output_specs(handler: Handler) -> tuple[TensorSpec, ...]:
    """The task's OIP outputs: `RESULT` (the task route's result per image), then the handler's tables."""
    return (RESULT_SPEC, *(TensorSpec(spec.name, spec.datatype, spec.shape) for spec in handler.tables))


def output_tensors(handler: Handler, response: BaseModel) -> dict[str, np.ndarray]:
    """Every output of the task's OIP model for `response` (the task route's answer), by name."""
    results = response.results  # type: ignore[attr-defined]
    tensors = {
        RESULT: np.array([result.model_dump_json().encode() for result in results] or [], dtype=object)
    }
    tensors.update(handler.table(results))
    return tensors


# ---- reading a request ----


def _decompressed(body: bytes, encoding: str, max_bytes: int) -> bytes:
    """The body without its Content-Encoding (gzip or deflate, as tritonclient compresses), at most `max_bytes`."""
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise ApiError(
            415,
            "unsupported_media_type",
            f"Content-Encoding {encoding} is not accepted; send identity, gzip or deflate",
        )
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)  # HTTP deflate is a zlib stream
    try:
        data = inflater.decompress(body, max_bytes + 1)
    except zlib.error as error:
        raise ApiError(400, "bad_request", f"the {encoding} request body cannot be decompressed") from error
    if len(data) > max_bytes:
        raise ApiError(
            413, "body_too_large", f"the request body decompresses to more than {max_bytes} bytes, the limit"
        )
    if not inflater.eof:
        raise ApiError(400, "bad_request", f"the {encoding} request body is truncated")
    return data


def _split(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """The JSON header and the binary tensor data after it."""
    if header_length is None:
        return body, memoryview(b"")
    cut = byte_count(header_length)
    if cut is None or cut > len(body):
        raise ApiError(
            400,
            "bad_request",
            f"{HEADER_LENGTH} must be the byte length of the JSON header in ASCII digits, at most the body's "
            f"{len(body)} bytes",
        )
    return body[:cut], memoryview(body)[cut:]


def _parse_header(header: bytes, max_images: int) -> InferenceRequest:
    # refused before parsing, as the task routes refuse JSON bodies with more values than images
    if header.count(b",") > 2 * max_images + _MAX_HEADER_COMMAS:
        raise ApiError(
            413, "too_many_images", f"the inference request holds more values than {max_images} images can"
        )
    try:
        return InferenceRequest.model_validate_json(header)
    except ValidationError as error:
        if any(e.get("type") == "json_invalid" for e in error.errors()):
            raise ApiError(400, "bad_request", "the inference request header is not valid JSON") from error
        message = describe_validation_errors(list(error.errors()))
        raise ApiError(400, "bad_request", f"malformed inference request: {message}") from error


def _binary_parts(request: InferenceRequest, binary: memoryview) -> list[memoryview | None]:
    """Each input's binary data (None for inputs given as JSON `data`), checked against the body's length."""
    parts: list[memoryview | None] = []
    offset = 0
    for tensor in request.inputs:
        size = (tensor.parameters or {}).get("binary_data_size")
        if size is None:
            parts.append(None)
            continue
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ApiError(400, "bad_request", f"input {tensor.name}: binary_data_size must be a byte count")
        parts.append(binary[offset : offset + size])
        offset += size
    if offset != len(binary):
        raise ApiError(
            400,
            "bad_request",
            f"the inputs' binary_data_size add up to {offset} bytes, but {len(binary)} follow the JSON header",
        )
    return parts


def _bytes_elements(data: memoryview, expected: int) -> list[bytes]:
    """BYTES tensor data (4-byte little-endian length, then the bytes, per element) as its elements.

    The structure is walked first (no copies) so that a body of millions of empty elements is refused
    before tritonclient's deserializer would build them all."""
    offset = count = 0
    while offset < len(data):
        if count == expected or offset + 4 > len(data):
            raise ApiError(
                400, "bad_request", f"input {IMAGE}: the binary data does not hold {expected} elements"
            )
        (length,) = struct.unpack_from("<I", data, offset)
        offset += 4 + length
        count += 1
    if offset != len(data) or count != expected:
        raise ApiError(
            400, "bad_request", f"input {IMAGE}: the binary data does not hold {expected} elements"
        )
    elements, offset = [], 0
    while offset < len(data):
        (length,) = struct.unpack_from("<I", data, offset)
        elements.append(bytes(data[offset + 4 : offset + 4 + length]))
        offset += 4 + length
    return elements


def _base64_elements(data: list[str | list[str]]) -> list[bytes]:
    texts = [text for item in data for text in (item if isinstance(item, list) else [item])]
    images = []
    for index, text in enumerate(texts):
        try:
            images.append(
                base64.b64decode(text.partition(",")[2] if text.startswith("data:") else text, validate=True)
            )
        except (binascii.Error, ValueError) as error:
            raise ApiError(400, "bad_request", f"input {IMAGE}[{index}] is not valid base64") from error
    return images


def read_infer_request(
    body: bytes,
    header_length: str | None,
    encoding: str,
    max_bytes: int,
    max_images: int,
    model: str | None = None,
) -> tuple[InferenceRequest, list[bytes]]:
    """The inference request for `model` and its images, in order (runs in a worker thread: decompression
    and parsing)."""
    header, binary = _split(_decompressed(body, encoding, max_bytes), header_length)
    request = _parse_header(header, max_images)
    if model is not None and request.model_name is not None and request.model_name != model:
        raise ApiError(
            400,
            "bad_request",
            f"the request's model_name {request.model_name[:64]!r} is not {model}, the model of its URL",
        )
    parts = _binary_parts(request, binary)
    images: list[bytes] | None = None
    for tensor, part in zip(request.inputs, parts, strict=True):
        if tensor.name != IMAGE:
            raise ApiError(
                400, "bad_request", f"unknown input {tensor.name}; the model takes one input, {IMAGE} (BYTES)"
            )
        if images is not None:
            raise ApiError(400, "bad_request", f"input {IMAGE} is given twice")
        if tensor.datatype != "BYTES":
            raise ApiError(
                400,
                "bad_request",
                f"input {IMAGE} has datatype {tensor.datatype}; it is BYTES (encoded image files)",
            )
        if any(d < 0 for d in tensor.shape):
            raise ApiError(
                400, "bad_request", f"input {IMAGE} has shape {tensor.shape}; dimensions cannot be negative"
            )
        count = math.prod(tensor.shape)
        if count > max_images:
            raise ApiError(
                413, "too_many_images", f"{count} images in one request; the limit is {max_images}"
            )
        if part is not None:
            images = _bytes_elements(part, count)
        elif tensor.data is not None:
            images = _base64_elements(tensor.data)
            if len(images) != count:
                raise ApiError(
                    400, "bad_request", f"input {IMAGE} has shape {tensor.shape} but {len(images)} elements"
                )
        else:
            raise ApiError(400, "bad_request", f"input {IMAGE} has neither data nor binary_data_size")
    return request, images or []


def task_options(handler: Handler, parameters: dict[str, Scalar] | None) -> BaseModel:
    """The task's options from the request's parameters (422 invalid_request, as on the task routes)."""
    options = {k: v for k, v in (parameters or {}).items() if k != "binary_data_output"}
    if "annotate" in options:
        raise ApiError(
            422, "invalid_request", f"annotate is not available over {PREFIX}; use {handler.endpoint}"
        )
    return handler.options.model_validate(options)


# ---- writing the answer ----


def _chosen_outputs(handler: Handler, request: InferenceRequest) -> list[tuple[TensorSpec, bool]]:
    """The outputs to send, in order, and whether each goes as binary data."""
    specs = {spec.name: spec for spec in output_specs(handler)}
    binary_default = (request.parameters or {}).get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise ApiError(400, "bad_request", "parameter binary_data_output must be true or false")
    if request.outputs is None:
        return [(spec, binary_default) for spec in specs.values()]
    chosen = []
    for output in request.outputs:
        spec = specs.get(output.name)
        if spec is None:
            raise ApiError(
                400, "bad_request", f"unknown output {output.name}; {handler.model} gives {', '.join(specs)}"
            )
        parameters = output.parameters or {}
        unknown = set(parameters) - {"binary_data"}
        if unknown:
            raise ApiError(
                400, "bad_request", f"output {output.name}: parameters {sorted(unknown)} are not supported"
            )
        binary = parameters.get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise ApiError(400, "bad_request", f"output {output.name}: binary_data must be true or false")
        chosen.append((spec, binary))
    return chosen


def _binary_data(spec: TensorSpec, values: np.ndarray) -> bytes:
    if spec.datatype == "BYTES":
        return b"".join(struct.pack("<I", len(v)) + v for v in (_as_bytes(value) for value in values.ravel()))
    return np.ascontiguousarray(values, dtype=_NUMPY_TYPES[spec.datatype]).tobytes()


def _as_bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _json_data(spec: TensorSpec, values: np.ndarray) -> list[Any]:
    if spec.datatype == "BYTES":
        return [value.decode("utf-8") for value in values.ravel()]
    return values.ravel().tolist()


def encode_infer_response(
    handler: Handler, version: str, request: InferenceRequest, response: BaseModel
) -> Response:
    """The OIP inference response for the task's `response`: JSON, or a JSON header plus binary tensor data."""
    tensors = output_tensors(handler, response)
    outputs, chunks = [], []
    for spec, binary in _chosen_outputs(handler, request):
        values = tensors[spec.name]
        entry: dict[str, Any] = {"name": spec.name, "datatype": spec.datatype, "shape": list(values.shape)}
        if binary:
            chunk = _binary_data(spec, values)
            entry["parameters"] = {"binary_data_size": len(chunk)}
            chunks.append(chunk)
        else:
            entry["data"] = _json_data(spec, values)
        outputs.append(entry)
    document: dict[str, Any] = {"model_name": handler.model, "model_version": version, "outputs": outputs}
    if request.id is not None:
        document["id"] = request.id
    document["parameters"] = {"backend": response.backend}  # type: ignore[attr-defined]
    header = json.dumps(document, separators=(",", ":")).encode()
    if not chunks:
        return Response(header, media_type="application/json")
    return Response(
        header + b"".join(chunks),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(header))},
    )


# ---- errors: the protocol's shape for everything under /v2 ----


def _relative_path(scope: Scope) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def _oip_error_body(body: bytes) -> bytes:
    """`{"error": "<code>: <message>"}` for the gateway's `{"error": {"code", "message"}}`; other bodies as they are."""
    try:
        error = json.loads(body)["error"]
        text = f"{error['code']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        return body
    return json.dumps({"error": text}).encode()


class OipErrors:
    """Plain ASGI middleware: error answers under /v2 get the protocol's shape, with the same status, headers and
    code; an exception nothing handled becomes a logged OIP 500 instead of a text page."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = _relative_path(scope)
        if scope["type"] != "http" or not (path == PREFIX or path.startswith(PREFIX + "/")):
            await self.app(scope, receive, send)
            return
        held: Message | None = None  # the start of an error answer, sent once its body is rewritten
        chunks: list[bytes] = []
        started = False

        async def reshape(message: Message) -> None:
            nonlocal held, started
            if message["type"] == "http.response.start":
                started = True
                if message["status"] < 400:
                    await send(message)
                else:
                    held = message
                return
            if held is None or message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = _oip_error_body(b"".join(chunks))
            headers = [(k, v) for k, v in held["headers"] if k.lower() != b"content-length"]
            await send({**held, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        try:
            await self.app(scope, receive, reshape)
        except Exception:
            if started:
                raise
            log.exception("unhandled error on %s %s", scope.get("method"), path)
            body = json.dumps({"error": "internal: internal error; the gateway log has the details"}).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})


# ---- routes ----


def _server_metadata() -> dict[str, Any]:
    return {"name": "cvserve", "version": "0.1.0", "extensions": list(EXTENSIONS)}


def oip_endpoint(path: str, handlers: Mapping[str, Handler]) -> str:
    """A `/v2` path as a bounded metric tag: inference per model (versions folded), the rest as `/v2`."""
    parts = path.split("/")  # "", "v2", "models", NAME, ["versions", V,] "infer"
    if len(parts) in (5, 7) and parts[2] == "models" and parts[-1] == "infer" and parts[3] in handlers:
        return f"{PREFIX}/models/{parts[3]}/infer"
    return PREFIX


def install_oip(api: FastAPI, answerer: Answerer, guarded: list[Any]) -> None:
    """Add the `/v2` routes over `answerer` (inference behind `guarded`, the API key dependency) and their errors."""
    settings = answerer.settings
    handlers = answerer.handlers
    api.add_middleware(OipErrors)
    open_routes = APIRouter(prefix=PREFIX, tags=["Open Inference Protocol"])
    inference = APIRouter(prefix=PREFIX, tags=["Open Inference Protocol"], dependencies=guarded)

    def handler_of(model: str, version: str | None) -> Handler:
        handler = handlers.get(model)
        if handler is None:
            raise ApiError(
                404, "model_not_found", f"no model {model}; the gateway serves {', '.join(handlers)}"
            )
        answerer.pipeline(handler)  # 404 model_disabled
        loaded = answerer.lifecycle.loaded(model)
        if version is not None and version not in loaded:
            raise ApiError(
                404, "version_not_found", f"model {model} has no version {version} loaded (loaded: {', '.join(loaded)})"
            )
        return handler

    def metadata(model: str, version: str | None) -> dict[str, Any]:
        handler = handler_of(model, version)
        contract = answerer.pipelines[model].contract
        height, width = contract.input_size
        return {
            "name": model,
            "versions": answerer.lifecycle.loaded(model),
            "platform": "cvserve",
            "inputs": [INPUT_SPEC.metadata()],
            "outputs": [spec.metadata() for spec in output_specs(handler)],
            "parameters": {  # what the contract says, and the options the request's parameters take
                "task": contract.task,
                "endpoint": handler.endpoint,
                "backend": settings.backend,
                "labels": list(contract.labels),
                "max_batch_size": contract.max_batch_size,
                "max_images_per_request": settings.max_images_per_request,
                "input_size": {"width": width, "height": height},
                "options": {  # JSON schema of each option the parameters take
                    name: schema
                    for name, schema in handler.options.model_json_schema()["properties"].items()
                    if name != "annotate"
                },
            },
        }

    def config(model: str, version: str | None) -> dict[str, Any]:
        handler = handler_of(model, version)
        contract = answerer.pipelines[model].contract

        def tensor(spec: TensorSpec) -> dict[str, Any]:
            return {"name": spec.name, "data_type": _CONFIG_TYPES[spec.datatype], "dims": list(spec.shape)}

        return {
            "name": model,
            "platform": "cvserve",
            "backend": settings.backend,
            "max_batch_size": 0,  # IMAGE's first dimension is the batch: up to max_images_per_request images
            "input": [tensor(INPUT_SPEC)],
            "output": [tensor(spec) for spec in output_specs(handler)],
            "parameters": {key: {"string_value": value} for key, value in contract.parameters.items()},
        }

    async def model_ready(model: str, version: str | None) -> JSONResponse:
        handler_of(model, version)
        ready = await answerer.ready(model)
        return JSONResponse({"name": model, "ready": ready}, status_code=200 if ready else 503)

    async def infer(request: Request, model: str, version: str | None) -> Response:
        handler = handler_of(model, version)
        oip_requests: list[InferenceRequest] = []

        async def read(pipeline: TaskPipeline) -> tuple[ImageInputs, BaseModel]:
            body = await read_body(request, settings.max_body_bytes)
            oip_request, blobs = await asyncio.to_thread(
                read_infer_request,
                body,
                request.headers.get(HEADER_LENGTH),
                request.headers.get("content-encoding", "").strip().lower(),
                settings.max_body_bytes,
                settings.max_images_per_request,
                model,
            )
            pixels = await check_images(
                blobs,
                settings.max_images_per_request,
                max_request_pixels=settings.max_request_pixels,
                allowed_formats=settings.allowed_formats,
                min_side=pipeline.min_side,
            )
            oip_requests.append(oip_request)
            return ImageInputs(blobs, pixels=pixels), task_options(handler, oip_request.parameters)

        async def encode(
            response: BaseModel, inputs: ImageInputs, options: BaseModel, timings: Timings | None
        ) -> Response:
            check_carried_images(response, settings)
            with stage(timings, "encode"):
                served = str(getattr(response, "version", "") or answerer.versions[model])
                return await asyncio.to_thread(encode_infer_response, handler, served, oip_requests[0], response)

        with asked(version, request.headers.get(CANARY_HEADER)):
            return await answerer.answer_request(request, handler, read, encode)

    @open_routes.get("", summary="Server metadata")
    async def server_metadata() -> dict[str, Any]:
        """The server's name, version and protocol extensions."""
        return _server_metadata()

    @open_routes.get("/health/live", summary="Server liveness")
    async def live() -> dict[str, bool]:
        """The gateway process is alive."""
        return {"live": True}

    @open_routes.get("/health/ready", summary="Server readiness")
    async def ready() -> JSONResponse:
        """Every enabled model can answer now (503 otherwise); checked at most once a second."""
        is_ready = await answerer.ready()
        return JSONResponse({"ready": is_ready}, status_code=200 if is_ready else 503)

    @open_routes.get("/models/{model}", summary="Model metadata")
    async def model_metadata(model: str) -> dict[str, Any]:
        """The model's input and outputs (see service/surfaces/oip.py), labels and options."""
        return metadata(model, None)

    @open_routes.get("/models/{model}/versions/{version}", summary="Model metadata (one version)")
    async def model_version_metadata(model: str, version: str) -> dict[str, Any]:
        return metadata(model, version)

    @open_routes.get("/models/{model}/ready", summary="Model readiness")
    async def model_readiness(model: str) -> JSONResponse:
        return await model_ready(model, None)

    @open_routes.get("/models/{model}/versions/{version}/ready", summary="Model readiness (one version)")
    async def model_version_readiness(model: str, version: str) -> JSONResponse:
        return await model_ready(model, version)

    @open_routes.get("/models/{model}/config", summary="Model configuration")
    async def model_config(model: str) -> dict[str, Any]:
        """A Triton-style configuration of the model's OIP view."""
        return config(model, None)

    @open_routes.get("/models/{model}/versions/{version}/config", summary="Model configuration (one version)")
    async def model_version_config(model: str, version: str) -> dict[str, Any]:
        return config(model, version)

    body_doc = {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": InferenceRequest.model_json_schema()},
                "application/octet-stream": {
                    "schema": {"type": "string", "format": "binary"},
                    "description": f"binary tensor data: the JSON header ({HEADER_LENGTH} bytes), then the data",
                },
            },
        }
    }

    @inference.post("/models/{model}/infer", summary="Inference", openapi_extra=body_doc)
    async def model_infer(request: Request, model: str) -> Response:
        """Answer the images of input IMAGE with the task's outputs (see service/surfaces/oip.py)."""
        return await infer(request, model, None)

    @inference.post(
        "/models/{model}/versions/{version}/infer", summary="Inference (one version)", openapi_extra=body_doc
    )
    async def model_version_infer(request: Request, model: str, version: str) -> Response:
        return await infer(request, model, version)

    api.include_router(open_routes)
    api.include_router(inference)
