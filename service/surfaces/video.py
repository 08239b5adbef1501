"""Video files through the task routes: `POST /detect` (or /classify, /segment) with a video body.

`Content-Type: video/mp4` (or video/quicktime) or `video/webm` (or video/x-matroska); the body is
decoded with PyAV (FFmpeg), its demuxer chosen by the Content-Type (never probed from the bytes), and
every frame goes through the model as the task's images do, a few frames per batch. The answer is
the per-frame results as JSON (`VideoResponse`; /detect's detections carry ByteTrack track ids), or,
with `Accept: video/webm` or `video/mp4`, the video with the answers drawn on it (VP8 in WebM, H.264
in MP4; at most 4 MP a frame).

Bounded before and while decoding (docs/ERRORS.md): the body by `video_max_bytes` (413
body_too_large), frames by `video_max_frames` (413 too_many_frames), duration by
`video_max_duration_s` (413 video_too_long), frame size by `video_max_frame_pixels` (413
frame_too_large), the whole request by `video_timeout_s` (504); a body FFmpeg cannot read is 400
undecodable_video, a video stream in a codec it has no decoder for 415 unsupported_media_type. The
header's frame count and duration are checked before the first frame is decoded; the decoded frames
are counted too, since a header may lie.
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Iterator
from fractions import Fraction

import av
import numpy as np
from fastapi import Request, Response
from pydantic import BaseModel, Field, SerializeAsAny

from service.backends.base import BackendTimeout
from service.core.accept import preferred
from service.core.answerer import Answerer
from service.core.errors import ApiError
from service.core.inputs import read_body
from service.core.pipeline import TaskPipeline
from service.handlers.common import Geometry, Handler
from service.imaging.annotate import fit_image
from service.imaging.images import RENDER_MAX_PIXELS, fit_size
from service.settings import Settings
from service.timing import Timings, stage

log = logging.getLogger(__name__)

# Content-Type → FFmpeg demuxer; only these two demuxers ever see a client's bytes.
DEMUXERS = {"video/mp4": "mp4", "video/quicktime": "mp4", "video/webm": "webm", "video/x-matroska": "webm"}
# Accept → (muxer, encoder, encoder options) of the annotated video
ENCODERS: dict[str, tuple[str, str, dict[str, str]]] = {
    "video/webm": ("webm", "libvpx", {"deadline": "realtime", "cpu-used": "8", "b": "2M"}),
    "video/mp4": ("mp4", "libx264", {"preset": "veryfast", "crf": "23"}),
}
FRAMES_PER_BATCH = 8  # frames decoded, run and drawn together: bounds the frames held at once
_DEFAULT_FPS = 25.0


class VideoInfo(BaseModel):
    width: int
    height: int
    fps: float = Field(..., description="Average frame rate from the container (25 when it names none).")
    frames: int = Field(..., description="Frames decoded and answered.")
    duration_s: float
    codec: str = Field(..., examples=["vp8"])


class VideoFrameResult(BaseModel):
    index: int = Field(..., description="Frame number in decoding order, from 0.")
    time_s: float = Field(..., description="Presentation time of the frame.")
    result: SerializeAsAny[BaseModel]


class VideoResponse(BaseModel):
    model: str
    version: str
    backend: str
    video: VideoInfo
    frames: list[VideoFrameResult]


def is_video_request(request: Request) -> bool:
    """Whether the request's body is a video (Content-Type video/*)."""
    return _media_type(request.headers.get("content-type", "")).startswith("video/")


def _media_type(header: str) -> str:
    return header.split(";")[0].strip().lower()


def _wanted_video(request: Request) -> str | None:
    """The annotated video's media type if the Accept header asks for one (with q > 0)."""
    return preferred(request.headers, ENCODERS)


async def answer_video(
    answerer: Answerer, handler: Handler, request: Request, options: BaseModel
) -> Response:
    """Answer every frame of the video in the request's body: JSON per frame, or the annotated video."""
    settings: Settings = answerer.settings
    pipeline = answerer.pipeline(handler)
    media_type = _media_type(request.headers.get("content-type", ""))
    demuxer = DEMUXERS.get(media_type)
    if demuxer is None:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"Content-Type {media_type} is not accepted for videos; send video/mp4 or video/webm",
        )
    if getattr(options, "annotate", None) is not None:
        raise ApiError(
            422,
            "invalid_request",
            "annotate: for a video, ask for the drawn video with Accept: video/webm or video/mp4",
        )
    if getattr(options, "explain", None) is not None:
        raise ApiError(422, "invalid_request", "explain is for images, not videos: send the frames to explain as images")
    timings = answerer.timings()  # the whole video's stages, summed over its frames
    with stage(timings, "read"):
        body = await answerer.in_body_time(read_body(request, settings.video_max_bytes))
    reader = await asyncio.to_thread(VideoReader, body, demuxer, settings)
    try:
        ticket = answerer.admission.admit(len(body), FRAMES_PER_BATCH * reader.width * reader.height)
        try:
            async with asyncio.timeout(settings.video_timeout_s):
                response = await _answer_frames(
                    answerer, handler, pipeline, reader, options, _wanted_video(request), timings
                )
        except TimeoutError as error:
            raise BackendTimeout(
                f"the video was not answered within {settings.video_timeout_s:g} s"
            ) from error
        finally:
            ticket.release()
    finally:
        await asyncio.to_thread(reader.close)
    answerer.report_stages(handler, response, timings, {})
    return response


