"""Helpers for the export tests: run the CLI, run a model.pt in a bare process, compare outputs.

References are built straight from the architectures (training/models.py, torchvision) and the
same state dicts, never through export's own wrappers, so a wrapper bug cannot hide itself.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.ops import box_iou

from training.models import DEMO_MEAN, DEMO_STD

ROOT = Path(__file__).resolve().parents[2]

# Runs in `python -I` (no cwd, no PYTHONPATH): torch plus torchvision's C++ op library, which
# Triton's libtorch backend links too; no torchvision Python package and nothing of this project.
FRESH_PROCESS_SCRIPT = """
import glob, importlib.util, os, sys
import torch
ops_dir = os.path.dirname(importlib.util.find_spec("torchvision").origin)
torch.ops.load_library(glob.glob(os.path.join(ops_dir, "_C*.so"))[0])
model = torch.jit.load(sys.argv[1], map_location="cpu")
with torch.no_grad():
    outputs = model(torch.load(sys.argv[2]))
outputs = list(outputs) if isinstance(outputs, tuple) else [outputs]
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torchvision", "export", "training", "service"))
torch.save({"outputs": outputs, "foreign_modules": loaded}, sys.argv[3])
"""


def run_export(
    *args: str, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """`python -m export ARGS` from the repository root, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "export", *args],
        check=False,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def export_in_process(*args: str) -> subprocess.CompletedProcess[str]:
    """`export.__main__.main(ARGS)` in this process, answered as `run_export` answers: its exit status
    and what it wrote to stdout and stderr. It spares the ~5 s a fresh interpreter spends importing
    torch; `run_export`'s callers (tests/export/test_pretrained.py) keep the real `python -m export`
    process, its one stderr line and its exit status covered."""
    from export.__main__ import main

    stdout, stderr = io.StringIO(), io.StringIO()
    sigterm = signal.getsignal(signal.SIGTERM)  # main() makes SIGTERM unwind like Ctrl-C
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level  # main()'s basicConfig must not outlive the call
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                status = main(list(args))
            except SystemExit as exit_:  # argparse's usage errors (status 2)
                status = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        signal.signal(signal.SIGTERM, sigterm)
        root.handlers[:] = handlers
        root.setLevel(level)
    return subprocess.CompletedProcess(
        ["python", "-m", "export", *args], status, stdout.getvalue(), stderr.getvalue()
    )


def run_in_fresh_process(model_pt: Path, image: torch.Tensor, work: Path) -> list[torch.Tensor]:
    """Outputs of `model_pt` on `image`, computed in a new interpreter with only torch.jit.load."""
    work.mkdir(parents=True, exist_ok=True)
    torch.save(image, work / "input.pt")
    done = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            FRESH_PROCESS_SCRIPT,
            str(model_pt),
            str(work / "input.pt"),
            str(work / "out.pt"),
        ],
        check=False,
        cwd=work,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"bare torch.jit.load run failed:\n{done.stderr[-3000:]}"
    result = torch.load(work / "out.pt")
    assert result["foreign_modules"] == [], f"the bare process imported {result['foreign_modules']}"
    return result["outputs"]


def run_onnx(model_onnx: Path, image: torch.Tensor) -> list[torch.Tensor]:
    """Outputs of `model_onnx` on `image` in a bare ONNX Runtime session (CPU), in the file's output order."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_onnx), providers=["CPUExecutionProvider"])
    (name,) = [tensor.name for tensor in session.get_inputs()]
    return [torch.from_numpy(output) for output in session.run(None, {name: image.numpy()})]


def normalise(
    image: torch.Tensor, mean: Sequence[float] = DEMO_MEAN, std: Sequence[float] = DEMO_STD
) -> torch.Tensor:
    """uint8 batch -> float normalised the way the model was trained."""
    return (image.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (fp32)."""
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


def assert_classifier_matches(
    model: nn.Module,
    image: torch.Tensor,
    outputs: Sequence[torch.Tensor],
    mean: Sequence[float] = DEMO_MEAN,
    std: Sequence[float] = DEMO_STD,
) -> None:
    """PROBS == softmax(model(normalised image)) within fp32 relative error 1e-4."""
    with torch.no_grad():
        expected = torch.softmax(model.eval()(normalise(image, mean, std)), dim=1)
    (probs,) = outputs
    assert probs.dtype == torch.float32 and probs.shape == expected.shape
    assert relative_error(probs, expected) <= 1e-4
    assert torch.allclose(probs.sum(dim=1), torch.ones(len(image)), atol=1e-5)


