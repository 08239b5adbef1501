"""The task registry, the floor of the house: what a task is, and the architectures of its model.

A `Task` is one task's name, endpoint and model I/O contract (`outputs`, the labelled output, the
class-0 name, input rules). This package imports nothing of the project: the parts of a task that
live in other layers register themselves, keyed by the task's model name, the way torchvision's
models register with `register_model`: the gateway's handler (`service.handlers.register_handler`),
export's wrapper (`export.wrappers.register_wrapper`) and the architectures (`register_arch` here,
called by `training.archs` for the demo models and `export.archs` for torchvision's). A new task is
one module that registers its parts (tests/service/test_new_task.py defines one inside a test).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

if TYPE_CHECKING:
    from torchvision.models import WeightsEnum

Builder = Callable[
    [int, int], nn.Module
]  # (number of labels, input side) -> randomly initialised eager model
Stats = tuple[list[float], list[float]]  # per-channel mean, std of images in [0, 1]


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor of the contract; `dims` exclude the batch dimension."""

    name: str
    dtype: torch.dtype
    dims: tuple[int, ...]


@dataclass(frozen=True)
class Architecture:
    """One registered architecture of a task's model."""

    model: str  # the task's model name: classifier | detector | segmenter
    name: str  # demo | resnet50 | fasterrcnn_resnet50_fpn_v2 | ...
    build: Builder
    class_count_key: str  # the state-dict entry whose first dimension is the number of classes
    normalisation: Literal["demo", "imagenet"]  # the statistics its weights were trained with
    default_size: Callable[[], tuple[int, int | None]]  # (input side, resize side or None) of its weights
    pretrained: WeightsEnum | None = None  # torchvision's weights for it, if any
    tune: Callable[[nn.Module, dict], None] | None = None  # adjust a demo model from training's meta.json


_ARCHITECTURES: dict[str, dict[str, Architecture]] = {}


def register_arch(
    model: str,
    name: str,
    *,
    class_count_key: str,
    normalisation: Literal["demo", "imagenet"],
    default_size: Callable[[], tuple[int, int | None]],
    pretrained: WeightsEnum | None = None,
    tune: Callable[[nn.Module, dict], None] | None = None,
) -> Callable[[Builder], Builder]:
    """Decorator: register `build` as architecture `name` of `model` (torchvision's `register_model` style)."""

    def register(build: Builder) -> Builder:
        archs = _ARCHITECTURES.setdefault(model, {})
        if name in archs:
            raise ValueError(f"architecture {name!r} of the {model} is registered twice")
        archs[name] = Architecture(
            model, name, build, class_count_key, normalisation, default_size, pretrained, tune
        )
        return build

    return register


def get_arch(model: str, name: str) -> Architecture:
    """The architecture `name` registered for `model` (KeyError naming the choices otherwise)."""
    try:
        return _ARCHITECTURES[model][name]
    except KeyError:
        raise KeyError(
            f"no architecture {name!r} for the {model}; registered: {', '.join(list_archs(model))}"
        ) from None


def list_archs(model: str) -> tuple[str, ...]:
    """Names of the architectures registered for `model`, "demo" first."""
    return tuple(sorted(_ARCHITECTURES.get(model, {}), key=lambda name: (name != "demo", name)))


@dataclass(frozen=True)
class Task:
    """One task: its name and route, and its model's I/O contract."""

    name: str  # classification | detection | segmentation | ...
    model: str  # the model's name in the repository: classifier | detector | segmenter | ...
    endpoint: str  # the gateway's route: /classify | ...
    preprocess: Literal["resize_center_crop", "letterbox"]  # how the gateway fits images to the input
    labelled_output: str  # the output whose config.pbtxt entry points at labels.txt
    outputs: Callable[
        [int, int], tuple[TensorSpec, ...]
    ]  # (labels, input side) -> outputs, in forward()'s order
    background: str | None = None  # labels.txt line 0 when class 0 means "nothing here"
    pretrained_arch: str | None = None  # the architecture torchvision's pretrained weights are for
    input_multiple: int = 1  # the input side must be a multiple of this
    max_labels: int | None = None  # most classes the outputs can carry

    @property
    def architectures(self) -> tuple[str, ...]:
        return list_archs(self.model)

    def inputs(self, input_size: int) -> tuple[TensorSpec, ...]:
        """Every task's model takes one uint8 RGB image, batched: conversion lives in the graph."""
        return (TensorSpec("IMAGE", torch.uint8, (3, input_size, input_size)),)


TASKS: dict[str, Task] = {}  # model name -> task, in registration order


def registry(*tasks: Task) -> dict[str, Task]:
    """`{model: task}`, checking that names, endpoints and labelled outputs fit together."""
    by_model: dict[str, Task] = {}
    for task in tasks:
        if task.model in by_model:
            raise ValueError(f"two tasks for the model {task.model!r}")
        if task.endpoint in {t.endpoint for t in by_model.values()}:
            raise ValueError(f"two tasks on the endpoint {task.endpoint!r}")
        names = [spec.name for spec in task.outputs(2, 64)]
        if task.labelled_output not in names:
            raise ValueError(f"{task.model}: labelled output {task.labelled_output!r} is not one of {names}")
        by_model[task.model] = task
    return by_model


def register_task(task: Task) -> Task:
    """Add `task` to `TASKS` (refused if its model or endpoint is taken, or its contract is inconsistent)."""
    TASKS.update(registry(*TASKS.values(), task))
    return task


def unregister_task(model: str) -> None:
    """Take a task (and its architectures) out of the registry again (tests that add one)."""
    TASKS.pop(model, None)
    _ARCHITECTURES.pop(model, None)
