"""The demo models in artifacts/demo (from `python -m training`) meet every bar, now as when trained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from support.seeds import fresh_seeds
from training import evaluate
from training.data import render_classification, render_scenes
from training.models import build_demo_classifier, build_demo_detector, build_demo_segmenter
from training.shapes import CLASSES

DEMO = Path(__file__).resolve().parents[2] / "artifacts" / "demo"
REPORT = DEMO / "report.json"
CPU = torch.device("cpu")
# Fresh scenes, disjoint from both the training seeds and the report's held-out set.
FRESH_SEEDS = fresh_seeds(120)


@pytest.fixture(scope="module", autouse=True)
def report() -> dict:
    """The training report; its absence fails every test here (the demo models are not optional)."""
    if not REPORT.is_file():
        pytest.fail(
            f"{REPORT} is missing: `make models` (or `python -m training`) trains the demo models, or copies "
            "them from the cache outside the clone, and writes it"
        )
    return json.loads(REPORT.read_text())


@pytest.fixture(scope="module")
def meta() -> dict:
    return json.loads((DEMO / "meta.json").read_text())


def test_report_meets_every_bar(report: dict) -> None:
    assert set(report["models"]) == {"classifier", "detector", "segmenter"}
    for name, model in report["models"].items():
        assert model["value"] >= model["bar"], f"{name}: {model['metric']} {model['value']} < {model['bar']}"
        assert model["passed"] is True
    assert report["passed"] is True
    assert {"wall_seconds", "cpu_seconds"} <= set(report["total"])


def test_saved_classifier_still_classifies_fresh_images(meta: dict) -> None:
    model = build_demo_classifier(len(meta["classes"]))
    model.load_state_dict(torch.load(DEMO / "classifier.pt", weights_only=True))
    data = render_classification(FRESH_SEEDS, meta["image_size"]["classifier"], "fresh")
    assert evaluate.classification_top1(model, data, CPU) >= 0.95


def test_saved_detector_still_detects_on_fresh_scenes(meta: dict) -> None:
    size = meta["image_size"]["detector"]
    model = build_demo_detector(len(meta["classes"]), size)
    model.load_state_dict(torch.load(DEMO / "detector.pt", weights_only=True))
    data = render_scenes(FRESH_SEEDS[:60], size, 1, 4, "fresh")
    assert evaluate.detection_map50(model, data, CPU) >= 0.75


def test_saved_segmenter_still_segments_fresh_scenes(meta: dict) -> None:
    size = meta["image_size"]["segmenter"]
    model = build_demo_segmenter(len(meta["classes"]) + 1)
    model.load_state_dict(torch.load(DEMO / "segmenter.pt", weights_only=True))
    data = render_scenes(FRESH_SEEDS[:60], size, 1, 4, "fresh")
    assert evaluate.segmentation_miou(model, data, len(CLASSES) + 1, CPU) >= 0.80
