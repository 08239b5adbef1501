"""Fuzzing the Open Inference Protocol's parser (`read_infer_request`) and whole /v2 inference requests.

Requests are built the way clients build them (a JSON header, binary tensor data after it,
`Inference-Header-Content-Length`, gzip or deflate) and then bent: fields of the wrong type or value, names
and shapes and sizes that do not match, the header's bytes mutated, lengths in other scripts' digits ('²'),
bodies compressed or not as `Content-Encoding` says. The parser may only refuse with a 4xx `ApiError`; the
server (the real detector under uvicorn) answers every request with a 2xx or a 4xx in the protocol's error
shape, and a good request afterwards. Fixed example counts and the committed replay database
(tests/hardening/fuzzing.py).
"""

from __future__ import annotations

import base64
import gzip
import json
import zlib
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from tritonclient.utils import serialize_byte_tensor

from service.core.errors import ApiError
from service.surfaces.oip import HEADER_LENGTH, read_infer_request
from tests.hardening import payloads
from tests.hardening.fuzzing import fuzz_settings, header_text, mutated

MAX_BYTES = 1 << 20
MAX_IMAGES = 4
INFER = "/v2/models/detector/infer"

IMAGE_SEEDS = [
    payloads.encode(payloads.noise(24, 16), "PNG"),
    payloads.encode(payloads.noise(24, 16), "JPEG", quality=80),
    b"not an image",
    b"",
]
SCALARS = st.one_of(
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.none(),
)
OPTION_NAMES = st.sampled_from(
    ["score_threshold", "max_detections", "top_k", "annotate", "binary_data_output", "return_png", "x"]
)


def bytes_tensor(elements: list[bytes]) -> bytes:
    return serialize_byte_tensor(np.array(elements, dtype=object)).item() if elements else b""


GOOD_PARAMETERS = {
    "score_threshold": st.floats(0, 1),
    "max_detections": st.integers(1, 100),
    "binary_data_output": st.booleans(),
}
GOOD_OUTPUT = st.fixed_dictionaries(
    {"name": st.sampled_from(["RESULT", "BOXES", "COUNT", "LABELS"])},
    optional={"parameters": st.fixed_dictionaries({"binary_data": st.booleans()})},
)
# What a request may have bent; each example bends none (a valid request), one or two of them
BENDS = (
    "images", "name", "shape", "datatype", "size", "data", "inputs", "model_name", "id", "parameters",
    "outputs", "extra field", "header bytes", "length", "encoding",
)  # fmt: skip


@st.composite
def oip_bodies(draw: st.DrawFn) -> tuple[bytes, dict[str, bytes]]:
    """An inference request body and its headers: built as a client would, with a few things bent."""
    bent = draw(st.sets(st.sampled_from(BENDS), max_size=2))

    def pick(aspect: str, good: Any, bad: st.SearchStrategy[Any]) -> Any:
        return draw(bad) if aspect in bent else good

    images = pick(
        "images",
        draw(st.lists(st.sampled_from(IMAGE_SEEDS[:2]), min_size=1, max_size=2)),
        st.lists(mutated(IMAGE_SEEDS, max_edits=3), max_size=3),
    )
    binary = draw(st.booleans())
    data = bytes_tensor(images) if binary else b""
    tensor: dict[str, Any] = {
        "name": pick("name", "IMAGE", st.sampled_from(["RESULT", "", "image", "IMAGE "])),
        "shape": pick("shape", [len(images)], st.lists(st.integers(-2, 20), max_size=3)),
        "datatype": pick("datatype", "BYTES", st.sampled_from(["FP32", "bytes", "", "STRING"])),
    }
    if binary:
        bad_size = st.one_of(st.integers(-1, 2 * len(data) + 8), SCALARS)
        tensor["parameters"] = {"binary_data_size": pick("size", len(data), bad_size)}
    else:
        texts = [base64.b64encode(image).decode() for image in images]
        bad_data = st.one_of(st.lists(st.text(max_size=16), max_size=3), st.just([texts]))
        tensor["data"] = pick("data", texts, bad_data)
    header: dict[str, Any] = {"inputs": pick("inputs", [tensor], st.sampled_from([[tensor, tensor], []]))}
    if draw(st.booleans()) or "model_name" in bent:
        header["model_name"] = pick("model_name", "detector", st.one_of(st.just("classifier"), SCALARS))
    if draw(st.booleans()) or "id" in bent:
        header["id"] = pick("id", "request-1", SCALARS)
    if draw(st.booleans()) or "parameters" in bent:
        good = draw(st.fixed_dictionaries({}, optional=GOOD_PARAMETERS))
        header["parameters"] = pick("parameters", good, st.dictionaries(OPTION_NAMES, SCALARS, max_size=3))
    if draw(st.booleans()) or "outputs" in bent:
        good = draw(st.lists(GOOD_OUTPUT, min_size=1, max_size=3, unique_by=lambda output: output["name"]))
        bad = st.lists(
            st.fixed_dictionaries(
                {"name": st.sampled_from(["RESULT", "MASK", ""])},
                optional={"parameters": st.dictionaries(st.sampled_from(["binary_data", "x"]), SCALARS)},
            ),
            max_size=3,
        )
        header["outputs"] = pick("outputs", good, bad)
    if "extra field" in bent:
        header[draw(st.text(max_size=8))] = draw(SCALARS)
    text = json.dumps(header).encode()
    text = pick("header bytes", text, mutated([text], max_edits=4, random_share=20))
    body = text + data
    headers: dict[str, bytes] = {}
    length = pick(
        "length",
        str(len(text)) if binary else None,
        st.one_of(
            st.integers(-5, len(body) + 5).map(str),
            header_text(12),
            st.sampled_from(["²", "¹²", "1²", str(len(text)) + "²", "9" * 5000, "1 2", "0x10", "-0"]),
        ),
    )
    if length is not None:
        headers[HEADER_LENGTH] = length.encode("latin-1")
    encoding = pick(
        "encoding",
        draw(st.sampled_from([None, None, "gzip", "deflate"])),
        st.sampled_from(["identity", "br", "GZIP", "gzip, br", "x-gzip", ""]),
    )
    if encoding is not None:
        headers["Content-Encoding"] = encoding.encode()
        compress = draw(st.booleans()) if "encoding" in bent else encoding in ("gzip", "deflate")
        if compress:
            body = gzip.compress(body) if encoding.lower().startswith("gzip") else zlib.compress(body)
    return body, headers


