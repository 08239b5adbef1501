"""The browser demo page and annotated-image answers, wired into the gateway by two calls.

Annotated answers: `annotate=png|jpeg` (query or JSON body) or an `Accept: image/png|image/jpeg`
header asks for the answer drawn on the image (`service.imaging.annotate`).
* One image, and the client did not name `application/json` in Accept: the body is the PNG/JPEG.
* Otherwise (several images, or JSON asked for): the usual JSON, each result carrying
  `annotated_image` as a `data:image/...;base64,` URL (what the demo page uses).
* Drawings are made on a copy of at most `RENDER_MAX_PIXELS` (4 MP); the images an answer carries
  (drawings, `return_png` masks, explanation overlays, counted as sent) may add up to `max_response_bytes`, past which the
  request gets 413 `response_too_large` instead.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Sequence
from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from service.handlers.common import Handler
from service.imaging.annotate import MEDIA_TYPES, ImageFormat, encode_image, fit_image
from service.core.accept import accepted, preferred
from service.core.errors import ApiError
from service.imaging.images import RENDER_MAX_PIXELS, decode_image_for_display
from service.settings import Settings

STATIC_DIR = Path(__file__).resolve().parent / "static"
_FORMAT_OF_MEDIA_TYPE: dict[str, ImageFormat] = {media: fmt for fmt, media in MEDIA_TYPES.items()}


def install_demo(app: FastAPI) -> None:
    """Serve the demo page at `/` and its assets under `/static/`."""
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_api_route("/", _index, methods=["GET"], include_in_schema=False)


async def _index(request: Request) -> Response:
    """The page; its links are relative, so under a route prefix it must be fetched with a trailing `/`."""
    path = request.url.path
    if not path.endswith("/"):
        return RedirectResponse(path + "/" + (f"?{request.url.query}" if request.url.query else ""))
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


def requested_format(request: Request, options: BaseModel) -> ImageFormat | None:
    """The annotated-image format asked for: the `annotate` option first, then the Accept header."""
    chosen: ImageFormat | None = getattr(options, "annotate", None)
    if chosen is not None:
        return chosen
    media = preferred(request.headers, _FORMAT_OF_MEDIA_TYPE)
    return _FORMAT_OF_MEDIA_TYPE[media] if media is not None else None


async def annotated_or_json(
    request: Request,
    handler: Handler,
    response: BaseModel,
    blobs: Sequence[bytes],
    options: BaseModel,
    settings: Settings,
) -> BaseModel | Response:
    """Return `response` as it is, or with its answers drawn on the images (by the task's handler) when a
    client asks."""
    fmt = requested_format(request, options)
    carried = check_carried_images(response, settings)
    if fmt is None:
        return response
    as_json = len(blobs) != 1 or "application/json" in accepted(request.headers)
    images = await asyncio.to_thread(_draw_all, handler, response, blobs, fmt, settings, carried, as_json)
    if not as_json:
        return Response(images[0], media_type=MEDIA_TYPES[fmt])
    body = response.model_dump(mode="json")
    prefix = f"data:{MEDIA_TYPES[fmt]};base64,"
    for result, image in zip(body["results"], images, strict=True):
        result["annotated_image"] = prefix + base64.b64encode(image).decode("ascii")
    return JSONResponse(body)


def check_carried_images(response: BaseModel, settings: Settings) -> int:
    """Bytes of the images `response` already carries (`return_png` masks), or 413 past `max_response_bytes`."""
    carried = _png_bytes(response)
    if carried > settings.max_response_bytes:
        raise _too_large(settings)
    return carried


def _draw_all(
    handler: Handler,
    response: BaseModel,
    blobs: Sequence[bytes],
    fmt: ImageFormat,
    settings: Settings,
    carried: int,
    as_json: bool,
) -> list[bytes]:
    """Decode each upload again, at most display size, and draw on it; stop (413) as soon as the answer's
    images (`carried` bytes already, plus the drawings, base64 in JSON) pass `max_response_bytes`."""
    results = response.results  # type: ignore[attr-defined]
    drawn = []
    total = carried
    for blob, result in zip(blobs, results, strict=True):
        image = decode_image_for_display(
            blob, settings.max_pixels, settings.allowed_formats, RENDER_MAX_PIXELS
        )
        encoded = encode_image(handler.draw(fit_image(image, RENDER_MAX_PIXELS), result), fmt)
        total += 4 * -(-len(encoded) // 3) if as_json else len(encoded)
        if total > settings.max_response_bytes:
            raise _too_large(settings)
        drawn.append(encoded)
    return drawn


def _png_bytes(response: BaseModel) -> int:
    """Bytes of the base64 `return_png` masks and explanation overlays already in `response`."""
    results = response.results  # type: ignore[attr-defined]
    return sum(len(getattr(result, "png", None) or "") + _overlay_bytes(result) for result in results)


def _overlay_bytes(result: BaseModel) -> int:
    """Bytes of the base64 `overlay_png`s of a result's explanations (its own, its detections', its segments')."""
    answers = [result, *getattr(result, "detections", ()), *getattr(result, "segments", ())]
    explanations = [getattr(answer, "explanation", None) for answer in answers]
    return sum(len(e.overlay_png or "") for e in explanations if e is not None)


def _too_large(settings: Settings) -> ApiError:
    return ApiError(
        413,
        "response_too_large",
        f"the images of this answer would come to more than {settings.max_response_bytes} bytes, the limit; "
        "ask for annotate=jpeg, or send fewer or smaller images per request",
    )
