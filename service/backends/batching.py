"""Batching of one in-process model: `BatchedModel` queues images and runs them in batches as the
model frees (TorchScript or ONNX Runtime behind `ModelRunner`); the embedded backend
(`service.backends.local`), the CUDA runner (`service.backends.pipelined`) and Serve's model
deployments (`service.deploy.models`) build on it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from service.backends.base import BackendUnavailable, Encoded, Preparer
from service.backends.runtimes import ModelRunner
from service.telemetry.metrics import Instruments, ModelMetrics
from service.settings import Settings
from service.timing import BatchTiming

log = logging.getLogger(__name__)


def model_device(settings: Settings) -> str:
    """Where the embedded models run ("auto" is resolved by `service.deploy.serve.resolve_device` before)."""
    return "cuda" if settings.device == "cuda" else "cpu"


def warm_up(model: ModelRunner, settings: Settings) -> None:
    """Run `model` at every batch size it will be asked for (or once, if settings say so)."""
    if settings.warm_up_batch_sizes:
        model.warm_up(range(1, settings.max_batch_size + 1), runs=2)
    else:
        model.warm_up((1,), runs=1)


@dataclass(eq=False)
class _Waiting:
    """One queued image: its caller's future, when it was queued, and where to report its timing."""

    image: np.ndarray | Encoded
    future: asyncio.Future[dict[str, np.ndarray]]
    queued_at: float
    timing: BatchTiming | None
    live: bool = True  # queued and its caller still waits


@dataclass
class _Ran:
    """A batch's outputs (for the images not refused, in order) and the refused images' errors by index."""

    outputs: list[dict[str, np.ndarray]]
    refused: dict[int, Exception]


def refuse(batch: list[_Waiting], refused: dict[int, Exception]) -> list[_Waiting]:
    """Give each refused image's caller its error; the rest of `batch`, in order."""
    for index, error in refused.items():
        if not batch[index].future.done():
            batch[index].future.set_exception(error)
    return [entry for i, entry in enumerate(batch) if i not in refused]


