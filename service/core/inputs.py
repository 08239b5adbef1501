"""Read the images (and JSON options) out of a request in any of the three accepted styles.

* multipart/form-data: one or several files in fields `file` / `files`
* a raw image body: `Content-Type: image/jpeg|png|webp|...` (or application/octet-stream)
* application/json: `{"images": [base64, ...], <options>}`

Parsing is bounded by the image limit: at most `max_images` multipart files (and as many text
fields), a JSON body whose size in values could not hold more than `max_images` images is refused
before it is parsed, and the parse itself runs off the event loop. Before anything is decoded, the
images' header sizes must fit the request's pixel budget.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Collection
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from fastapi import Request
from pydantic import BaseModel, Field, ValidationError, create_model
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.types import Message

from service.core.errors import ApiError, describe_validation_errors
from service.imaging.images import READABLE_FORMATS, request_pixels
from service.settings import Settings

FILE_FIELDS = ("file", "files")
# Raw-body media types of the raster formats the gateway can read; any other image/* (SVG, HEIC, ...)
# is refused up front with 415. The body is still sniffed: the header only has to name a raster type.
RASTER_MEDIA_TYPES = frozenset(
    {
        "image/jpeg",
        "image/jpg",
        "image/pjpeg",
        "image/png",
        "image/apng",
        "image/webp",
        "image/bmp",
        "image/x-ms-bmp",
        "image/gif",
        "image/tiff",
    }
)
DEFAULT_MAX_REQUEST_PIXELS: int = Settings.model_fields["max_request_pixels"].default
_COUNT_DIGITS = 18  # a byte count of more digits is past every limit (and int() refuses over 4300 digits)


def byte_count(text: str) -> int | None:
    """A header's byte count (Content-Length and the like), or None if it is not ASCII digits.

    `str.isdigit` also takes '¹²³' (and other scripts' digits), which `int` then refuses; counts of more
    than 18 digits come back as 10**18, past any limit."""
    if not (text.isascii() and text.isdigit()):
        return None
    digits = text.lstrip("0") or "0"
    return int(digits) if len(digits) <= _COUNT_DIGITS else 10**_COUNT_DIGITS


@dataclass
class ImageInputs:
    """The raw image files of one request, in order, plus options given in a JSON body."""

    blobs: list[bytes]
    json_options: dict[str, Any] = field(default_factory=dict)
    pixels: int = 0  # all images together, from their headers (JPEGs at the size they decode to)


async def read_body(request: Request, max_bytes: int) -> bytes:
    """Read the whole body, refusing (413) as soon as it exceeds `max_bytes`."""
    declared = request.headers.get("content-length")
    if declared is not None:
        size = byte_count(declared)
        if size is None:
            raise ApiError(400, "bad_request", "Content-Length is not a number")
        if size > max_bytes:
            raise ApiError(
                413, "body_too_large", f"request body is {size} bytes or more; the limit is {max_bytes}"
            )
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise ApiError(413, "body_too_large", f"request body exceeds the limit of {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_images(
    request: Request,
    body_model: type[BaseModel],
    max_bytes: int,
    max_images: int,
    *,
    max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS,
    allowed_formats: Collection[str] = READABLE_FORMATS,
    min_side: int | None = None,
) -> ImageInputs:
    """Return the request's images whatever the style; 4xx errors say what was expected.

    The images' sizes, read from their headers (`allowed_formats`' readers; JPEGs at the reduced
    scale a decode for `min_side` uses), must add up to at most `max_request_pixels` (413)."""
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
        inputs = await _from_multipart(request, body, max_images)
    else:
        inputs = await asyncio.to_thread(_from_json, body, body_model, max_images)
    inputs.pixels = await check_images(
        inputs.blobs,
        max_images,
        max_request_pixels=max_request_pixels,
        allowed_formats=allowed_formats,
        min_side=min_side,
    )
    return inputs


async def check_images(
    blobs: list[bytes],
    max_images: int,
    *,
    max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS,
    allowed_formats: Collection[str] = READABLE_FORMATS,
    min_side: int | None = None,
) -> int:
    """The pixels of a request's images from their headers, once they pass the per-request limits
    (400 no_image, 413 too_many_images, 413 too_many_pixels); every input style goes through it."""
    if not blobs or not any(blobs):
        raise ApiError(400, "no_image", "the request contains no image")
    if len(blobs) > max_images:
        raise ApiError(413, "too_many_images", f"{len(blobs)} images in one request; the limit is {max_images}")
    pixels = await asyncio.to_thread(request_pixels, blobs, allowed_formats, min_side)
    if pixels > max_request_pixels:
        raise ApiError(
            413,
            "too_many_pixels",
            f"the request's {len(blobs)} images have {pixels} pixels together; the limit is "
            f"{max_request_pixels} pixels per request (send fewer or smaller images per request)",
        )
    return pixels


async def _from_multipart(request: Request, body: bytes, max_images: int) -> ImageInputs:
    async def replay() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    try:  # the parser stops at the first part past either limit
        form = await Request(request.scope, replay).form(
            max_files=max_images, max_fields=max_images, max_part_size=len(body) + 1
        )
    except (HTTPException, MultiPartException) as error:  # Starlette's words for a malformed body
        detail = str(getattr(error, "detail", None) or getattr(error, "message", "malformed multipart body"))
        if detail.startswith("Too many files"):
            raise ApiError(
                413,
                "too_many_images",
                f"more than {max_images} files in one request; the limit is {max_images}",
            ) from error
        raise ApiError(400, "bad_request", detail) from error
    try:
        parts = [part for name in FILE_FIELDS for part in form.getlist(name)]
        if not parts:
            raise ApiError(
                400, "no_image", "multipart body has no file; upload it in field 'file' (or 'files')"
            )
        if not all(isinstance(part, UploadFile) for part in parts):
            raise ApiError(400, "bad_request", "fields 'file'/'files' must be file uploads, not text")
        return ImageInputs([await part.read() for part in parts])  # type: ignore[union-attr]
    finally:
        await form.close()


def _from_json(body: bytes, body_model: type[BaseModel], max_images: int) -> ImageInputs:
    # A valid body has fewer commas than 2 per image (list separators, `data:` URLs) plus one per option.
    # Counting them is a memchr; parsing a 32 MiB list of 10M numbers first would cost ~1 GiB and a second.
    if body.count(b",") > 2 * max_images + len(body_model.model_fields):
        raise ApiError(
            413,
            "too_many_images",
            f"the JSON body holds more values than {max_images} images and the options can; "
            f"the limit is {max_images} images per request",
        )
    try:
        parsed = _capped(body_model, max_images).model_validate_json(body)
    except ValidationError as error:
        errors = error.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            raise ApiError(400, "bad_request", "the body is not valid JSON") from error
        too_long = next(
            (e for e in errors if e.get("type") == "too_long" and tuple(e["loc"]) == ("images",)), None
        )
        if too_long is not None:
            count = too_long.get("ctx", {}).get("actual_length", "too many")
            raise ApiError(
                413, "too_many_images", f"{count} images in one request; the limit is {max_images}"
            ) from error
        raise ApiError(422, "invalid_request", describe_validation_errors(list(errors))) from error
    options = parsed.model_dump(exclude_unset=True, exclude={"images"})
    return ImageInputs([_b64decode(text, i) for i, text in enumerate(parsed.images)], options)  # type: ignore[attr-defined]


@lru_cache(maxsize=16)
def _capped(body_model: type[BaseModel], max_images: int) -> type[BaseModel]:
    """`body_model` with its `images` list capped at `max_images` entries in the schema itself."""
    images = body_model.model_fields["images"]
    capped = Field(..., min_length=1, max_length=max_images, description=images.description)
    return create_model(body_model.__name__, __base__=body_model, images=(list[str], capped))


def _b64decode(text: str, index: int) -> bytes:
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ApiError(400, "bad_request", f"images[{index}] is not valid base64") from error
