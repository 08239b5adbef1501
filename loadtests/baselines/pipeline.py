"""The gateway's own pipeline (`service.core.pipeline.TaskPipeline`) around the gateway's own model runner
(TorchScript or ONNX Runtime, as `CVSERVE_RUNTIME` chooses for the gateway: `service.backends.runtimes`).

Baselines and the in-process measurement run exactly this object, the one the gateway runs, so the
benchmark compares serving machinery, not different image code (reduced JPEG decoding included).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from service.backends.runtimes import ModelRunner, load_model
from service.handlers.common import Geometry
from service.core.pipeline import Prepared, TaskPipeline
from service.settings import Settings


@dataclass
class ModelPipeline:
    """One model in this process: decode/preprocess/postprocess as the gateway does, and its forward pass."""

    pipeline: TaskPipeline
    model: ModelRunner

    @classmethod
    def load(cls, settings: Settings, model: str) -> ModelPipeline:
        """Read `<settings.model_repository>/<model>` (config.pbtxt, labels, latest model.pt or model.onnx as
        `settings.runtime` chooses) on CPU."""
        return cls(TaskPipeline.load(settings, model), load_model(settings, model, "cpu"))

    @property
    def contract(self) -> Any:
        return self.pipeline.contract

    @property
    def endpoint(self) -> str:
        return self.pipeline.endpoint

    def prepare(self, data: bytes) -> Prepared:
        """Decode an uploaded file and bring it to the model's `[3,H,W]` uint8 input."""
        return self.pipeline.prepare(data)

    def infer(self, images: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Run one batch; each image's outputs by contract name."""
        return self.model.infer(images)

    def answer(self, outputs: dict[str, np.ndarray], geometry: Geometry) -> dict[str, Any]:
        """The task's JSON result for one image, with default options."""
        return self.pipeline.answer(outputs, geometry).model_dump()
