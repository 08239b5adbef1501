"""`python -m export --version`: a new version written next to the old one, which stays as it was."""

from __future__ import annotations

import json
from pathlib import Path

from service.backends.torchscript import repository_versions
from service.contract import load_contract
from tests.export.conftest import Checkpoint
from tests.export.support import export_in_process
from tests.export.test_demo_source import fake_demo_dir


def test_a_new_version_is_written_next_to_the_old_one(checkpoints: dict[str, Checkpoint], tmp_path: Path) -> None:
    demo = fake_demo_dir(tmp_path, checkpoints, passed=True)
    out, cpu_out = tmp_path / "repo", tmp_path / "cpu"
    common = ["classifier", "--weights", "demo", "--demo-dir", str(demo), "--out", str(out), "--cpu-out", str(cpu_out)]
    first = export_in_process(*common, "--no-onnx")
    assert first.returncode == 0, first.stderr
    old = (out / "classifier" / "1" / "model.pt").stat()
    second = export_in_process(*common, "--no-onnx", "--version", "next")
    assert second.returncode == 0, second.stderr
    for repository in (out, cpu_out):
        assert repository_versions(repository, "classifier") == ["1", "2"]
    kept = (out / "classifier" / "1" / "model.pt").stat()
    assert (kept.st_ino, kept.st_mtime_ns) == (old.st_ino, old.st_mtime_ns)  # version 1 untouched
    assert (cpu_out / "classifier" / "2" / "model.py").is_file()
    assert json.loads((out / "classifier" / "2" / "version.json").read_text()) == {"weights": "demo"}
    assert load_contract(out, "classifier").labels == checkpoints["classifier"].labels
    again = export_in_process(*common, "--no-onnx", "--version", "2")
    assert again.returncode == 1 and "exists already" in again.stderr, again.stderr
    assert repository_versions(out, "classifier") == ["1", "2"]
