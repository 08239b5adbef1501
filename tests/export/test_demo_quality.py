"""The exported demo models (model_repository/, from `make models`) keep the trained quality.

Random-init parity cannot show that the graph's preprocessing is the one training used; the
trained weights can: each model.pt, fed raw uint8 held-out scenes exactly as its contract says,
must still reach training's bar on training's whole held-out set (metrics from torchmetrics).
"""

from __future__ import annotations

import pytest
import torch
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex
from torchmetrics.detection import MeanAveragePrecision

from service.backends.torchscript import load_torchscript
from service.contract import ModelContract, load_contract
from tests.export.support import ROOT
from training.data import eval_seeds, render_classification, render_scenes
from training.shapes import CLASSES
from training.train import DemoConfig

REPOSITORY = ROOT / "model_repository"
HELD_OUT = DemoConfig().eval_images  # a subset would judge the bar on fewer images than training did
BATCH = 50


def exported_demo(model: str) -> tuple[ModelContract, torch.jit.ScriptModule]:
    """The demo model's contract and TorchScript module from model_repository/."""
    if not (REPOSITORY / model / "config.pbtxt").is_file():
        pytest.fail(f"{REPOSITORY / model} missing: run `make models` (python -m export all --weights demo)")
    contract = load_contract(REPOSITORY, model)
    if contract.parameters.get("weights") != "demo":
        pytest.skip(
            f"{REPOSITORY / model} holds {contract.parameters.get('weights')} weights, not the demo's"
        )
    return contract, load_torchscript(REPOSITORY / model / "1" / "model.pt", torch.device("cpu"))


def bar(model: str) -> float:
    return DemoConfig().bars()[model][1]


@torch.inference_mode()
def test_exported_classifier_accuracy() -> None:
    contract, module = exported_demo("classifier")
    size, _ = contract.input_size
    assert contract.resize_size == size, "demo scenes are rendered at the model size: no resize/crop needed"
    data = render_classification(eval_seeds(HELD_OUT), size, "held-out classification")
    metric = MulticlassAccuracy(num_classes=len(contract.labels), average="micro")
    metric.update(module(data.images), data.labels)
    assert float(metric.compute()) >= bar("classifier")


@torch.inference_mode()
def test_exported_detector_map50() -> None:
    contract, module = exported_demo("detector")
    config = DemoConfig()
    size, _ = contract.input_size
    data = render_scenes(eval_seeds(HELD_OUT), size, config.min_shapes, config.max_shapes, "held-out scenes")
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", iou_thresholds=[0.5])
    for start in range(0, HELD_OUT, BATCH):
        boxes, scores, labels, count = module(data.images[start : start + BATCH])
        preds = [
            {"boxes": b[: int(n)], "scores": s[: int(n)], "labels": lab[: int(n)]}
            for b, s, lab, n in zip(boxes, scores, labels, count[:, 0], strict=True)
        ]
        targets = [
            {"boxes": b, "labels": lab}
            for b, lab in zip(
                data.boxes[start : start + BATCH], data.labels[start : start + BATCH], strict=True
            )
        ]
        metric.update(preds, targets)
    assert float(metric.compute()["map"]) >= bar("detector")


@torch.inference_mode()
def test_exported_segmenter_miou() -> None:
    contract, module = exported_demo("segmenter")
    config = DemoConfig()
    size, _ = contract.input_size
    data = render_scenes(eval_seeds(HELD_OUT), size, config.min_shapes, config.max_shapes, "held-out scenes")
    metric = MulticlassJaccardIndex(num_classes=len(contract.labels), average="macro")
    for start in range(0, HELD_OUT, BATCH):
        metric.update(
            module(data.images[start : start + BATCH]).long(), data.masks[start : start + BATCH].long()
        )
    assert float(metric.compute()) >= bar("segmenter")


def test_repository_labels_are_the_demo_classes() -> None:
    expected = {
        "classifier": CLASSES,
        "detector": ("__background__", *CLASSES),
        "segmenter": ("background", *CLASSES),
    }
    for model, labels in expected.items():
        assert exported_demo(model)[0].labels == labels
