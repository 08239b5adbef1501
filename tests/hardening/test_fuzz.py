"""Fuzzing with hypothesis over image bytes and request headers: whatever arrives, never a 5xx.

Two runs of a fixed number of examples: the decoder alone (fast, many examples: only `ImageError` may
escape it) and the running gateway (the whole path: parsers, header sizes, decode, annotate; each answer
must be a 2xx or a documented 4xx JSON error). Inputs are mutations of valid files in every accepted format
(EXIF, 16-bit, palette, animated, TIFF compressions) plus plain random bytes. Failures are kept in the
committed replay database and replayed first (tests/hardening/fuzzing.py).
"""

from __future__ import annotations

import base64
import warnings

import httpx
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from service.imaging.images import (
    READABLE_FORMATS,
    ImageError,
    decode_image,
    decode_image_for_display,
    request_pixels,
)
from tests.hardening import payloads
from tests.hardening.fuzzing import fuzz_settings, mutated
from tests.hardening.test_bad_inputs import assert_serves

DECODER_EXAMPLES = 2000
GATEWAY_EXAMPLES = 400


def _seeds() -> list[bytes]:
    pixels = payloads.noise(24, 16)
    exif = Image.Exif()
    exif[payloads.EXIF_ORIENTATION_TAG] = 6
    exif[0x010F] = "fuzz camera"
    seeds = [payloads.encode(pixels, fmt) for fmt in ("PNG", "WEBP", "BMP", "GIF")]
    seeds += [payloads.encode(pixels, "JPEG", quality=90, exif=exif.tobytes()), payloads.exif_jpeg(pixels, 3)]
    seeds += [
        payloads.encode(pixels, "TIFF", compression=c, exif=exif.tobytes())
        for c in (None, "tiff_lzw", "jpeg")
    ]
    seeds += [
        payloads.encode(pixels, "PNG", exif=exif.tobytes()),
        payloads.encode(pixels, "WEBP", exif=exif.tobytes()),
    ]
    seeds += [
        payloads.png16(24, 16)[0],
        payloads.palette_with_transparency(24, 16)[0],
        payloads.animated_gif(24, 16)[0],
    ]
    seeds += [payloads.cmyk_jpeg(24, 16), payloads.mpo_jpeg(24, 16), payloads.png_bomb(3000, 3000)]
    seeds += [payloads.encode(Image.fromarray(np.random.default_rng(2).random((16, 24), np.float32)), "TIFF")]
    seeds += [payloads.encode(Image.fromarray(pixels).convert("RGBA"), "PNG")]
    return seeds


SEEDS = _seeds()


def image_bytes() -> st.SearchStrategy[bytes]:
    """A valid file with a few bytes overwritten, inserted or deleted (and maybe cut short), or random bytes."""
    return mutated(SEEDS)


CONTENT_TYPES = st.one_of(
    st.sampled_from(
        [
            "image/png",
            "image/jpeg",
            "image/gif",
            "image/tiff",
            "image/webp",
            "image/bmp",
            "application/octet-stream",
            "image/svg+xml",
            "text/plain",
            "application/json",
            "multipart/form-data",
            "multipart/form-data; boundary=x",
            "image/png; charset=binary",
            "IMAGE/PNG",
            "",
        ]
    ),
    # what a header value can carry (h11 refuses surrounding whitespace before it is sent)
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40).map(str.strip),
)
ACCEPT = st.one_of(
    st.none(), st.sampled_from(["image/png", "image/jpeg;q=0", "application/json, image/png", "*/*"])
)
QUERIES = st.sampled_from(
    [
        "",
        "?annotate=png",
        "?annotate=jpeg",
        "?return_png=true",
        "?top_k=3",
        "?score_threshold=0",
        "?annotate=gif",
        "?top_k=-1",
        "?x=%00",
        "?annotate=png&return_png=1",
    ]
)


@fuzz_settings(max_examples=DECODER_EXAMPLES)
@given(data=image_bytes(), min_side=st.sampled_from([None, 8, 64]))
def test_decoder_raises_only_image_errors(data: bytes, min_side: int | None) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for decode in (
            lambda: decode_image(data, 4_000_000, READABLE_FORMATS),
            lambda: decode_image_for_display(data, 4_000_000, READABLE_FORMATS, 10_000),
        ):
            try:
                decode()
            except ImageError:
                pass
        request_pixels([data], READABLE_FORMATS, min_side)  # never raises


@pytest.fixture(scope="module")
def fuzz_client(embedded_gateway: str) -> httpx.Client:
    with httpx.Client(base_url=embedded_gateway, timeout=60) as session:
        yield session


def test_gateway_never_answers_5xx(fuzz_client: httpx.Client) -> None:
    seen: dict[int, int] = {}

    @fuzz_settings(max_examples=GATEWAY_EXAMPLES)
    @given(
        data=image_bytes(),
        style=st.sampled_from(["raw", "multipart", "json"]),
        endpoint=st.sampled_from(["/classify", "/detect", "/segment"]),
        content_type=CONTENT_TYPES,
        accept=ACCEPT,
        query=QUERIES,
    )
    def one_request(
        data: bytes, style: str, endpoint: str, content_type: str, accept: str | None, query: str
    ) -> None:
        headers = {"Accept": accept} if accept else {}
        if style == "raw":
            kwargs: dict = {"content": data, "headers": {**headers, "Content-Type": content_type}}
        elif style == "multipart":
            kwargs = {
                "files": {"file": ("x", data, content_type or "application/octet-stream")},
                "headers": headers,
            }
        else:
            kwargs = {"json": {"images": [base64.b64encode(data).decode()]}, "headers": headers}
        response = fuzz_client.post(endpoint + query, **kwargs)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code < 500, f"{response.status_code}: {response.text[:300]}"
        if response.status_code >= 400:
            assert set(response.json()) == {"error"}, response.text[:300]

    one_request()
    print(f"gateway fuzz: {sum(seen.values())} requests, statuses {dict(sorted(seen.items()))}")
    assert_serves(fuzz_client, "/detect")
