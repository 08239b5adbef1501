"""Per-task pre/post-processing: one `Handler` per task (`service/handlers/<task>.py`).

Handlers are registered with their tasks in `tasks/` (`tasks.HANDLERS`), not here, so that a task
is added in one place.
"""

from service.handlers.common import Handler

__all__ = ["Handler"]
