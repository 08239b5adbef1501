"""Gradients through an exported classifier (`model.pt`), for the `saliency` and `gradcam` explanations.

The embedded backend loads a second TorchScript copy of the model's `model.pt` the first time a gradient
explanation asks for it (whatever runtime answers its requests: ONNX Runtime gives no gradients, and export
writes both files of one version side by side). The Triton backend has none: the model runs elsewhere.

* `saliency`: the gradient of the class's logit with respect to the input pixels (as floats in 0-255,
  through the model's own normalisation), its largest absolute value over the colour channels.
* `gradcam` (Selvaraju et al. 2017): the class logit's gradient averaged over each channel of a conv stage's
  feature map weighs that map; the weighted sum, ReLU'd, is upsampled to the input. Scripted modules take
  no hooks, so the feature map is reached by calling the exported module's own submodules in order: a
  wrapper with `normalize` and a ResNet-style `model` (stages, then `avgpool` and `fc`), as the export
  writes the classifier. The chain is checked against the whole module once when loaded; a model it does
  not fit has no `gradcam` (422), and `saliency` then goes through the whole module (log-probability).
  The stage is the deepest whose map is at least `MIN_CAM_SIDE` cells a side: the demo classifier's
  64-pixel input leaves 2x2 after its last stage, too coarse to place anything, so it uses `layer3` (4x4).
  An fp16 export (`export --precision fp16`, the GPU profile) has its network inside `HalfPrecision`: the
  chain steps into it, runs the stages in float16 as the export does, and hands maps and logits on in float32.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from service.backends.torchscript import load_torchscript

log = logging.getLogger(__name__)

MIN_CAM_SIDE = 4
_HEAD = ("avgpool", "fc")


@dataclass(frozen=True)
class _Parts:
    """The exported classifier as a chain: input → features at `cam_stage` → logits."""

    features: Callable[[torch.Tensor], torch.Tensor]
    logits: Callable[[torch.Tensor], torch.Tensor]
    cam_stage: str


class GradientModel:
    """One classifier's `model.pt` for gradients, run one explanation at a time on a thread of its own."""

    def __init__(self, path: Path, input_dims: tuple[int, ...], device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.module = load_torchscript(path, self.device)
        self.input_dims = tuple(input_dims)
        self.parts = _classifier_parts(self.module, self.input_dims, self.device)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gradients")
        if self.parts is None:
            log.warning("%s is not a wrapped ResNet-style classifier: gradcam is not available for it", path)

    @property
    def methods(self) -> tuple[str, ...]:
        return ("saliency", "gradcam") if self.parts is not None else ("saliency",)

    @property
    def cam_stage(self) -> str | None:
        return self.parts.cam_stage if self.parts is not None else None

    async def heatmap(self, image: np.ndarray, class_id: int, method: str) -> np.ndarray:
        """`method`'s map for class `class_id` of one `[3,H,W]` uint8 image: float32 [H, W], >= 0."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.compute, image, class_id, method)

    def compute(self, image: np.ndarray, class_id: int, method: str) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(image))[None].to(self.device, torch.float32)
        with torch.enable_grad():
            if method == "saliency":
                x.requires_grad_(True)
                if self.parts is not None:
                    score = self.parts.logits(self.parts.features(x))[0, class_id]
                else:
                    score = torch.log(self.module(x)[0, class_id].clamp_min(1e-30))
                (grad,) = torch.autograd.grad(score, x)
                return grad.abs().amax(dim=1)[0].detach().cpu().numpy().astype(np.float32)
            if method == "gradcam":
                if self.parts is None:
                    raise ValueError("gradcam is not available for this model")
                features = self.parts.features(x).detach().requires_grad_(True)
                score = self.parts.logits(features)[0, class_id]
                (grad,) = torch.autograd.grad(score, features)
                weights = grad.mean(dim=(2, 3), keepdim=True)
                cam = torch.relu((weights * features).sum(dim=1, keepdim=True))
                cam = F.interpolate(cam, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
                return cam[0, 0].detach().cpu().numpy().astype(np.float32)
        raise ValueError(f"unknown gradient method {method!r}")

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _classifier_parts(
    module: torch.nn.Module, input_dims: tuple[int, ...], device: torch.device
) -> _Parts | None:
    """The module as normalise → stages → avgpool → flatten → fc, if it is that and gives the module's
    own answers (softmax of the chain's logits); None otherwise."""
    normalize, inner = getattr(module, "normalize", None), getattr(module, "model", None)
    if normalize is None or inner is None:
        return None
    names = [name for name, _ in inner.named_children()]
    half = names == ["model"]  # `export --precision fp16`: the network in float16, channels_last, inside
    if half:
        inner = inner.model
        names = [name for name, _ in inner.named_children()]
    if len(names) < 3 or tuple(names[-2:]) != _HEAD:
        return None
    stages = names[:-2]

    def into(y: torch.Tensor) -> torch.Tensor:  # as export/precision.py's HalfPrecision hands it over
        return y.half().contiguous(memory_format=torch.channels_last) if half else y

    def run(x: torch.Tensor, upto: int) -> list[torch.Tensor]:
        maps, y = [], into(normalize(x))
        for name in stages[:upto]:
            y = getattr(inner, name)(y)
            maps.append(y.float())  # explanations in float32, whatever the network runs in
        return maps

    try:
        probe = torch.randint(0, 256, (2, *input_dims), generator=torch.Generator().manual_seed(0)).to(device)
        with torch.no_grad():
            maps = run(probe.float(), len(stages))
            logits = inner.fc(torch.flatten(inner.avgpool(into(maps[-1])), 1)).float()
            if not torch.allclose(torch.softmax(logits, 1), module(probe.float()), atol=1e-4):
                return None
    except Exception:  # noqa: BLE001 (any mismatch of shapes or types: not this architecture)
        log.debug("the classifier chain does not fit", exc_info=True)
        return None
    # the deepest stage with a map of at least MIN_CAM_SIDE a side (the last one if none is)
    spatial = [i for i, m in enumerate(maps) if m.dim() == 4 and min(m.shape[-2:]) >= MIN_CAM_SIDE]
    cam = (spatial[-1] if spatial else len(stages) - 1) + 1

    def features(x: torch.Tensor) -> torch.Tensor:
        return run(x, cam)[-1]

    def logits(y: torch.Tensor) -> torch.Tensor:
        y = into(y)
        for name in stages[cam:]:
            y = getattr(inner, name)(y)
        return inner.fc(torch.flatten(inner.avgpool(y), 1)).float()

    return _Parts(features, logits, stages[cam - 1])
