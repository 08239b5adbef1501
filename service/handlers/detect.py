"""/detect: the detector's padded `BOXES/SCORES/LABELS/COUNT` → boxes on the original image."""

from __future__ import annotations

import numpy as np

from service.contract import ModelContract
from service.handlers.registry import register_handler
from service.handlers.common import Geometry, Handler, TableSpec, boxes_to_original, label_of, padded
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
        count = int(np.asarray(outputs["COUNT"]).reshape(-1)[0])
        scores = np.asarray(outputs["SCORES"], dtype=np.float64).reshape(-1)[:count]
        labels = np.asarray(outputs["LABELS"]).reshape(-1)[:count]
        boxes = np.asarray(outputs["BOXES"], dtype=np.float64).reshape(-1, 4)[:count]
        keep = np.flatnonzero(scores >= options.score_threshold)
        keep = keep[np.argsort(-scores[keep], kind="stable")][: options.max_detections]
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


register_handler(DetectHandler())
