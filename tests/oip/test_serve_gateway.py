"""tritonclient against the session's Ray Serve gateway (embedded backend, HAProxy ingress), under its
route prefix: tritonclient's `url` takes `host:port/path`, and the answer is the one /detect gives."""

from __future__ import annotations

import json

import httpx
import numpy as np
import tritonclient.http as triton_http

from tests.oip.conftest import encoded, scene


def test_tritonclient_gets_the_detect_answer_through_serve(embedded_gateway: str) -> None:
    client = triton_http.InferenceServerClient(
        embedded_gateway.removeprefix("http://"), network_timeout=120.0
    )
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("detector")
    assert client.get_model_metadata("detector")["inputs"] == [
        {"name": "IMAGE", "datatype": "BYTES", "shape": [-1]}
    ]
    jpegs = [encoded(scene(seed)[0].image) for seed in (51, 52)]
    files = [("files", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(jpegs)]
    expected = httpx.post(f"{embedded_gateway}/detect", files=files, timeout=120).json()["results"]
    image = triton_http.InferInput("IMAGE", [len(jpegs)], "BYTES")
    image.set_data_from_numpy(np.array(jpegs, dtype=object))
    answer = client.infer("detector", [image])
    assert [json.loads(document) for document in answer.as_numpy("RESULT")] == expected
    assert answer.as_numpy("COUNT").tolist() == [len(r["detections"]) for r in expected]
    assert all(r["detections"] for r in expected)
    error = httpx.get(f"{embedded_gateway}/v2/models/resnet", timeout=30)
    assert error.status_code == 404 and error.json()["error"].startswith("model_not_found: ")
