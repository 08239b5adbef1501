"""Per-task pre/post-processing: one `Handler` per task, registered by model name.

The built-in handlers (`classify`, `detect`, `segment`) register themselves when this package is
imported; a new task's module calls `register_handler` for its own. The gateway serves the handlers
registered when its app is built (`service.app.create_api`).
"""

from service.handlers.registry import HANDLERS, register_handler, unregister_handler

from service.handlers import classify, detect, segment  # noqa: E402,F401,I001  (each registers its handler)
from service.handlers.common import Handler

__all__ = ["HANDLERS", "Handler", "register_handler", "unregister_handler"]
