"""What a task is, and the architecture registry export builds models from.

A `Task` is everything about one task in one object: its gateway handler (name, endpoint,
options, request/response schemas, pre/postprocess, rendering), its model's I/O contract
(`outputs`, the labelled output, the class-0 name), how export wraps an eager model for that
contract, and the architectures registered for it. Training, export, the gateway's routes, the
bench and the tests read `tasks.TASKS`; nothing else lists tasks.

Architectures are registered the way torchvision registers its models (`@register_model`,
`get_model`): `@register_arch(model, name, ...)` on a builder, `get_arch(model, name)` to look one up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

if TYPE_CHECKING:
    from torchvision.models import WeightsEnum

    from service.handlers.common import Handler

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


_ARCHITECTURES: dict[str, dict[str, Architecture]] = {}


def register_arch(
    model: str,
    name: str,
    *,
    class_count_key: str,
    normalisation: Literal["demo", "imagenet"],
    default_size: Callable[[], tuple[int, int | None]],
    pretrained: WeightsEnum | None = None,
) -> Callable[[Builder], Builder]:
    """Decorator: register `build` as architecture `name` of `model` (torchvision's `register_model` style)."""

    def register(build: Builder) -> Builder:
        archs = _ARCHITECTURES.setdefault(model, {})
        if name in archs:
            raise ValueError(f"architecture {name!r} of the {model} is registered twice")
        archs[name] = Architecture(
            model, name, build, class_count_key, normalisation, default_size, pretrained
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
    """One task: the gateway's handler plus its model's contract and export recipe."""

    handler: Handler = field(repr=False)  # name, endpoint, options, schemas, pre/postprocess, rendering
    preprocess: Literal["resize_center_crop", "letterbox"]  # how the gateway fits images to the input
    labelled_output: str  # the output whose config.pbtxt entry points at labels.txt
    outputs: Callable[
        [int, int], tuple[TensorSpec, ...]
    ]  # (labels, input side) -> outputs, in forward()'s order
    wrap: Callable[[nn.Module, Stats], nn.Module]  # eager model -> uint8 [B,3,H,W] in, the outputs above out
    background: str | None = None  # labels.txt line 0 when class 0 means "nothing here"
    pretrained_arch: str | None = None  # the architecture torchvision's pretrained weights are for
    input_multiple: int = 1  # the input side must be a multiple of this
    max_labels: int | None = None  # most classes the outputs can carry
    tune_demo: Callable[[nn.Module, dict], None] | None = (
        None  # adjust a demo model from training's meta.json
    )

    @property
    def model(self) -> str:
        return self.handler.model

    @property
    def name(self) -> str:
        return self.handler.task

    @property
    def endpoint(self) -> str:
        return self.handler.endpoint

    @property
    def architectures(self) -> tuple[str, ...]:
        return list_archs(self.model)

    def inputs(self, input_size: int) -> tuple[TensorSpec, ...]:
        """Every task's model takes one uint8 RGB image, batched: conversion lives in the graph."""
        return (TensorSpec("IMAGE", torch.uint8, (3, input_size, input_size)),)


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
        if not list_archs(task.model):
            raise ValueError(f"{task.model}: no architecture registered")
        by_model[task.model] = task
    return by_model
