"""model.onnx beside every model.pt: the same contract, the same answers, any batch size, and its
onnxruntime_onnx repository.

Tolerances, ONNX Runtime against the TorchScript file on the same fresh images (ONNX Runtime's CPU
kernels are not torch's, so floats differ in the last bits):
* classifier: PROBS within 1e-5 absolute (seen: 2e-7), the same top-1 class;
* segmenter: MASK equal on at least 99.9 % of the pixels (an argmax may flip where two classes tie;
  against the eager model, support.py's check wants equality wherever the top two logits are >1e-4
  apart; seen: all equal);
* detector: the same COUNT per image, every TorchScript box matched by an ONNX box of the same label
  with IoU >= 0.99 (seen: boxes within 3e-5 px), scores within 1e-4 relative, zero padding past COUNT.
Each file is also compared with its eager model through support.py's assertions, as model.pt is.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from torch import nn
from tritonclient.grpc import model_config_pb2

from export.repository import Batching, OnnxOptions, model_config
from export.spec import ModelSpec
from service.backends.onnxruntime import OnnxRuntimeModel
from service.backends.torchscript import TorchScriptModel
from service.contract import load_contract
from service.model_config import dump
from tasks import MODELS
from tests.export.conftest import SIZES, Exported
from tests.export.support import assert_detections_agree, run_onnx
from tests.export.test_parity import ASSERT_MATCHES, fresh_images


@pytest.fixture(scope="module")
def runners(exported: Exported) -> dict[str, tuple[TorchScriptModel, OnnxRuntimeModel]]:
    """Both runtimes of the gateway on each exported model."""
    return {
        model: (TorchScriptModel(exported.out, model), OnnxRuntimeModel(exported.out, model)) for model in MODELS
    }


@pytest.mark.parametrize("model", MODELS)
def test_model_onnx_matches_eager(exported: Exported, model: str) -> None:
    image = fresh_images(model, seed=11)
    outputs = run_onnx(exported.out / model / "1" / "model.onnx", image)
    ASSERT_MATCHES[model](exported.checkpoints[model].model, image, outputs)


@pytest.mark.parametrize("model", MODELS)
def test_onnx_runtime_answers_what_torchscript_answers(
    runners: dict[str, tuple[TorchScriptModel, OnnxRuntimeModel]], model: str
) -> None:
    torchscript, onnxruntime = runners[model]
    batch = fresh_images(model, seed=23, batch=4).numpy()
    expected, actual = torchscript.forward(batch), onnxruntime.forward(batch)
    assert {name: (v.dtype, v.shape) for name, v in actual.items()} == {
        name: (v.dtype, v.shape) for name, v in expected.items()
    }
    if model == "classifier":
        assert np.abs(actual["PROBS"] - expected["PROBS"]).max() <= 1e-5
        assert np.array_equal(actual["PROBS"].argmax(axis=1), expected["PROBS"].argmax(axis=1))
    elif model == "segmenter":
        different = actual["MASK"] != expected["MASK"]
        assert different.mean() <= 0.001, f"{different.mean():.3%} of the pixels differ"
        assert len(np.unique(expected["MASK"])) > 1, "a one-class mask cannot show the masks agree"
    else:
        assert_detections_agree(expected, actual)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("batch", [1, 4])
def test_onnx_batch_dimension_is_dynamic(exported: Exported, model: str, batch: int) -> None:
    """One file runs every batch size up to max_batch_size, with the contract's shapes."""
    contract = load_contract(exported.out, model)
    image = fresh_images(model, seed=5, batch=max(batch, 2))[:batch]
    outputs = run_onnx(exported.out / model / "1" / "model.onnx", image)
    assert [(str(t.numpy().dtype), tuple(t.shape)) for t in outputs] == [
        (spec.dtype, (batch, *spec.dims)) for spec in contract.outputs
    ]


@pytest.mark.parametrize("model", MODELS)
def test_onnx_repository_serves_the_same_model_onnx(exported: Exported, model: str) -> None:
    libtorch, onnx = load_contract(exported.out, model), load_contract(exported.onnx_out, model)
    assert (onnx.inputs, onnx.outputs, onnx.labels, onnx.max_batch_size, onnx.parameters) == (
        libtorch.inputs,
        libtorch.outputs,
        libtorch.labels,
        libtorch.max_batch_size,
        libtorch.parameters,
    )
    config = onnx.config
    assert config.platform == "onnxruntime_onnx" and not config.backend
    assert [g.kind for g in config.instance_group] == [config.instance_group[0].KIND_GPU]
    assert config.dynamic_batching == libtorch.config.dynamic_batching
    assert not config.optimization.execution_accelerators.gpu_execution_accelerator  # CUDA provider alone
    assert sorted(p.name for p in (exported.onnx_out / model / "1").iterdir()) == ["model.onnx", "version.json"]
    onnx_file = (exported.onnx_out / model / "1" / "model.onnx").read_bytes()
    assert onnx_file == (exported.out / model / "1" / "model.onnx").read_bytes()
    assert len(onnx_file) < 2**31  # one file: no external data beside it


def test_tensorrt_accelerator_option() -> None:
    spec = ModelSpec("classifier", nn.Identity(), ("a", "b"), SIZES["classifier"], "demo", SIZES["classifier"])
    written = dump(model_config(spec, Batching(), cpu=False, onnx=OnnxOptions(tensorrt=True)))
    config = text_format.Parse(written, model_config_pb2.ModelConfig())  # Triton's own schema reads it
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt"
    assert dict(accelerator.parameters) == {"precision_mode": "FP32", "max_workspace_size_bytes": str(1 << 30)}
    assert config.platform == "onnxruntime_onnx"


def test_onnx_runner_names_a_missing_file(exported: Exported, tmp_path: Path) -> None:
    """A repository exported before ONNX: a clear error naming the file and the fix."""
    old = tmp_path / "repo"
    shutil.copytree(exported.out / "classifier", old / "classifier")
    (old / "classifier" / "1" / "model.onnx").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.onnx not found: export again"):
        OnnxRuntimeModel(old, "classifier")
