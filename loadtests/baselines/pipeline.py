"""The service's own decode, preprocess and postprocess around the exported TorchScript model.

Baselines and the in-process measurement run exactly this, so the benchmark compares serving
machinery, not different image code.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.contract import ModelContract, load_contract
from service.handlers import HANDLERS, Handler
from service.handlers.common import Geometry
from service.images import decode_image
from service.settings import Settings


def load_torchscript(path: Path) -> torch.jit.ScriptModule:
    """Load an exported model.pt for CPU inference (TorchScript is Triton's libtorch format)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.* is deprecated", category=FutureWarning)
        module = torch.jit.load(str(path), map_location="cpu")
    return module.eval()


@dataclass
class ModelPipeline:
    """One model with its contract, its task's handler and the gateway's image limits."""

    contract: ModelContract
    handler: Handler[Any, Any]
    module: torch.jit.ScriptModule
    settings: Settings

    @classmethod
    def load(cls, settings: Settings, model: str) -> ModelPipeline:
        """Read `<settings.model_repository>/<model>` (config.pbtxt, labels, 1/model.pt)."""
        repository = settings.model_repository
        module = load_torchscript(repository / model / "1" / "model.pt")
        return cls(load_contract(repository, model), HANDLERS[model], module, settings)

    @property
    def endpoint(self) -> str:
        return self.handler.endpoint

    def prepare(self, data: bytes) -> tuple[np.ndarray, Geometry]:
        """Decode an uploaded file and bring it to the model's `[3,H,W]` uint8 input."""
        image = decode_image(data, self.settings.max_pixels, self.settings.allowed_formats)
        return self.handler.preprocess(image, self.contract)

    def infer(self, images: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Run one batch; outputs are mapped to the contract's names by position."""
        with torch.inference_mode():
            raw = self.module(torch.from_numpy(np.stack(images)))
        tensors = raw if isinstance(raw, (tuple, list)) else (raw,)
        names = [spec.name for spec in self.contract.outputs]
        arrays = [t.numpy() for t in tensors]
        return [{name: array[i] for name, array in zip(names, arrays)} for i in range(len(images))]

    def answer(self, outputs: dict[str, np.ndarray], geometry: Geometry) -> dict[str, Any]:
        """The task's JSON result for one image, with default options."""
        result = self.handler.postprocess(outputs, geometry, self.handler.options(), self.contract)
        return result.model_dump()
