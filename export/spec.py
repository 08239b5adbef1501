"""What one exported model is: its wrapper module, labels, input size and the tensors Triton sees.

The tensor lists follow docs/ARCHITECTURE.md in order: Triton's libtorch backend binds the
wrapper's forward() arguments and returned tuple to config.pbtxt entries by position. What a
model's tensors are comes from its task (`tasks.TASKS`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from tasks import MODELS, TASKS, Task, TensorSpec

__all__ = ["MODELS", "ModelSpec", "TensorSpec"]


@dataclass(frozen=True)
class ModelSpec:
    """An eager model ready to script: uint8 [B,3,H,W] in, the contract's outputs out."""

    name: str  # a model of tasks.TASKS: classifier | detector | segmenter
    module: nn.Module = field(repr=False)
    labels: tuple[str, ...]
    input_size: int  # H == W
    weights: str  # demo | pretrained:<enum> | checkpoint:<file>
    resize_size: int | None = None  # only for resize_center_crop
    precision: str = "fp32"  # fp32 | fp16 (export/precision.py: the network in fp16, same I/O contract)

    @property
    def task(self) -> Task:
        return TASKS[self.name]

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self.task.inputs(self.input_size)

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self.task.outputs(len(self.labels), self.input_size)

    @property
    def parameters(self) -> dict[str, str]:
        """config.pbtxt parameters the gateway reads to prepare images."""
        params = {"task": self.task.name, "preprocess": self.task.preprocess, "weights": self.weights}
        if self.resize_size is not None:
            params["resize_size"] = str(self.resize_size)
        if self.precision != "fp32":
            params["precision"] = self.precision
        return params
