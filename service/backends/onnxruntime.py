"""One exported ONNX model in this process: load `model.onnx` once, run uint8 batches through ONNX Runtime.

The same interface as `service.backends.torchscript.TorchScriptModel` (name, contract, version,
`forward`, `infer`, `warm_up`, `batch_sizes_run`), so `BatchedModel`, the embedded backend and the
benchmark run either without knowing which.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.backends.torchscript import latest_version
from service.contract import ModelContract, load_contract

ONNX_FILE = "model.onnx"  # export.onnx_export.ONNX_FILE (the gateway does not import export)

# ONNX Runtime's providers per device: CUDA needs the onnxruntime-gpu wheel instead of onnxruntime.
PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


def session_options(threads: int) -> ort.SessionOptions:
    """`threads` intra-op threads, operators run one after another (the batcher is the parallelism)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: shape-inference notes about the detector's Loop are noise
    return options


class OnnxRuntimeModel:
    """`<repository>/<model>/<version>/model.onnx` (the latest when `version` is None) with its contract, in an ONNX Runtime session."""

    def __init__(
        self, repository: Path, model: str, device: str = "cpu", threads: int = 1, version: str | None = None
    ) -> None:
        self.name = model
        self.contract: ModelContract = load_contract(repository, model)
        self.version = version or latest_version(repository, model)
        path = repository / model / self.version / ONNX_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: export again (`python -m export`) to write model.onnx")
        providers = PROVIDERS["cuda" if device == "cuda" else "cpu"]
        missing = [name for name in providers if name not in ort.get_available_providers()]
        if missing:
            raise RuntimeError(
                f"ONNX Runtime {ort.__version__} here lacks {', '.join(missing)}: "
                "install onnxruntime-gpu for CUDA, or use CVSERVE_RUNTIME=torchscript"
            )
        self._session = ort.InferenceSession(str(path), session_options(threads), providers=providers)
        self._input_name = self.contract.inputs[0].name
        self._output_names = [spec.name for spec in self.contract.outputs]
        self.batch_sizes_run: set[int] = set()  # every batch size this model has run (warm-up included)

    def forward(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Run a `[N,3,H,W]` uint8 batch; outputs by contract name, batch dim kept."""
        outputs = self._session.run(self._output_names, {self._input_name: np.ascontiguousarray(batch)})
        self.batch_sizes_run.add(len(batch))
        return dict(zip(self._output_names, outputs, strict=True))

    def infer(self, images: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Run `[3,H,W]` images as one batch; return each image's outputs without the batch dim."""
        outputs = self.forward(np.stack(images))
        return [{name: values[i] for name, values in outputs.items()} for i in range(len(images))]

    def warm_up(self, batch_sizes: Sequence[int] = (1,), runs: int = 2) -> None:
        """Run each batch size `runs` times on random images (ONNX Runtime allocates per shape on the first)."""
        rng = np.random.default_rng(0)
        for size in batch_sizes:
            batch = rng.integers(0, 256, (size, *self.contract.inputs[0].dims), dtype=np.uint8)
            for _ in range(runs):
                self.forward(batch)
