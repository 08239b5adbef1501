"""`--weights demo` reads artifacts like `python -m training` writes them (meta.json, report.json).

The demo directory here holds the session's random-init checkpoints, so no training runs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from service.contract import load_contract
from tests.export.conftest import Checkpoint
from tests.export.support import export_in_process
from training.models import DEMO_MEAN, DEMO_STD
from training.shapes import CLASSES

IMAGE_SIZE = {
    "classifier": 32,
    "detector": 96,
    "segmenter": 64,
}  # unlike the defaults, to see meta.json is read


def fake_demo_dir(root: Path, checkpoints: dict[str, Checkpoint], passed: bool) -> Path:
    demo = root / "demo"
    demo.mkdir()
    for name in ("classifier", "detector"):
        shutil.copyfile(checkpoints[name].path, demo / f"{name}.pt")
    # The session's segmenter checkpoint is a .safetensors file; training writes torch files.
    torch.save(load_file(str(checkpoints["segmenter"].path)), demo / "segmenter.pt")
    meta = {
        "classes": list(CLASSES),
        "image_size": IMAGE_SIZE,
        "mean": list(DEMO_MEAN),
        "std": list(DEMO_STD),
    }
    (demo / "meta.json").write_text(json.dumps(meta))
    (demo / "report.json").write_text(json.dumps({"passed": passed}))
    return demo


def test_demo_export_of_all_models(checkpoints: dict[str, Checkpoint], tmp_path: Path) -> None:
    demo = fake_demo_dir(tmp_path, checkpoints, passed=True)
    out, cpu_out = tmp_path / "repo", tmp_path / "cpu"
    done = export_in_process(
        "all", "--weights", "demo", "--demo-dir", str(demo), "--out", str(out), "--cpu-out", str(cpu_out)
    )
    assert done.returncode == 0, done.stderr
    for model, size in IMAGE_SIZE.items():
        contract = load_contract(out, model)
        assert contract.input_size == (size, size)
        assert contract.parameters["weights"] == "demo"
        assert contract.labels == checkpoints[model].labels
        assert load_contract(cpu_out, model).labels == contract.labels
    assert load_contract(out, "classifier").resize_size == IMAGE_SIZE["classifier"]


def test_demo_that_missed_its_bars_is_refused(checkpoints: dict[str, Checkpoint], tmp_path: Path) -> None:
    demo = fake_demo_dir(tmp_path, checkpoints, passed=False)
    out, cpu_out = tmp_path / "repo", tmp_path / "cpu"
    done = export_in_process(
        "all", "--weights", "demo", "--demo-dir", str(demo), "--out", str(out), "--cpu-out", str(cpu_out)
    )
    assert done.returncode == 1
    assert len(done.stderr.strip().splitlines()) == 1 and "quality bars" in done.stderr, done.stderr
    assert not out.exists() and not cpu_out.exists()
