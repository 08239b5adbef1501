"""Training on tiny configs: each model takes real optimiser steps; a run saves, caches and retrains."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from training.data import SceneSet, render_classification, render_scenes, train_seeds
from training.models import build_demo_classifier, build_demo_detector, build_demo_segmenter, encoder_trunk
from training.shapes import CLASSES
from training.train import (
    DemoConfig,
    StepConfig,
    key_inputs,
    native_bf16,
    run,
    train_classifier,
    train_detector,
    train_segmenter,
    training_key,
)

TINY = DemoConfig(
    classifier_train_images=32,
    scene_train_images=8,
    eval_images=8,
    classifier=StepConfig(steps=2, batch_size=4, lr=1e-3),
    detector=StepConfig(steps=2, batch_size=2, lr=1e-3),
    segmenter=StepConfig(steps=2, batch_size=2, lr=1e-3),
)
CPU = torch.device("cpu")


STEPS = StepConfig(steps=2, batch_size=2, lr=1e-3)


def _floats(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    return {k for k in before if k in after and not torch.equal(before[k], after[k])}


@pytest.fixture(scope="module")
def scenes() -> SceneSet:
    return render_scenes(train_seeds(0, 1000, 4), 128, 1, 4, "test")


def test_classifier_takes_real_training_steps() -> None:
    torch.manual_seed(0)
    initial = _floats(build_demo_classifier(len(CLASSES)))
    torch.manual_seed(0)  # train_classifier builds the same initial weights
    model = train_classifier(render_classification(train_seeds(0, 0, 8), 64, "test"), STEPS, CPU, seed=0)
    assert model.fc.out_features == len(CLASSES)
    assert "fc.weight" in _changed(initial, _floats(model))


def test_detector_trains_from_the_segmenters_encoder_without_touching_it(scenes: SceneSet) -> None:
    segmenter = build_demo_segmenter(len(CLASSES) + 1)
    before_segmenter = _floats(segmenter)
    seed = encoder_trunk(segmenter)
    before = _floats(seed)
    assert torch.equal(before["layer3.1.conv2.weight"], before_segmenter["down.3.1.conv2.weight"])
    assert torch.equal(before["conv1.weight"], before_segmenter["down.0.0.weight"])
    detector = train_detector(scenes, STEPS, 128, seed, CPU, seed=0)
    assert not _changed(before, _floats(seed)), "training the detector must not touch the trunk it was given"
    assert not _changed(before_segmenter, _floats(segmenter)), "nor the segmenter"
    trunk = _floats(detector.backbone.body)
    assert set(trunk) <= set(before), "the detector's trunk is a ResNet-18"
    assert _changed(before, trunk), "the trunk itself trained"
    assert detector.roi_heads.box_predictor.cls_score.out_features == len(CLASSES) + 1


def test_segmenter_encoder_is_the_classifiers_trunk() -> None:
    classifier = build_demo_classifier(len(CLASSES))
    segmenter = build_demo_segmenter(len(CLASSES) + 1, encoder=classifier)
    assert segmenter.down[4] is classifier.layer4
    assert segmenter.down[0][0] is classifier.conv1


def test_segmenter_trains_from_the_classifiers_trunk_without_touching_it(scenes: SceneSet) -> None:
    classifier = build_demo_classifier(len(CLASSES))
    before = _floats(classifier)
    torch.manual_seed(0)
    initial = _floats(build_demo_segmenter(len(CLASSES) + 1, encoder=build_demo_classifier(len(CLASSES))))
    torch.manual_seed(0)  # the same decoder initialisation as `initial`
    model = train_segmenter(scenes, STEPS, classifier, CPU, seed=0)
    assert not _changed(before, _floats(classifier)), "training the segmenter must not touch the classifier"
    after = _floats(model)
    assert _changed({"down.4.0.conv1.weight": before["layer4.0.conv1.weight"]}, after), "the encoder trained"
    assert model.head.out_channels == len(CLASSES) + 1
    assert "head.weight" in _changed(initial, after)

def test_segmenter_with_crop_trains_on_windows_of_the_scenes(scenes: SceneSet) -> None:
    seen: list[tuple[int, ...]] = []
    classifier = build_demo_classifier(len(CLASSES))
    classifier.conv1.register_forward_pre_hook(lambda _module, args: seen.append(tuple(args[0].shape)))
    train_segmenter(scenes, STEPS, classifier, CPU, seed=0, crop=64)
    assert seen == [(2, 3, 64, 64)] * STEPS.steps, "every step sees one 64 px window of 2 scenes"


def test_the_segmenter_answers_at_the_size_it_is_given() -> None:
    model = build_demo_segmenter(len(CLASSES) + 1).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 96, 160)).shape == (1, len(CLASSES) + 1, 96, 160)



def test_run_saves_loadable_models_then_reuses_them(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    report = run(TINY, out, CPU, threads=2)

    assert set(report["models"]) == {"classifier", "detector", "segmenter"}
    for model in report["models"].values():
        assert {"metric", "value", "bar", "passed", "wall_seconds", "cpu_seconds"} <= set(model)
        assert model["passed"] == (model["value"] >= model["bar"])
    assert report["passed"] is False, "two steps of training cannot meet the bars"
    assert json.loads((out / "report.json").read_text()) == report

    meta = json.loads((out / "meta.json").read_text())
    assert meta["classes"] == list(CLASSES)
    assert meta["image_size"] == {"classifier": 64, "detector": 128, "segmenter": 128}
    assert meta["training_key"] == report["training_key"]
    builders = {
        "classifier": build_demo_classifier(len(CLASSES)),
        "detector": build_demo_detector(len(CLASSES), meta["image_size"]["detector"]),
        "segmenter": build_demo_segmenter(len(CLASSES) + 1),
    }
    for name, model in builders.items():
        model.load_state_dict(torch.load(out / f"{name}.pt", weights_only=True))

    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    start = time.perf_counter()
    assert run(TINY, out, CPU, threads=2) == report
    assert time.perf_counter() - start < 5.0
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps, "a cached run writes nothing"

    forced = run(TINY, out, CPU, threads=2, force=True)
    assert (out / "classifier.pt").stat().st_mtime_ns != stamps["classifier.pt"]
    assert forced["training_key"] == report["training_key"]

    other = run(DemoConfig(**{**TINY.__dict__, "seed": 1}), out, CPU, threads=2)
    assert other["training_key"] != report["training_key"], "another config retrains"


def test_incomplete_output_is_not_taken_for_a_cached_run(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    run(TINY, out, CPU, threads=2)
    (out / "detector.pt").unlink()
    stamp = (out / "classifier.pt").stat().st_mtime_ns
    run(TINY, out, CPU, threads=2)
    assert (out / "detector.pt").is_file()
    assert (out / "classifier.pt").stat().st_mtime_ns != stamp


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "training", *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_cli_help_names_its_options() -> None:
    from training.__main__ import get_args_parser

    text = get_args_parser().format_help()  # what --help prints (the process is tested below)
    for option in ("--out", "--seed", "--force", "--device", "--threads", "--fp32"):
        assert option in text
    assert get_args_parser().parse_args(["--fp32"]).fp32 is True


def test_the_demo_trains_in_bfloat16_where_native_unless_asked_for_float32(tmp_path: Path) -> None:
    from training.__main__ import get_args_parser

    assert DemoConfig().bf16 is True and get_args_parser().parse_args([]).fp32 is False
    # Autocast only where the hardware runs bfloat16 natively: the key and the report say which.
    native = native_bf16(CPU)
    assert key_inputs(DemoConfig(), CPU, 2)["bf16_autocast"] is native
    assert key_inputs(DemoConfig(bf16=False), CPU, 2)["bf16_autocast"] is False
    assert training_key(DemoConfig(), CPU, 2) != training_key(DemoConfig(bf16=False), CPU, 2)
    report = run(TINY, tmp_path / "out", CPU, threads=2)
    assert report["bf16_autocast"] is native


def test_cli_refuses_an_unusable_device(tmp_path: Path) -> None:
    result = _cli("--device", "no-such-device", "--out", str(tmp_path))
    assert result.returncode == 2
    assert "no-such-device" in result.stderr and "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir()), "nothing written"


@pytest.mark.parametrize("crop", [80, 160, -32])
def test_a_segmenter_crop_the_u_net_cannot_take_is_refused_at_config_time(crop: int) -> None:
    with pytest.raises(ValueError, match="segmenter_crop"):
        DemoConfig(segmenter_crop=crop)
    assert DemoConfig(segmenter_crop=0).segmenter_crop == 0  # whole scenes
