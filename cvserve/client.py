"""Typed client of the cvserve gateway: `Client` (sync) and `AsyncClient` (asyncio), both on httpx.

    from cvserve.client import Client

    with Client("http://127.0.0.1:8000") as client:
        answer = client.detect("street.png", score_threshold=0.5)   # a service.schemas.DetectResponse
        drawn = client.detect("street.png", annotate="png")         # .response, and .images (PNG bytes)

Images may be paths, bytes, PIL images or uint8 numpy arrays (H×W, H×W×3 or H×W×4; arrays and PIL
images are sent as PNG), one or a list (one request, one batch). The API key comes from `api_key` or
the environment's `CVSERVE_API_KEY`; a 503 is retried after its `Retry-After` (`RetryPolicy`); a
refusal (a 503 too, once the retries are spent) raises `GatewayError` with the gateway's `code`, `message` and status (`http_<status>` and
the text for an answer without the gateway's JSON error, such as a proxy's), and no answer at all
(refused connection, the `timeout` passed) raises `GatewayUnreachable`. `answers="msgpack"` asks for
task answers as MessagePack (smaller and faster to read for large segmentation answers); they are
returned as the same pydantic models.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Generic, Literal, Self, TypeVar, overload

import httpx
import msgpack
import numpy as np
from PIL import Image
from pydantic import BaseModel, ValidationError

from service.schemas import (
    ClassifyResponse,
    DetectResponse,
    HealthResponse,
    ModelsResponse,
    ReadyResponse,
    SegmentResponse,
)

__all__ = [
    "AnnotatedAnswer",
    "AsyncClient",
    "Client",
    "CvserveError",
    "GatewayError",
    "GatewayUnreachable",
    "ImageInput",
    "Images",
    "RetryPolicy",
]

DEFAULT_URL = "http://127.0.0.1:8000"
URL_ENV, API_KEY_ENV = "CVSERVE_URL", "CVSERVE_API_KEY"
ImageFormat = Literal["png", "jpeg"]
AnswerFormat = Literal["json", "msgpack"]  # how task answers travel: MessagePack is smaller for large masks
MSGPACK = "application/msgpack"
ImageInput = str | os.PathLike[str] | bytes | bytearray | memoryview | Image.Image | np.ndarray
Images = ImageInput | Sequence[ImageInput]  # one image, or several for one request
ResponseT = TypeVar("ResponseT", ClassifyResponse, DetectResponse, SegmentResponse)
_SINGLE = (str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray)
_PNG_MODES = frozenset({"1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"})


class CvserveError(Exception):
    """Anything that kept the client from getting an answer."""


class GatewayError(CvserveError):
    """The gateway refused or failed the request: its HTTP status, `error.code` and `error.message`."""

    def __init__(self, status_code: int, code: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{status_code} {code}: {message}")
        self.status_code = status_code
        self.code = code
        self.message = message
        self.retry_after = retry_after


class GatewayUnreachable(CvserveError):
    """No HTTP answer came back: connection refused or reset, or the client's timeout passed."""


@dataclass(frozen=True)
class RetryPolicy:
    """When a 503 is tried again: at most `attempts` tries in all, sleeping at most `max_wait_s` in all.

    Each wait is the answer's `Retry-After` (seconds or an HTTP date), else `backoff_s` doubling per try.
    A wait that would pass `max_wait_s` is not started: the 503 is raised instead."""

    attempts: int = 4
    max_wait_s: float = 30.0
    backoff_s: float = 0.5

    def wait_before_retry(self, response: httpx.Response, attempt: int, waited_s: float) -> float | None:
        """Seconds to wait before trying again after `response` (try number `attempt`), or None: do not."""
        if response.status_code != 503 or attempt >= self.attempts:
            return None
        wait = retry_after_s(response)
        if wait is None:
            wait = self.backoff_s * 2 ** (attempt - 1)
        return wait if waited_s + wait <= self.max_wait_s else None


NO_RETRY = RetryPolicy(attempts=1)


