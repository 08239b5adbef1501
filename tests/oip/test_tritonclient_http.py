"""An unmodified `tritonclient.http` against the gateway's /v2 routes (a real uvicorn server over the real
models): the same answers as the task routes, for one image and for a batch, in both of the protocol's
encodings, with the task's options as parameters; the key, the limits and the protocol's error shape."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from service.contract import load_contract
from tasks import MODELS
from tests.oip.conftest import KEY, encoded, scene
from training.shapes import CLASSES, make_scene


def auth() -> dict[str, str]:
    """The key header, fresh per call: tritonclient adds its own headers to the dict it is given."""
    return {"X-API-Key": KEY}


@pytest.fixture(scope="module")
def client(oip_url: str) -> triton_http.InferenceServerClient:
    return triton_http.InferenceServerClient(oip_url, network_timeout=120.0, connection_timeout=30.0)


def image_input(images: list[bytes], binary: bool = True) -> triton_http.InferInput:
    """IMAGE with the encoded files: binary tensor data, or base64 strings in the JSON body."""
    tensor = triton_http.InferInput("IMAGE", [len(images)], "BYTES")
    if binary:
        tensor.set_data_from_numpy(np.array(images, dtype=object))
    else:
        tensor.set_data_from_numpy(
            np.array([base64.b64encode(i).decode() for i in images], dtype=object), binary_data=False
        )
    return tensor


def outputs(names: list[str], binary: bool) -> list[triton_http.InferRequestedOutput]:
    return [triton_http.InferRequestedOutput(name, binary_data=binary) for name in names]


def task_route(http: httpx.Client, endpoint: str, images: list[bytes], **options: object) -> dict:
    files = [("files", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(images)]
    response = http.post(endpoint, params=options, files=files)
    assert response.status_code == 200, response.text
    return response.json()


def results_of(answer: triton_http.InferResult) -> list[dict]:
    return [json.loads(document) for document in answer.as_numpy("RESULT")]


def text(value: bytes | str) -> str:
    """A BYTES element as text: bytes from binary data, str from JSON data (as tritonclient gives them)."""
    return value.decode() if isinstance(value, bytes) else value


def refused(call: object, *args: object, **kwargs: object) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        call(*args, **kwargs)  # type: ignore[operator]
    return caught.value


def test_server_health_and_metadata(client: triton_http.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    metadata = client.get_server_metadata()
    assert metadata["name"] == "cvserve" and "binary_tensor_data" in metadata["extensions"]


@pytest.mark.parametrize("model", MODELS)
def test_model_metadata_comes_from_the_repository_contract(
    client: triton_http.InferenceServerClient, http: httpx.Client, model_repository: Path, model: str
) -> None:
    contract = load_contract(model_repository, model)
    served = {m["name"]: m for m in http.get("/models").json()["models"]}[model]
    metadata = client.get_model_metadata(model)
    assert metadata["name"] == model and metadata["versions"] == [served["version"]]
    assert metadata["inputs"] == [{"name": "IMAGE", "datatype": "BYTES", "shape": [-1]}]
    assert metadata["outputs"][0] == {"name": "RESULT", "datatype": "BYTES", "shape": [-1]}
    assert metadata["parameters"]["labels"] == list(contract.labels)
    assert metadata["parameters"]["max_batch_size"] == contract.max_batch_size
    assert metadata["parameters"]["task"] == contract.task
    assert client.get_model_metadata(model, model_version=served["version"]) == metadata
    assert client.is_model_ready(model) and client.is_model_ready(model, served["version"])
    config = client.get_model_config(model)
    assert [o["name"] for o in config["output"]] == [o["name"] for o in metadata["outputs"]]
    assert config["input"] == [{"name": "IMAGE", "data_type": "TYPE_STRING", "dims": [-1]}]
    wrong_version = refused(client.get_model_metadata, model, model_version="999")
    assert wrong_version.status() == "404" and wrong_version.message().startswith("version_not_found: ")


def test_an_unknown_model_is_404_in_the_protocols_shape(client: triton_http.InferenceServerClient) -> None:
    error = refused(client.get_model_metadata, "resnet")
    assert error.status() == "404" and error.message().startswith("model_not_found: ")
    assert not client.is_model_ready("resnet")


@pytest.mark.parametrize("binary", [True, False], ids=["binary-data", "json"])
def test_a_jpeg_gets_the_same_answer_as_detect(
    client: triton_http.InferenceServerClient, http: httpx.Client, binary: bool
) -> None:
    drawn, names = scene(1)
    jpeg = encoded(drawn.image)
    expected = task_route(http, "/detect", [jpeg], score_threshold=0.5)
    names_out = ["RESULT", "BOXES", "SCORES", "LABELS", "CLASS_IDS", "COUNT"]
    answer = client.infer(
        "detector",
        [image_input([jpeg], binary)],
        outputs=outputs(names_out, binary),
        parameters={"score_threshold": 0.5},
        headers=auth(),
        request_id="req-1",
    )
    response = answer.get_response()
    assert response["model_name"] == "detector" and response["model_version"] == expected["version"]
    assert response["id"] == "req-1"
    assert all(("parameters" in o) == binary and ("data" in o) != binary for o in response["outputs"])
    assert results_of(answer) == expected["results"]
    detections = expected["results"][0]["detections"]
    assert detections and {d["label"] for d in detections} & names, (detections, names)  # a real answer
    count = len(detections)
    assert answer.as_numpy("COUNT").tolist() == [count]
    assert answer.as_numpy("BOXES").shape == (1, count, 4) and answer.as_numpy("BOXES").dtype == np.float32
    np.testing.assert_allclose(answer.as_numpy("BOXES")[0], [d["box"] for d in detections], atol=1e-3)
    np.testing.assert_allclose(answer.as_numpy("SCORES")[0], [d["score"] for d in detections], rtol=1e-6)
    assert [text(label) for label in answer.as_numpy("LABELS")[0]] == [d["label"] for d in detections]
    assert answer.as_numpy("CLASS_IDS")[0].tolist() == [d["class_id"] for d in detections]


def test_a_batch_is_answered_per_image_in_order_with_padded_tensors(
    client: triton_http.InferenceServerClient, http: httpx.Client
) -> None:
    scenes = [scene(seed, shapes=(1, 4))[0] for seed in (11, 12, 13)]
    jpegs = [encoded(s.image) for s in scenes]
    expected = task_route(http, "/detect", jpegs, score_threshold=0.3, max_detections=3)["results"]
    answer = client.infer(
        "detector",
        [image_input(jpegs)],
        parameters={"score_threshold": 0.3, "max_detections": 3},
        headers=auth(),
    )  # no outputs named: all of them, as binary data
    assert results_of(answer) == expected
    counts = [len(r["detections"]) for r in expected]
    assert answer.as_numpy("COUNT").tolist() == counts and max(counts) > 0
    boxes, labels = answer.as_numpy("BOXES"), answer.as_numpy("LABELS")
    assert boxes.shape == (3, max(counts), 4)
    for i, result in enumerate(expected):
        np.testing.assert_allclose(
            boxes[i, : counts[i]], [d["box"] for d in result["detections"]] or np.zeros((0, 4)), atol=1e-3
        )
        assert not boxes[i, counts[i] :].any() and all(label == b"" for label in labels[i, counts[i] :])
        assert (answer.as_numpy("CLASS_IDS")[i, counts[i] :] == -1).all()


def test_classify_takes_top_k_as_a_parameter(
    client: triton_http.InferenceServerClient, http: httpx.Client
) -> None:
    shapes = [make_scene(10**6 + 500 + i, 128, 1, 1) for i in range(2)]
    pngs = [encoded(s.image, "PNG") for s in shapes]
    expected = task_route(http, "/classify", pngs, top_k=3)["results"]
    answer = client.infer("classifier", [image_input(pngs)], parameters={"top_k": 3}, headers=auth())
    assert results_of(answer) == expected
    labels = answer.as_numpy("LABELS")
    assert labels.shape == (2, 3) and answer.as_numpy("SCORES").shape == (2, 3)
    assert [[x.decode() for x in row] for row in labels] == [
        [p["label"] for p in r["predictions"]] for r in expected
    ]
    drawn = [CLASSES[int(s.labels[0]) - 1] for s in shapes]
    assert [row[0].decode() for row in labels] == drawn


def test_segment_with_return_png_is_the_segment_answer(
    client: triton_http.InferenceServerClient, http: httpx.Client
) -> None:
    drawn, _ = scene(21)
    jpeg = encoded(drawn.image)
    expected = task_route(http, "/segment", [jpeg], return_png="true")["results"]
    answer = client.infer("segmenter", [image_input([jpeg])], parameters={"return_png": True}, headers=auth())
    assert results_of(answer) == expected
    assert expected[0]["segments"] and expected[0]["png"]
    assert [o["name"] for o in answer.get_response()["outputs"]] == ["RESULT"]


@pytest.mark.parametrize("compression", ["gzip", "deflate"])
def test_compressed_requests_are_read(
    client: triton_http.InferenceServerClient, http: httpx.Client, compression: str
) -> None:
    drawn, _ = scene(2)
    jpeg = encoded(drawn.image)
    expected = task_route(http, "/detect", [jpeg])["results"]
    answer = client.infer(
        "detector", [image_input([jpeg])], headers=auth(), request_compression_algorithm=compression,
        response_compression_algorithm=compression,
    )  # fmt: skip
    assert results_of(answer) == expected


def test_a_version_is_checked(client: triton_http.InferenceServerClient) -> None:
    jpeg = encoded(scene(3)[0].image)
    version = client.get_model_metadata("detector")["versions"][0]
    assert (
        client.infer("detector", [image_input([jpeg])], model_version=version, headers=auth())
        .as_numpy("RESULT")
        .size
        == 1
    )
    error = refused(client.infer, "detector", [image_input([jpeg])], model_version="999", headers=auth())
    assert error.status() == "404" and error.message().startswith("version_not_found: ")


def test_errors_reach_tritonclient_with_our_status_and_code(
    client: triton_http.InferenceServerClient,
) -> None:
    jpeg = encoded(scene(4)[0].image)
    cases = [
        ({}, [jpeg], {}, "401", "unauthorized"),
        ({"X-API-Key": "x" * 24}, [jpeg], {}, "401", "unauthorized"),
        (auth(), [jpeg], {"score_threshold": 1.5}, "422", "invalid_request"),
        (auth(), [jpeg], {"top_k": 3}, "422", "invalid_request"),  # a classifier option on the detector
        (auth(), [jpeg], {"annotate": "png"}, "422", "invalid_request"),
        (auth(), [b"not an image at all"], {}, "400", "undecodable_image"),
        (auth(), [jpeg, b""], {}, "400", "undecodable_image"),
        (auth(), [jpeg] * 17, {}, "413", "too_many_images"),
    ]
    for headers, images, parameters, status, code in cases:
        error = refused(
            client.infer, "detector", [image_input(images)], parameters=parameters, headers=headers
        )
        assert (error.status(), error.message().split(":")[0]) == (status, code), (
            parameters,
            error.message(),
        )
    unknown = refused(
        client.infer, "detector", [image_input([jpeg])], outputs=outputs(["MASK"], True), headers=auth()
    )
    assert unknown.status() == "400" and "unknown output MASK" in unknown.message()
    # the gateway still answers after every refusal
    assert client.infer("detector", [image_input([jpeg])], headers=auth()).as_numpy("COUNT").size == 1


def test_the_task_routes_are_unchanged_beside_v2(oip_url: str) -> None:
    jpeg = encoded(scene(5)[0].image)
    response = httpx.post(
        f"http://{oip_url}/detect", content=jpeg, headers={"Content-Type": "image/jpeg", **auth()}, timeout=60
    )
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    missing = httpx.post(
        f"http://{oip_url}/detect", content=jpeg, headers={"Content-Type": "image/jpeg"}, timeout=60
    )
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "unauthorized"
