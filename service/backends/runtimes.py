"""Which runtime runs an embedded model: TorchScript (`model.pt`) or ONNX Runtime (`model.onnx`).

Both files hold the same contract (export writes them side by side) and both runners have the same
interface (`ModelRunner`), so `BatchedModel` and the backends above it never know which one runs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from service.backends.onnxruntime import ONNX_FILE, OnnxRuntimeModel
from service.backends.torchscript import TorchScriptModel, latest_version
from service.contract import ModelContract
from service.settings import Settings

log = logging.getLogger(__name__)

Runtime = Literal["torchscript", "onnxruntime"]

# `runtime="auto"` on CPU: the faster runtime per model, measured in one run of `python -m
# loadtests.runtimes` (loadtests/runtimes-2026-12-04.json; decode + model + postprocess images/s, ONNX
# Runtime over TorchScript at batch 1 / 8: classifier 1.96x / 1.25x, segmenter 1.60x / 1.27x, detector
# 1.13x / 0.87x; 2 shared cores, spread between rounds 6-72 %, loadtests/RESULTS.md). The detector stays
# on TorchScript: its ONNX graph loops the one-image model over the batch, so it gains nothing from batches,
# and batches are what a loaded gateway runs.
CPU_DEFAULTS: dict[str, Runtime] = {
    "classifier": "onnxruntime",
    "detector": "torchscript",
    "segmenter": "onnxruntime",
}


class ModelRunner(Protocol):
    """What `BatchedModel` needs of a loaded model (`TorchScriptModel`, `OnnxRuntimeModel`)."""

    name: str
    contract: ModelContract
    version: str
    batch_sizes_run: set[int]

    def forward(self, batch: np.ndarray) -> dict[str, np.ndarray]: ...

    def infer(self, images: list[np.ndarray]) -> list[dict[str, np.ndarray]]: ...

    def warm_up(self, batch_sizes: Sequence[int] = (1,), runs: int = 2) -> None: ...


def choose_runtime(settings: Settings, model: str, device: str, version: str | None = None) -> Runtime:
    """`settings.runtime`, or for "auto": the measured default on CPU (TorchScript on CUDA, where the
    comparison is not measured yet), TorchScript when the repository predates model.onnx."""
    if settings.runtime != "auto":
        return settings.runtime
    if device != "cpu":
        return "torchscript"
    runtime = CPU_DEFAULTS.get(model, "torchscript")
    if runtime == "onnxruntime" and not _has_onnx(settings.model_repository, model, version):
        log.warning(
            "%s has no %s (exported before ONNX): running model.pt with TorchScript; "
            "export again to use ONNX Runtime",
            settings.model_repository / model,
            ONNX_FILE,
        )
        return "torchscript"
    return runtime


def load_model(settings: Settings, model: str, device: str, version: str | None = None) -> ModelRunner:
    """`model` (its `version`, or the latest) from `settings.model_repository` in the runtime
    `choose_runtime` picks."""
    runtime = choose_runtime(settings, model, device, version)
    if runtime == "onnxruntime":
        return OnnxRuntimeModel(settings.model_repository, model, device, settings.torch_threads, version)
    return TorchScriptModel(settings.model_repository, model, device, version)


def runtime_of(runner: ModelRunner) -> Runtime:
    """The runtime a loaded model runs in."""
    return "onnxruntime" if isinstance(runner, OnnxRuntimeModel) else "torchscript"


def _has_onnx(repository: Path, model: str, version: str | None = None) -> bool:
    try:
        return (repository / model / (version or latest_version(repository, model)) / ONNX_FILE).is_file()
    except FileNotFoundError:
        return False
