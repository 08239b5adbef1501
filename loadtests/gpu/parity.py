"""Parity checks of the GPU check: the reloaded model.pt against its eager model (same device, same
precision), and the fp16 export against the fp32 one (top-1 agreement, box IoU, mask IoU).

Each check is one number against a tolerance it must not exceed (`value <= tolerance`), so an
agreement is written as its complement (a disagreement, an IoU loss).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torchvision.ops import box_iou

from training.shapes import make_scene

SEED = 0
# What "the same output" means, per check. Eager and TorchScript run the same kernels, but on CUDA
# the scripted graph's fused elementwise ops may round differently; these leave room for that only.
# The comparison runs with TF32 off (`exact_float32`): with it on (PyTorch's default for cuDNN
# convolutions), the H200 run's detector scores moved by 1e-3 and near-tied random-weight boxes swapped.
TOLERANCES = {
    "outputs mismatched_tensors": 0,  # outputs whose shape or dtype differ (then nothing else is compared)
    "PROBS max_abs_diff": 1e-4,  # softmax probabilities
    "logits max_rel_diff": 1e-3,  # max |diff| / max |eager logit|
    "COUNT max_abs_diff": 0.0,  # detections per image
    "SCORES max_abs_diff": 1e-3,
    "BOXES max_abs_diff": 0.05,  # pixels, each of the best eager boxes against its closest same-label box
    "MASK mismatch_fraction": 1e-3,  # pixels whose class differs (argmax ties)
}
# fp16 against fp32: half precision rounds at about 1e-3 relative, so logits move by that much per
# layer; with random weights near-tied classes, boxes and pixels may swap, hence the looser top-1,
# box and mask bounds (pretrained weights agree far better).
FP16_TOLERANCES = {
    "fp16-logits max_rel_diff": 0.05,
    "fp16-PROBS top1_disagreement": 0.25,  # fraction of images whose top-1 class differs
    "fp16-BOXES unmatched_fraction": 0.2,  # of fp32's 10 best boxes per image: no same-label fp16 box at IoU >= 0.5
    "fp16-MASK iou_loss": 0.05,  # 1 - mean over classes present of the masks' IoU
}


BOX_MATCH_IOU = 0.5
BOXES_COMPARED = 10  # best boxes per image held to the box checks


def parity_images(model: str, size: int, batch: int) -> torch.Tensor:
    """Seeded uint8 noise plus one shapes scene (a single shape for the classifier)."""
    noise = torch.randint(
        0, 256, (batch - 1, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(SEED)
    )
    shapes = (1, 1) if model == "classifier" else (1, 4)
    scene = make_scene(SEED, size, *shapes).image
    return torch.cat([noise, torch.from_numpy(scene).permute(2, 0, 1)[None]])


def _outputs(result: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [result] if isinstance(result, torch.Tensor) else list(result)


def _check(name: str, value: float) -> dict[str, Any]:
    """One comparison against its tolerance; a non-finite value is reported as null and fails."""
    tolerance = TOLERANCES[name] if name in TOLERANCES else FP16_TOLERANCES[name]
    finite = math.isfinite(value)
    output, metric = name.split(" ")
    return {
        "output": output,
        "metric": metric,
        "value": value if finite else None,
        "tolerance": tolerance,
        "passed": finite and value <= tolerance,
    }


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) if a.numel() else 0.0


def _max_rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


def detector_checks(eager: list[torch.Tensor], scripted: list[torch.Tensor]) -> list[dict[str, Any]]:
    """Counts, sorted scores, and each of the `BOXES_COMPARED` best eager boxes per image against its
    closest same-label scripted box (any rank).

    Matching boxes (instead of comparing rows) keeps equal-score detections in either order equal; only
    the best boxes are held to pixels, because with random weights the tail is a hundred near-tied
    proposals whose NMS survivors change with the last bit of a score.
    """
    (boxes_e, scores_e, labels_e, count_e), (boxes_s, scores_s, labels_s, count_s) = eager, scripted
    score_diff, box_diff = 0.0, 0.0
    for i in range(len(count_e)):
        n_e, n_s = int(count_e[i, 0]), int(count_s[i, 0])
        n = min(n_e, n_s)
        score_diff = max(score_diff, _max_abs(scores_e[i, :n], scores_s[i, :n]))
        n_e = min(n_e, BOXES_COMPARED)
        if n_e == 0:
            continue
        distance = (boxes_e[i, :n_e, None, :] - boxes_s[i, None, :n_s, :]).abs().amax(dim=-1)
        distance[labels_e[i, :n_e, None] != labels_s[i, None, :n_s]] = math.inf
        closest = distance.amin(dim=1) if n_s else torch.full((n_e,), math.inf)
        box_diff = max(box_diff, float(closest.max()))
    return [
        _check("COUNT max_abs_diff", _max_abs(count_e, count_s)),
        _check("SCORES max_abs_diff", score_diff),
        _check("BOXES max_abs_diff", box_diff),
    ]


def _logits(wrapper: Any, images: torch.Tensor) -> torch.Tensor:
    """The wrapped network's raw output (export/wrappers.py: `model(normalize(image))`)."""
    return wrapper.model(wrapper.normalize(images)).float().cpu()


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """TF32 off for cuDNN convolutions and CUDA matmuls inside the block (restored after): parity
    compares the export with its eager model, not two roundings of 10-bit mantissas."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def check_parity(
    model: str, eager: nn.Module, scripted: torch.jit.ScriptModule, images: torch.Tensor, warmup_calls: int
) -> dict[str, Any]:
    """Compare the reloaded model.pt with its eager model on `images` (already on the device), TF32 off."""
    with torch.inference_mode(), exact_float32():
        for _ in range(warmup_calls):
            scripted(images)
        expected, actual = _outputs(eager(images)), _outputs(scripted(images))
        layouts = [(t.shape, t.dtype) for t in expected], [(t.shape, t.dtype) for t in actual]
        mismatched = sum(a != b for a, b in zip(*layouts)) + abs(len(expected) - len(actual))
        checks = [_check("outputs mismatched_tensors", mismatched)]
        compared: dict[str, int] = {}
        if not mismatched:  # otherwise nothing else is comparable
            expected, actual = [t.float().cpu() for t in expected], [t.float().cpu() for t in actual]
            if model == "detector":
                checks += detector_checks(expected, actual)
                compared = {"detections": int(expected[3].sum())}
            else:
                logits = _max_rel(_logits(scripted, images), _logits(eager, images))
                if model == "classifier":
                    checks.append(_check("PROBS max_abs_diff", _max_abs(actual[0], expected[0])))
                    compared = {"top1_classes": len(expected[0].argmax(dim=1).unique())}
                else:
                    mismatch = float((actual[0] != expected[0]).float().mean())
                    checks.append(_check("MASK mismatch_fraction", mismatch))
                    compared = {"mask_classes": len(expected[0].unique())}
                checks.append(_check("logits max_rel_diff", logits))
    return {
        "passed": all(c["passed"] for c in checks),
        "images": len(images),
        "input_size": images.shape[-1],
        **compared,
        "checks": checks,
    }


# --- fp16 against fp32 --------------------------------------------------------------------------

def fp16_parity(
    model: str, fp32: torch.jit.ScriptModule, fp16: torch.jit.ScriptModule, images: torch.Tensor
) -> dict[str, Any]:
    """Compare the fp16 export with the fp32 export on `images` (on the device): same output layout,
    then top-1 agreement, box IoU or mask IoU, and the networks' raw outputs."""
    with torch.inference_mode():
        expected, actual = _outputs(fp32(images)), _outputs(fp16(images))
        layouts = [(t.shape, t.dtype) for t in expected], [(t.shape, t.dtype) for t in actual]
        mismatched = sum(a != b for a, b in zip(*layouts)) + abs(len(expected) - len(actual))
        checks = [_check("outputs mismatched_tensors", mismatched)]
        if not mismatched:
            expected, actual = [t.float().cpu() for t in expected], [t.float().cpu() for t in actual]
            if model == "detector":
                checks.append(_check("fp16-BOXES unmatched_fraction", unmatched_fraction(expected, actual)))
            else:
                logits = _max_rel(_logits(fp16, images), _logits(fp32, images))
                if model == "classifier":
                    top1 = expected[0].argmax(dim=1) != actual[0].argmax(dim=1)
                    checks.append(_check("fp16-PROBS top1_disagreement", float(top1.float().mean())))
                else:
                    checks.append(_check("fp16-MASK iou_loss", 1.0 - mask_iou(expected[0], actual[0])))
                checks.append(_check("fp16-logits max_rel_diff", logits))
    return {"passed": all(c["passed"] for c in checks), "images": len(images), "checks": checks}


