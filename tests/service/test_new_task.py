"""A new task is its own module: a fourth task defined only in this file is served on every surface.

The task's contract (`tasks.register_task`), its handler and schemas (`service.handlers.register_handler`)
and a trivial model exported with export's own repository writer are all that this file adds; the task
route, `/v2`, the WebSocket stream, `/models` and OpenAPI then answer it with no edit anywhere else.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import BaseModel, Field
from torch import nn

from export.repository import Batching, OnnxOptions, staged, write_model
from export.spec import ModelSpec
from service.app import create_api
from service.backends.local import LocalBackend
from service.contract import ModelContract
from service.handlers import Handler, register_handler, unregister_handler
from service.handlers.common import Geometry, TableSpec, padded
from service.schemas import ImageSize
from service.settings import Settings
from tasks import Task, TensorSpec, register_task, unregister_task

COLOURS = ("red", "green", "blue")


# ---- the task, as a plugin module would write it ----


class ColourOptions(BaseModel):
    annotate: None = None  # no drawing option: answers are JSON
    min_share: float = Field(0.0, ge=0.0, le=1.0, description="Report the colour only if its share reaches this.")


class ColourRequest(ColourOptions):
    images: list[str] = Field(..., min_length=1)


class ColourResult(BaseModel):
    image: ImageSize
    colour: str | None
    share: float


class ColourResponse(BaseModel):
    model: str
    version: str
    backend: str
    results: list[ColourResult]


class ChannelShares(nn.Module):
    """uint8 [B,3,H,W] -> SHARES fp32 [B,3]: each channel's share of the image's total intensity."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        means = image.float().mean(dim=(2, 3))
        return means / means.sum(dim=1, keepdim=True).clamp(min=1e-6)


class ColourHandler(Handler[ColourOptions, ColourResult]):
    task = "colour"
    model = "colourer"
    endpoint = "/colour"
    options = ColourOptions
    request = ColourRequest
    response = ColourResponse
    tables = (TableSpec("SHARE", "FP32", (-1, -1)),)

    def postprocess(
        self, outputs: dict[str, np.ndarray], geometry: Geometry, options: ColourOptions, contract: ModelContract
    ) -> ColourResult:
        shares = np.asarray(outputs["SHARES"], dtype=np.float64).reshape(-1)
        best = int(np.argmax(shares))
        share = float(shares[best])
        colour = contract.labels[best] if share >= options.min_share else None
        return ColourResult(image=ImageSize(width=geometry.width, height=geometry.height), colour=colour, share=share)

    def draw(self, image: np.ndarray, result: ColourResult) -> np.ndarray:
        return image

    def table(self, results: list[ColourResult]) -> dict[str, np.ndarray]:
        return {"SHARE": padded([[r.share] for r in results], 0.0, "FP32")}


def _outputs(num_labels: int, input_size: int) -> tuple[TensorSpec, ...]:
    return (TensorSpec("SHARES", torch.float32, (num_labels,)),)


# ---- the test ----


@pytest.fixture
def colour_repository(tmp_path: Path) -> Iterator[Path]:
    """Register the task and its handler, export its model into a fresh repository; unregister after."""
    register_task(
        Task(name="colour", model="colourer", endpoint="/colour", preprocess="letterbox",
             labelled_output="SHARES", outputs=_outputs)
    )  # fmt: skip
    register_handler(ColourHandler())
    try:
        spec = ModelSpec("colourer", ChannelShares().eval(), COLOURS, input_size=32, weights="test")
        gpu, cpu, onnx = tmp_path / "repository", tmp_path / "cpu", tmp_path / "onnx"
        with staged([gpu, cpu, onnx]) as (gpu_staging, cpu_staging, onnx_staging):
            write_model(spec, gpu_staging, cpu_staging, onnx_staging, Batching(), OnnxOptions())
        yield gpu
    finally:
        unregister_handler("colourer")
        unregister_task("colourer")


def _png(rgb: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 40), rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_task_defined_in_one_module_is_answered_on_every_surface(colour_repository: Path) -> None:
    settings = Settings(model_repository=colour_repository, models=("colourer",), device="cpu", torch_threads=1)
    red, blue = _png((220, 10, 10)), _png((5, 5, 200))
    with TestClient(create_api(settings, LocalBackend(settings))) as client:
        # the task route, in two input styles, with the task's own option
        answer = client.post("/colour", files={"file": ("red.png", red, "image/png")})
        assert answer.status_code == 200, answer.text
        (result,) = answer.json()["results"]
        assert result["colour"] == "red" and result["share"] > 0.8 and result["image"] == {"width": 48, "height": 40}
        answer = client.post("/colour?min_share=0.99", json={"images": [base64.b64encode(blue).decode()]})
        assert answer.status_code == 200 and answer.json()["results"][0]["colour"] is None
        assert client.post("/colour?min_share=2").status_code == 422  # its options are validated

        # the Open Inference Protocol: metadata and inference with its table output
        metadata = client.get("/v2/models/colourer").json()
        assert [o["name"] for o in metadata["outputs"]] == ["RESULT", "SHARE"]
        assert metadata["parameters"]["labels"] == list(COLOURS)
        infer = {"inputs": [{"name": "IMAGE", "shape": [2], "datatype": "BYTES",
                             "data": [base64.b64encode(red).decode(), base64.b64encode(blue).decode()]}]}  # fmt: skip
        answer = client.post("/v2/models/colourer/infer", json=infer)
        assert answer.status_code == 200, answer.text
        outputs = {o["name"]: o for o in answer.json()["outputs"]}
        assert [json.loads(r)["colour"] for r in outputs["RESULT"]["data"]] == ["red", "blue"]
        assert outputs["SHARE"]["shape"] == [2, 1] and min(outputs["SHARE"]["data"]) > 0.8

        # a WebSocket stream of frames
        with client.websocket_connect("/stream/colour") as stream:
            assert stream.receive_json()["type"] == "ready"
            stream.send_bytes(blue)
            message = stream.receive_json()
            assert message["type"] == "result" and message["result"]["colour"] == "blue"

        # what the service says about itself
        assert [m["name"] for m in client.get("/models").json()["models"]] == ["colourer"]
        paths = client.get("/openapi.json").json()["paths"]
        assert "/colour" in paths and "ColourResponse" in json.dumps(paths["/colour"])
