"""The demo models' cache outside the clone: keyed on what decides the weights, written atomically."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import PIL
import pytest
import torch
import torchmetrics
import torchvision

from tests.training.test_train import CPU, TINY
from training import cache as training_cache
from training.cache import default_cache_dir, entry_dir
from training.train import CHECKPOINTS, DemoConfig, cached_report, key_inputs, run, training_key

ROOT = Path(__file__).resolve().parents[2]
FILES = (*CHECKPOINTS, "meta.json", "report.json")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the clone's training code and README, to edit."""
    copy = tmp_path / "clone"
    shutil.copytree(ROOT / "training", copy / "training", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "README.md", copy / "README.md")
    return copy


def _key(tree: Path, config: DemoConfig = TINY, threads: int = 2) -> str:
    return training_key(config, CPU, threads, sources=tree / "training")


def test_the_key_is_the_same_for_an_identical_tree(tree: Path) -> None:
    assert _key(tree) == training_key(TINY, CPU, 2), "the copy keys like the clone itself"


@pytest.mark.parametrize(
    "name", ["train.py", "shapes.py", "data.py", "models.py", "evaluate.py", "__main__.py"]
)
def test_editing_training_code_changes_the_key(tree: Path, name: str) -> None:
    before = _key(tree)
    with (tree / "training" / name).open("a") as source:
        source.write("\n_EDIT = 1\n")
    assert _key(tree) != before, f"an edit of training/{name} must retrain"


def test_comments_docstrings_and_layout_keep_the_key(tree: Path) -> None:
    before = _key(tree)
    models = tree / "training" / "models.py"
    text = models.read_text()
    edited = text.replace('"""', '"""Reworded. ', 1)  # the module's docstring
    edited = edited.replace("    def forward(", "    # a comment\n\n    def forward(", 1)
    edited = edited.replace("DEMO_WIDTH = 32", "DEMO_WIDTH = (\n    32\n)  # layout", 1)
    assert edited != text
    models.write_text(edited)
    assert _key(tree) == before
    models.write_text(edited.replace("DEMO_WIDTH = (\n    32\n)", "DEMO_WIDTH = (\n    33\n)", 1))
    assert _key(tree) != before, "a changed value is a changed training"


def test_a_new_training_module_changes_the_key(tree: Path) -> None:
    before = _key(tree)
    (tree / "training" / "augment.py").write_text("SCALE = 2\n")
    assert _key(tree) != before


def test_editing_what_does_not_decide_the_weights_keeps_the_key(tree: Path) -> None:
    before = _key(tree)
    with (tree / "README.md").open("a") as readme:
        readme.write("\nA new paragraph.\n")
    with (tree / "training" / "cache.py").open("a") as source:  # moves files, decides nothing
        source.write("\n# an edit\n")
    assert _key(tree) == before