def unmatched_fraction(expected: Sequence[torch.Tensor], actual: Sequence[torch.Tensor]) -> float:
    """Of each image's `BOXES_COMPARED` best expected boxes, the fraction with no actual box of the same
    label at IoU >= `BOX_MATCH_IOU` (0 when there are none to compare)."""
    (boxes_e, _, labels_e, count_e), (boxes_s, _, labels_s, count_s) = expected, actual
    compared = unmatched = 0
    for i in range(len(count_e)):
        n_e, n_s = min(int(count_e[i, 0]), BOXES_COMPARED), int(count_s[i, 0])
        if n_e == 0:
            continue
        compared += n_e
        if n_s == 0:
            unmatched += n_e
            continue
        iou = box_iou(boxes_e[i, :n_e], boxes_s[i, :n_s])
        iou[labels_e[i, :n_e, None] != labels_s[i, None, :n_s]] = 0.0
        unmatched += int((iou.amax(dim=1) < BOX_MATCH_IOU).sum())
    return unmatched / compared if compared else 0.0


def mask_iou(expected: torch.Tensor, actual: torch.Tensor) -> float:
    """Mean over the classes in either mask of |both| / |either| (1.0 for identical masks)."""
    ious = []
    for label in torch.unique(torch.cat([expected.unique(), actual.unique()])):
        a, b = expected == label, actual == label
        ious.append(float((a & b).sum()) / max(1, int((a | b).sum())))
    return sum(ious) / len(ious) if ious else 1.0
