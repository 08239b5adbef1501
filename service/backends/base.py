"""The one interface the gateway uses to run a model, whatever serves it."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class BackendUnavailable(RuntimeError):
    """The backend cannot answer now (not ready, down, restarting): the gateway answers 503."""


class BackendTimeout(RuntimeError):
    """The backend did not answer within the request's deadline: the gateway answers 504."""


class Backend(Protocol):
    async def infer(self, model: str, image: np.ndarray) -> dict[str, np.ndarray]:
        """Run one `[3,H,W]` uint8 image through `model`; return its outputs without batch dim."""
        ...

    async def ready(self) -> bool:
        """Return whether every model can answer now."""
        ...
