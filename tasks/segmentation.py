"""Segmentation: /segment, the segmenter (per-pixel class index `MASK`), a U-Net."""

from __future__ import annotations

import torch
from torch import nn

from export.wrappers import SegmenterWrapper
from service.handlers.segment import SegmentHandler
from tasks.base import Stats, Task, TensorSpec, register_arch
from tasks.defaults import demo_size
from training.models import UNet, build_demo_segmenter


@register_arch(
    "segmenter", "demo", class_count_key="head.weight", normalisation="demo",
    default_size=lambda: (demo_size("scene_size"), None),
)  # fmt: skip
def demo(num_labels: int, input_size: int) -> nn.Module:
    """A U-Net over a ResNet-18 encoder (trained by `python -m training`); torchvision has none."""
    return build_demo_segmenter(num_labels)


def outputs(num_labels: int, input_size: int) -> tuple[TensorSpec, ...]:
    return (TensorSpec("MASK", torch.uint8, (input_size, input_size)),)


def wrap(model: nn.Module, stats: Stats) -> nn.Module:
    return SegmenterWrapper(model, *stats)


TASK = Task(
    handler=SegmentHandler(),
    preprocess="letterbox",
    labelled_output="MASK",
    outputs=outputs,
    wrap=wrap,
    background="background",
    input_multiple=UNet.STRIDE,
    max_labels=256,  # MASK is uint8
)
