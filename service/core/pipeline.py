"""One model's image path around inference: decode → preprocess, and postprocess, as the gateway runs it.

`TaskPipeline` is the single copy of that code: the gateway calls it for every request, and the
benchmark's baselines (hand-written server, LitServe, the in-process figures) call the same object,
so a comparison measures serving machinery, never different image code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel

from service.contract import ModelContract, load_contract
from service.handlers.common import Geometry, Handler, at_full_size
from service.imaging.images import decode_image_reduced
from service.settings import Settings
from service.handlers import HANDLERS

Prepared = tuple[np.ndarray, Geometry]


@dataclass(frozen=True)
class TaskPipeline:
    """A model's contract, its task's handler and the gateway's image limits."""

    model: str
    contract: ModelContract
    handler: Handler[Any, Any]
    settings: Settings

    @classmethod
    def load(cls, settings: Settings, model: str, handler: Handler[Any, Any] | None = None) -> TaskPipeline:
        """Read `<settings.model_repository>/<model>`'s contract (config.pbtxt, labels); the registry's
        handler for `model` unless `handler` is given."""
        handler = handler if handler is not None else HANDLERS[model]
        return cls(model, load_contract(settings.model_repository, model), handler, settings)

    @property
    def endpoint(self) -> str:
        return self.handler.endpoint

    @property
    def min_side(self) -> int:
        """Shorter side a decode must keep: twice what the model input needs (large JPEGs decode reduced to it)."""
        return 2 * max(*self.contract.input_size, self.contract.resize_size or 0)

    def prepare(self, data: bytes) -> Prepared:
        """Decode an uploaded file and bring it to the model's `[3,H,W]` uint8 input (raises `ImageError`)."""
        return self.preprocess(*self.decode(data))

    def decode(self, data: bytes) -> tuple[np.ndarray, tuple[int, int]]:
        """The file's RGB pixels (large JPEGs reduced) and its full (width, height) (raises `ImageError`)."""
        return decode_image_reduced(data, self.settings.max_pixels, self.settings.allowed_formats, self.min_side)

    def preprocess(self, image: np.ndarray, size: tuple[int, int]) -> Prepared:
        """Decoded pixels → the model's `[3,H,W]` uint8 input, and the geometry back to the full `size`."""
        tensor, geometry = self.handler.preprocess(image, self.contract)
        return tensor, at_full_size(geometry, *size)

    def answer(self, outputs: dict[str, np.ndarray], geometry: Geometry, options: BaseModel | None = None) -> BaseModel:
        """The task's result for one image (default options unless given)."""
        return self.handler.postprocess(outputs, geometry, options or self.handler.options(), self.contract)
