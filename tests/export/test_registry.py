"""The task registry (`tasks/`): one object per task, read by export, the gateway, training and the bench.

These tests check the registry keeps its promises (each architecture builds what it declares,
inconsistent tasks are refused) and that export's per-task checks come from it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from export.errors import ExportError
from export.sources import ARCHITECTURES, SourceOptions, load_specs
from service.app import endpoint_tag
from service.handlers import HANDLERS
from tasks import MODELS, TASKS, get_arch, list_archs, register_arch
from tasks.base import registry
from tests.export.conftest import Checkpoint
from training.train import MODELS as TRAINED

ALL_ARCHS = [(model, arch) for model in MODELS for arch in list_archs(model)]


def test_one_task_per_model_and_everyone_reads_the_same_list() -> None:
    assert MODELS == ("classifier", "detector", "segmenter")
    assert [TASKS[m].endpoint for m in MODELS] == ["/classify", "/detect", "/segment"]
    assert [TASKS[m].name for m in MODELS] == ["classification", "detection", "segmentation"]
    assert {m: h.model for m, h in HANDLERS.items()} == {m: m for m in MODELS}
    assert all(endpoint_tag(t.endpoint, HANDLERS) == t.endpoint for t in TASKS.values())  # the gateway's routes
    assert TRAINED == MODELS  # the demo trains every task's model
    assert ARCHITECTURES == {m: list_archs(m) for m in MODELS}  # export's --arch choices


@pytest.mark.parametrize(("model", "arch"), ALL_ARCHS)
def test_each_architecture_builds_what_it_declares(model: str, arch: str) -> None:
    architecture = get_arch(model, arch)
    size, resize = architecture.default_size()
    task = TASKS[model]
    assert size >= 32 and size % task.input_multiple == 0
    assert resize is None or resize >= size  # a centre crop is taken from the resized image
    eager = architecture.build(5, size)
    assert eager.state_dict()[architecture.class_count_key].shape[0] == 5
    if architecture.pretrained is not None:
        assert task.pretrained_arch == arch and architecture.pretrained.meta["categories"]


def test_each_task_has_its_pretrained_weights_or_says_it_has_none() -> None:
    assert {m: TASKS[m].pretrained_arch for m in MODELS} == {
        "classifier": "resnet50",
        "detector": "fasterrcnn_resnet50_fpn_v2",
        "segmenter": None,  # torchvision has no U-Net
    }


def test_unknown_or_repeated_architectures_are_refused() -> None:
    with pytest.raises(KeyError, match="registered: demo, fasterrcnn_resnet50_fpn_v2"):
        get_arch("detector", "yolo")
    with pytest.raises(ValueError, match="registered twice"):
        register_arch(
            "classifier",
            "demo",
            class_count_key="fc.weight",
            normalisation="demo",
            default_size=lambda: (64, 64),
        )(
            lambda labels, size: None  # type: ignore[arg-type,return-value]
        )
    assert list_archs("classifier") == ("demo", "resnet50")


def test_inconsistent_tasks_are_refused() -> None:
    classifier, detector = TASKS["classifier"], TASKS["detector"]
    with pytest.raises(ValueError, match="two tasks for the model"):
        registry(classifier, classifier)
    with pytest.raises(ValueError, match="labelled output 'NOPE'"):
        registry(dataclasses.replace(detector, labelled_output="NOPE"))
    elsewhere = dataclasses.replace(detector, model="other")  # the detector's endpoint again
    with pytest.raises(ValueError, match="two tasks on the endpoint"):
        registry(detector, elsewhere)


def test_a_handler_must_match_its_registered_task() -> None:
    from service.handlers import register_handler
    from service.handlers.detect import DetectHandler

    with pytest.raises(ValueError, match="registered twice"):
        register_handler(DetectHandler())

    class Stray(DetectHandler):
        endpoint = "/elsewhere"

    with pytest.raises(ValueError, match="the task registry says detection at /detect"):
        register_handler(Stray())


def test_the_registry_is_the_floor() -> None:
    """tasks/ imports nothing of the project; the other layers register their parts into it."""
    import subprocess
    import sys

    code = "import sys, tasks; print(sorted(m for m in sys.modules if m.split('.')[0] in {'service', 'export', 'training'}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"


def test_the_segmenters_input_side_rule_comes_from_its_task(
    checkpoints: dict[str, Checkpoint], tmp_path: Path
) -> None:
    segmenter = checkpoints["segmenter"]
    options = SourceOptions(
        weights="checkpoint", checkpoint=segmenter.path, classes=segmenter.classes, input_size=100
    )
    with pytest.raises(ExportError, match="multiple of 32, got 100"):
        load_specs(["segmenter"], options)
    (spec,) = load_specs(["segmenter"], dataclasses.replace(options, input_size=96))
    assert spec.task is TASKS["segmenter"] and spec.outputs[0].dims == (96, 96)
    assert spec.parameters == {
        "task": "segmentation",
        "preprocess": "letterbox",
        "weights": f"checkpoint:{segmenter.path.name}",
    }
