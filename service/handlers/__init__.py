"""One handler per task, keyed by the model it runs; add a task by adding a handler here."""

from __future__ import annotations

from service.handlers.classify import ClassifyHandler
from service.handlers.common import Handler
from service.handlers.detect import DetectHandler
from service.handlers.segment import SegmentHandler

HANDLERS: dict[str, Handler] = {h.model: h for h in (ClassifyHandler(), DetectHandler(), SegmentHandler())}

__all__ = ["HANDLERS", "Handler"]