def retry_after_s(response: httpx.Response) -> float | None:
    """The response's `Retry-After` in seconds (delta-seconds or an HTTP date), None when absent or unreadable."""
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class AnnotatedAnswer(Generic[ResponseT]):
    """An answer asked for with `annotate=`: the usual response, and the answer drawn on each image."""

    response: ResponseT
    images: list[bytes] = field(repr=False)  # PNG or JPEG files, one per input image, in order
    media_type: str = "image/png"


def encode_image(image: ImageInput) -> tuple[str, bytes]:
    """A file name and the bytes to upload for one image (arrays and PIL images become PNG)."""
    if isinstance(image, str | os.PathLike):
        path = Path(image)
        return path.name, path.read_bytes()
    if isinstance(image, bytes | bytearray | memoryview):
        return "image", bytes(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))):
            raise ValueError(
                f"a numpy image must be uint8 H×W, H×W×3 (RGB) or H×W×4 (RGBA); got {image.dtype} {image.shape}"
            )
        image = Image.fromarray(image)
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        (image if image.mode in _PNG_MODES else image.convert("RGB")).save(buffer, format="PNG")
        return "image.png", buffer.getvalue()
    raise TypeError(f"not an image: {type(image).__name__}; pass a path, bytes, a PIL image or a numpy array")


def _as_list(images: Images) -> list[ImageInput]:
    try:
        listed = [images] if isinstance(images, _SINGLE) else list(images)
    except TypeError:
        raise TypeError(
            f"not an image: {type(images).__name__}; pass a path, bytes, a PIL image or a numpy array, "
            "or a list of them"
        ) from None
    if not listed:
        raise ValueError("no images given")
    return listed


def _annotated_image(result: dict[str, Any], status_code: int) -> bytes:
    """Take the drawn image (a `data:image/...;base64,` URL) out of one result of an annotated answer."""
    url = result.pop("annotated_image", None)
    if not isinstance(url, str) or not url.startswith("data:image/"):
        raise GatewayError(
            status_code, "unexpected_answer", "an annotated answer's result has no annotated_image"
        )
    return base64.b64decode(url.partition(",")[2])


@dataclass(frozen=True)
class _Call:
    """One HTTP request, ready to send (again, on a retry)."""

    method: str
    path: str
    params: dict[str, Any] = field(default_factory=dict)
    files: list[tuple[str, tuple[str, bytes, str]]] | None = None
    headers: dict[str, str] | None = None


