"""/detect: the detector's padded `BOXES/SCORES/LABELS/COUNT` → boxes on the original image."""

from __future__ import annotations

import numpy as np

from service.contract import ModelContract
from service.handlers.common import Geometry, Handler, boxes_to_original, label_of
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
