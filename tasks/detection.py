"""Detection: /detect, the detector (`BOXES/SCORES/LABELS/COUNT`, K rows), Faster R-CNN."""

from __future__ import annotations

import inspect

import torch
from torch import nn
from torchvision.models.detection import (
    FasterRCNN,
    FasterRCNN_ResNet50_FPN_V2_Weights,
    fasterrcnn_resnet50_fpn_v2,
)

from export.wrappers import MAX_DETECTIONS, DetectorWrapper
from service.handlers.detect import DetectHandler
from tasks.base import Stats, Task, TensorSpec, register_arch
from tasks.defaults import demo_size
from training.models import build_demo_detector

CLASS_COUNT_KEY = "roi_heads.box_predictor.cls_score.weight"


def _torchvision_size() -> tuple[int, int | None]:
    """The side torchvision's Faster R-CNN resizes to by default (the COCO weights' scale)."""
    return inspect.signature(FasterRCNN).parameters["min_size"].default, None


@register_arch(
    "detector", "demo", class_count_key=CLASS_COUNT_KEY, normalisation="demo",
    default_size=lambda: (demo_size("scene_size"), None),
)  # fmt: skip
def demo(num_labels: int, input_size: int) -> nn.Module:
    """A ResNet-18-FPN Faster R-CNN (trained by `python -m training`); `num_labels` counts background."""
    return build_demo_detector(num_labels - 1, input_size)


@register_arch(
    "detector", "fasterrcnn_resnet50_fpn_v2", class_count_key=CLASS_COUNT_KEY, normalisation="imagenet",
    default_size=_torchvision_size, pretrained=FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1,
)  # fmt: skip
def fasterrcnn_v2(num_labels: int, input_size: int) -> nn.Module:
    """torchvision's ResNet-50-FPN v2 (its MobileNetV3 sibling fails under TorchScript on CUDA).
    Its transform must not resize: inputs arrive letterboxed to `input_size`."""
    return fasterrcnn_resnet50_fpn_v2(
        weights=None, weights_backbone=None, num_classes=num_labels, min_size=input_size, max_size=input_size
    )


def outputs(num_labels: int, input_size: int) -> tuple[TensorSpec, ...]:
    return (
        TensorSpec("BOXES", torch.float32, (MAX_DETECTIONS, 4)),
        TensorSpec("SCORES", torch.float32, (MAX_DETECTIONS,)),
        TensorSpec("LABELS", torch.int64, (MAX_DETECTIONS,)),
        TensorSpec("COUNT", torch.int32, (1,)),
    )


def wrap(model: nn.Module, stats: Stats) -> nn.Module:
    return DetectorWrapper(model)  # Faster R-CNN normalises inside its own transform


def tune_demo(model: nn.Module, meta: dict) -> None:
    """The score threshold demo training chose on its validation scenes."""
    if "detector_score_threshold" in meta:
        model.roi_heads.score_thresh = float(meta["detector_score_threshold"])


TASK = Task(
    handler=DetectHandler(),
    preprocess="letterbox",
    labelled_output="LABELS",
    outputs=outputs,
    wrap=wrap,
    background="__background__",
    pretrained_arch="fasterrcnn_resnet50_fpn_v2",
    tune_demo=tune_demo,
)