def _raise_for_error(response: httpx.Response) -> None:
    """Raise `GatewayError` for a non-2xx answer, with the gateway's code and message when it sent them."""
    if response.is_success:
        return
    code, message = f"http_{response.status_code}", response.text.strip()[:500] or response.reason_phrase
    try:
        error = response.json()["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        pass
    raise GatewayError(response.status_code, code, message, retry_after_s(response))


def _validated(response: httpx.Response, model: type[BaseModel], body: Any = None) -> Any:
    """`body` (else the response's JSON) as `model`; a malformed answer is a `GatewayError` too."""
    try:
        return model.model_validate_json(response.content) if body is None else model.model_validate(body)
    except ValidationError as error:
        raise GatewayError(
            response.status_code, "unexpected_answer", f"not a {model.__name__}: {error}"
        ) from error


def _parse(response: httpx.Response, model: type[BaseModel]) -> Any:
    """The body of a successful answer as `model` (a malformed one is a `GatewayError` too)."""
    _raise_for_error(response)
    return _validated(response, model)


def _parse_ready(response: httpx.Response) -> ReadyResponse:
    """/ready's answer: a 503 with a ReadyResponse body says "not ready", which is an answer too."""
    if response.status_code == 503:
        try:
            return ReadyResponse.model_validate_json(response.content)
        except ValidationError:
            pass  # not the gateway's own 503 (e.g. a proxy in front): an error after all
    return _parse(response, ReadyResponse)


def _msgpack_body(response: httpx.Response) -> dict[str, Any]:
    """A MessagePack answer as the JSON document it stands for (its raw-bytes fields back to base64)."""
    try:
        body = msgpack.unpackb(response.content, raw=False)
        for result in body["results"]:
            if isinstance(result.get("png"), bytes):
                result["png"] = base64.b64encode(result["png"]).decode("ascii")
    except (ValueError, KeyError, TypeError, msgpack.UnpackException) as error:
        raise GatewayError(
            response.status_code, "unexpected_answer", f"not a MessagePack answer: {error}"
        ) from error
    return body


def _parse_task(response: httpx.Response, model: type[ResponseT], annotate: ImageFormat | None) -> Any:
    is_msgpack = response.headers.get("content-type", "").startswith(MSGPACK)
    if annotate is None and not is_msgpack:
        return _parse(response, model)
    _raise_for_error(response)
    body = _msgpack_body(response) if is_msgpack else response.json()
    if annotate is None:
        return _validated(response, model, body)
    images = [_annotated_image(result, response.status_code) for result in body["results"]]
    media_type = "image/jpeg" if annotate == "jpeg" else "image/png"
    return AnnotatedAnswer(response=model.model_validate(body), images=images, media_type=media_type)


class _ClientBase:
    """What both clients share: where to send, the headers, how requests are built and answers read."""

    def __init__(
        self,
        url: str | None,
        api_key: str | None,
        retry: RetryPolicy | None,
        headers: Mapping[str, str] | None,
        answers: AnswerFormat = "json",
    ) -> None:
        if answers not in ("json", "msgpack"):
            raise ValueError(f"answers must be 'json' or 'msgpack', not {answers!r}")
        self.url = (url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")
        self._task_headers = {"Accept": MSGPACK} if answers == "msgpack" else None
        self.retry = retry or RetryPolicy()
        key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self._headers = {
            "Accept": "application/json",
            **({"X-API-Key": key} if key else {}),
            **(headers or {}),
        }

    def _task_call(self, endpoint: str, images: Images, options: Mapping[str, Any]) -> _Call:
        files = [
            ("files", (name, data, "application/octet-stream"))
            for name, data in map(encode_image, _as_list(images))
        ]
        params = {name: value for name, value in options.items() if value is not None}
        return _Call("POST", endpoint, params=params, files=files, headers=self._task_headers)

    def _describe(self, call: _Call, error: httpx.TransportError) -> GatewayUnreachable:
        kind = "timed out" if isinstance(error, httpx.TimeoutException) else "failed"
        return GatewayUnreachable(
            f"{call.method} {self.url}{call.path} {kind}: {error or type(error).__name__}"
        )


class Client(_ClientBase):
    """Synchronous client; use it as a context manager (or call `close`)."""

    def __init__(
        self,
        url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout | None = 60.0,
        retry: RetryPolicy | None = None,
        headers: Mapping[str, str] | None = None,
        answers: AnswerFormat = "json",
    ) -> None:
        super().__init__(url, api_key, retry, headers, answers)
        self._http = httpx.Client(base_url=self.url, headers=self._headers, timeout=timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: _Call, retry: RetryPolicy | None = None) -> httpx.Response:
        policy, attempt, waited = retry or self.retry, 1, 0.0
        while True:
            try:
                response = self._http.request(
                    call.method, call.path, params=call.params, files=call.files, headers=call.headers
                )
            except httpx.TransportError as error:
                raise self._describe(call, error) from error
            wait = policy.wait_before_retry(response, attempt, waited)
            if wait is None:
                return response
            time.sleep(wait)
            attempt, waited = attempt + 1, waited + wait

    def health(self) -> HealthResponse:
        """GET /health: the gateway process is alive."""
        return _parse(self._send(_Call("GET", "/health")), HealthResponse)

    def ready(self) -> ReadyResponse:
        """GET /ready: whether every enabled model answers now (`ready=False` is an answer, not an error)."""
        response = self._send(_Call("GET", "/ready"), NO_RETRY)
        return _parse_ready(response)

    def models(self) -> ModelsResponse:
        """GET /models: the enabled models, their labels and input sizes."""
        return _parse(self._send(_Call("GET", "/models")), ModelsResponse)

    @overload
    def classify(
        self, images: Images, *, top_k: int | None = ..., annotate: None = ..., **options: Any
    ) -> ClassifyResponse: ...
    @overload
    def classify(
        self, images: Images, *, top_k: int | None = ..., annotate: ImageFormat, **options: Any
    ) -> AnnotatedAnswer[ClassifyResponse]: ...
    def classify(
        self,
        images: Images,
        *,
        top_k: int | None = None,
        annotate: ImageFormat | None = None,
        **options: Any,
    ) -> ClassifyResponse | AnnotatedAnswer[ClassifyResponse]:
        """POST /classify: the top-k classes of each image."""
        call = self._task_call("/classify", images, {"top_k": top_k, "annotate": annotate, **options})
        return _parse_task(self._send(call), ClassifyResponse, annotate)

    @overload
    def detect(
        self,
        images: Images,
        *,
        score_threshold: float | None = ...,
        max_detections: int | None = ...,
        annotate: None = ...,
        **options: Any,
    ) -> DetectResponse: ...
    @overload
    def detect(
        self,
        images: Images,
        *,
        score_threshold: float | None = ...,
        max_detections: int | None = ...,
        annotate: ImageFormat,
        **options: Any,
    ) -> AnnotatedAnswer[DetectResponse]: ...
    def detect(
        self,
        images: Images,
        *,
        score_threshold: float | None = None,
        max_detections: int | None = None,
        annotate: ImageFormat | None = None,
        **options: Any,
    ) -> DetectResponse | AnnotatedAnswer[DetectResponse]:
        """POST /detect: boxes (xyxy, original-image pixels), labels and scores of each image."""
        values = {"score_threshold": score_threshold, "max_detections": max_detections, "annotate": annotate}
        return _parse_task(
            self._send(self._task_call("/detect", images, {**values, **options})), DetectResponse, annotate
        )

    @overload
    def segment(
        self,
        images: Images,
        *,
        return_png: bool | None = ...,
        return_polygons: bool | None = ...,
        polygon_tolerance: float | None = ...,
        annotate: None = ...,
        **options: Any,
    ) -> SegmentResponse: ...
    @overload
    def segment(
        self,
        images: Images,
        *,
        return_png: bool | None = ...,
        return_polygons: bool | None = ...,
        polygon_tolerance: float | None = ...,
        annotate: ImageFormat,
        **options: Any,
    ) -> AnnotatedAnswer[SegmentResponse]: ...
    def segment(
        self,
        images: Images,
        *,
        return_png: bool | None = None,
        return_polygons: bool | None = None,
        polygon_tolerance: float | None = None,
        annotate: ImageFormat | None = None,
        **options: Any,
    ) -> SegmentResponse | AnnotatedAnswer[SegmentResponse]:
        """POST /segment: per-class RLE masks and pixel fractions of each image (and polygons, a PNG)."""
        values = {
            "return_png": return_png,
            "return_polygons": return_polygons,
            "polygon_tolerance": polygon_tolerance,
            "annotate": annotate,
        }
        call = self._task_call("/segment", images, {**values, **options})
        return _parse_task(self._send(call), SegmentResponse, annotate)


class AsyncClient(_ClientBase):
    """Asyncio client, the same methods as `Client` as coroutines; use it with `async with` (or `aclose`)."""

    def __init__(
        self,
        url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout | None = 60.0,
        retry: RetryPolicy | None = None,
        headers: Mapping[str, str] | None = None,
        answers: AnswerFormat = "json",
    ) -> None:
        super().__init__(url, api_key, retry, headers, answers)
        self._http = httpx.AsyncClient(base_url=self.url, headers=self._headers, timeout=timeout)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: _Call, retry: RetryPolicy | None = None) -> httpx.Response:
        policy, attempt, waited = retry or self.retry, 1, 0.0
        while True:
            try:
                response = await self._http.request(
                    call.method, call.path, params=call.params, files=call.files, headers=call.headers
                )
            except httpx.TransportError as error:
                raise self._describe(call, error) from error
            wait = policy.wait_before_retry(response, attempt, waited)
            if wait is None:
                return response
            await asyncio.sleep(wait)
            attempt, waited = attempt + 1, waited + wait

    async def health(self) -> HealthResponse:
        """GET /health: the gateway process is alive."""
        return _parse(await self._send(_Call("GET", "/health")), HealthResponse)

    async def ready(self) -> ReadyResponse:
        """GET /ready: whether every enabled model answers now (`ready=False` is an answer, not an error)."""
        response = await self._send(_Call("GET", "/ready"), NO_RETRY)
        return _parse_ready(response)

    async def models(self) -> ModelsResponse:
        """GET /models: the enabled models, their labels and input sizes."""
        return _parse(await self._send(_Call("GET", "/models")), ModelsResponse)

    @overload
    async def classify(
        self, images: Images, *, top_k: int | None = ..., annotate: None = ..., **options: Any
    ) -> ClassifyResponse: ...
    @overload
    async def classify(
        self, images: Images, *, top_k: int | None = ..., annotate: ImageFormat, **options: Any
    ) -> AnnotatedAnswer[ClassifyResponse]: ...
    async def classify(
        self,
        images: Images,
        *,
        top_k: int | None = None,
        annotate: ImageFormat | None = None,
        **options: Any,
    ) -> ClassifyResponse | AnnotatedAnswer[ClassifyResponse]:
        """POST /classify: the top-k classes of each image."""
        call = self._task_call("/classify", images, {"top_k": top_k, "annotate": annotate, **options})
        return _parse_task(await self._send(call), ClassifyResponse, annotate)

    @overload
    async def detect(
        self,
        images: Images,
        *,
        score_threshold: float | None = ...,
        max_detections: int | None = ...,
        annotate: None = ...,
        **options: Any,
    ) -> DetectResponse: ...
    @overload
    async def detect(
        self,
        images: Images,
        *,
        score_threshold: float | None = ...,
        max_detections: int | None = ...,
        annotate: ImageFormat,
        **options: Any,
    ) -> AnnotatedAnswer[DetectResponse]: ...
    async def detect(
        self,
        images: Images,
        *,
        score_threshold: float | None = None,
        max_detections: int | None = None,
        annotate: ImageFormat | None = None,
        **options: Any,
    ) -> DetectResponse | AnnotatedAnswer[DetectResponse]:
        """POST /detect: boxes (xyxy, original-image pixels), labels and scores of each image."""
        values = {"score_threshold": score_threshold, "max_detections": max_detections, "annotate": annotate}
        call = self._task_call("/detect", images, {**values, **options})
        return _parse_task(await self._send(call), DetectResponse, annotate)

    @overload
    async def segment(
        self,
        images: Images,
        *,
        return_png: bool | None = ...,
        return_polygons: bool | None = ...,
        polygon_tolerance: float | None = ...,
        annotate: None = ...,
        **options: Any,
    ) -> SegmentResponse: ...
    @overload
    async def segment(
        self,
        images: Images,
        *,
        return_png: bool | None = ...,
        return_polygons: bool | None = ...,
        polygon_tolerance: float | None = ...,
        annotate: ImageFormat,
        **options: Any,
    ) -> AnnotatedAnswer[SegmentResponse]: ...
    async def segment(
        self,
        images: Images,
        *,
        return_png: bool | None = None,
        return_polygons: bool | None = None,
        polygon_tolerance: float | None = None,
        annotate: ImageFormat | None = None,
        **options: Any,
    ) -> SegmentResponse | AnnotatedAnswer[SegmentResponse]:
        """POST /segment: per-class RLE masks and pixel fractions of each image (and polygons, a PNG)."""
        values = {
            "return_png": return_png,
            "return_polygons": return_polygons,
            "polygon_tolerance": polygon_tolerance,
            "annotate": annotate,
        }
        call = self._task_call("/segment", images, {**values, **options})
        return _parse_task(await self._send(call), SegmentResponse, annotate)
