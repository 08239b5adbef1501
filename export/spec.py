"""What one exported model is: its wrapper module, labels, input size and the tensors Triton sees.

The tensor lists follow docs/ARCHITECTURE.md in order: Triton's libtorch backend binds the
wrapper's forward() arguments and returned tuple to config.pbtxt entries by position.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

MODELS = ("classifier", "detector", "segmenter")
TASKS = {"classifier": "classification", "detector": "detection", "segmenter": "segmentation"}
PREPROCESS = {"classifier": "resize_center_crop", "detector": "letterbox", "segmenter": "letterbox"}
# K: the detector's fixed number of output rows (rows past COUNT are zero).
MAX_DETECTIONS = 100
# labels.txt line 0 for the models whose class 0 is "nothing here".
BACKGROUND = {"detector": "__background__", "segmenter": "background"}
# The output whose label_filename points at labels.txt.
LABELLED_OUTPUT = {"classifier": "PROBS", "detector": "LABELS", "segmenter": "MASK"}


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor of the contract; `dims` exclude the batch dimension."""

    name: str
    dtype: torch.dtype
    dims: tuple[int, ...]


@dataclass(frozen=True)
class ModelSpec:
    """An eager model ready to script: uint8 [B,3,H,W] in, the contract's outputs out."""

    name: str  # classifier | detector | segmenter
    module: nn.Module = field(repr=False)
    labels: tuple[str, ...]
    input_size: int  # H == W
    weights: str  # demo | pretrained:<enum> | checkpoint:<file>
    resize_size: int | None = None  # only for resize_center_crop

    @property
    def task(self) -> str:
        return TASKS[self.name]

    @property
    def preprocess(self) -> str:
        return PREPROCESS[self.name]

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return (TensorSpec("IMAGE", torch.uint8, (3, self.input_size, self.input_size)),)

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return output_specs(self.name, len(self.labels), self.input_size)

    @property
    def parameters(self) -> dict[str, str]:
        """config.pbtxt parameters the gateway reads to prepare images."""
        params = {"task": self.task, "preprocess": self.preprocess, "weights": self.weights}
        if self.resize_size is not None:
            params["resize_size"] = str(self.resize_size)
        return params


def output_specs(model: str, num_labels: int, input_size: int) -> tuple[TensorSpec, ...]:
    """The contract's outputs of `model`, in the order its wrapper returns them."""
    if model == "classifier":
        return (TensorSpec("PROBS", torch.float32, (num_labels,)),)
    if model == "detector":
        return (
            TensorSpec("BOXES", torch.float32, (MAX_DETECTIONS, 4)),
            TensorSpec("SCORES", torch.float32, (MAX_DETECTIONS,)),
            TensorSpec("LABELS", torch.int64, (MAX_DETECTIONS,)),
            TensorSpec("COUNT", torch.int32, (1,)),
        )
    if model == "segmenter":
        return (TensorSpec("MASK", torch.uint8, (input_size, input_size)),)
    raise ValueError(f"unknown model {model!r}")
