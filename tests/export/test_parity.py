"""Exported model.pt files agree with their eager models and with the config.pbtxt contract.

Each model.pt runs in a separate interpreter that only calls torch.jit.load (as Triton's libtorch
backend does) on fresh random images; its outputs are compared with the eager architecture.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from service.contract import load_contract
from tasks import MODELS
from tests.export.conftest import QUEUE_DELAY_US, SIZES, Exported
from tests.export.support import (
    assert_classifier_matches,
    assert_detector_matches,
    assert_segmenter_matches,
    run_in_fresh_process,
)
from training.shapes import make_scene

ASSERT_MATCHES = {
    "classifier": assert_classifier_matches,
    "detector": assert_detector_matches,
    "segmenter": assert_segmenter_matches,
}


def fresh_images(model: str, seed: int, batch: int = 3) -> torch.Tensor:
    """Random noise plus shapes scenes, never seen during export."""
    size = SIZES[model]
    noise = torch.randint(
        0, 256, (batch - 1, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )
    scene = torch.from_numpy(make_scene(seed, size).image).permute(2, 0, 1)[None]
    return torch.cat([noise, scene])


@pytest.mark.parametrize("model", MODELS)
def test_model_pt_in_a_bare_process_matches_eager(exported: Exported, model: str, tmp_path: Path) -> None:
    seed = int(os.environ.get("CVSERVE_TEST_PARITY_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"{model}: images of seed {seed} (CVSERVE_TEST_PARITY_SEED={seed} replays them)")
    image = fresh_images(model, seed=seed)
    outputs = run_in_fresh_process(exported.out / model / "1" / "model.pt", image, tmp_path)
    try:
        ASSERT_MATCHES[model](exported.checkpoints[model].model, image, outputs)
    except AssertionError as error:
        raise AssertionError(f"images of seed {seed} (CVSERVE_TEST_PARITY_SEED={seed}): {error}") from error


@pytest.mark.parametrize("model", MODELS)
def test_config_describes_the_real_outputs(exported: Exported, model: str, tmp_path: Path) -> None:
    contract = load_contract(exported.out, model)
    batch = contract.max_batch_size
    image = fresh_images(model, seed=7, batch=batch)
    outputs = run_in_fresh_process(exported.out / model / "1" / "model.pt", image, tmp_path)

    assert [(t.name, t.dtype, t.dims) for t in contract.inputs] == [
        ("IMAGE", "uint8", (3, SIZES[model], SIZES[model]))
    ]
    # The libtorch backend binds outputs by position: the returned order must be the config's.
    assert len(outputs) == len(contract.outputs)
    for spec, tensor in zip(contract.outputs, outputs, strict=True):
        assert (str(tensor.numpy().dtype), tuple(tensor.shape)) == (spec.dtype, (batch, *spec.dims)), (
            spec.name
        )
    assert contract.labels == exported.checkpoints[model].labels
    assert (
        contract.task
        == {"classifier": "classification", "detector": "detection", "segmenter": "segmentation"}[model]
    )
    assert contract.parameters["weights"] == f"checkpoint:{exported.checkpoints[model].path.name}"


def test_contract_tensor_order_and_labels(exported: Exported) -> None:
    """The tensor names, order and label files are exactly docs/ARCHITECTURE.md's."""
    names = {model: [t.name for t in load_contract(exported.out, model).outputs] for model in MODELS}
    assert names == {
        "classifier": ["PROBS"],
        "detector": ["BOXES", "SCORES", "LABELS", "COUNT"],
        "segmenter": ["MASK"],
    }
    detector = load_contract(exported.out, "detector")
    assert [t.dims for t in detector.outputs] == [(100, 4), (100,), (100,), (1,)]
    assert (
        detector.labels[0] == "__background__"
        and load_contract(exported.out, "segmenter").labels[0] == "background"
    )
    classifier = load_contract(exported.out, "classifier")
    assert (classifier.preprocess, classifier.resize_size) == ("resize_center_crop", SIZES["classifier"])
    assert {load_contract(exported.out, m).preprocess for m in ("detector", "segmenter")} == {"letterbox"}
    labelled = {
        m: [o.name for o in load_contract(exported.out, m).config.output if o.label_filename] for m in MODELS
    }
    assert labelled == {"classifier": ["PROBS"], "detector": ["LABELS"], "segmenter": ["MASK"]}


@pytest.mark.parametrize("model", MODELS)
def test_gpu_repository_config(exported: Exported, model: str) -> None:
    config = load_contract(exported.out, model).config
    assert config.platform == "pytorch_libtorch" and not config.backend
    assert [(g.kind, g.count) for g in config.instance_group] == [(config.instance_group[0].KIND_GPU, 1)]
    assert config.max_batch_size == 4
    assert list(config.dynamic_batching.preferred_batch_size) == [2, 4]
    assert config.dynamic_batching.max_queue_delay_microseconds == QUEUE_DELAY_US
    assert sorted(p.name for p in (exported.out / model).iterdir()) == ["1", "config.pbtxt", "labels.txt"]
    version = sorted(p.name for p in (exported.out / model / "1").iterdir())
    assert version == ["model.onnx", "model.pt", "version.json"]  # version.json: the weights' source (issue 27)


@pytest.mark.parametrize("model", MODELS)
def test_cpu_repository_serves_the_same_model_with_the_python_backend(exported: Exported, model: str) -> None:
    gpu, cpu = load_contract(exported.out, model), load_contract(exported.cpu_out, model)
    assert (cpu.inputs, cpu.outputs, cpu.labels, cpu.max_batch_size, cpu.parameters) == (
        gpu.inputs,
        gpu.outputs,
        gpu.labels,
        gpu.max_batch_size,
        gpu.parameters,
    )
    assert cpu.config.backend == "python" and not cpu.config.platform
    assert [g.kind for g in cpu.config.instance_group] == [cpu.config.instance_group[0].KIND_CPU]
    assert cpu.config.dynamic_batching == gpu.config.dynamic_batching
    gpu_pt, cpu_pt = exported.out / model / "1" / "model.pt", exported.cpu_out / model / "1" / "model.pt"
    assert gpu_pt.read_bytes() == cpu_pt.read_bytes()
    assert (exported.cpu_out / model / "1" / "model.py").is_file()


def test_no_staging_directories_are_left_behind(exported: Exported) -> None:
    for parent in (exported.out.parent, exported.cpu_out.parent):
        assert not [p.name for p in parent.iterdir() if ".staging-" in p.name]
