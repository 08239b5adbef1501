"""The task registry: one `Task` per task; add a task with its module and one line below.

`TASKS` maps model names to tasks in serving order; `MODELS` is that order; `HANDLERS` the
gateway's per-model handlers. See docs/ARCHITECTURE.md ("Adding a task").
"""

from __future__ import annotations

from service.handlers.common import Handler
from tasks import classification, detection, segmentation
from tasks.base import Architecture, Task, TensorSpec, get_arch, list_archs, register_arch, registry

TASKS: dict[str, Task] = registry(classification.TASK, detection.TASK, segmentation.TASK)
MODELS: tuple[str, ...] = tuple(TASKS)
HANDLERS: dict[str, Handler] = {model: task.handler for model, task in TASKS.items()}

__all__ = [
    "HANDLERS",
    "MODELS",
    "TASKS",
    "Architecture",
    "Task",
    "TensorSpec",
    "get_arch",
    "list_archs",
    "register_arch",
]
