"""The GPU check's CPU rehearsal end to end (export, reload, parity, throughput, JSON), and its
comparisons on outputs that do and do not match."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from export.wrappers import ClassifierWrapper, script
from loadtests.gpu.parity import TOLERANCES, check_parity, detector_checks
from tasks import MODELS
from tests.conftest import ROOT


def test_dry_run_writes_parity_and_throughput_for_every_model(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "loadtests.gpu_check", "--dry-run", "--out", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    output = (done.stdout + done.stderr)[-4000:]
    assert done.returncode == 0, output
    assert "FutureWarning" not in done.stderr, output

    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert results["dry_run"] is True and results["passed"] is True
    assert results["device"]["type"] == "cpu" and results["versions"]["torch"] == torch.__version__
    assert set(results["parity"]) == set(MODELS)
    for model in MODELS:
        parity = results["parity"][model]
        assert parity["passed"] is True and parity["images"] == 2 and parity["input_size"] == 64, parity
        assert len(parity["checks"]) >= 2
        for check in parity["checks"]:
            assert check["tolerance"] == TOLERANCES[f"{check['output']} {check['metric']}"]
            assert math.isfinite(check["value"]) and 0 <= check["value"] <= check["tolerance"], check
            assert check["passed"] is True

        export = results["export"][model]
        assert export["command"].startswith(f"python -m export {model} --weights checkpoint")
        assert export["input_size"] == 64 and export["model_pt_mib"] > 0

        throughput = results["throughput"][model]
        assert [(r["stage"], r["batch_size"]) for r in throughput] == [
            ("model", 1),
            ("model", 2),
            ("pipeline", 2),
        ]
        for row in throughput:
            assert row["batches"] >= 1 and row["images_per_s"] > 0 and row["batch_ms_p50"] > 0, row
    # Real architectures, not stand-ins: ImageNet's and COCO's class lists, the U-Net's shapes.
    assert [results["export"][m]["labels"] for m in MODELS] == [1000, 91, 6]
    assert results["parity"]["detector"]["detections"] > 0
    assert results["parity"]["segmenter"]["mask_classes"] > 1
    assert results["bench"]["status"] == "skipped"


def test_without_cuda_a_real_run_stops_with_one_line(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    command = [sys.executable, "-m", "loadtests.gpu_check", "--out", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 1
    assert done.stderr.startswith("gpu_check: error: no CUDA device") and done.stderr.count("\n") == 1, (
        done.stderr
    )
    assert "--dry-run" in done.stderr
    assert not (tmp_path / "gpu_check.json").exists()


def _tiny_classifier(seed: int, classes: int = 5) -> ClassifierWrapper:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, classes))
    return ClassifierWrapper(net, [0.5] * 3, [0.25] * 3).eval()


def test_parity_fails_when_the_scripted_model_differs() -> None:
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    same = check_parity(
        "classifier", _tiny_classifier(0), script(_tiny_classifier(0)), images, warmup_calls=1
    )
    other = check_parity(
        "classifier", _tiny_classifier(0), script(_tiny_classifier(1)), images, warmup_calls=0
    )
    assert same["passed"] and all(c["value"] == 0 for c in same["checks"])
    assert not other["passed"]
    logits = next(c for c in other["checks"] if c["output"] == "logits")
    assert logits["value"] > logits["tolerance"] and not logits["passed"]
    wider = check_parity("classifier", _tiny_classifier(0), script(_tiny_classifier(0, 6)), images, 0)
    assert [(c["output"], c["value"], c["passed"]) for c in wider["checks"]] == [("outputs", 1, False)]


def _detections(boxes: list[list[float]], scores: list[float], labels: list[int]) -> list[torch.Tensor]:
    """One image's detector outputs, zero-padded to K = 4 rows."""
    k, n = 4, len(boxes)
    padded_boxes, padded_scores, padded_labels = torch.zeros(1, k, 4), torch.zeros(1, k), torch.zeros(1, k)
    padded_boxes[0, :n] = torch.tensor(boxes)
    padded_scores[0, :n] = torch.tensor(scores)
    padded_labels[0, :n] = torch.tensor(labels, dtype=torch.float32)
    return [padded_boxes, padded_scores, padded_labels, torch.tensor([[float(n)]])]


def test_detector_checks_match_boxes_not_rows() -> None:
    eager = _detections([[0, 0, 10, 10], [5, 5, 20, 20]], [0.9, 0.9], [1, 2])
    swapped = _detections([[5, 5, 20, 20], [0, 0, 10, 10]], [0.9, 0.9], [2, 1])
    shifted = _detections([[0, 0, 10, 11], [5, 5, 20, 20]], [0.9, 0.9], [1, 2])
    relabelled = _detections([[0, 0, 10, 10], [5, 5, 20, 20]], [0.9, 0.9], [3, 2])
    more = _detections([[0, 0, 10, 10], [5, 5, 20, 20], [1, 1, 2, 2]], [0.9, 0.9, 0.1], [1, 2, 4])
    fewer = _detections([[0, 0, 10, 10]], [0.9], [1])

    def failed(scripted: list[torch.Tensor]) -> set[str]:
        return {c["output"] for c in detector_checks(eager, scripted) if not c["passed"]}

    assert failed(swapped) == set()  # equal scores in either order are the same answer
    assert failed(shifted) == {"BOXES"}
    assert failed(relabelled) == {"BOXES"}  # no same-label box: reported as null, and failed
    assert next(c for c in detector_checks(eager, relabelled) if c["output"] == "BOXES")["value"] is None
    assert failed(more) == {"COUNT"}
    assert failed(fewer) == {"COUNT", "BOXES"}
