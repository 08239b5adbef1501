"""/classify: top-k classes from the classifier's softmax `PROBS`."""

from __future__ import annotations

import numpy as np

from service.contract import ModelContract
from service.handlers.registry import register_handler
from service.handlers.common import Geometry, Handler, TableSpec, label_of, padded
from service.imaging.annotate import draw_classification
from service.schemas import (
    ClassificationResult,
    ClassifyOptions,
    ClassifyRequest,
    ClassifyResponse,
    ClassScore,
    ImageSize,
)


class ClassifyHandler(Handler[ClassifyOptions, ClassificationResult]):
    task = "classification"
    model = "classifier"
    endpoint = "/classify"
    options = ClassifyOptions
    request = ClassifyRequest
    response = ClassifyResponse
    tables = (TableSpec("LABELS", "BYTES", (-1, -1)), TableSpec("SCORES", "FP32", (-1, -1)),
              TableSpec("CLASS_IDS", "INT32", (-1, -1)))  # fmt: skip

    def postprocess(
        self, outputs: dict[str, np.ndarray], geometry: Geometry, options: ClassifyOptions, contract: ModelContract
    ) -> ClassificationResult:
        """Return the `top_k` most probable classes, best first."""
        probs = np.asarray(outputs["PROBS"], dtype=np.float64).reshape(-1)
        top = np.argsort(-probs, kind="stable")[: options.top_k]
        predictions = [
            ClassScore(class_id=int(i), label=label_of(contract.labels, int(i)), score=float(np.clip(probs[i], 0, 1)))
            for i in top
        ]
        return ClassificationResult(image=ImageSize(width=geometry.width, height=geometry.height), predictions=predictions)

    def draw(self, image: np.ndarray, result: ClassificationResult) -> np.ndarray:
        return draw_classification(image, result)

    def table(self, results: list[ClassificationResult]) -> dict[str, np.ndarray]:
        """Per image, its classes best first: `[n, k]` labels, scores and class ids."""
        rows = [result.predictions for result in results]
        return {
            "LABELS": padded([[p.label.encode() for p in row] for row in rows], b"", "BYTES"),
            "SCORES": padded([[p.score for p in row] for row in rows], 0.0, "FP32"),
            "CLASS_IDS": padded([[p.class_id for p in row] for row in rows], -1, "INT32"),
        }


register_handler(ClassifyHandler())
