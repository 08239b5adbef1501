"""WebSocket frame streams: `/stream/classify`, `/stream/detect`, `/stream/segment`.

The client sends encoded frames (JPEG, PNG, WebP; one binary message each) and gets one JSON text
message per answered frame, from the same path a POST takes (`Answerer.answer_images`: admission,
decode, the backend's batcher, postprocess), so frames of all streams batch together.

* Options: the task's query parameters (`score_threshold=0.6`, `annotate=jpeg`, ...); `/stream/detect`
  also takes `track=true|false` (default true: ByteTrack ids, `service.imaging.tracking`).
* Latest frame wins: a stream holds at most one frame waiting. A frame that arrives while the model
  still works on an earlier one replaces the waiting frame, which is dropped unanswered ('stale').
* Rate cap: a stream starts at most `stream_max_fps` frames a second; a frame that comes sooner waits
  for its turn, and is dropped ('rate') if a newer one arrives meanwhile. So a client sending in lock
  step is slowed to the cap, never left without an answer, and the last frame sent is always answered.
  Drops are counted in every answer's `stats` and in `cvserve_stream_dropped_frames{reason}`;
  nothing queues without bound.
* Frame numbers count the binary messages received on the stream, from 0, so a client can match answers.
* The API key, when set: header `X-API-Key` (or `Authorization: Bearer`), query `api_key=`, or, for
  browsers, the subprotocols `["cvserve", "cvserve.key.<key>"]` (the server selects `cvserve`).
* Refusals close the socket right after the handshake with a code and a reason (docs/ERRORS.md):
  4401 unauthorized, 4404 model_disabled, 4422 invalid_request, 1013 too_many_streams.
  A frame that cannot be answered gets `{"type": "error", "frame": n, "error": {"code", "message"}}`
  and the stream goes on.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from pydantic import BaseModel, ConfigDict, SerializeAsAny, ValidationError

from service.backends.base import BackendTimeout, BackendUnavailable
from service.core.answerer import Answerer
from service.core.errors import ApiError, describe_validation_errors
from service.core.inputs import ImageInputs
from service.handlers.common import Handler, Tracker
from service.imaging.annotate import MEDIA_TYPES, encode_image, fit_image
from service.imaging.images import RENDER_MAX_PIXELS, decode_image_for_display, decoded_pixels
from service.settings import Settings

log = logging.getLogger(__name__)

STREAM_PREFIX = "/stream"
SUBPROTOCOL = "cvserve"
KEY_SUBPROTOCOL_PREFIX = "cvserve.key."
# Close codes: 1013 is the standard "try again later"; 44xx mirror the HTTP status of the same refusal.
CLOSE_UNAUTHORIZED, CLOSE_MODEL_DISABLED, CLOSE_INVALID, CLOSE_TOO_MANY_STREAMS = 4401, 4404, 4422, 1013
_REASON_BYTES = 123  # a close reason's limit in the WebSocket protocol
# What sending to or reading from a socket whose client left raises (Starlette: RuntimeError after a close)
_GONE = (WebSocketDisconnect, RuntimeError, OSError)


class StreamOptions(BaseModel):
    """Options of a stream besides the task's own."""

    model_config = ConfigDict(extra="forbid")
    track: bool = True


class StreamStats(BaseModel):
    received: int = 0  # binary messages (frames) received
    answered: int = 0
    dropped_stale: int = 0  # replaced by a newer frame while the model worked on an earlier one
    dropped_rate: int = 0  # replaced by a newer frame while held back for stream_max_fps
    errors: int = 0  # frames answered with an error message


class StreamReady(BaseModel):
    type: Literal["ready"] = "ready"
    endpoint: str
    model: str
    max_fps: float
    max_frame_bytes: int
    track: bool


class FrameAnswer(BaseModel):
    type: Literal["result"] = "result"
    frame: int
    latency_ms: float  # from the frame's arrival to its answer
    result: SerializeAsAny[BaseModel]
    annotated_image: str | None = None  # data URL, with annotate=png|jpeg
    stats: StreamStats


class FrameError(BaseModel):
    type: Literal["error"] = "error"
    frame: int
    error: dict[str, str]
    stats: StreamStats


@dataclass
class _Frame:
    index: int
    data: bytes
    arrived: float


class LatestFrame:
    """A slot for one waiting frame: a newer frame replaces the one waiting (latest frame wins)."""

    def __init__(self) -> None:
        self._frame: _Frame | None = None
        self._ready = asyncio.Event()

    def put(self, frame: _Frame) -> bool:
        """Offer `frame`; return whether it replaced a frame that was still waiting."""
        replaced = self._frame is not None
        self._frame = frame
        self._ready.set()
        return replaced

    async def take(self) -> _Frame:
        """Wait for a frame and take it out of the slot."""
        await self._ready.wait()
        self._ready.clear()
        frame, self._frame = self._frame, None
        assert frame is not None
        return frame

    def take_waiting(self) -> _Frame | None:
        """The frame waiting now, taken out of the slot, if there is one."""
        self._ready.clear()
        frame, self._frame = self._frame, None
        return frame


