"""The demo architectures of the built-in tasks (what `python -m training` trains), registered for export."""

from __future__ import annotations

from torch import nn

from tasks import register_arch
from training.models import build_demo_classifier, build_demo_detector, build_demo_segmenter
from training.train import DemoConfig

DETECTOR_CLASS_COUNT_KEY = "roi_heads.box_predictor.cls_score.weight"


def _size(name: str) -> int:
    """`DemoConfig().<name>`: "classifier_size" or "scene_size"."""
    return int(getattr(DemoConfig(), name))


@register_arch(
    "classifier", "demo", class_count_key="fc.weight", normalisation="demo",
    default_size=lambda: (_size("classifier_size"), _size("classifier_size")),
)  # fmt: skip
def demo_classifier(num_labels: int, input_size: int) -> nn.Module:
    """A ResNet-18 with `num_labels` outputs."""
    return build_demo_classifier(num_labels)


def _tune_detector(model: nn.Module, meta: dict) -> None:
    """The score threshold demo training chose on its validation scenes."""
    if "detector_score_threshold" in meta:
        model.roi_heads.score_thresh = float(meta["detector_score_threshold"])


@register_arch(
    "detector", "demo", class_count_key=DETECTOR_CLASS_COUNT_KEY, normalisation="demo",
    default_size=lambda: (_size("scene_size"), None), tune=_tune_detector,
)  # fmt: skip
def demo_detector(num_labels: int, input_size: int) -> nn.Module:
    """A ResNet-18-FPN Faster R-CNN; `num_labels` counts background."""
    return build_demo_detector(num_labels - 1, input_size)


@register_arch(
    "segmenter", "demo", class_count_key="head.weight", normalisation="demo",
    default_size=lambda: (_size("scene_size"), None),
)  # fmt: skip
def demo_segmenter(num_labels: int, input_size: int) -> nn.Module:
    """A U-Net over a ResNet-18 encoder (torchvision has none)."""
    return build_demo_segmenter(num_labels)