def test_config_seed_threads_and_versions_change_the_key(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = _key(tree)
    assert _key(tree, DemoConfig(**{**TINY.__dict__, "seed": 1})) != before
    assert _key(tree, DemoConfig(**{**TINY.__dict__, "eval_images": 9})) != before
    assert _key(tree, threads=4) != before
    for library in (torch, torchvision, np, PIL, torchmetrics):
        with monkeypatch.context() as patched:
            patched.setattr(library, "__version__", "0.0.0-other")
            assert _key(tree) != before, f"another {library.__name__} retrains"
    assert _key(tree) == before


def test_key_inputs_name_the_hardware_path() -> None:
    inputs = key_inputs(TINY, CPU, 2)
    assert {"config", "models", "versions", "device", "hardware", "threads", "bf16_autocast"} <= set(inputs)
    assert inputs["models"] == ["classifier", "detector", "segmenter"]
    assert {"torch", "torchvision", "numpy", "pillow", "torchmetrics", "python"} <= set(inputs["versions"])


def test_the_cache_directory_follows_the_environment(tmp_path: Path) -> None:
    assert default_cache_dir({"CVSERVE_CACHE": str(tmp_path / "c"), "XDG_CACHE_HOME": "/x"}) == tmp_path / "c"
    assert default_cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "cvserve"
    assert default_cache_dir({}) == Path.home() / ".cache" / "cvserve"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One tiny training run (no cache), its output directory and report."""
    out = tmp_path_factory.mktemp("trained") / "demo"
    return out, run(TINY, out, CPU, threads=2)


def _clone_of(trained: tuple[Path, dict], tmp_path: Path) -> Path:
    out = tmp_path / "clone" / "demo"
    shutil.copytree(trained[0], out)
    return out


def test_a_second_clone_copies_the_cached_models_instead_of_training(
    trained: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    first_out = _clone_of(trained, tmp_path)
    first = run(TINY, first_out, CPU, threads=2, cache=cache)  # a run found in the clone fills the cache
    entry = entry_dir(cache, first["training_key"])
    assert sorted(p.name for p in entry.iterdir()) == sorted(FILES)
    assert not [p for p in cache.iterdir() if p != entry], "no staging directory is left behind"

    monkeypatch.setattr("training.train.train_classifier", _stop)  # training now would raise
    second_out = tmp_path / "two" / "demo"
    second = run(TINY, second_out, CPU, threads=2, cache=cache)
    assert second == first
    for name in FILES:
        assert (second_out / name).read_bytes() == (entry / name).read_bytes(), name


def test_another_key_is_not_served_from_the_cache(
    trained: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    training_cache.store(trained[0], cache, trained[1]["training_key"], CHECKPOINTS)
    monkeypatch.setattr("training.train.train_classifier", _stop)
    with pytest.raises(_Stop):  # another seed goes on to train
        run(DemoConfig(**{**TINY.__dict__, "seed": 1}), tmp_path / "two", CPU, threads=2, cache=cache)
    assert [p.name for p in cache.iterdir()] == [f"demo-{trained[1]['training_key']}"]


def test_an_interrupted_store_leaves_no_entry(
    trained: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    copies = []
    real_copy = shutil.copyfile

    def copy_then_die(source: Path, target: Path) -> None:
        if copies:
            raise KeyboardInterrupt("interrupted while storing")
        copies.append(real_copy(source, target))

    monkeypatch.setattr(training_cache.shutil, "copyfile", copy_then_die)
    with pytest.raises(KeyboardInterrupt):
        training_cache.store(trained[0], cache, trained[1]["training_key"], CHECKPOINTS)
    assert copies, "one file had been copied"
    assert not list(cache.iterdir()), "neither an entry nor a staging directory remains"
    assert not training_cache.restore(cache, trained[1]["training_key"], tmp_path / "other", CHECKPOINTS)


def test_an_incomplete_entry_is_never_restored(trained: tuple[Path, dict], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    entry = training_cache.store(trained[0], cache, trained[1]["training_key"], CHECKPOINTS)
    (entry / "detector.pt").unlink()
    target = tmp_path / "clone" / "demo"
    assert not training_cache.restore(cache, trained[1]["training_key"], target, CHECKPOINTS)
    assert not target.exists()


def test_an_interrupted_restore_is_not_taken_for_a_run(
    trained: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    key = trained[1]["training_key"]
    training_cache.store(trained[0], cache, key, CHECKPOINTS)
    out = _clone_of(trained, tmp_path)  # a complete run there already: the records go first
    real_copy = shutil.copyfile

    def die_on_records(source: Path, target: Path) -> None:
        if Path(source).name == "meta.json":
            raise KeyboardInterrupt("interrupted while restoring")
        real_copy(source, target)

    monkeypatch.setattr(training_cache.shutil, "copyfile", die_on_records)
    with pytest.raises(KeyboardInterrupt):
        training_cache.restore(cache, key, out, CHECKPOINTS)
    assert cached_report(out, key) is None


def test_without_a_cache_nothing_is_written_outside_the_output(
    trained: tuple[Path, dict], tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    run(TINY, _clone_of(trained, tmp_path), CPU, threads=2)
    assert not cache.exists()


class _Stop(Exception):
    """Raised by a stand-in trainer: the run got as far as training."""


def _stop(*args: object, **kwargs: object) -> None:
    raise _Stop
