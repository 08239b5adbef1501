"""The embedded backend's model runner for a CUDA device: host-to-device copies overlap compute, and two
batches are in flight.

`BatchedModel` (service/backends/local.py) runs one batch at a time: copy in, compute, copy out, then
the next batch forms. On a GPU that leaves the device idle during every copy and every Python step
between batches. Here each batch is padded to its bucket (service/buckets.py: fixed shapes, warmed
up once), written into a pinned host buffer, copied with `non_blocking` on a copy stream, computed on
a compute stream that waits only for its own copy, and copied back into pinned output buffers;
meanwhile the next batch forms and is launched. `PipelinedBatchedModel` keeps at most `in_flight`
batches launched and not yet finished. On a CPU the same code runs each batch at once (no streams,
no pinned memory), so it is tested here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from service.backends.base import Encoded
from service.backends.batching import BatchedModel, _Waiting, refuse
from service.backends.torchscript import TorchScriptModel
from service.backends.runtimes import ModelRunner
from service.buckets import bucket_for, buckets_up_to
from service.telemetry.metrics import Instruments



@dataclass
class Launched:
    """A batch on its way through the device: wait on `done`, then read `outputs[:count]`."""

    count: int
    bucket: int
    outputs: list[torch.Tensor]
    done: torch.cuda.Event | None  # None on the CPU: finished at launch
    keep: list[torch.Tensor] = field(default_factory=list)  # device tensors in use until `done`


@dataclass
class _Slot:
    """One in-flight position: its pinned input buffers (per bucket) and when its last copy finished."""

    inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    copied: torch.cuda.Event | None = None


def time_kernels_per_shape(device: torch.device) -> None:
    """On CUDA, let cuDNN time its convolution algorithms once per input shape and keep the fastest
    (`torch.backends.cudnn.benchmark`, process-wide). Worth it here: every batch is padded to a bucket, so
    the shapes are few and fixed, and `warm_up` pays each one's timing before any request. The GPU
    check's model sweep runs the same way, so /detect end to end is compared with the model alone on
    equal kernels. Elsewhere (the CPU), nothing changes."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


