"""The task registry: one `Task` per task. Importing `tasks` registers the built-in three.

`TASKS` maps model names to tasks in serving order (tasks registered later, a plugin's or a test's,
are added to it); `MODELS` is the built-in models' order. See docs/ARCHITECTURE.md ("Adding a task").
"""

from __future__ import annotations

from tasks import classification, detection, segmentation
from tasks.base import (
    TASKS,
    Architecture,
    Task,
    TensorSpec,
    get_arch,
    list_archs,
    register_arch,
    register_task,
    registry,
    unregister_task,
)

MODELS: tuple[str, ...] = (classification.TASK.model, detection.TASK.model, segmentation.TASK.model)

__all__ = [
    "MODELS",
    "TASKS",
    "Architecture",
    "Task",
    "TensorSpec",
    "get_arch",
    "list_archs",
    "register_arch",
    "register_task",
    "registry",
    "unregister_task",
]
