"""How a candidate model version agrees with the current one, per image, from the raw outputs of both
(the contract's tensors, in model-input terms: no postprocess needed). Pure numpy, no state.

* classification (`PROBS`): `top1_agreement` (1 if both pick the same class, else 0) and `score_drift`
  (|current's top-1 probability - candidate's probability of that same class|).
* detection (`BOXES`, `SCORES`, `LABELS`, `COUNT`): `box_f1` (greedy matching, best scores first, of
  same-label boxes at IoU >= 0.5, the current version's boxes taken as the truth; 1.0 when neither
  finds anything) and `count_drift` (|candidate's boxes - current's boxes|), both over the boxes
  scoring at least `DETECTION_SCORE`.
* segmentation (`MASK`): `mask_iou` (mean over the classes present in either mask of the per-class
  IoU; 1.0 when both masks are all background).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

Outputs = Mapping[str, np.ndarray]
DETECTION_SCORE = 0.5  # boxes below this score do not count (the detector handler's default threshold)
MATCH_IOU = 0.5

MEASURES: dict[str, tuple[str, ...]] = {
    "classification": ("top1_agreement", "score_drift"),
    "detection": ("box_f1", "count_drift"),
    "segmentation": ("mask_iou",),
}


def classification(current: Outputs, candidate: Outputs) -> dict[str, float]:
    """Top-1 agreement and score drift of one image's `PROBS`."""
    ours, theirs = np.asarray(current["PROBS"], np.float64), np.asarray(candidate["PROBS"], np.float64)
    top = int(np.argmax(ours))
    return {
        "top1_agreement": float(top == int(np.argmax(theirs))),
        "score_drift": float(abs(ours[top] - theirs[top])),
    }


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of `a` `[N,4]` with every box of `b` `[M,4]` (xyxy): `[N,M]`."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(bottom_right - top_left, 0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _kept(outputs: Outputs, min_score: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The valid rows scoring >= `min_score`: boxes, labels, scores (best first)."""
    count = int(np.asarray(outputs["COUNT"]).reshape(-1)[0])
    scores = np.asarray(outputs["SCORES"], np.float64).reshape(-1)[:count]
    keep = np.flatnonzero(scores >= min_score)
    keep = keep[np.argsort(-scores[keep], kind="stable")]
    boxes = np.asarray(outputs["BOXES"], np.float64).reshape(-1, 4)[:count][keep]
    labels = np.asarray(outputs["LABELS"]).reshape(-1)[:count][keep]
    return boxes, labels, scores[keep]


def box_f1(truth: tuple[np.ndarray, np.ndarray], found: tuple[np.ndarray, np.ndarray], iou: float = MATCH_IOU) -> float:
    """F1 of `found` (boxes, labels; best first) against `truth`: each found box, in order, matches the
    unmatched truth box of its label with the highest IoU, if that IoU >= `iou`."""
    truth_boxes, truth_labels = truth
    found_boxes, found_labels = found
    if len(truth_boxes) == 0 and len(found_boxes) == 0:
        return 1.0
    if len(truth_boxes) == 0 or len(found_boxes) == 0:
        return 0.0
    overlaps = box_iou(found_boxes, truth_boxes)
    overlaps[found_labels[:, None] != truth_labels[None, :]] = -1.0
    matched = np.zeros(len(truth_boxes), dtype=bool)
    hits = 0
    for row in overlaps:
        row = np.where(matched, -1.0, row)
        best = int(np.argmax(row))
        if row[best] >= iou:
            matched[best] = True
            hits += 1
    return 2.0 * hits / (len(truth_boxes) + len(found_boxes))


def detection(current: Outputs, candidate: Outputs, min_score: float = DETECTION_SCORE) -> dict[str, float]:
    """Box F1 at IoU 0.5 (the current version's boxes as truth) and count drift of one image."""
    ours_boxes, ours_labels, _ = _kept(current, min_score)
    their_boxes, their_labels, _ = _kept(candidate, min_score)
    return {
        "box_f1": box_f1((ours_boxes, ours_labels), (their_boxes, their_labels)),
        "count_drift": float(abs(len(their_boxes) - len(ours_boxes))),
    }


def mask_iou(a: np.ndarray, b: np.ndarray, background: int = 0) -> float:
    """Mean IoU over the non-background classes present in either class-index mask (1.0 if none is)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"masks of shapes {a.shape} and {b.shape} cannot be compared")
    classes = np.union1d(np.unique(a), np.unique(b))
    classes = classes[classes != background]
    if len(classes) == 0:
        return 1.0
    ious = [float(np.logical_and(a == c, b == c).sum()) / float(np.logical_or(a == c, b == c).sum()) for c in classes]
    return float(np.mean(ious))


def segmentation(current: Outputs, candidate: Outputs) -> dict[str, float]:
    """Mean mask IoU of one image's `MASK`."""
    return {"mask_iou": mask_iou(current["MASK"], candidate["MASK"])}


COMPARE: dict[str, Callable[[Outputs, Outputs], dict[str, float]]] = {
    "classification": classification,
    "detection": detection,
    "segmentation": segmentation,
}


def compare(task: str, current: Outputs, candidate: Outputs) -> dict[str, float]:
    """The task's measures for one image (empty for a task without measures)."""
    measure = COMPARE.get(task)
    return measure(current, candidate) if measure is not None else {}
