"""Modules that give each model its Triton I/O: uint8 [B,3,H,W] in, the contract's tensors out.

Conversion to float and normalisation live inside the graph, so a client sends raw pixels and
every server (libtorch backend, python backend, embedded) computes exactly the same thing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

from service.backends.torchscript import quiet_jit
from tasks.base import Stats
from tasks.detection import MAX_DETECTIONS  # K: the detector's fixed number of output rows

Wrap = Callable[[nn.Module, Stats], nn.Module]  # eager model -> uint8 [B,3,H,W] in, the contract's outputs out
WRAPPERS: dict[str, Wrap] = {}  # model name -> how export wraps its eager model


def register_wrapper(model: str) -> Callable[[Wrap], Wrap]:
    """Decorator: `wrap` gives `model`'s eager networks their contract's I/O (registered per task)."""

    def register(wrap: Wrap) -> Wrap:
        if model in WRAPPERS:
            raise ValueError(f"a wrapper for the {model} is registered twice")
        WRAPPERS[model] = wrap
        return wrap

    return register


class Normalize(nn.Module):
    """uint8 images -> float in [0, 1] -> (x - mean) / std, per channel."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return (image.float() / 255.0 - self.mean) / self.std


class ClassifierWrapper(nn.Module):
    """IMAGE uint8 [B,3,H,W] -> PROBS fp32 [B,C] (softmax)."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.model = model.eval()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(self.normalize(image)), dim=1)


class SegmenterWrapper(nn.Module):
    """IMAGE uint8 [B,3,H,W] -> MASK uint8 [B,H,W] (per-pixel argmax class index)."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.model = model.eval()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(image)).argmax(dim=1).to(torch.uint8)


class DetectorWrapper(nn.Module):
    """IMAGE uint8 [B,3,H,W] -> BOXES [B,K,4], SCORES [B,K], LABELS [B,K], COUNT [B,1].

    Faster R-CNN normalises inside its own GeneralizedRCNNTransform, so it gets float/255. Its
    transform must not resize (min_size == max_size == the letterboxed input side), so boxes come
    back in model-input pixels. Rows are sorted by score and zero-padded to K.
    """

    def __init__(self, model: GeneralizedRCNN, max_detections: int = MAX_DETECTIONS) -> None:
        super().__init__()
        # Scripted R-CNNs always return (losses, detections); forward() unpacks that, so the
        # once-per-process warning saying so would only be noise in the server log.
        model._has_warned = True
        self.model = model.eval()
        self.max_detections = max_detections

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        images = list(image.float().div(255.0).unbind(0))
        if torch.jit.is_scripting():
            _, detections = self.model(images)
        else:
            detections = self.model(images)
        batch, k = image.shape[0], self.max_detections
        boxes = torch.zeros((batch, k, 4), dtype=torch.float32, device=image.device)
        scores = torch.zeros((batch, k), dtype=torch.float32, device=image.device)
        labels = torch.zeros((batch, k), dtype=torch.int64, device=image.device)
        count = torch.zeros((batch, 1), dtype=torch.int32, device=image.device)
        for i, detection in enumerate(detections):
            order = torch.argsort(detection["scores"], descending=True)[:k]
            n = order.numel()
            boxes[i, :n] = detection["boxes"][order]
            scores[i, :n] = detection["scores"][order]
            labels[i, :n] = detection["labels"][order]
            count[i, 0] = n
        return boxes, scores, labels, count


class OneImageDetector(nn.Module):
    """IMAGE uint8 [3,H,W] -> BOXES [K,4], SCORES [K], LABELS [K], COUNT [1]: one image of `DetectorWrapper`.

    Written with tensor ops only (no Python ints from tensors, no in-place slices), so that tracing
    it for ONNX keeps the number of detections data-dependent; export/onnx_export.py loops it over
    the batch."""

    def __init__(self, detector: DetectorWrapper) -> None:
        super().__init__()
        self.model = detector.model
        self.max_detections = detector.max_detections

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        (detection,) = self.model([image.float().div(255.0)])
        k = self.max_detections
        order = torch.argsort(detection["scores"], descending=True)[:k]
        boxes = torch.cat([detection["boxes"][order], torch.zeros((k, 4), device=image.device)])[:k]
        scores = torch.cat([detection["scores"][order], torch.zeros((k,), device=image.device)])[:k]
        labels = torch.cat(
            [detection["labels"][order], torch.zeros((k,), dtype=torch.int64, device=image.device)]
        )[:k]
        count = torch.ones_like(order).sum().to(torch.int32).reshape(1)
        return boxes, scores, labels, count


@register_wrapper("classifier")
def wrap_classifier(model: nn.Module, stats: Stats) -> nn.Module:
    return ClassifierWrapper(model, *stats)


@register_wrapper("detector")
def wrap_detector(model: nn.Module, stats: Stats) -> nn.Module:
    return DetectorWrapper(model)  # Faster R-CNN normalises inside its own transform


@register_wrapper("segmenter")
def wrap_segmenter(model: nn.Module, stats: Stats) -> nn.Module:
    return SegmenterWrapper(model, *stats)


def script(module: nn.Module) -> torch.jit.ScriptModule:
    """TorchScript `module` (Triton's libtorch format, deprecated in torch but still required)."""
    with quiet_jit():
        return torch.jit.script(module.eval())


def save(module: torch.jit.ScriptModule, path: str) -> None:
    """Write a scripted module to `path` (torch.jit.save, its deprecation notice silenced)."""
    with quiet_jit():
        torch.jit.save(module, path)
