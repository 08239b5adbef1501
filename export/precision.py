"""fp16 export: the network runs in float16 with channels_last activations; the I/O contract stays.

The wrappers (export/wrappers.py) keep uint8 in, normalisation in float32 and their outputs (PROBS
fp32, MASK uint8, the detector's fp32 boxes and scores). Only the convolutional network is halved:
for the classifier and the segmenter their whole `model`, for Faster R-CNN its backbone (ResNet-50 +
FPN, most of its work), while its RPN and box heads, NMS included, stay in float32 (torchvision has
no CPU NMS in half precision, and box regression wants the precision). Tensor cores on a GPU run
fp16 convolutions several times faster, and channels_last is the layout they read without
transposing. Parity with the fp32 export is checked by top-1 agreement, box IoU and mask IoU
(loadtests/gpu/parity.py).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

from export.spec import ModelSpec

PRECISIONS = ("fp32", "fp16")


class HalfPrecision(nn.Module):
    """Run `model` in float16, channels_last; float32 in, float32 out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.half().to(memory_format=torch.channels_last).eval()

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x.half().contiguous(memory_format=torch.channels_last)).float()


class HalfBackbone(nn.Module):
    """A detection backbone (image → named feature maps) in float16, channels_last; float32 maps out."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.out_channels: int = backbone.out_channels
        self.backbone = backbone.half().to(memory_format=torch.channels_last).eval()

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features: dict[str, Tensor] = self.backbone(x.half().contiguous(memory_format=torch.channels_last))
        out: dict[str, Tensor] = {}
        for name, feature in features.items():
            out[name] = feature.float()
        return out


def with_precision(spec: ModelSpec, precision: str) -> ModelSpec:
    """`spec` unchanged for fp32; for fp16 a copy whose network runs in half precision (the spec's
    module is changed in place: load a fresh one to keep an fp32 copy)."""
    if precision == "fp32":
        return spec
    if precision != "fp16":
        raise ValueError(f"precision {precision!r}: choose from {', '.join(PRECISIONS)}")
    wrapper = spec.module
    inner = wrapper.model
    if isinstance(inner, GeneralizedRCNN):
        inner.backbone = HalfBackbone(inner.backbone)
    else:
        wrapper.model = HalfPrecision(inner)
    return dataclasses.replace(spec, precision=precision)
