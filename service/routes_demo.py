"""The browser demo page and annotated-image answers, wired into the gateway by two calls.

Annotated answers: `annotate=png|jpeg` (query or JSON body) or an `Accept: image/png|image/jpeg`
header asks for the answer drawn on the image (`service.annotate`).
* One image, and the client did not name `application/json` in Accept: the body is the PNG/JPEG.
* Otherwise (several images, or JSON asked for): the usual JSON, each result carrying
  `annotated_image` as a `data:image/...;base64,` URL (what the demo page uses).
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

from service.annotate import MEDIA_TYPES, ImageFormat, annotate_result, encode_image
from service.images import decode_image
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


def _accepted_media_types(request: Request) -> list[str]:
    """Media types the Accept header names with q > 0, in the order given."""
    accepted = []
    for item in request.headers.get("accept", "").split(","):
        media_type, *params = (part.strip() for part in item.split(";"))
        q = next((p.partition("=")[2] for p in params if p.startswith("q=")), "1")
        try:
            weight = float(q)
        except ValueError:
            weight = 1.0
        if media_type and weight > 0:
            accepted.append(media_type.lower())
    return accepted


def requested_format(request: Request, options: BaseModel) -> ImageFormat | None:
    """The annotated-image format asked for: the `annotate` option first, then the Accept header."""
    chosen: ImageFormat | None = getattr(options, "annotate", None)
    if chosen is not None:
        return chosen
    accepted = _accepted_media_types(request)
    return next((_FORMAT_OF_MEDIA_TYPE[m] for m in accepted if m in _FORMAT_OF_MEDIA_TYPE), None)


async def annotated_or_json(
    request: Request, response: BaseModel, blobs: Sequence[bytes], options: BaseModel, settings: Settings
) -> BaseModel | Response:
    """Return `response` as it is, or with its answers drawn on the images when a client asks."""
    fmt = requested_format(request, options)
    if fmt is None:
        return response
    images = await asyncio.to_thread(_draw_all, response, blobs, fmt, settings)
    if len(images) == 1 and "application/json" not in _accepted_media_types(request):
        return Response(images[0], media_type=MEDIA_TYPES[fmt])
    body = response.model_dump(mode="json")
    prefix = f"data:{MEDIA_TYPES[fmt]};base64,"
    for result, image in zip(body["results"], images, strict=True):
        result["annotated_image"] = prefix + base64.b64encode(image).decode("ascii")
    return JSONResponse(body)


def _draw_all(
    response: BaseModel, blobs: Sequence[bytes], fmt: ImageFormat, settings: Settings
) -> list[bytes]:
    """Decode each upload again (they were decoded once already, so this cannot fail) and draw on it."""
    results = response.results  # type: ignore[attr-defined]
    drawn = []
    for blob, result in zip(blobs, results, strict=True):
        image = decode_image(blob, settings.max_pixels, settings.allowed_formats)
        drawn.append(encode_image(annotate_result(image, result), fmt))
    return drawn
