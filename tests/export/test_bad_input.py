"""Bad input to `python -m export` (its main(), in this process): one clear line on stderr, non-zero exit,
nothing half-written."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tasks import MODELS
from tests.export.conftest import Checkpoint, Exported
from tests.export.support import export_in_process


def assert_clean_failure(done: subprocess.CompletedProcess[str], *expected: str) -> str:
    """Non-zero exit, exactly one stderr line that says `expected`, no traceback."""
    assert done.returncode != 0, done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def tree_digest(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `root` (empty if it does not exist)."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def assert_nothing_written(out: Path, cpu_out: Path) -> None:
    for repo in (out, cpu_out):
        assert not repo.exists() or not any(repo.iterdir()), f"{repo} was written: {list(repo.iterdir())}"
        if repo.parent.exists():
            assert not [p for p in repo.parent.iterdir() if ".staging-" in p.name], (
                "staging directory left behind"
            )


def targets(tmp_path: Path) -> list[str]:
    return ["--out", str(tmp_path / "repo"), "--cpu-out", str(tmp_path / "cpu" / "repo")]


def test_unknown_model(tmp_path: Path) -> None:
    done = export_in_process("resnet9000", "--weights", "demo", *targets(tmp_path))
    assert_clean_failure(done, "invalid choice", "resnet9000")
    assert_nothing_written(tmp_path / "repo", tmp_path / "cpu" / "repo")


def test_missing_checkpoint(checkpoints: dict[str, Checkpoint], tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.pt"
    done = export_in_process(
        "classifier",
        "--weights",
        "checkpoint",
        "--checkpoint",
        str(missing),
        "--classes",
        str(checkpoints["classifier"].classes),
        *targets(tmp_path),
    )
    assert_clean_failure(done, str(missing), "not found")
    assert_nothing_written(tmp_path / "repo", tmp_path / "cpu" / "repo")


@pytest.mark.parametrize("model", MODELS)
def test_class_count_not_matching_the_checkpoint(
    checkpoints: dict[str, Checkpoint], model: str, tmp_path: Path
) -> None:
    checkpoint = checkpoints[model]
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(checkpoint.labels[:-1]) + "\n")  # one name short
    done = export_in_process(
        model,
        "--weights",
        "checkpoint",
        "--checkpoint",
        str(checkpoint.path),
        "--classes",
        str(classes),
        *targets(tmp_path),
    )
    line = assert_clean_failure(
        done, f"lists {len(checkpoint.labels) - 1} names", f"predicts {len(checkpoint.labels)}"
    )
    assert str(classes) in line
    assert_nothing_written(tmp_path / "repo", tmp_path / "cpu" / "repo")


def test_detector_classes_must_start_with_background(
    checkpoints: dict[str, Checkpoint], tmp_path: Path
) -> None:
    checkpoint = checkpoints["detector"]
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join([*checkpoint.labels[1:], "extra"]) + "\n")
    done = export_in_process(
        "detector",
        "--weights",
        "checkpoint",
        "--checkpoint",
        str(checkpoint.path),
        "--classes",
        str(classes),
        *targets(tmp_path),
    )
    assert_clean_failure(done, "__background__")
    assert_nothing_written(tmp_path / "repo", tmp_path / "cpu" / "repo")


def test_checkpoint_of_another_architecture(checkpoints: dict[str, Checkpoint], tmp_path: Path) -> None:
    done = export_in_process(
        "classifier",
        "--weights",
        "checkpoint",
        "--arch",
        "resnet50",
        "--checkpoint",
        str(checkpoints["classifier"].path),
        "--classes",
        str(checkpoints["classifier"].classes),
        *targets(tmp_path),
    )
    assert_clean_failure(done, "does not fit the architecture")
    assert_nothing_written(tmp_path / "repo", tmp_path / "cpu" / "repo")


def test_unreadable_checkpoint(checkpoints: dict[str, Checkpoint], tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    done = export_in_process(
        "classifier",
        "--weights",
        "checkpoint",
        "--checkpoint",
        str(garbage),
        "--classes",
        str(checkpoints["classifier"].classes),
        *targets(tmp_path),
    )
    assert_clean_failure(done, "cannot read checkpoint", str(garbage))
    assert_nothing_written(tmp_path / "repo", tmp_path / "cpu" / "repo")


def test_output_below_a_regular_file(checkpoints: dict[str, Checkpoint], tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a directory should be")
    checkpoint = checkpoints["classifier"]
    done = export_in_process(
        "classifier",
        "--weights",
        "checkpoint",
        "--checkpoint",
        str(checkpoint.path),
        "--classes",
        str(checkpoint.classes),
        "--out",
        str(blocker / "repo"),
        "--cpu-out",
        str(tmp_path / "cpu" / "repo"),
    )
    assert_clean_failure(done, "cannot write to", str(blocker))
    assert blocker.read_text() == "a file where a directory should be"
    assert_nothing_written(tmp_path / "cpu" / "repo", tmp_path / "cpu" / "repo")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories anyway")
def test_output_in_a_read_only_directory(checkpoints: dict[str, Checkpoint], tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    checkpoint = checkpoints["classifier"]
    try:
        done = export_in_process(
            "classifier",
            "--weights",
            "checkpoint",
            "--checkpoint",
            str(checkpoint.path),
            "--classes",
            str(checkpoint.classes),
            "--out",
            str(locked / "repo"),
            "--cpu-out",
            str(tmp_path / "cpu" / "repo"),
        )
        assert_clean_failure(done, "cannot write to", str(locked))
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def test_failed_export_leaves_an_existing_repository_untouched(
    exported: Exported, checkpoints: dict[str, Checkpoint], tmp_path: Path
) -> None:
    out, cpu_out = tmp_path / "repo", tmp_path / "cpu" / "repo"
    shutil.copytree(exported.out, out)
    shutil.copytree(exported.cpu_out, cpu_out)
    before = (tree_digest(out), tree_digest(cpu_out))
    # A readable checkpoint whose head has one class fewer than the class-names file.
    state = torch.load(checkpoints["classifier"].path, weights_only=True)
    state["fc.weight"], state["fc.bias"] = state["fc.weight"][:-1], state["fc.bias"][:-1]
    smaller = tmp_path / "smaller.pt"
    torch.save(state, smaller)
    done = export_in_process(
        "classifier",
        "--weights",
        "checkpoint",
        "--checkpoint",
        str(smaller),
        "--classes",
        str(checkpoints["classifier"].classes),
        "--out",
        str(out),
        "--cpu-out",
        str(cpu_out),
    )
    assert_clean_failure(done, "predicts")
    assert (tree_digest(out), tree_digest(cpu_out)) == before
    assert not [p for p in out.parent.iterdir() if ".staging-" in p.name]


def test_pretrained_segmenter_does_not_exist(tmp_path: Path) -> None:
    done = export_in_process("segmenter", "--weights", "pretrained", *targets(tmp_path))
    assert_clean_failure(done, "no pretrained", "U-Net")
    assert_nothing_written(tmp_path / "repo", tmp_path / "cpu" / "repo")


def test_checkpoint_source_needs_one_model(tmp_path: Path) -> None:
    done = export_in_process("all", "--weights", "checkpoint", *targets(tmp_path))
    assert_clean_failure(done, "one model at a time")
    assert_nothing_written(tmp_path / "repo", tmp_path / "cpu" / "repo")


def test_both_repositories_in_one_directory(tmp_path: Path) -> None:
    done = export_in_process(
        "all", "--weights", "demo", "--out", str(tmp_path / "repo"), "--cpu-out", str(tmp_path / "repo")
    )
    assert_clean_failure(done, "two directories")
    assert_nothing_written(tmp_path / "repo", tmp_path / "repo")
