"""/classify: top-k classes from the classifier's softmax `PROBS`."""

from __future__ import annotations

import numpy as np

from service.contract import ModelContract
from service.handlers.common import Geometry, Handler, label_of
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
