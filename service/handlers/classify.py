"""/classify: top-k classes from the classifier's softmax `PROBS`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from service.contract import ModelContract
from service.handlers.registry import register_handler
from service.handlers.common import ExplainTarget, Geometry, Handler, TableSpec, label_of, padded
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

    explain_methods = ("occlusion", "saliency", "gradcam")

    def check_explain(self, options: ClassifyOptions, contract: ModelContract) -> None:
        explain_class_id(options.explain_class, contract.labels)

    def explain_targets(
        self,
        outputs: dict[str, np.ndarray],
        geometry: Geometry,
        options: ClassifyOptions,
        contract: ModelContract,
        top: int,
    ) -> list[ExplainTarget]:
        """`explain_class`, or the top class."""
        probs = np.asarray(outputs["PROBS"], dtype=np.float64).reshape(-1)
        class_id = explain_class_id(options.explain_class, contract.labels)
        if class_id is None:
            class_id = int(np.argsort(-probs, kind="stable")[0])
        return [ExplainTarget(class_id, label_of(contract.labels, class_id), float(probs[class_id]))]

    def explain_scores(
        self, outputs: dict[str, np.ndarray], targets: Sequence[ExplainTarget], contract: ModelContract
    ) -> np.ndarray:
        """The target class's probability."""
        probs = np.asarray(outputs["PROBS"], dtype=np.float64).reshape(-1)
        return np.array([probs[target.class_id] for target in targets])

    def with_explanations(
        self, result: ClassificationResult, explained: Sequence[tuple[ExplainTarget, Any]]
    ) -> ClassificationResult:
        return result.model_copy(update={"explanation": explained[0][1]}) if explained else result

    def table(self, results: list[ClassificationResult]) -> dict[str, np.ndarray]:
        """Per image, its classes best first: `[n, k]` labels, scores and class ids."""
        rows = [result.predictions for result in results]
        return {
            "LABELS": padded([[p.label.encode() for p in row] for row in rows], b"", "BYTES"),
            "SCORES": padded([[p.score for p in row] for row in rows], 0.0, "FP32"),
            "CLASS_IDS": padded([[p.class_id for p in row] for row in rows], -1, "INT32"),
        }


def explain_class_id(name: str | None, labels: tuple[str, ...]) -> int | None:
    """The class `explain_class` names (a label, or a class id), None for the default; ValueError if unknown."""
    if name is None:
        return None
    if name in labels:
        return labels.index(name)
    if name.strip().isdigit() and int(name) < len(labels):
        return int(name)
    raise ValueError(
        f"explain_class {name[:64]!r} is not a class of the classifier: one of {', '.join(labels)} "
        f"or 0-{len(labels) - 1}"
    )


register_handler(ClassifyHandler())