def _header_length(headers: dict[str, bytes]) -> str | None:
    value = headers.get(HEADER_LENGTH)
    return None if value is None else value.decode("latin-1")


@fuzz_settings(max_examples=300)
@given(request=oip_bodies(), model=st.sampled_from([None, "detector"]))
def test_the_parser_refuses_only_with_4xx_api_errors(
    request: tuple[bytes, dict[str, bytes]], model: str | None
) -> None:
    body, headers = request
    encoding = headers.get("Content-Encoding", b"").decode().strip().lower()
    try:
        parsed, images = read_infer_request(
            body, _header_length(headers), encoding, MAX_BYTES, MAX_IMAGES, model
        )
    except ApiError as error:
        assert 400 <= error.status_code < 500, (error.status_code, error.code, error.message)
        return
    assert len(images) <= MAX_IMAGES and all(isinstance(image, bytes) for image in images)
    assert model is None or parsed.model_name in (None, model)


@pytest.fixture(scope="module")
def oip_client(inprocess_gateway: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://{inprocess_gateway}", timeout=60) as client:
        yield client


def assert_infers(client: httpx.Client) -> None:
    """A good request is answered, with a real RESULT."""
    image = payloads.encode(payloads.noise(48, 32), "PNG")
    data = bytes_tensor([image])
    size = {"binary_data_size": len(data)}
    tensor = {"name": "IMAGE", "shape": [1], "datatype": "BYTES", "parameters": size}
    header = json.dumps({"inputs": [tensor]}).encode()
    response = client.post(INFER, content=header + data, headers={HEADER_LENGTH: str(len(header))})
    assert response.status_code == 200, response.text[:300]
    (result,) = [output for output in response.json()["outputs"] if output["name"] == "RESULT"]
    assert json.loads(result["data"][0])["image"] == {"width": 48, "height": 32}


def test_whole_requests_get_no_5xx_and_the_server_answers_after(oip_client: httpx.Client) -> None:
    seen: dict[int, int] = {}

    @fuzz_settings(max_examples=150)
    @given(request=oip_bodies(), path=st.sampled_from([INFER, INFER, "/v2/models/detector/versions/1/infer"]))
    def one_request(request: tuple[bytes, dict[str, bytes]], path: str) -> None:
        body, headers = request
        response = oip_client.post(path, content=body, headers=headers)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code < 500, f"{response.status_code}: {response.text[:300]}"
        if response.status_code >= 400:
            error = response.json()
            assert set(error) == {"error"} and isinstance(error["error"], str), response.text[:300]

    one_request()
    print(f"OIP fuzz: statuses {dict(sorted(seen.items()))}")
    assert_infers(oip_client)
