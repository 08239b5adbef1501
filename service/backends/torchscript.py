"""One exported TorchScript model in this process: load `model.pt` once, run uint8 batches through it.

The embedded backend (in the gateway replica or in a model deployment), the benchmark's baselines
and the in-process figures run models through this class, or through its ONNX Runtime twin
(`service.backends.onnxruntime.OnnxRuntimeModel`) as `CVSERVE_RUNTIME` chooses (`service.backends.runtimes`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torchvision  # noqa: F401  (registers torchvision::nms & co., which scripted detectors call)

from service.contract import ModelContract, load_contract


@contextmanager
def quiet_jit() -> Iterator[None]:
    """Silence torch's `torch.jit.* is deprecated` notice for the block, and nothing else (TorchScript
    is still Triton's libtorch format). export/python_model.py keeps its own copy: it runs in Triton."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.* is deprecated", category=FutureWarning)
        yield


def load_torchscript(path: str | Path, device: torch.device) -> torch.jit.ScriptModule:
    """Load a TorchScript file for inference."""
    with quiet_jit():
        module = torch.jit.load(str(path), map_location=device)
    return module.eval()


def repository_versions(repository: Path, model: str) -> list[str]:
    """`model`'s numeric version directories in `repository`, oldest first (none: an empty list)."""
    folder = repository / model
    if not folder.is_dir():
        return []
    return sorted((p.name for p in folder.iterdir() if p.is_dir() and p.name.isdigit()), key=int)


def latest_version(repository: Path, model: str) -> str:
    """The highest numeric version directory of `model` (Triton's default `latest` policy)."""
    versions = repository_versions(repository, model)
    if not versions:
        raise FileNotFoundError(f"{repository / model} has no version directory: run the export first")
    return versions[-1]


class TorchScriptModel:
    """`<repository>/<model>/<version>/model.pt` (the latest when `version` is None) with its contract, on `device`."""

    def __init__(self, repository: Path, model: str, device: str = "cpu", version: str | None = None) -> None:
        self.name = model
        self.contract: ModelContract = load_contract(repository, model)
        self.version = version or latest_version(repository, model)
        self.device = torch.device(device)
        self._module = load_torchscript(repository / model / self.version / "model.pt", self.device)
        self._output_names = [spec.name for spec in self.contract.outputs]
        self.batch_sizes_run: set[int] = set()  # every batch size this model has run (warm-up included)

    @property
    def module(self) -> torch.jit.ScriptModule:
        """The loaded TorchScript module, for runners that drive it themselves (service/backends/pipelined.py)."""
        return self._module

    def forward(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Run a `[N,3,H,W]` uint8 batch; outputs by contract name (mapped by position), batch dim kept."""
        with torch.inference_mode():
            result = self._module(torch.from_numpy(batch).to(self.device))
        self.batch_sizes_run.add(len(batch))
        tensors = [result] if isinstance(result, torch.Tensor) else list(result)
        return {name: tensor.cpu().numpy() for name, tensor in zip(self._output_names, tensors, strict=True)}

    def infer(self, images: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Run `[3,H,W]` images as one batch; return each image's outputs without the batch dim."""
        outputs = self.forward(np.stack(images))
        return [{name: values[i] for name, values in outputs.items()} for i in range(len(images))]

    def warm_up(self, batch_sizes: Sequence[int] = (1,), runs: int = 2) -> None:
        """Run each batch size `runs` times on random images: TorchScript optimises a graph per input
        shape on its second run, so afterwards no request pays for that (Triton's `model_warmup` does
        the same for the exported configs)."""
        rng = np.random.default_rng(0)
        for size in batch_sizes:
            batch = rng.integers(0, 256, (size, *self.contract.inputs[0].dims), dtype=np.uint8)
            for _ in range(runs):
                self.forward(batch)