def assert_segmenter_matches(model: nn.Module, image: torch.Tensor, outputs: Sequence[torch.Tensor]) -> None:
    """MASK == argmax of the logits at input resolution, except where two classes tie within 1e-4."""
    with torch.no_grad():
        logits = model.eval()(normalise(image))
    (mask,) = outputs
    assert mask.dtype == torch.uint8 and mask.shape == (len(image), *image.shape[2:])
    top2 = logits.topk(2, dim=1).values
    decisive = (top2[:, 0] - top2[:, 1]) > 1e-4 * top2[:, 0].abs().clamp_min(1.0)
    expected = logits.argmax(dim=1).to(torch.uint8)
    assert decisive.float().mean() > 0.99, "test input too ambiguous to compare masks"
    assert torch.equal(mask[decisive], expected[decisive])
    assert len(expected.unique()) > 1, "a one-class mask cannot show the argmax is right"


def assert_detector_matches(
    model: nn.Module, image: torch.Tensor, outputs: Sequence[torch.Tensor], k: int = 100
) -> None:
    """Same count per image; every reference box has a same-label match with IoU >= 0.99; zero padding."""
    with torch.no_grad():
        detections = model.eval()(list(image.float() / 255))
    boxes, scores, labels, count = outputs
    batch = len(image)
    assert (boxes.shape, scores.shape, labels.shape, count.shape) == (
        (batch, k, 4),
        (batch, k),
        (batch, k),
        (batch, 1),
    )
    assert (boxes.dtype, scores.dtype, labels.dtype, count.dtype) == (
        torch.float32,
        torch.float32,
        torch.int64,
        torch.int32,
    )
    assert int(count.sum()) > 0, "no detections at all: the comparison would prove nothing"
    for i, expected in enumerate(detections):
        n = int(count[i, 0])
        assert n == len(expected["boxes"])
        assert torch.all(scores[i, 1:n] <= scores[i, : n - 1]), "SCORES must be descending"
        assert not boxes[i, n:].any() and not scores[i, n:].any() and not labels[i, n:].any()
        if n == 0:
            continue
        iou = box_iou(expected["boxes"], boxes[i, :n])
        iou[expected["labels"][:, None] != labels[i, :n][None, :]] = 0
        assert float(iou.max(dim=1).values.min()) >= 0.99
        assert relative_error(scores[i, :n], expected["scores"].sort(descending=True).values) <= 1e-4


def assert_detections_agree(
    expected: dict[str, np.ndarray], actual: dict[str, np.ndarray], min_matched: float = 1.0
) -> None:
    """Two runtimes' detector outputs (batch dim kept): the same COUNT per image, zero padding, and at least
    `min_matched` of the expected boxes per image matched by a same-label box with IoU >= 0.99 whose
    score is within 1e-4 relative."""
    assert np.array_equal(actual["COUNT"], expected["COUNT"])
    assert int(expected["COUNT"].sum()) > 0, "no detections at all: the comparison would prove nothing"
    for i, (n,) in enumerate(expected["COUNT"]):
        assert not actual["BOXES"][i, n:].any() and not actual["SCORES"][i, n:].any()
        assert not actual["LABELS"][i, n:].any()
        if n == 0:
            continue
        iou = box_iou(torch.from_numpy(expected["BOXES"][i, :n]), torch.from_numpy(actual["BOXES"][i, :n]))
        iou[torch.from_numpy(expected["LABELS"][i, :n][:, None] != actual["LABELS"][i, :n][None, :])] = 0
        best, match = iou.max(dim=1)
        matched = best >= 0.99
        assert float(matched.float().mean()) >= min_matched, f"image {i}: {int((~matched).sum())} of {n} unmatched"
        scores = torch.from_numpy(actual["SCORES"][i, :n])[match[matched]], torch.from_numpy(expected["SCORES"][i, :n])[matched]
        assert relative_error(*scores) <= 1e-4
