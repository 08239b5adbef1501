"""The one interface the gateway uses to run a model, whatever serves it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from service.contract import ModelContract
from service.timing import BatchTiming


class BackendUnavailable(RuntimeError):
    """The backend cannot answer now (not ready, down, restarting): the gateway answers 503."""


class BackendTimeout(RuntimeError):
    """The backend did not answer within the request's deadline: the gateway answers 504."""


class MalformedAnswer(BackendUnavailable):
    """The model answered outputs its contract does not allow: 503, and the gateway reports not ready."""


class Backend:
    """Base of every backend: `infer` and `ready` are required; the rest have working defaults."""

    async def infer(self, model: str, image: np.ndarray) -> dict[str, np.ndarray]:
        """Run one `[3,H,W]` uint8 image through `model`; return its outputs without batch dim."""
        raise NotImplementedError

    async def ready(self) -> bool:
        """Return whether every model can answer now."""
        raise NotImplementedError

    async def infer_many(
        self, model: str, images: Sequence[np.ndarray], timings: Sequence[BatchTiming] | None = None
    ) -> list[dict[str, np.ndarray]]:
        """Run all of one request's images concurrently (so they can share a batch); outputs in order.

        `timings`, one per image, receive where each image's time went; a backend that cannot see its
        batches reports the whole call as `model_s`."""
        began = time.perf_counter()
        outputs = list(await asyncio.gather(*(self.infer(model, image) for image in images)))
        for timing in timings or ():
            timing.model_s = time.perf_counter() - began
        return outputs

    def announce(self, model: str, images: int) -> None:
        """`images` for `model` are being decoded now (an in-process batcher may wait for them)."""

    def arrived(self, model: str, images: int) -> None:
        """The images `announce` named are decoded (or failed)."""

    def batch_sizes(self, model: str) -> dict[int, int]:
        """Batches of each size `model` ran here, where the backend knows (tests observe batching)."""
        return {}

    def gradient_methods(self, model: str) -> tuple[str, ...]:
        """Explanation methods that need gradients through `model` this backend can run (none by default:
        only the embedded backend holds the model in this process)."""
        return ()

    async def gradients(self, model: str) -> Any:
        """`model` for gradients (`service.backends.gradients.GradientModel`), loaded on first use."""
        raise BackendUnavailable(f"this backend computes no gradients through {model}")

    async def close(self) -> None:
        """Release connections and threads (idempotent)."""


def check_outputs(contract: ModelContract, outputs: dict[str, np.ndarray]) -> None:
    """Raise `MalformedAnswer` unless `outputs` (one image's, no batch dim) match the contract's names,
    dtypes and fixed dims (-1 is any size)."""
    for spec in contract.outputs:
        value = outputs.get(spec.name)
        if not isinstance(value, np.ndarray):
            raise MalformedAnswer(f"model {contract.name} answered without output {spec.name}")
        if value.dtype != np.dtype(spec.dtype) or value.ndim != len(spec.dims):
            raise MalformedAnswer(
                f"model {contract.name} output {spec.name} is {value.dtype}{list(value.shape)}; "
                f"the contract says {spec.dtype}{list(spec.dims)}"
            )
        if any(want not in (-1, got) for want, got in zip(spec.dims, value.shape, strict=True)):
            raise MalformedAnswer(
                f"model {contract.name} output {spec.name} has shape {list(value.shape)}; "
                f"the contract says {list(spec.dims)}"
            )
