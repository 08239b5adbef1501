"""Every refusal under /v2 is the protocol's `{"error": "<code>: <message>"}` with the task routes' status and
code: malformed inference requests, the gateway's limits (body, images, pixels, formats, compression, body
deadline), options, the key, unknown paths and methods. Against a real uvicorn server over the real detector
with small limits; after the refusals a valid request is still answered."""

from __future__ import annotations

import gzip
import json
import socket
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from tritonclient.utils import serialize_byte_tensor

from service.app import create_api
from service.backends.local import LocalBackend
from tests.oip.conftest import KEY, encoded, keyed_settings, scene, serving

MAX_BODY = 256 * 1024
LENGTH = "Inference-Header-Content-Length"


@pytest.fixture(scope="module")
def limited(model_repository: Path) -> Iterator[httpx.Client]:
    """The API with only the detector, JPEG only, 2 images, 100 000 pixels and 256 KiB per request, 1 s to send."""
    settings = keyed_settings(
        model_repository,
        models=("detector",),
        max_body_bytes=MAX_BODY,
        max_images_per_request=2,
        max_request_pixels=100_000,
        allowed_formats=("JPEG",),
        body_timeout_s=1.0,
    )
    with (
        serving(create_api(settings, LocalBackend(settings))) as url,
        httpx.Client(base_url=f"http://{url}", headers={"X-API-Key": KEY}, timeout=60) as client,
    ):
        yield client


def bytes_tensor(*elements: bytes) -> bytes:
    """BYTES tensor data as tritonclient sends it (4-byte little-endian length, then the bytes)."""
    return serialize_byte_tensor(np.array(elements, dtype=object)).item()


def request_body(inputs: list[dict[str, Any]], binary: bytes | None = None, **fields: Any) -> dict[str, Any]:
    """`content` and headers of an inference request: a JSON header, then `binary` (when given)."""
    header = json.dumps({"inputs": inputs, **fields}).encode()
    if binary is None:
        return {"content": header}
    return {"content": header + binary, "headers": {LENGTH: str(len(header))}}


def image_input(images: list[bytes], **overrides: Any) -> tuple[dict[str, Any], bytes]:
    binary = bytes_tensor(*images)
    tensor = {
        "name": "IMAGE",
        "shape": [len(images)],
        "datatype": "BYTES",
        "parameters": {"binary_data_size": len(binary)},
    }
    return tensor | overrides, binary


def jpeg(seed: int = 1, size: int = 128) -> bytes:
    return encoded(scene(seed, size)[0].image)


def infer_kwargs(images: list[bytes], **fields: Any) -> dict[str, Any]:
    tensor, binary = image_input(images)
    return request_body([tensor], binary, **fields)


def png_kwargs() -> dict[str, Any]:
    return infer_kwargs([encoded(scene(1)[0].image, "PNG")])


def oip_error(response: httpx.Response) -> tuple[int, str]:
    """(status, code) of a /v2 error answer, after checking it has the protocol's shape."""
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str), body
    code, _, message = body["error"].partition(": ")
    assert message, body
    return response.status_code, code


