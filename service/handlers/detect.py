"""/detect: the detector's padded `BOXES/SCORES/LABELS/COUNT` → boxes on the original image."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from service.contract import ModelContract
from service.handlers.registry import register_handler
from service.handlers.common import (
    ExplainTarget,
    Geometry,
    Handler,
    TableSpec,
    box_ious,
    boxes_to_original,
    label_of,
    padded,
)
from service.imaging.annotate import draw_detection_result
from service.imaging.tracking import DetectionTracker, TrackedDetectionResult
from service.schemas import (
    Detection,
    DetectionResult,
    DetectOptions,
    DetectRequest,
    DetectResponse,
    ImageSize,
)


class DetectHandler(Handler[DetectOptions, DetectionResult]):
    task = "detection"
    model = "detector"
    endpoint = "/detect"
    options = DetectOptions
    request = DetectRequest
    response = DetectResponse
    tables = (TableSpec("BOXES", "FP32", (-1, -1, 4)), TableSpec("SCORES", "FP32", (-1, -1)),
              TableSpec("LABELS", "BYTES", (-1, -1)), TableSpec("CLASS_IDS", "INT32", (-1, -1)),
              TableSpec("COUNT", "INT32", (-1,)))  # fmt: skip

    def postprocess(
        self, outputs: dict[str, np.ndarray], geometry: Geometry, options: DetectOptions, contract: ModelContract
    ) -> DetectionResult:
        """Keep the valid rows scoring >= `score_threshold`, at most `max_detections`, best first."""
        boxes, scores, labels = _rows(outputs)
        keep = _kept(scores, options)
        mapped = boxes_to_original(boxes[keep], geometry)
        detections = [
            Detection(
                box=[round(float(v), 2) for v in box],
                class_id=int(labels[i]),
                label=label_of(contract.labels, int(labels[i])),
                score=float(np.clip(scores[i], 0, 1)),
            )
            for i, box in zip(keep, mapped)
        ]
        return DetectionResult(image=ImageSize(width=geometry.width, height=geometry.height), detections=detections)

    explain_methods = ("occlusion",)

    def explain_targets(
        self,
        outputs: dict[str, np.ndarray],
        geometry: Geometry,
        options: DetectOptions,
        contract: ModelContract,
        top: int,
    ) -> list[ExplainTarget]:
        """The answer's best `top` detections, with their boxes in model-input pixels."""
        boxes, scores, labels = _rows(outputs)
        return [
            ExplainTarget(int(labels[i]), label_of(contract.labels, int(labels[i])), float(scores[i]), n, box=boxes[i])
            for n, i in enumerate(_kept(scores, options)[:top])
        ]

    def explain_scores(
        self, outputs: dict[str, np.ndarray], targets: Sequence[ExplainTarget], contract: ModelContract
    ) -> np.ndarray:
        """Each target's score in `outputs`: the best score of a box of its label overlapping its box by IoU
        >= 0.5 (0 when none does)."""
        boxes, scores, labels = _rows(outputs)
        found = []
        for target in targets:
            assert target.box is not None
            same = (labels == target.class_id) & (box_ious(target.box, boxes) >= MATCH_IOU)
            found.append(float(scores[same].max(initial=0.0)))
        return np.array(found)

    def with_explanations(
        self, result: DetectionResult, explained: Sequence[tuple[ExplainTarget, Any]]
    ) -> DetectionResult:
        detections = list(result.detections)
        for target, explanation in explained:
            detections[target.index] = detections[target.index].model_copy(update={"explanation": explanation})
        return result.model_copy(update={"detections": detections})

    def tracker(self, fps: float) -> DetectionTracker:
        """ByteTrack ids across the frames (`service.imaging.tracking`)."""
        return DetectionTracker(fps)

    def draw(self, image: np.ndarray, result: DetectionResult) -> np.ndarray:
        """Boxes with labels and scores; tracked detections also with their track id."""
        if not isinstance(result, TrackedDetectionResult):
            return draw_detection_result(image, result)
        labels = [d.label if d.track_id is None else f"{d.label} #{d.track_id}" for d in result.detections]
        return draw_detection_result(image, result, labels)

    def table(self, results: list[DetectionResult]) -> dict[str, np.ndarray]:
        """Per image, its detections padded to the batch's largest count, and `COUNT`."""
        rows = [result.detections for result in results]
        return {
            "BOXES": padded([[d.box for d in row] for row in rows], 0.0, "FP32", (4,)),
            "SCORES": padded([[d.score for d in row] for row in rows], 0.0, "FP32"),
            "LABELS": padded([[d.label.encode() for d in row] for row in rows], b"", "BYTES"),
            "CLASS_IDS": padded([[d.class_id for d in row] for row in rows], -1, "INT32"),
            "COUNT": np.array([len(row) for row in rows], dtype="<i4"),
        }


MATCH_IOU = 0.5  # an occluded pass's box is the explained detection when its label matches and IoU reaches this


def _rows(outputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The valid rows' boxes (model-input pixels), scores and labels."""
    count = int(np.asarray(outputs["COUNT"]).reshape(-1)[0])
    scores = np.asarray(outputs["SCORES"], dtype=np.float64).reshape(-1)[:count]
    labels = np.asarray(outputs["LABELS"]).reshape(-1)[:count]
    boxes = np.asarray(outputs["BOXES"], dtype=np.float64).reshape(-1, 4)[:count]
    return boxes, scores, labels


def _kept(scores: np.ndarray, options: DetectOptions) -> np.ndarray:
    """Rows scoring >= `score_threshold`, best first, at most `max_detections`."""
    keep = np.flatnonzero(scores >= options.score_threshold)
    return keep[np.argsort(-scores[keep], kind="stable")][: options.max_detections]


register_handler(DetectHandler())
