"""Read the images (and JSON options) out of a request in any of the three accepted styles.

* multipart/form-data: one or several files in fields `file` / `files`
* a raw image body: `Content-Type: image/jpeg|png|webp|...` (or application/octet-stream)
* application/json: `{"images": [base64, ...], <options>}`
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.types import Message

from service.errors import ApiError, describe_validation_errors

FILE_FIELDS = ("file", "files")
# Raw-body media types of the raster formats the gateway can read; any other image/* (SVG, HEIC, ...)
# is refused up front with 415. The body is still sniffed: the header only has to name a raster type.
RASTER_MEDIA_TYPES = frozenset(
    {"image/jpeg", "image/jpg", "image/pjpeg", "image/png", "image/apng", "image/webp", "image/bmp",
     "image/x-ms-bmp", "image/gif", "image/tiff"}
)


@dataclass
class ImageInputs:
    """The raw image files of one request, in order, plus options given in a JSON body."""

    blobs: list[bytes]
    json_options: dict[str, Any] = field(default_factory=dict)


async def read_body(request: Request, max_bytes: int) -> bytes:
    """Read the whole body, refusing (413) as soon as it exceeds `max_bytes`."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "bad_request", "Content-Length is not a number")
        if int(declared) > max_bytes:
            raise ApiError(413, "body_too_large", f"request body is {declared} bytes; the limit is {max_bytes}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise ApiError(413, "body_too_large", f"request body exceeds the limit of {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_images(request: Request, body_model: type[BaseModel], max_bytes: int, max_images: int) -> ImageInputs:
    """Return the request's images whatever the style; 4xx errors say what was expected."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    raw = media_type in RASTER_MEDIA_TYPES or media_type == "application/octet-stream"
    if not raw and media_type not in ("multipart/form-data", "application/json"):
        raise ApiError(  # before reading the body: nothing to gain from it
            415,
            "unsupported_media_type",
            f"Content-Type {media_type or '(none)'} is not accepted; send multipart/form-data with field "
            "'file' or 'files', a raw image with Content-Type image/jpeg|png|webp, or application/json "
            '{"images": [<base64>]}',
        )
    body = await read_body(request, max_bytes)
    if raw:
        inputs = ImageInputs([body])
    elif media_type == "multipart/form-data":
        inputs = await _from_multipart(request, body)
    else:
        inputs = _from_json(body, body_model)
    if not inputs.blobs or not any(inputs.blobs):
        raise ApiError(400, "no_image", "the request contains no image")
    if len(inputs.blobs) > max_images:
        raise ApiError(
            413, "too_many_images", f"{len(inputs.blobs)} images in one request; the limit is {max_images}"
        )
    return inputs


async def _from_multipart(request: Request, body: bytes) -> ImageInputs:
    async def replay() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    form = await Request(request.scope, replay).form(max_part_size=len(body) + 1)
    try:
        parts = [part for name in FILE_FIELDS for part in form.getlist(name)]
        if not parts:
            raise ApiError(400, "no_image", "multipart body has no file; upload it in field 'file' (or 'files')")
        if not all(isinstance(part, UploadFile) for part in parts):
            raise ApiError(400, "bad_request", "fields 'file'/'files' must be file uploads, not text")
        return ImageInputs([await part.read() for part in parts])  # type: ignore[union-attr]
    finally:
        await form.close()


def _from_json(body: bytes, body_model: type[BaseModel]) -> ImageInputs:
    try:
        parsed = body_model.model_validate_json(body)
    except ValidationError as error:
        if any(e.get("type") == "json_invalid" for e in error.errors()):
            raise ApiError(400, "bad_request", "the body is not valid JSON") from error
        raise ApiError(422, "invalid_request", describe_validation_errors(list(error.errors()))) from error
    options = parsed.model_dump(exclude_unset=True, exclude={"images"})
    return ImageInputs([_b64decode(text, i) for i, text in enumerate(parsed.images)], options)  # type: ignore[attr-defined]


def _b64decode(text: str, index: int) -> bytes:
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ApiError(400, "bad_request", f"images[{index}] is not valid base64") from error
