"""Classification: /classify, the classifier (softmax `PROBS`), ResNet-18 demo or ResNet-50."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import ResNet50_Weights, resnet50

from export.wrappers import ClassifierWrapper
from service.handlers.classify import ClassifyHandler
from tasks.base import Stats, Task, TensorSpec, register_arch
from tasks.defaults import demo_size
from training.models import build_demo_classifier


def _resnet50_size() -> tuple[int, int | None]:
    transforms = ResNet50_Weights.IMAGENET1K_V2.transforms()
    return transforms.crop_size[0], transforms.resize_size[0]


@register_arch(
    "classifier", "demo", class_count_key="fc.weight", normalisation="demo",
    default_size=lambda: (demo_size("classifier_size"), demo_size("classifier_size")),
)  # fmt: skip
def demo(num_labels: int, input_size: int) -> nn.Module:
    """A ResNet-18 with `num_labels` outputs (trained by `python -m training`)."""
    return build_demo_classifier(num_labels)


@register_arch(
    "classifier", "resnet50", class_count_key="fc.weight", normalisation="imagenet",
    default_size=_resnet50_size, pretrained=ResNet50_Weights.IMAGENET1K_V2,
)  # fmt: skip
def resnet50_arch(num_labels: int, input_size: int) -> nn.Module:
    return resnet50(weights=None, num_classes=num_labels)


def outputs(num_labels: int, input_size: int) -> tuple[TensorSpec, ...]:
    return (TensorSpec("PROBS", torch.float32, (num_labels,)),)


def wrap(model: nn.Module, stats: Stats) -> nn.Module:
    return ClassifierWrapper(model, *stats)


TASK = Task(
    handler=ClassifyHandler(),
    preprocess="resize_center_crop",
    labelled_output="PROBS",
    outputs=outputs,
    wrap=wrap,
    pretrained_arch="resnet50",
)
