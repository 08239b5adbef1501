"""torchvision's architectures for the built-in tasks, registered with their pretrained weights.

A checkpoint or torchvision's weights are loaded into these (`--weights pretrained|checkpoint`).
The demo architectures are registered by `training.archs`.
"""

from __future__ import annotations

import inspect

from torch import nn
from torchvision.models import ResNet50_Weights, resnet50
from torchvision.models.detection import FasterRCNN, FasterRCNN_ResNet50_FPN_V2_Weights, fasterrcnn_resnet50_fpn_v2

from tasks import register_arch

DETECTOR_CLASS_COUNT_KEY = "roi_heads.box_predictor.cls_score.weight"


def _resnet50_size() -> tuple[int, int | None]:
    transforms = ResNet50_Weights.IMAGENET1K_V2.transforms()
    return transforms.crop_size[0], transforms.resize_size[0]


def _fasterrcnn_size() -> tuple[int, int | None]:
    """The side torchvision's Faster R-CNN resizes to by default (the COCO weights' scale)."""
    return inspect.signature(FasterRCNN).parameters["min_size"].default, None


@register_arch(
    "classifier", "resnet50", class_count_key="fc.weight", normalisation="imagenet",
    default_size=_resnet50_size, pretrained=ResNet50_Weights.IMAGENET1K_V2,
)  # fmt: skip
def resnet50_arch(num_labels: int, input_size: int) -> nn.Module:
    return resnet50(weights=None, num_classes=num_labels)


@register_arch(
    "detector", "fasterrcnn_resnet50_fpn_v2", class_count_key=DETECTOR_CLASS_COUNT_KEY, normalisation="imagenet",
    default_size=_fasterrcnn_size, pretrained=FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1,
)  # fmt: skip
def fasterrcnn_v2(num_labels: int, input_size: int) -> nn.Module:
    """torchvision's ResNet-50-FPN v2 (its MobileNetV3 sibling fails under TorchScript on CUDA).
    Its transform must not resize: inputs arrive letterboxed to `input_size`."""
    return fasterrcnn_resnet50_fpn_v2(
        weights=None, weights_backbone=None, num_classes=num_labels, min_size=input_size, max_size=input_size
    )