INFER = "/v2/models/detector/infer"
MALFORMED: list[tuple[str, dict[str, Any], int, str]] = [
    ("header length not a number", {"content": b"{}", "headers": {LENGTH: "abc"}}, 400, "bad_request"),
    ("header length past the body", {"content": b"{}", "headers": {LENGTH: "99"}}, 400, "bad_request"),
    ("header length a superscript digit", {"content": b"{}", "headers": {LENGTH: "²".encode("latin-1")}}, 400, "bad_request"),
    ("header length of 5000 digits", {"content": b"{}", "headers": {LENGTH: "9" * 5000}}, 400, "bad_request"),
    ("header not JSON", {"content": b"{inputs: ["}, 400, "bad_request"),
    ("JSON not an object", {"content": b"[1, 2]"}, 400, "bad_request"),
    ("unknown field", request_body([], url="http://x"), 400, "bad_request"),
    ("model_name of another model", infer_kwargs([jpeg()], model_name="classifier"), 400, "bad_request"),
    ("no inputs", request_body([]), 400, "bad_request"),
    ("unknown input", request_body([image_input([jpeg()], name="INPUT0")[0]], image_input([jpeg()])[1]), 400, "bad_request"),
    ("FP32 input", request_body([image_input([jpeg()], datatype="FP32")[0]], image_input([jpeg()])[1]), 400, "bad_request"),
    ("IMAGE twice", request_body([image_input([jpeg()])[0]] * 2, image_input([jpeg()])[1] * 2), 400, "bad_request"),
    ("negative shape", request_body([image_input([jpeg()], shape=[-1])[0]], image_input([jpeg()])[1]), 400, "bad_request"),
    ("shape and data disagree", request_body([image_input([jpeg()], shape=[2])[0]], image_input([jpeg()])[1]), 400, "bad_request"),
    ("binary sizes do not add up", request_body([image_input([jpeg()])[0]], image_input([jpeg()])[1] + b"xx"), 400, "bad_request"),
    ("element cut short", request_body([image_input([jpeg()], parameters={"binary_data_size": 50})[0]], image_input([jpeg()])[1][:50]), 400, "bad_request"),
    ("60000 empty elements", request_body([image_input([b""], parameters={"binary_data_size": 240_000})[0]], bytes(240_000)), 400, "bad_request"),
    ("neither data nor binary", request_body([{"name": "IMAGE", "shape": [1], "datatype": "BYTES"}]), 400, "bad_request"),
    ("data not base64", request_body([{"name": "IMAGE", "shape": [1], "datatype": "BYTES", "data": ["not base64!"]}]), 400, "bad_request"),
    ("data count off", request_body([{"name": "IMAGE", "shape": [2], "datatype": "BYTES", "data": ["aGk="]}]), 400, "bad_request"),
    ("unknown output", infer_kwargs([jpeg()], outputs=[{"name": "MASK"}]), 400, "bad_request"),
    ("classification extension", infer_kwargs([jpeg()], outputs=[{"name": "RESULT", "parameters": {"classification": 3}}]), 400, "bad_request"),
    ("binary_data_output not a bool", infer_kwargs([jpeg()], parameters={"binary_data_output": "yes"}), 400, "bad_request"),
    ("option out of range", infer_kwargs([jpeg()], parameters={"max_detections": 0}), 422, "invalid_request"),
    ("option of the wrong type", infer_kwargs([jpeg()], parameters={"score_threshold": "high"}), 422, "invalid_request"),
    ("unknown option", infer_kwargs([jpeg()], parameters={"verbose": True}), 422, "invalid_request"),
    ("three images", infer_kwargs([jpeg()] * 3), 413, "too_many_images"),
    ("too many pixels", infer_kwargs([jpeg(1, 256), jpeg(2, 256)]), 413, "too_many_pixels"),
    ("a PNG where only JPEG is allowed", png_kwargs(), 415, "unsupported_image_format"),
    ("not an image", infer_kwargs([b"plain text, not an image"]), 400, "undecodable_image"),
    ("body over the limit", infer_kwargs([bytes(MAX_BODY)]), 413, "body_too_large"),
    ("gzip bomb", {"content": gzip.compress(bytes(16 * MAX_BODY)), "headers": {"Content-Encoding": "gzip"}}, 413, "body_too_large"),
    ("corrupt gzip", {"content": b"\x1f\x8b not gzip", "headers": {"Content-Encoding": "gzip"}}, 400, "bad_request"),
    ("cut-off deflate", {"content": zlib.compress(b'{"inputs": []}')[:-4], "headers": {"Content-Encoding": "deflate"}}, 400, "bad_request"),
    ("X-Request-Timeout not a number", infer_kwargs([jpeg()]) | {"headers": {LENGTH: infer_kwargs([jpeg()])["headers"][LENGTH], "X-Request-Timeout": "soon"}}, 400, "bad_request"),
    ("brotli", {"content": b"\x00", "headers": {"Content-Encoding": "br"}}, 415, "unsupported_media_type"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("request_kwargs", "status", "code"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED]
)
def test_a_bad_inference_request_is_refused_in_the_protocols_shape(
    limited: httpx.Client, request_kwargs: dict[str, Any], status: int, code: str
) -> None:
    assert oip_error(limited.post(INFER, **request_kwargs)) == (status, code)


def test_paths_methods_models_and_the_key(limited: httpx.Client) -> None:
    assert oip_error(limited.get("/v2/nothing/here")) == (404, "not_found")
    assert oip_error(limited.post("/v2/health/live")) == (405, "method_not_allowed")
    assert oip_error(limited.get("/v2/models/classifier")) == (404, "model_disabled")
    assert oip_error(limited.post("/v2/models/classifier/infer", **infer_kwargs([jpeg()]))) == (
        404,
        "model_disabled",
    )
    assert oip_error(limited.get("/v2/models/resnet/ready")) == (404, "model_not_found")
    without_key = infer_kwargs([jpeg()])
    without_key["headers"]["X-API-Key"] = ""
    assert oip_error(limited.post(INFER, **without_key)) == (401, "unauthorized")
    # outside /v2 the gateway's own shape stays
    assert limited.get("/nothing").json()["error"]["code"] == "not_found"
    assert limited.get("/v2/health/live").json() == {"live": True}  # open, like /health


def test_a_slow_body_is_408_after_body_timeout(limited: httpx.Client) -> None:
    host, port = str(limited.base_url.host), limited.base_url.port
    began = time.monotonic()
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(
            f"POST {INFER} HTTP/1.1\r\nHost: {host}\r\nX-API-Key: {KEY}\r\nContent-Length: 1000\r\n\r\n".encode()
            + b'{"inputs": '
        )
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer
    assert json.loads(body)["error"].startswith("body_timeout: ")
    assert 0.9 < time.monotonic() - began < 10


def test_valid_requests_are_answered_after_the_refusals(limited: httpx.Client) -> None:
    outputs = [{"name": "COUNT"}, {"name": "RESULT"}]
    # model_name, as KServe's client sends it, may name the URL's model
    response = limited.post(INFER, **infer_kwargs([jpeg(3)], model_name="detector", outputs=outputs))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json" and LENGTH not in response.headers
    assert "model;dur=" in response.headers["server-timing"]  # stage timings, as on the task routes
    count, result = response.json()["outputs"]
    assert count["name"] == "COUNT" and count["datatype"] == "INT32" and count["shape"] == [1]
    assert json.loads(result["data"][0])["detections"], result  # a real answer, not an empty one
    # compressed, as tritonclient compresses, and all outputs as binary data
    tensor, binary = image_input([jpeg(3)])
    header = json.dumps({"inputs": [tensor], "parameters": {"binary_data_output": True}}).encode()
    packed = limited.post(
        INFER,
        content=gzip.compress(header + binary),
        headers={LENGTH: str(len(header)), "Content-Encoding": "gzip"},
    )
    assert packed.status_code == 200 and packed.headers["content-type"] == "application/octet-stream"
    cut = int(packed.headers[LENGTH])
    outputs = json.loads(packed.content[:cut])["outputs"]
    assert sum(o["parameters"]["binary_data_size"] for o in outputs) == len(packed.content) - cut
