"""An unmodified KServe Python SDK (`kserve.InferenceRESTClient`, protocol v2) and `tritonclient.http` infer
through /v2 of the same in-process server (the real models under uvicorn in a thread), each in the
protocol's two encodings: JSON (base64 image strings in `data`) and binary tensor data. Their answers are
the task route's answer for the same image.

KServe's client sends `id` and `model_name` in every request header besides `inputs` (and `outputs`,
`parameters` when given; `InferRequest.to_rest` in kserve 0.21); the gateway takes `model_name` when it is
the URL's model and refuses another one (400). The SDK runs in its own process (tests/oip/kserve_infer.py:
its protobuf package clashes with tritonclient.grpc's, which the gateway imports). It is not in the dev
dependencies: kserve 0.21 needs psutil<6 and python-dateutil<3, where the suite uses psutil>=6
(`Process.net_connections`). `make setup` installs it with its missing dependencies, without theirs, into
.kserve/ (`pip install --no-deps --target .kserve ...`, the Makefile's KSERVE_SDK), which only the SDK's
process gets on its PYTHONPATH (CVSERVE_KSERVE_DIR names another folder). Without that folder the KServe
cases fail: the suite does not pass by skipping the client it was asked to serve.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import os

import httpx
import numpy as np
import pytest
import tritonclient.http as triton_http

from tests.oip.conftest import KEY, encoded, scene
from tests.oip.kserve_infer import OPTIONS, OUTPUTS

ROOT = Path(__file__).resolve().parents[2]
KSERVE_DIR = Path(os.environ.get("CVSERVE_KSERVE_DIR", ROOT / ".kserve"))
ENCODINGS = ("json", "binary")


def kserve_environment() -> dict[str, str]:
    """The SDK's process environment: .kserve/ first on PYTHONPATH (unless kserve is installed already)."""
    if importlib.util.find_spec("kserve") is not None:
        return dict(os.environ)
    if not (KSERVE_DIR / "kserve").is_dir():
        pytest.fail(f"KServe's SDK is not in {KSERVE_DIR}: run `make setup` (see this module's docstring)")
    path = os.pathsep.join(p for p in (str(KSERVE_DIR), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ) | {"PYTHONPATH": path}


@pytest.fixture(scope="module")
def jpeg() -> bytes:
    return encoded(scene(31)[0].image)


@pytest.fixture(scope="module")
def expected(http: httpx.Client, jpeg: bytes) -> dict[str, Any]:
    """The task route's answer for the image: /detect with the same options."""
    response = http.post("/detect", params=OPTIONS, content=jpeg, headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["results"][0]["detections"], answer  # a real answer, so the comparison means something
    return answer


def kserve_answers(url: str, jpeg: bytes, tmp_path: Path, body_model: str = "detector") -> dict[str, Any]:
    """tests/oip/kserve_infer.py's answers, per encoding, for the image sent to /v2/models/detector/infer."""
    image = tmp_path / "image.jpg"
    image.write_bytes(jpeg)
    done = subprocess.run(
        [sys.executable, "-m", "tests.oip.kserve_infer", f"http://{url}", KEY, str(image), "detector"]
        + [body_model, *ENCODINGS],
        cwd=ROOT,
        env=kserve_environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def tritonclient_outputs(url: str, jpeg: bytes, encoding: str) -> dict[str, Any]:
    binary = encoding == "binary"
    image = triton_http.InferInput("IMAGE", [1], "BYTES")
    if binary:
        image.set_data_from_numpy(np.array([jpeg], dtype=object))
    else:
        text = base64.b64encode(jpeg).decode()
        image.set_data_from_numpy(np.array([text], dtype=object), binary_data=False)
    client = triton_http.InferenceServerClient(url, network_timeout=120.0)
    try:
        answer = client.infer(
            "detector",
            [image],
            outputs=[triton_http.InferRequestedOutput(name, binary_data=binary) for name in OUTPUTS],
            parameters=dict(OPTIONS),
            headers={"X-API-Key": KEY},
        )
    finally:
        client.close()
    return {name: answer.as_numpy(name) for name in OUTPUTS}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def assert_is_the_detect_answer(outputs: dict[str, Any], expected: dict[str, Any]) -> None:
    assert set(outputs) == set(OUTPUTS)
    assert [json.loads(_text(document)) for document in outputs["RESULT"]] == expected["results"]
    detections = expected["results"][0]["detections"]
    boxes = np.asarray(outputs["BOXES"], dtype=np.float32)
    assert np.asarray(outputs["COUNT"]).tolist() == [len(detections)]
    assert boxes.shape == (1, len(detections), 4)
    np.testing.assert_allclose(boxes[0], [d["box"] for d in detections], atol=1e-3)
    np.testing.assert_allclose(np.asarray(outputs["SCORES"])[0], [d["score"] for d in detections], rtol=1e-6)
    assert [_text(label) for label in outputs["LABELS"][0]] == [d["label"] for d in detections]
    assert np.asarray(outputs["CLASS_IDS"])[0].tolist() == [d["class_id"] for d in detections]


def test_kserve_gets_the_detect_answer_in_both_encodings(
    oip_url: str, jpeg: bytes, expected: dict[str, Any], tmp_path: Path
) -> None:
    answers = kserve_answers(oip_url, jpeg, tmp_path)
    for encoding in ENCODINGS:
        assert answers[encoding].get("model_name") == "detector", (encoding, answers[encoding])
        assert_is_the_detect_answer(answers[encoding]["outputs"], expected)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_tritonclient_gets_the_same_answer_from_the_same_server(
    oip_url: str, jpeg: bytes, expected: dict[str, Any], encoding: str
) -> None:
    assert_is_the_detect_answer(tritonclient_outputs(oip_url, jpeg, encoding), expected)


def test_kserve_with_another_model_name_in_the_body_is_400(oip_url: str, jpeg: bytes, tmp_path: Path) -> None:
    """The SDK takes the URL's model from its `model_name` argument, the body's from the request."""
    answers = kserve_answers(oip_url, jpeg, tmp_path, body_model="classifier")
    for encoding in ENCODINGS:
        assert answers[encoding]["status"] == 400, answers[encoding]
        error = answers[encoding]["body"]["error"]
        assert error.startswith("bad_request: the request's model_name 'classifier'"), error
