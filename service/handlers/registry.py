"""The handlers of the registered tasks, by model name (the gateway's side of `tasks.TASKS`)."""

from __future__ import annotations

from service.handlers.common import Handler
from tasks import TASKS

HANDLERS: dict[str, Handler] = {}


def register_handler(handler: Handler) -> Handler:
    """Serve `handler`'s task: its model, task name and endpoint must be those of a task in `tasks.TASKS`."""
    task = TASKS.get(handler.model)
    if task is None:
        raise ValueError(f"no task is registered for the model {handler.model!r}: register its Task first")
    if (handler.task, handler.endpoint) != (task.name, task.endpoint):
        raise ValueError(
            f"handler {type(handler).__name__} says {handler.task} at {handler.endpoint}; "
            f"the task registry says {task.name} at {task.endpoint}"
        )
    if handler.model in HANDLERS:
        raise ValueError(f"a handler for the {handler.model} is registered twice")
    HANDLERS[handler.model] = handler
    return handler


def unregister_handler(model: str) -> None:
    """Stop serving a task's handler (tests that add a task)."""
    HANDLERS.pop(model, None)
