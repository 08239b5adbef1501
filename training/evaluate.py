"""Quality of the demo models on held-out scenes, measured with torchmetrics (not by hand)."""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex
from torchmetrics.detection import MeanAveragePrecision

from training.data import ClassificationSet, SceneSet, normalise, to_unit_float


@torch.inference_mode()
def classification_top1(
    model: nn.Module, data: ClassificationSet, device: torch.device, batch_size: int = 256
) -> float:
    """Top-1 accuracy of `model` (eval mode) on `data`."""
    model.eval()
    metric = MulticlassAccuracy(num_classes=model.fc.out_features, average="micro", top_k=1)
    for start in range(0, len(data.images), batch_size):
        logits = model(normalise(data.images[start : start + batch_size].to(device)))
        metric.update(logits.cpu(), data.labels[start : start + batch_size])
    return float(metric.compute())


@torch.inference_mode()
def detection_map50(model: nn.Module, data: SceneSet, device: torch.device, batch_size: int = 32) -> float:
    """COCO-style mAP at IoU 0.5 of `model` as served: eval mode, its own score threshold and NMS."""
    model.eval()
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", iou_thresholds=[0.5])
    for start in range(0, len(data), batch_size):
        images = to_unit_float(data.images[start : start + batch_size].to(device))
        outputs = model(list(images))
        preds = [{k: out[k].cpu() for k in ("boxes", "scores", "labels")} for out in outputs]
        targets = [
            {"boxes": boxes, "labels": labels}
            for boxes, labels in zip(
                data.boxes[start : start + batch_size], data.labels[start : start + batch_size], strict=True
            )
        ]
        metric.update(preds, targets)
    return float(metric.compute()["map"])


@torch.inference_mode()
def segmentation_miou(
    model: nn.Module, data: SceneSet, num_classes: int, device: torch.device, batch_size: int = 64
) -> float:
    """Mean IoU over all classes, background included, of `model`'s per-pixel argmax."""
    model.eval()
    metric = MulticlassJaccardIndex(num_classes=num_classes, average="macro")
    for start in range(0, len(data), batch_size):
        logits = model(normalise(data.images[start : start + batch_size].to(device)))
        metric.update(logits.argmax(1).cpu(), data.masks[start : start + batch_size].long())
    return float(metric.compute())