async def _answer_frames(
    answerer: Answerer,
    handler: Handler,
    pipeline: TaskPipeline,
    reader: VideoReader,
    options: BaseModel,
    wanted: str | None,
    timings: Timings | None = None,
) -> Response:
    """Frames a few at a time: decode, preprocess (threads), the model, postprocess and tracking, drawing."""
    settings: Settings = answerer.settings
    tracker = handler.tracker(reader.fps)
    writer = VideoWriter(handler, wanted, reader.fps, reader.width, reader.height) if wanted else None
    answered: list[VideoFrameResult] = []
    route = answerer.lifecycle.route(handler.model)  # one version answers every frame of the video
    try:
        while True:
            with stage(timings, "decode"):
                chunk = await asyncio.to_thread(reader.read, FRAMES_PER_BATCH)
            if not chunk:
                break
            with stage(timings, "preprocess"):
                prepared = await asyncio.gather(
                    *(asyncio.to_thread(_prepare, pipeline, image) for image, _ in chunk)
                )
            with stage(timings, "model"):  # the backend's queue included; a malformed answer flips /ready
                outputs = await answerer.infer(pipeline, [tensor for tensor, _ in prepared], None, route)
            with stage(timings, "postprocess"):
                results = [
                    pipeline.answer(out, geometry, options) for out, (_, geometry) in zip(outputs, prepared)
                ]
                if tracker is not None:
                    results = [tracker.update(r) for r in results]
            for (image, time_s), result in zip(chunk, results):
                answered.append(VideoFrameResult(index=len(answered), time_s=round(time_s, 4), result=result))
                if writer is not None:
                    with stage(timings, "encode"):
                        await asyncio.to_thread(writer.write, image, result)
                    if writer.size > settings.max_response_bytes:
                        raise _too_large(settings)
            answerer.metrics.video_frames.inc(len(chunk), tags={"endpoint": handler.endpoint})
        if writer is not None:
            with stage(timings, "encode"):
                video = await asyncio.to_thread(writer.finish)
            if len(video) > settings.max_response_bytes:
                raise _too_large(settings)
            return Response(video, media_type=wanted, headers={"X-Video-Frames": str(len(answered))})
    finally:
        if writer is not None:
            writer.close()
    if not answered:
        raise ApiError(400, "undecodable_video", "the video has no frame that could be decoded")
    info = VideoInfo(
        width=reader.width,
        height=reader.height,
        fps=round(reader.fps, 3),
        frames=len(answered),
        duration_s=round(reader.last_time_s + 1 / reader.fps, 4),
        codec=reader.codec,
    )
    response = VideoResponse(
        model=handler.model,
        version=route.serve,
        backend=settings.backend,
        video=info,
        frames=answered,
    )
    with stage(timings, "encode"):
        body = response.model_dump_json()
    return Response(body, media_type="application/json")


def _prepare(pipeline: TaskPipeline, image: np.ndarray) -> tuple[np.ndarray, Geometry]:
    return pipeline.preprocess(image, (image.shape[1], image.shape[0]))


def _too_large(settings: Settings) -> ApiError:
    return ApiError(
        413,
        "response_too_large",
        f"the drawn video would be more than {settings.max_response_bytes} bytes, the limit; send a shorter video",
    )


def _undecodable(detail: str) -> ApiError:
    return ApiError(400, "undecodable_video", f"the body is not a video this gateway can decode ({detail})")


# FFmpeg's own errors, and what PyAV raises for streams it cannot describe
_DECODE_ERRORS = (av.FFmpegError, ValueError, OSError, EOFError, IndexError, TypeError, ZeroDivisionError)


