"""The request core: every surface (task routes, `/v2`, streams, video files) hands its images here.

One request's life, the same for all of them: the body read under its own deadline (408), admission
(503 + Retry-After past the limits in flight), the request's deadline (504), cancellation when the
client goes away (499, its images leave the batch queue), decode → backend → the output contract
check (a malformed answer is 503 and flips readiness) → postprocess, then the surface's encoding,
and the stage timings sent to `Server-Timing`, the histograms and the trace. Surfaces only parse
their own protocol and encode their own answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from fastapi import Request, Response
from pydantic import BaseModel
from starlette.requests import ClientDisconnect

from service.backends.base import Backend, BackendTimeout, Encoded, MalformedAnswer, check_outputs
from service.core.admission import Admission, Limits, Ticket
from service.core.auth import ApiKeyCheck
from service.core.device_decode import device_preparers, plan_on_device
from service.core.explain import ExplainedImage, ExplainPlan, explain, plan
from service.core.errors import ApiError
from service.core.inputs import ImageInputs
from service.core.pipeline import TaskPipeline
from service.core.versions import ModelVersions, Route
from service.handlers.common import Geometry, Handler
from service.imaging.images import ImageError
from service.settings import Settings
from service.telemetry.metrics import GatewayMetrics, Instruments, LifecycleMetrics
from service.telemetry.tracing import Tracing
from service.timing import BatchTiming, Timings, stage

log = logging.getLogger(__name__)
T = TypeVar("T")

# A file up to this size has its JPEG header read on the event loop (tens of microseconds); a larger one,
# whose header chunks (EXIF, ICC profile) could be large, in the image threads.
INLINE_HEADER_BYTES = 1 << 20
READY_CACHE_S = 1.0  # readiness probes within this long of a check reuse its answer
REQUEST_TIMEOUT_HEADER = "x-request-timeout"


class Answerer:
    """Answers images for every surface: admission, deadlines, decode → backend → postprocess, readiness."""

    def __init__(
        self,
        settings: Settings,
        backend: Backend,
        metrics: GatewayMetrics,
        handlers: Mapping[str, Handler],
        tracing: Tracing | None = None,
        lifecycle_metrics: LifecycleMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.metrics = metrics
        self.tracing = tracing  # None: tracing off
        self.handlers = dict(handlers)  # every task the registry knows, enabled or not
        self.pipelines = {m: TaskPipeline.load(settings, m, handlers[m]) for m in settings.models}
        backend.use_device_decode(device_preparers(settings, handlers))  # where settings ask for it and it can
        # Decode/preprocess/postprocess threads: as many as cores (Pillow and torch release the GIL).
        self._pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="images")
        limits = Limits(
            settings.admission_limit,
            settings.max_in_flight_bytes,
            settings.max_in_flight_pixels,
            settings.max_in_flight_passes,
        )
        self.admission = Admission(limits, settings.retry_after_s)
        # Which version of each model answers, the candidate and its comparisons (service/core/versions.py).
        self.lifecycle = ModelVersions(
            settings,
            backend,
            {m: pipeline.contract for m, pipeline in self.pipelines.items()},
            lifecycle_metrics or LifecycleMetrics(Instruments.prometheus()),
            busy=lambda: self.admission.requests,
            utilisation=self.admission.utilisation,
        )
        self.keys = ApiKeyCheck(settings)
        self.malformed: dict[str, str] = {}  # model → why its last answer broke its contract (not ready)
        self._checked: tuple[float, bool] | None = None  # the last backend readiness check

    @property
    def versions(self) -> dict[str, str]:
        """Each enabled model's current version (the one a request that asks for none gets)."""
        return {model: self.lifecycle.current(model) for model in self.pipelines}

    def pipeline(self, handler: Handler) -> TaskPipeline:
        """The enabled model's pipeline, or 404 model_disabled."""
        pipeline = self.pipelines.get(handler.model)
        if pipeline is None:
            raise ApiError(404, "model_disabled", f"model {handler.model} is not enabled on this gateway")
        return pipeline

    async def ready(self, model: str | None = None) -> bool:
        """Every enabled model (or `model`) can answer now: the backend says so (checked at most once a
        `READY_CACHE_S`) and no answer broke its contract since its last good one."""
        now = time.monotonic()
        if self._checked is None or now - self._checked[0] >= READY_CACHE_S:
            self._checked = (now, await self.backend.ready())
        healthy = model not in self.malformed if model is not None else not self.malformed
        return self._checked[1] and healthy

    # ---- one HTTP request, whatever its surface ----

    async def answer_request(
        self,
        request: Request,
        handler: Handler,
        read: Callable[[TaskPipeline], Awaitable[tuple[ImageInputs, BaseModel]]],
        encode: Callable[[BaseModel, ImageInputs, BaseModel, Timings | None], Awaitable[Response]],
    ) -> Response:
        """Answer one HTTP request for `handler`'s task: `read` gives its images and options (408 past
        `body_timeout_s`), then admission, its deadline (the server's or a shorter `X-Request-Timeout`),
        disconnect cancellation, and `encode` turns the task's response into the surface's answer."""
        pipeline = self.pipeline(handler)
        timings = self.timings()
        with stage(timings, "read"):
            inputs, options = await self.in_body_time(read(pipeline))
        deadline_s = request_deadline(request, self.settings.request_timeout_s)

        async def finish(response: BaseModel) -> Response:
            return await encode(response, inputs, options, timings)

        answer = await unless_gone(request, self.answer_admitted(handler, inputs, options, finish, timings, deadline_s))
        self.report_stages(handler, answer, timings, {"cvserve.images": len(inputs.blobs)})
        return answer

    async def in_body_time(self, reading: Awaitable[T]) -> T:
        """Await `reading` (the request body, parsed) within `body_timeout_s` (408 body_timeout past it)."""
        try:
            async with asyncio.timeout(self.settings.body_timeout_s):
                return await reading
        except TimeoutError as error:
            raise ApiError(
                408, "body_timeout", f"the request body did not arrive within {self.settings.body_timeout_s:g} s"
            ) from error

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

    # ---- images → answers ----

    async def answer_admitted(
        self,
        handler: Handler,
        inputs: ImageInputs,
        options: BaseModel,
        finish: Callable[[BaseModel], Awaitable[T]],
        timings: Timings | None = None,
        deadline_s: float | None = None,
    ) -> T:
        """Admit the images (503 + Retry-After past the limits), then answer them and `finish` the answer
        within the deadline (504); every surface that runs a model on images goes through here. An explanation
        asked for is checked first (422/413) and admitted as the model passes it will run."""
        images = len(inputs.blobs)
        explaining = plan(self.settings, self.pipeline(handler), self.backend, options, images)
        passes = images * (explaining.passes_per_image if explaining is not None else 1)
        ticket = self.admission.admit(sum(map(len, inputs.blobs)), inputs.pixels, passes)
        timeout = deadline_s or self.settings.request_timeout_s
        try:
            async with asyncio.timeout(timeout):
                answer = await self.answer_images(handler, inputs.blobs, options, ticket, timings, explaining)
                return await finish(answer)
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
        explaining: ExplainPlan | None = None,
    ) -> BaseModel:
        """The task's response for encoded images `blobs` (decode → backend → postprocess, then the
        explanations `explaining` plans); `ticket` holds admission until the image threads finish;
        `timings`, if given, receives each stage's duration."""
        pipeline = self.pipeline(handler)
        route = self.lifecycle.route(handler.model)  # read once: a version change now does not touch this request
        self.metrics.images.observe(len(blobs), tags={"endpoint": handler.endpoint})
        loop = asyncio.get_running_loop()

        def in_pool(function: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
            work = self._pool.submit(function, *args)
            if ticket is not None:
                ticket.hold(work)
            return asyncio.wrap_future(work, loop=loop)

        # JPEGs go to the backend undecoded when it decodes them on the models' device, except for work
        # that needs the model inputs here: explanations, and a candidate's comparison.
        on_device = (
            self.backend.decodes_on_device and self.settings.device_decode != "off"
            and explaining is None and route.other is None
        )  # fmt: skip

        async def prepare(index: int, blob: bytes) -> _Decoded:
            if on_device:  # a small file's header is read here: a thread's hand-off would cost more
                inline = len(blob) <= INLINE_HEADER_BYTES
                planned = _plan_on_device(pipeline, blob) if inline else await in_pool(_plan_on_device, pipeline, blob)
                if planned is not None:
                    return planned
            return await in_pool(_prepare, pipeline, blob, index)

        with self.lifecycle.serving(handler.model, route):  # the version is not unloaded under it
            # An in-process batcher waits briefly for images being decoded here; JPEGs the backend decodes
            # arrive with the call itself.
            count = 0 if on_device else len(blobs)
            if count:
                self.backend.announce(handler.model, count)
            try:
                prepared = await asyncio.gather(*(prepare(i, blob) for i, blob in enumerate(blobs)))
            finally:
                if count:
                    self.backend.arrived(handler.model, count)
            batches = [BatchTiming() for _ in prepared] if timings is not None else None
            try:
                outputs = await self.infer(pipeline, [image.tensor for image in prepared], batches, route)
            except ImageError as error:  # an image only the device's decode found unreadable
                where = f"image {error.index}: " if error.index is not None else ""
                raise ApiError(error.status_code, error.code, f"{where}{error}") from error
            geometries = [image.geometry for image in prepared]
            results, postprocess_s = await in_pool(_answer_all, pipeline, outputs, geometries, options)
            if timings is not None:
                for image in prepared:
                    timings.add("decode", image.decode_s)
                    timings.add("preprocess", image.preprocess_s)
                timings.batches(batches or [])
                timings.add("postprocess", postprocess_s)
            if explaining is not None:
                images = [
                    ExplainedImage(blob, image.tensor, image.geometry, out, result)
                    for blob, image, out, result in zip(blobs, prepared, outputs, results, strict=True)
                ]

                own_version = Route(route.serve)  # the answer's version; occluded copies are not compared

                async def infer(tensors: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
                    return await self.infer(pipeline, tensors, None, own_version)

                with stage(timings, "explain"):
                    results = await explain(
                        explaining, pipeline, options, images, infer, in_pool, self.backend, self.metrics,
                        self.settings.explain_timeout_s,
                    )  # fmt: skip
        return self.response(handler, results, route.serve)

    async def infer(
        self,
        pipeline: TaskPipeline,
        tensors: Sequence[np.ndarray | Encoded],
        batches: Sequence[BatchTiming] | None = None,
        route: Route | None = None,
    ) -> list[dict[str, np.ndarray]]:
        """The model's outputs for preprocessed `tensors` from the version `route` names (default: as the
        lifecycle routes it now), each checked against its contract (a malformed answer is 503 and makes
        the gateway not ready until the model answers well again). A candidate compared with it runs
        afterwards, off this request's path."""
        route = route or self.lifecycle.route(pipeline.model)
        outputs = await self._run(pipeline.model, list(tensors), batches, route.serve)
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
        if route.other is not None:
            self.lifecycle.compare_later(pipeline.model, route, tensors, outputs, functools.partial(self._background, pipeline.model))
        return outputs

    async def _run(
        self, model: str, tensors: list[np.ndarray], batches: Sequence[BatchTiming] | None, version: str
    ) -> list[dict[str, np.ndarray]]:
        if not self.backend.supports_versions or self.backend.loaded_versions(model) == [version]:
            return await self.backend.infer_many(model, tensors, batches)  # the one version it holds
        return await self.backend.infer_many(model, tensors, batches, version=version)

    async def _background(self, model: str, version: str, tensors: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """`tensors` through `version` for a comparison nobody waits for (the backend's spare capacity)."""
        return await self.backend.infer_background(model, tensors, version)

    def response(self, handler: Handler, results: list[BaseModel], version: str | None = None) -> BaseModel:
        """The task route's response document for `results` (answered by `version`, default the current one)."""
        return handler.response(
            model=handler.model,
            version=version or self.lifecycle.current(handler.model),
            backend=self.settings.backend,
            results=results,
        )

    def close(self) -> None:
        self.lifecycle.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.tracing is not None:
            self.tracing.shutdown()


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
    tensor: np.ndarray | Encoded  # the model input, or a JPEG for the backend to decode on the device
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


def _plan_on_device(pipeline: TaskPipeline, blob: bytes) -> _Decoded | None:
    """A JPEG for a backend that decodes on the device: only its header is read here (its geometry comes
    from its size). None: `_prepare` decodes the image here."""
    began = time.perf_counter()
    planned = plan_on_device(pipeline, blob)
    if planned is None:
        return None
    return _Decoded(planned[0], planned[1], time.perf_counter() - began, 0.0)


def _answer_all(
    pipeline: TaskPipeline, outputs: list[dict[str, np.ndarray]], geometries: list[Geometry], options: BaseModel
) -> tuple[list[BaseModel], float]:
    """Every image's result (in a pool thread), and the seconds it took."""
    began = time.perf_counter()
    results = [pipeline.answer(out, geometry, options) for out, geometry in zip(outputs, geometries, strict=True)]
    return results, time.perf_counter() - began
