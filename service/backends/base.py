"""The one interface the gateway uses to run a model, whatever serves it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from service.contract import ModelContract
from service.imaging.images import ImageError
from service.timing import BatchTiming


@dataclass(frozen=True)
class Encoded:
    """A JPEG for the process that owns the model to decode on its device (service/core/device_decode.py),
    in place of a prepared `[3,H,W]` array: the file as uploaded and its EXIF orientation, which Pillow
    read from the header in the process that received it."""

    data: bytes
    orientation: int


class Preparer(Protocol):
    """Turns a batch of prepared arrays and `Encoded` JPEGs into one model input on the device
    (`service.core.device_decode.DevicePreparer`), counting the JPEGs its device decoded and those the CPU
    path took instead (the device rejected them)."""

    decoded_on_device: int
    decoded_on_cpu: int

    def inputs(self, images: Sequence[np.ndarray | Encoded]) -> tuple[list[int], Any, dict[int, Exception]]:
        """The indices kept, their `[N,3,H,W]` uint8 tensor on the device (None if none), the refusals by index."""
        ...


# What makes a model's `Preparer`: (model name, its contract, its device) → preparer.
MakePreparer = Callable[[str, ModelContract, str], Preparer]


def in_order(answers: Sequence[Any]) -> list[dict[str, np.ndarray]]:
    """The answers to one call's images (outputs, or errors as `gather(..., return_exceptions=True)` gives
    them): the first error raised, an `ImageError` with `index` set to its image's place in the call;
    else the outputs, in order."""
    for index, answer in enumerate(answers):
        if isinstance(answer, ImageError):
            answer.index = index
        if isinstance(answer, BaseException):
            raise answer
    return list(answers)


def decode_counts(preparers: Sequence[Preparer]) -> dict[str, int]:
    """JPEGs decoded on the device and by the CPU path instead, over `preparers`."""
    return {
        "device": sum(p.decoded_on_device for p in preparers),
        "cpu": sum(p.decoded_on_cpu for p in preparers),
    }


def refusal(error: ImageError) -> dict[str, Any]:
    """An image's `ImageError` as plain data, for a process that decoded it to send back (our own words)."""
    return {"index": error.index, "status": error.status_code, "code": error.code, "message": str(error)}


def refused(data: dict[str, Any]) -> ImageError:
    """The `ImageError` a `refusal` describes, as the client should hear it."""
    error = ImageError(str(data.get("message", "the image could not be decoded")))
    error.status_code = int(data.get("status", 400))
    error.code = str(data.get("code", ImageError.code))
    error.index = data.get("index")
    return error


class BackendUnavailable(RuntimeError):
    """The backend cannot answer now (not ready, down, restarting): the gateway answers 503."""


class BackendTimeout(RuntimeError):
    """The backend did not answer within the request's deadline: the gateway answers 504."""


class VersionRefused(RuntimeError):
    """A model version was not loaded: it failed to load, to warm up or its contract check (the message says
    which and why); whatever served before keeps serving."""


class MalformedAnswer(BackendUnavailable):
    """The model answered outputs its contract does not allow: 503, and the gateway reports not ready."""


class Backend:
    """Base of every backend: `infer` and `ready` are required; the rest have working defaults.

    A backend that can hold several versions of a model at once (`supports_versions`) loads and unloads
    them while serving, and `infer_many(..., version=)` runs a given one; the gateway's model lifecycle
    (`service.core.versions`) decides which version a request gets."""

    supports_versions = False
    # Whether `infer_many` also takes `Encoded` JPEGs, decoded where the models are (an image it refuses
    # raises its `ImageError`, with `index` set to its place in the call).
    decodes_on_device = False

    def use_device_decode(self, make_preparer: MakePreparer) -> None:
        """Decode `Encoded` JPEGs with the preparers `make_preparer` makes, where settings ask for it (the
        app gives every backend this; one whose models are not in this process ignores it)."""

    async def infer(self, model: str, image: np.ndarray) -> dict[str, np.ndarray]:
        """Run one `[3,H,W]` uint8 image through `model`; return its outputs without batch dim."""
        raise NotImplementedError

    async def ready(self) -> bool:
        """Return whether every model can answer now."""
        raise NotImplementedError

    async def infer_many(
        self,
        model: str,
        images: Sequence[np.ndarray],
        timings: Sequence[BatchTiming] | None = None,
        version: str | None = None,
    ) -> list[dict[str, np.ndarray]]:
        """Run all of one request's images concurrently (so they can share a batch); outputs in order.

        `timings`, one per image, receive where each image's time went; a backend that cannot see its
        batches reports the whole call as `model_s`. `version` (backends that `supports_versions`): that
        loaded version rather than the one loaded at start."""
        began = time.perf_counter()
        outputs = list(await asyncio.gather(*(self.infer(model, image) for image in images)))
        for timing in timings or ():
            timing.model_s = time.perf_counter() - began
        return outputs

    def announce(self, model: str, images: int) -> None:
        """`images` for `model` are being decoded now (an in-process batcher may wait for them)."""

    def arrived(self, model: str, images: int) -> None:
        """The images `announce` named are decoded (or failed)."""

    async def infer_background(self, model: str, images: Sequence[np.ndarray], version: str) -> list[dict[str, np.ndarray]]:
        """Run `images` on `version` for work nobody waits for (a candidate's comparison): a backend that
        can gives it the machine's spare time only; by default it is an ordinary call."""
        return await self.infer_many(model, images, None, version=version)

    def loaded_versions(self, model: str) -> list[str]:
        """The versions of `model` loaded now, oldest first (empty: the backend does not say)."""
        return []

    async def load_version(self, model: str, version: str) -> None:
        """Load, warm up and check `version` of `model` beside the loaded ones; `VersionRefused` if it fails."""
        raise VersionRefused(f"the {type(self).__name__} cannot load model versions while serving")

    async def unload_version(self, model: str, version: str) -> None:
        """Release a loaded version once the requests it is answering are done."""
        raise VersionRefused(f"the {type(self).__name__} cannot unload model versions while serving")

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