class FramePacer:
    """Spaces the frames one stream starts at least 1/`per_s` seconds apart."""

    def __init__(self, per_s: float) -> None:
        self.interval = 1.0 / per_s
        self._next = 0.0

    def delay(self) -> float:
        """Seconds until the stream may start its next frame."""
        return max(0.0, self._next - time.monotonic())

    def started(self) -> None:
        self._next = time.monotonic() + self.interval


def install_streams(api: FastAPI, answerer: Answerer, handlers: Iterable[Handler]) -> None:
    """Add `/stream/<task>` WebSocket routes over `answerer` (one per handler)."""
    for handler in handlers:
        _stream_route(api, answerer, handler)


def _stream_route(api: FastAPI, answerer: Answerer, handler: Handler) -> None:
    async def stream(websocket: WebSocket) -> None:
        await FrameStream(websocket, answerer, handler).run()

    api.add_api_websocket_route(STREAM_PREFIX + handler.endpoint, stream, name=f"stream_{handler.task}")


def _key_given(websocket: WebSocket) -> str:
    """The API key the client sent: header, `Authorization: Bearer`, query `api_key`, or key subprotocol."""
    headers = websocket.headers
    given = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ")
    given = given or websocket.query_params.get("api_key", "")
    if not given:
        offered = websocket.scope.get("subprotocols", [])
        given = next(
            (p.removeprefix(KEY_SUBPROTOCOL_PREFIX) for p in offered if p.startswith(KEY_SUBPROTOCOL_PREFIX)),
            "",
        )
    return given


def _reason(text: str) -> str:
    """`text` cut to what a close frame can carry."""
    encoded = text.encode()
    return (
        text
        if len(encoded) <= _REASON_BYTES
        else encoded[: _REASON_BYTES - 3].decode(errors="ignore") + "..."
    )