class BatchedModel:
    """One model and its batch queue: callers' images run together, one batch at a time, on the model's thread.

    Batches form when the model is free, not when images arrive: a free model takes every waiting
    image (up to `max_batch_size`) at once, and waits (at most `batch_wait_timeout_s`) only while
    images that callers announced (`coming`) are still being decoded. Under load the queue fills
    while a batch runs, so batches grow with the load; a lone request never waits. Callers that gave
    up (deadline, disconnect) are dropped before their image is batched.
    """

    def __init__(
        self,
        model: ModelRunner,
        max_batch_size: int,
        batch_wait_timeout_s: float,
        backend: str,
        instruments: Instruments | None = None,
    ) -> None:
        self.model = model
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"model-{model.name}")
        self._metrics = ModelMetrics(model.name, backend, instruments or Instruments.prometheus())
        self.batch_sizes: Counter[int] = Counter()
        self.dropped = 0  # images whose callers gave up before they were batched
        # Decodes the `Encoded` JPEGs callers queue, on the model's device, as each batch is run (None: only
        # prepared arrays are queued). LocalBackend gives every batcher one when the app asks for device decode.
        self.preparer: Preparer | None = None
        self.configure(max_batch_size, batch_wait_timeout_s)
        self._waiting: deque[_Waiting] = deque()
        self._live = 0  # queued images whose callers still wait
        self._coming = 0  # images announced by callers and not yet queued (being read or decoded)
        self._changed: asyncio.Event | None = None  # created in the serving loop
        self._worker: asyncio.Task[None] | None = None

    def configure(self, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        """Change batch settings while serving (the contract's max_batch_size caps them)."""
        self.max_batch_size = min(max_batch_size, self.model.contract.max_batch_size or max_batch_size)
        self.batch_wait_timeout_s = batch_wait_timeout_s

    def announce(self, images: int) -> None:
        """`images` images for this model are on their way; call `arrived(images)` once they are queued or failed."""
        self._coming += images

    def arrived(self, images: int) -> None:
        self._coming = max(0, self._coming - images)
        self._notify()

    def submit(
        self, image: np.ndarray | Encoded, timing: BatchTiming | None = None
    ) -> asyncio.Future[dict[str, np.ndarray]]:
        """Queue one `[3,H,W]` image, or a JPEG to decode on the device (`Encoded`, with a `preparer`); the
        future resolves to its outputs, or to the image's `ImageError` (cancel it to drop the image).
        `timing`, if given, receives the image's queue wait, its batch's run time and size."""
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._changed = asyncio.Event()
            self._worker = loop.create_task(self._run(), name=f"batches-{self.model.name}")
        future: asyncio.Future[dict[str, np.ndarray]] = loop.create_future()
        entry = _Waiting(image, future, time.perf_counter(), timing)
        future.add_done_callback(lambda _: self._gave_up(entry))
        self._waiting.append(entry)
        self._live += 1
        self._notify()
        return future

    async def infer(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """Run one image in the next batch that has room; return its outputs."""
        return await self.submit(image)

    def _gave_up(self, entry: _Waiting) -> None:
        if entry.live and entry.future.cancelled():  # still queued: it will be skipped, never batched
            entry.live = False
            self._live -= 1
            self.dropped += 1

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._changed is not None
        while True:
            while not self._live:
                self._waiting.clear()  # only given-up entries are left
                self._changed.clear()
                await self._changed.wait()
            deadline = loop.time() + self.batch_wait_timeout_s
            while self._live < self.max_batch_size and self._coming > 0 and loop.time() < deadline:
                self._changed.clear()
                try:
                    await asyncio.wait_for(self._changed.wait(), deadline - loop.time())
                except TimeoutError:
                    break
            batch: list[_Waiting] = []
            while self._waiting and len(batch) < self.max_batch_size:
                entry = self._waiting.popleft()
                if entry.live:
                    entry.live = False
                    self._live -= 1
                    batch.append(entry)
            if batch:
                await self._run_batch(loop, batch)

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Waiting]) -> None:
        started = time.perf_counter()
        try:
            ran = await loop.run_in_executor(self._executor, self._infer, [entry.image for entry in batch])
        except Exception:  # the model failed: every caller of this batch gets the error
            self._fail(batch)
            return
        self._deliver(refuse(batch, ran.refused), ran.outputs, started)

    def _infer(self, images: list[np.ndarray | Encoded]) -> _Ran:
        """The batch's outputs (on the model's thread), and its refused JPEGs' errors."""
        inputs, refused = self._inputs(images)
        if isinstance(inputs, torch.Tensor):
            inputs = list(inputs.cpu().numpy())
        return _Ran(self.model.infer(inputs) if len(inputs) else [], refused)

    def _inputs(
        self, images: list[np.ndarray | Encoded]
    ) -> tuple[list[np.ndarray] | torch.Tensor, dict[int, Exception]]:
        """The model's inputs for `images`: the arrays as they are or, when JPEGs are among them, one uint8
        batch on the device from `preparer`, which leaves out the JPEGs it refuses (their errors by index)."""
        if not any(isinstance(image, Encoded) for image in images):
            return images, {}  # type: ignore[return-value]
        if self.preparer is None:
            raise RuntimeError(f"model {self.model.name} was given a JPEG to decode and has no preparer")
        _, batch, refused = self.preparer.inputs(images)
        return (batch if batch is not None else []), dict(refused)

    def _fail(self, batch: list[_Waiting]) -> None:
        """Every caller of `batch` gets `BackendUnavailable` (the model's own error goes to the log only)."""
        log.exception("model %s failed on a batch of %d", self.model.name, len(batch))
        for entry in batch:
            if not entry.future.done():
                entry.future.set_exception(BackendUnavailable(f"model {self.model.name} failed; retry shortly"))

    def _deliver(self, batch: list[_Waiting], outputs: list[dict[str, np.ndarray]], started: float) -> None:
        """Each caller of `batch` gets its outputs; the batch's size and time go to metrics and timings."""
        if not batch:  # every image of it was refused
            return
        seconds = time.perf_counter() - started
        self._metrics.observe_batch(len(batch), seconds)
        self.batch_sizes[len(batch)] += 1
        for entry, output in zip(batch, outputs, strict=True):
            if entry.timing is not None:
                entry.timing.queue_s = started - entry.queued_at
                entry.timing.model_s = seconds
                entry.timing.batch_size = len(batch)
            if not entry.future.done():
                entry.future.set_result(output)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
