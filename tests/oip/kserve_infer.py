"""Infer through /v2 with the unmodified KServe Python SDK, as a KServe client application does; for
tests/oip/test_kserve_client.py, which runs it as its own process: kserve's protobuf package `inference`
clashes with tritonclient.grpc's in one process ("duplicate symbol 'inference.ServerLiveRequest'"), and the
gateway imports tritonclient.grpc.

    python -m tests.oip.kserve_infer URL KEY IMAGE_FILE MODEL BODY_MODEL ENCODING [ENCODING ...]

prints one JSON line: per encoding (json, binary) either the model name and outputs of the answer
(`as_numpy()` as lists, BYTES as text) or the refusal's status and body.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np

# kserve is imported where it is used: the test imports these constants in a process that must not load it
OUTPUTS = ("RESULT", "BOXES", "SCORES", "LABELS", "CLASS_IDS", "COUNT")
OPTIONS = {"score_threshold": 0.5}


def request(image: bytes, encoding: str, model_name: str) -> Any:
    """A `kserve.InferRequest` of one image: base64 text in JSON `data`, or binary tensor data."""
    import kserve
    from kserve.protocol.infer_type import RequestedOutput

    if encoding == "json":
        tensor = kserve.InferInput("IMAGE", [1], "BYTES", data=[base64.b64encode(image).decode()])
    else:
        tensor = kserve.InferInput("IMAGE", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([image], dtype=object), binary_data=True)
    return kserve.InferRequest(
        model_name=model_name,
        infer_inputs=[tensor],
        parameters=dict(OPTIONS),
        request_outputs=[RequestedOutput(name, {"binary_data": encoding == "binary"}) for name in OUTPUTS],
    )


def _listed(values: np.ndarray) -> Any:
    if values.dtype == object:
        return [_listed(v) if isinstance(v, np.ndarray) else _text(v) for v in values]
    return values.tolist()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def infer_all(
    url: str, key: str, image: bytes, model: str, body_model: str, encodings: list[str]
) -> dict[str, Any]:
    import kserve

    client = kserve.InferenceRESTClient(kserve.RESTConfig(protocol="v2", timeout=120))
    answers: dict[str, Any] = {}
    try:
        for encoding in encodings:
            try:
                response = await client.infer(
                    url, request(image, encoding, body_model), model_name=model, headers={"X-API-Key": key}
                )
            except httpx.HTTPStatusError as error:
                answers[encoding] = {"status": error.response.status_code, "body": error.response.json()}
                continue
            answers[encoding] = {
                "model_name": response.model_name,
                "outputs": {output.name: _listed(output.as_numpy()) for output in response.outputs},
            }
    finally:
        await client.close()
    return answers


def main(argv: list[str]) -> None:
    url, key, image_file, model, body_model, *encodings = argv
    answers = asyncio.run(infer_all(url, key, Path(image_file).read_bytes(), model, body_model, encodings))
    print(json.dumps(answers))


if __name__ == "__main__":
    main(sys.argv[1:])