class FrameStream:
    """One client's stream: a receiver that keeps only the latest frame, and a worker that answers it."""

    def __init__(self, websocket: WebSocket, answerer: Answerer, handler: Handler) -> None:
        self.websocket = websocket
        self.answerer = answerer
        self.handler = handler
        self.settings: Settings = answerer.settings
        self.metrics = answerer.metrics
        self.stats = StreamStats()
        self.slot = LatestFrame()
        self.pacer = FramePacer(self.settings.stream_max_fps)
        self._pacing = False  # the worker holds a frame back for the rate cap
        self.tracker: Tracker | None = None
        self._send_lock = asyncio.Lock()
        self._closing: asyncio.Future[None] | None = None

    async def run(self) -> None:
        """Accept, check, then answer frames until the client goes away."""
        websocket = self.websocket
        offered = websocket.scope.get("subprotocols", [])
        await websocket.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)
        options = await self._admit()
        if options is None:
            return
        endpoint = self.handler.endpoint
        self.metrics.stream_opened(endpoint)
        try:
            await self._send(StreamReady(
                endpoint=endpoint,
                model=self.handler.model,
                max_fps=self.settings.stream_max_fps,
                max_frame_bytes=self.settings.stream_max_frame_bytes,
                track=self.tracker is not None,
            ))  # fmt: skip
            # When the stream ends the worker is cancelled, not awaited: awaiting it while this task is
            # being cancelled would take a second cancel (anyio delivers them until the task exits).
            worker = asyncio.create_task(self._work(options))
            worker.add_done_callback(self._worker_done)
            try:
                await self._receive()
            finally:
                worker.cancel()
        except _GONE:
            pass  # the client went away
        finally:
            self.metrics.stream_closed(endpoint)

    def _worker_done(self, worker: asyncio.Task[None]) -> None:
        """A worker that failed (a bug, not a client that left) closes its stream with 1011."""
        if worker.cancelled() or isinstance(worker.exception(), _GONE):
            return
        log.error("stream %s failed", self.handler.endpoint, exc_info=worker.exception())
        self._closing = asyncio.ensure_future(self._close_broken())

    async def _close_broken(self) -> None:
        with contextlib.suppress(*_GONE):
            await self.websocket.close(1011, "internal error; the gateway log has the details")

    async def _admit(self) -> BaseModel | None:
        """The task's options, or None after closing the socket with the reason it is refused."""
        settings, websocket = self.settings, self.websocket
        client = websocket.client.host if websocket.client else "unknown"
        if not await self.answerer.keys.verify(_key_given(websocket), client):  # the HTTP routes' check
            await websocket.close(CLOSE_UNAUTHORIZED, "unauthorized: missing or wrong API key")
            return None
        if self.handler.model not in self.answerer.pipelines:
            await websocket.close(
                CLOSE_MODEL_DISABLED, f"model_disabled: model {self.handler.model} is not enabled"
            )
            return None
        query = dict(websocket.query_params)
        query.pop("api_key", None)
        stream_query = {name: query.pop(name) for name in ("track",) if name in query}
        try:
            options = self.handler.options.model_validate(query)
            stream_options = StreamOptions.model_validate(stream_query)
            tracker = self.handler.tracker(settings.stream_max_fps)
            if stream_query and tracker is None:
                raise ValueError(f"track is an option of streams whose task tracks, not {self.handler.endpoint}")
            if getattr(options, "explain", None) is not None:
                raise ValueError(f"explain is not available on streams: POST the frame to {self.handler.endpoint}")
        except ValidationError as error:
            await websocket.close(
                CLOSE_INVALID, _reason("invalid_request: " + describe_validation_errors(error.errors()))
            )
            return None
        except ValueError as error:
            await websocket.close(CLOSE_INVALID, _reason(f"invalid_request: {error}"))
            return None
        if self.metrics.open_streams() >= settings.stream_max_streams:
            await websocket.close(
                CLOSE_TOO_MANY_STREAMS,
                f"too_many_streams: {settings.stream_max_streams} streams are open, the limit; retry later",
            )
            return None
        if stream_options.track:
            self.tracker = tracker
        return options

    async def _receive(self) -> None:
        """Read every message at once; keep only the newest frame waiting (drops are counted)."""
        while True:
            message = await self.websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("bytes")
            index = self.stats.received
            self.stats.received += 1
            if data is None:
                await self._error(
                    index, "bad_request", "send each frame as one binary message (JPEG, PNG or WebP)"
                )
            elif len(data) > self.settings.stream_max_frame_bytes:
                await self._error(
                    index,
                    "frame_too_large",
                    f"frame is {len(data)} bytes; the limit is {self.settings.stream_max_frame_bytes}",
                )
            elif self.slot.put(_Frame(index, data, time.perf_counter())):
                self._dropped("rate" if self._pacing else "stale")

    async def _work(self, options: BaseModel) -> None:
        """Answer the latest frame, one at a time, until cancelled."""
        while True:
            frame = await self.slot.take()
            if (delay := self.pacer.delay()) > 0:  # the rate cap: hold the frame back, keep the newest
                self._pacing = True
                try:
                    await asyncio.sleep(delay)
                finally:
                    self._pacing = False
                if (newer := self.slot.take_waiting()) is not None:
                    self._dropped("rate")
                    frame = newer
            self.pacer.started()
            try:
                result, annotated = await self._answer(frame, options)
            except ApiError as error:
                await self._error(frame.index, error.code, error.message)
                continue
            except BackendUnavailable as error:
                await self._error(frame.index, "unavailable", str(error))
                continue
            except BackendTimeout as error:
                await self._error(frame.index, "timeout", str(error))
                continue
            self.stats.answered += 1
            self.metrics.stream_frames.inc(tags={"endpoint": self.handler.endpoint})
            latency_ms = round(1000 * (time.perf_counter() - frame.arrived), 2)
            await self._send(FrameAnswer(
                frame=frame.index, latency_ms=latency_ms, result=result, annotated_image=annotated, stats=self.stats
            ))  # fmt: skip

    async def _answer(self, frame: _Frame, options: BaseModel) -> tuple[BaseModel, str | None]:
        """One frame's result (tracked where the task tracks) and, when asked, its drawing as a data URL."""
        answerer, settings = self.answerer, self.settings
        pipeline = answerer.pipeline(self.handler)
        pixels = await asyncio.to_thread(decoded_pixels, frame.data, settings.allowed_formats, pipeline.min_side)

        async def finish(response: BaseModel) -> tuple[BaseModel, str | None]:
            result: BaseModel = response.results[0]  # type: ignore[attr-defined]
            if self.tracker is not None:
                result = self.tracker.update(result)
            fmt = getattr(options, "annotate", None)
            if fmt is None:
                return result, None
            drawn = await asyncio.to_thread(draw_frame, self.handler, frame.data, result, fmt, settings)
            return result, f"data:{MEDIA_TYPES[fmt]};base64,{base64.b64encode(drawn).decode('ascii')}"

        # frames share the gateway's admission limits and deadline with every other request
        return await answerer.answer_admitted(self.handler, ImageInputs([frame.data], pixels=pixels), options, finish)

    def _dropped(self, reason: str) -> None:
        if reason == "rate":
            self.stats.dropped_rate += 1
        else:
            self.stats.dropped_stale += 1
        self.metrics.frame_dropped(self.handler.endpoint, reason)

    async def _error(self, index: int, code: str, message: str) -> None:
        self.stats.errors += 1
        await self._send(FrameError(frame=index, error={"code": code, "message": message}, stats=self.stats))

    async def _send(self, message: BaseModel) -> None:
        async with self._send_lock:  # the receiver (errors) and the worker (answers) both send
            await self.websocket.send_text(message.model_dump_json())


def draw_frame(
    handler: Handler, data: bytes, result: BaseModel, fmt: Literal["png", "jpeg"], settings: Settings
) -> bytes:
    """`result` drawn on the frame `data` by its task's handler (tracked detections with their ids), encoded."""
    image = fit_image(
        decode_image_for_display(data, settings.max_pixels, settings.allowed_formats, RENDER_MAX_PIXELS),
        RENDER_MAX_PIXELS,
    )
    return encode_image(handler.draw(image, result), fmt)