class PipelinedRunner:
    """Launch padded batches of a `TorchScriptModel` on its device; `finish` waits for one and returns
    each image's outputs. Call `launch` from one thread; `finish` in launch order."""

    def __init__(self, model: TorchScriptModel, buckets: Sequence[int], in_flight: int = 2) -> None:
        self.model = model
        self.buckets = tuple(buckets)
        self.device = model.device
        self.cuda = self.device.type == "cuda"
        if self.cuda and self.device.index is None:  # "cuda" is the current device: name it, as tensors do
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._slots = [_Slot() for _ in range(in_flight)]
        self._next_slot = 0
        self._names = [spec.name for spec in model.contract.outputs]
        self.shapes_run: set[int] = set()  # batch sizes the module has seen (all buckets)
        if self.cuda:
            self._copy_stream = torch.cuda.Stream(self.device)
            self._compute_stream = torch.cuda.Stream(self.device)
        time_kernels_per_shape(self.device)

    def launch(self, images: Sequence[np.ndarray] | torch.Tensor) -> Launched:
        """Start one batch: `[3,H,W]` uint8 arrays (copied in through pinned memory) or a `[N,3,H,W]`
        uint8 tensor already on the device (service/core/device_decode.py)."""
        count = len(images)
        bucket = bucket_for(count, self.buckets)
        self.shapes_run.add(bucket)
        if not self.cuda:
            batch = self._host_batch(images, bucket, None)
            with torch.inference_mode():
                outputs = self._outputs(self.model.module(batch))
            return Launched(count, bucket, [o.cpu() for o in outputs], None)
        slot = self._slots[self._next_slot]
        self._next_slot = (self._next_slot + 1) % len(self._slots)
        keep: list[torch.Tensor] = []
        with torch.inference_mode():
            if isinstance(images, torch.Tensor) and images.device == self.device:
                # Made on another stream (the preparer's, which the current stream waits for): the compute
                # stream waits too and pads there, and the allocator keeps the tensor's memory until the
                # compute stream is done with it.
                self._compute_stream.wait_stream(torch.cuda.current_stream(self.device))
                images.record_stream(self._compute_stream)
                with torch.cuda.stream(self._compute_stream):
                    batch = (
                        images
                        if count == bucket
                        else torch.cat([images, images.new_zeros((bucket - count, *images.shape[1:]))])
                    )
            else:
                if slot.copied is not None:
                    slot.copied.synchronize()  # this slot's pinned buffer is free again
                host = self._host_batch(images, bucket, slot)
                with torch.cuda.stream(self._copy_stream):
                    batch = host.to(self.device, non_blocking=True)
                    slot.copied = torch.cuda.Event(blocking=True)
                    slot.copied.record(self._copy_stream)
                self._compute_stream.wait_event(slot.copied)
            keep.append(batch)
            with torch.cuda.stream(self._compute_stream):
                batch.record_stream(self._compute_stream)
                device_outputs = self._outputs(self.model.module(batch))
                outputs = []
                for tensor in device_outputs:
                    host_out = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
                    host_out.copy_(tensor, non_blocking=True)
                    outputs.append(host_out)
                keep.extend(device_outputs)
                done = torch.cuda.Event(blocking=True)  # waiting threads sleep: the CPU decodes meanwhile
                done.record(self._compute_stream)
        return Launched(count, bucket, outputs, done, keep)

    def finish(self, launched: Launched) -> list[dict[str, np.ndarray]]:
        """Wait for a launched batch; each image's outputs by contract name, without the padding."""
        if launched.done is not None:
            launched.done.synchronize()
        arrays = [tensor[: launched.count].numpy() for tensor in launched.outputs]
        launched.keep.clear()
        return [
            {name: values[i] for name, values in zip(self._names, arrays, strict=True)}
            for i in range(launched.count)
        ]

    def infer(self, images: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """One batch, start to finish (TorchScriptModel.infer's contract, padded to the bucket)."""
        return self.finish(self.launch(images))

    def warm_up(self, runs: int = 2) -> None:
        """Run every bucket `runs` times, so that no request pays for a shape's first runs."""
        rng = np.random.default_rng(0)
        dims = self.model.contract.inputs[0].dims
        for bucket in self.buckets:
            images = list(rng.integers(0, 256, (bucket, *dims), dtype=np.uint8))
            for _ in range(runs):
                self.infer(images)

    def _host_batch(
        self, images: Sequence[np.ndarray] | torch.Tensor, bucket: int, slot: _Slot | None
    ) -> torch.Tensor:
        """The images in a `[bucket,3,H,W]` host tensor (the slot's pinned buffer on CUDA); padding rows are zero."""
        if isinstance(images, torch.Tensor):
            images = list(images.cpu().numpy())
        shape = (bucket, *images[0].shape)
        if slot is None:
            host = torch.zeros(shape, dtype=torch.uint8)
        else:
            host = slot.inputs.get(bucket)
            if host is None or tuple(host.shape) != shape:
                host = slot.inputs[bucket] = torch.zeros(shape, dtype=torch.uint8, pin_memory=True)
            host[len(images) :].zero_()
        np.stack(images, out=host.numpy()[: len(images)])
        return host

    @staticmethod
    def _outputs(result: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [result] if isinstance(result, torch.Tensor) else list(result)


class PipelinedBatchedModel(BatchedModel):
    """`BatchedModel` whose batches go through a `PipelinedRunner`: the next batch forms and launches
    while the last one computes, with at most `in_flight` launched and unfinished."""

    def __init__(
        self,
        model: TorchScriptModel,
        max_batch_size: int,
        batch_wait_timeout_s: float,
        backend: str,
        instruments: Instruments | None = None,
        in_flight: int = 2,
    ) -> None:
        super().__init__(model, max_batch_size, batch_wait_timeout_s, backend, instruments)
        self.runner = PipelinedRunner(model, buckets_up_to(self.max_batch_size), in_flight)
        self._finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"finish-{model.name}")
        self._slots: asyncio.Semaphore | None = None
        self._in_flight = in_flight
        self.most_in_flight = 0  # the most batches launched and unfinished at once (tests observe it)
        self._launched = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def configure(self, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        """Change batch settings; the buckets follow the new largest batch."""
        super().configure(max_batch_size, batch_wait_timeout_s)
        if hasattr(self, "runner"):
            self.runner.buckets = buckets_up_to(self.max_batch_size)

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Waiting]) -> None:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self._in_flight)
        await self._slots.acquire()  # at most `in_flight` batches launched and unfinished
        started = time.perf_counter()
        try:
            launched, refused = await loop.run_in_executor(self._executor, self._launch, [e.image for e in batch])
        except Exception:
            self._slots.release()
            self._fail(batch)
            return
        batch = refuse(batch, refused)
        if launched is None:  # every image of it was refused
            self._slots.release()
            return
        self._launched += 1
        self.most_in_flight = max(self.most_in_flight, self._launched)
        task = loop.create_task(self._finish(loop, batch, launched, started))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _launch(self, images: list[np.ndarray | Encoded]) -> tuple[Launched | None, dict[int, Exception]]:
        """Launch the batch (JPEGs among it decoded on the device first); the refused JPEGs' errors by index."""
        inputs, refused = self._inputs(images)
        return (self.runner.launch(inputs) if len(inputs) else None), refused

    async def _finish(
        self, loop: asyncio.AbstractEventLoop, batch: list[_Waiting], launched: Launched, started: float
    ) -> None:
        assert self._slots is not None
        try:
            outputs = await loop.run_in_executor(self._finisher, self.runner.finish, launched)
        except Exception:
            self._fail(batch)
            return
        finally:
            self._launched -= 1
            self._slots.release()
        self._deliver(batch, outputs, started)

    def close(self) -> None:
        super().close()
        self._finisher.shutdown(wait=False, cancel_futures=True)


def batched_model(model: ModelRunner, max_batch_size: int, batch_wait_timeout_s: float, backend: str,
                  instruments: Instruments | None = None) -> BatchedModel:  # fmt: skip
    """The batcher for `model`'s device: pipelined for TorchScript on CUDA, one batch at a time elsewhere
    (ONNX Runtime keeps its own CUDA streams)."""
    if isinstance(model, TorchScriptModel) and model.device.type == "cuda":
        return PipelinedBatchedModel(model, max_batch_size, batch_wait_timeout_s, backend, instruments)
    return BatchedModel(model, max_batch_size, batch_wait_timeout_s, backend, instruments)