class VideoReader:
    """The video stream of one uploaded file, its limits checked from the header, then frame by frame."""

    def __init__(self, data: bytes, demuxer: str, settings: Settings) -> None:
        if not data:
            raise ApiError(400, "undecodable_video", "the request body is empty")
        self._settings = settings
        try:
            self._container = av.open(io.BytesIO(data), mode="r", format=demuxer)
        except _DECODE_ERRORS as error:
            raise _undecodable(type(error).__name__) from error
        try:
            if not self._container.streams.video:
                raise _undecodable("no video stream")
            stream = self._container.streams.video[0]
            if stream.codec_context is None:  # FFmpeg found the stream but has no decoder for its codec
                raise ApiError(  # (PyAV then knows no name or tag of the codec either)
                    415,
                    "unsupported_media_type",
                    "the video's codec cannot be decoded here; send H.264, VP8, VP9 or AV1",
                )
            self.width, self.height = int(stream.codec_context.width), int(stream.codec_context.height)
            self.codec = stream.codec_context.name
            rate = stream.average_rate or stream.guessed_rate
            self.fps = float(rate) if rate and 0 < float(rate) <= 1000 else _DEFAULT_FPS
            duration = (
                float(stream.duration * stream.time_base) if stream.duration and stream.time_base else 0.0
            )
            if not duration and self._container.duration:
                duration = self._container.duration / av.time_base
            self._check_size(self.width, self.height)
            self._check_duration(duration)
            self._check_count(int(stream.frames or 0))
            self._frames: Iterator[av.VideoFrame] = self._container.decode(stream)
        except BaseException:
            self._container.close()
            raise
        self.count = 0
        self.last_time_s = 0.0

    def read(self, count: int) -> list[tuple[np.ndarray, float]]:
        """The next `count` frames (fewer at the end) as RGB arrays with their times in seconds."""
        frames: list[tuple[np.ndarray, float]] = []
        try:
            for frame in self._frames:
                self.count += 1
                self._check_count(self.count)
                self._check_size(frame.width, frame.height)
                time_s = float(frame.time) if frame.time is not None else (self.count - 1) / self.fps
                self._check_duration(time_s)
                self.last_time_s = time_s
                frames.append((frame.to_ndarray(format="rgb24"), time_s))
                if len(frames) == count:
                    break
        except _DECODE_ERRORS as error:
            raise _undecodable(f"frame {self.count}: {type(error).__name__}") from error
        return frames

    def close(self) -> None:
        self._container.close()

    def _check_size(self, width: int, height: int) -> None:
        if width <= 0 or height <= 0:
            raise _undecodable("the video stream has no frame size")
        limit = self._settings.video_max_frame_pixels
        if width * height > limit:
            raise ApiError(
                413,
                "frame_too_large",
                f"video frames are {width}x{height} pixels; the limit is {limit} pixels",
            )

    def _check_duration(self, seconds: float) -> None:
        limit = self._settings.video_max_duration_s
        if seconds > limit:
            raise ApiError(
                413, "video_too_long", f"the video runs {seconds:.1f} s or more; the limit is {limit:g} s"
            )

    def _check_count(self, frames: int) -> None:
        limit = self._settings.video_max_frames
        if frames > limit:
            raise ApiError(413, "too_many_frames", f"the video has more than {limit} frames, the limit")


class VideoWriter:
    """Encodes drawn frames into a WebM (VP8) or MP4 (H.264) in memory, at most 4 MP a frame."""

    def __init__(self, handler: Handler, media_type: str, fps: float, width: int, height: int) -> None:
        self._handler = handler  # draws each frame's result
        muxer, encoder, encoder_options = ENCODERS[media_type]
        fitted_width, fitted_height = fit_size(width, height, RENDER_MAX_PIXELS)
        self.width, self.height = (
            max(2, fitted_width // 2 * 2),
            max(2, fitted_height // 2 * 2),
        )  # yuv420p: even sides
        self._buffer = io.BytesIO()
        self._container = av.open(self._buffer, mode="w", format=muxer)
        self._stream = self._container.add_stream(encoder, rate=Fraction(fps).limit_denominator(1001))
        self._stream.width, self._stream.height = self.width, self.height
        self._stream.pix_fmt = "yuv420p"
        self._stream.options = encoder_options
        self._closed = False

    @property
    def size(self) -> int:
        """Bytes written so far."""
        return self._buffer.tell()

    def write(self, image: np.ndarray, result: BaseModel) -> None:
        """Draw `result` on the frame `image` and encode it."""
        drawn = self._handler.draw(fit_image(image, RENDER_MAX_PIXELS), result)[: self.height, : self.width]
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(drawn), format="rgb24")
        for packet in self._stream.encode(frame):
            self._container.mux(packet)

    def finish(self) -> bytes:
        """Flush the encoder and return the whole file."""
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self.close()
        return self._buffer.getvalue()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._container.close()
