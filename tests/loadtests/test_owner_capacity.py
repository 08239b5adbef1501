"""loadtests/owner_capacity.py: the null model keeps the contract it replaces, and a short run against a real
model owner (`python -m service.owner_app --socket`) is answered in batches without errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from loadtests.owner_capacity import main, null_repository
from service.backends.torchscript import TorchScriptModel
from service.contract import load_contract


def test_null_model_keeps_the_contract(model_repository: Path, tmp_path: Path) -> None:
    null_repository(model_repository, "classifier", tmp_path, max_batch=16, size=96)
    source, null = load_contract(model_repository, "classifier"), load_contract(tmp_path, "classifier")
    assert null.max_batch_size == 16
    assert tuple(null.inputs[0].dims) == (3, 96, 96)
    assert null.resize_size == 96
    assert (null.task, null.preprocess, null.labels) == (source.task, source.preprocess, source.labels)
    assert [(o.name, o.dims) for o in null.outputs] == [(o.name, o.dims) for o in source.outputs]
    model = TorchScriptModel(tmp_path, "classifier", device="cpu")
    images = [np.full((3, 96, 96), value, dtype=np.uint8) for value in (0, 7, 255)]
    outputs = model.infer(images)
    assert [out["PROBS"].shape for out in outputs] == [(len(source.labels),)] * 3
    assert [float(out["PROBS"][0]) for out in outputs] == [0.0, 7.0, 255.0]  # each row its own image


def test_short_run_is_answered_in_batches(model_repository: Path, tmp_path: Path) -> None:
    out = tmp_path / "capacity.json"
    args = ["--repository", str(model_repository), "--seconds", "1", "--warm", "0.3", "--clients", "2",
            "--depth", "16", "--max-batch", "8", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert result["errors"] == 0
    assert result["requests_per_s"] > 0 and result["owner_cpu_ms_per_request"] > 0
    sizes = {int(size) for size in result["batch_sizes"]}
    assert max(sizes) <= 8 and result["mean_batch"] > 1  # 32 outstanding requests meet in batches
