"""Embedded backend, in process: TorchScript or ONNX Runtime (`settings.runtime`) batched by
`BatchedModel` (no Ray here).

Two placements use it:

* `model_placement="ingress"` (the default): every model lives inside the gateway replica
  (`LocalBackend`); requests batch in that process, so between the socket and the model there is
  one process and no copy of an image through Ray's object store.
* `model_placement="deployment"`: one Serve deployment per model (`service.deploy.models`) that
  holds a `BatchedModel` and that the gateway calls through handles, for clusters where models scale, or sit on
  GPUs, apart from the HTTP front (deploy/serve/cvserve.yaml).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from service.backends.base import (
    Backend, BackendUnavailable, Encoded, MakePreparer, MalformedAnswer, VersionRefused, check_outputs,
    decode_counts, in_order,
)  # fmt: skip
from service.backends.gradients import GradientModel
from service.backends.batching import BatchedModel, model_device, warm_up
from service.backends.pipelined import PipelinedBatchedModel, batched_model
from service.backends.runtimes import ModelRunner, load_model, runtime_of
from service.telemetry.metrics import Instruments
from service.settings import Settings
from service.timing import BatchTiming

log = logging.getLogger(__name__)


class LocalBackend(Backend):
    """`Backend` over models loaded in this process (the gateway replica); see `service.backends.base`.

    Several versions of a model can be loaded at once (`load_version`), each with its own batcher; a
    request names the one it runs on (`infer_many(..., version=)`), the latest loaded at start if none."""

    supports_versions = True

    def __init__(self, settings: Settings, instruments: Instruments | None = None) -> None:
        self._settings = settings
        self._instruments = instruments
        self._device = device = model_device(settings)
        self._make_preparer: MakePreparer | None = None  # set by `use_device_decode`
        if device == "cpu":
            torch.set_num_threads(settings.torch_threads)
        self._repository = settings.model_repository
        self._gradients: dict[str, GradientModel] = {}  # loaded on the first gradient explanation
        self._gradients_lock = asyncio.Lock()
        self._versions: dict[str, dict[str, BatchedModel]] = {}  # model → version → its batcher
        self._default: dict[str, str] = {}  # model → the version loaded at start
        self._busy: Counter[tuple[str, str]] = Counter()  # (model, version) → calls running on it now
        self._loading = threading.Lock()  # one version loads at a time
        # Comparison work (service/core/versions.py) runs on one thread of the lowest CPU priority, so on a
        # busy CPU the scheduler gives it what the requests' threads leave.
        self._background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="background", initializer=_lowest_priority)
        for name in settings.models:
            batched = self._build(name, None)
            self._versions[name] = {batched.model.version: batched}
            self._default[name] = batched.model.version

    def use_device_decode(self, make_preparer: MakePreparer) -> None:
        """Every loaded and later loaded version of each model decodes `Encoded` JPEGs in its batches, with
        `make_preparer`'s preparer, when `device_decode` is on (or `auto` with the models on CUDA)."""
        if self._settings.decodes_on(self._device):
            self._make_preparer = make_preparer
            for name, versions in self._versions.items():
                for batched in versions.values():
                    batched.preparer = make_preparer(name, batched.model.contract, self._device)
            self.decodes_on_device = True

    @property
    def _models(self) -> dict[str, BatchedModel]:
        """Each model's version loaded at start (or the newest loaded, once that one is unloaded)."""
        return {name: self._batcher(name, None) for name in self._versions}

    def _build(self, name: str, version: str | None, check: bool = False) -> BatchedModel:
        """Load `version` (None: the latest) of `name`, warm it up at every batch size and, with `check`,
        check its outputs against the contract at the smallest and largest batch."""
        device = self._device
        model = load_model(self._settings, name, device, version)
        batched = batched_model(
            model, self._settings.max_batch_size, self._settings.batch_wait_timeout_s, "embedded", self._instruments
        )
        if self._make_preparer is not None:
            batched.preparer = self._make_preparer(name, model.contract, device)
        try:
            if isinstance(batched, PipelinedBatchedModel):
                batched.runner.warm_up()  # every batch bucket, the only shapes it will run
            else:
                warm_up(model, self._settings)
            if check:
                check_runner(model, batched.max_batch_size)
        except BaseException:
            batched.close()
            raise
        log.info(
            "model %s v%s loaded on %s in %s in the gateway replica", name, model.version, device, runtime_of(model)
        )
        return batched

    def loaded_versions(self, model: str) -> list[str]:
        return sorted(self._versions.get(model, {}), key=int)

    async def load_version(self, model: str, version: str) -> None:
        """Load `version` of `model` from the repository beside the loaded ones: warmed up at every batch
        size and its outputs checked against the contract; `VersionRefused` (with the reason) otherwise."""
        if version in self._versions.get(model, {}):
            return
        if not (self._settings.model_repository / model / version).is_dir():
            raise VersionRefused(f"{model} has no version {version} in {self._settings.model_repository}")

        def build() -> BatchedModel:
            with self._loading:
                return self._build(model, version, check=True)

        try:
            batched = await asyncio.to_thread(build)
        except MalformedAnswer as error:
            raise VersionRefused(f"{model} v{version} breaks its contract: {error}") from error
        except Exception as error:  # a missing or broken file, a shape the model refuses, ...
            raise VersionRefused(f"{model} v{version} failed to load or warm up: {type(error).__name__}: {error}") from error
        self._versions.setdefault(model, {})[version] = batched

    async def unload_version(self, model: str, version: str, drain_s: float = 30.0) -> None:
        """Stop taking calls for `version`, let the ones running finish (at most `drain_s`), free it."""
        batched = self._versions.get(model, {}).pop(version, None)
        if batched is None:
            return
        loop = asyncio.get_running_loop()
        until = loop.time() + drain_s
        while self._busy[model, version] and loop.time() < until:
            await asyncio.sleep(0.05)
        batched.close()
        log.info("model %s v%s unloaded", model, version)

    def _batcher(self, model: str, version: str | None) -> BatchedModel:
        versions = self._versions[model]
        if version is None:  # the version loaded at start, or the newest loaded once that one is unloaded
            version = self._default[model] if self._default[model] in versions else max(versions, key=int, default="")
        chosen = versions.get(version)
        if chosen is None:
            raise BackendUnavailable(f"model {model} v{version} is not loaded")
        return chosen

    async def infer(self, model: str, image: np.ndarray) -> dict[str, np.ndarray]:
        """Queue one `[3,H,W]` image for `model`'s next batch; the caller's deadline bounds the wait."""
        return await self._batcher(model, None).infer(image)

    async def infer_many(
        self,
        model: str,
        images: Sequence[np.ndarray],
        timings: Sequence[BatchTiming] | None = None,
        version: str | None = None,
    ) -> list[dict[str, np.ndarray]]:
        """Queue all of one request's images at once (so they share a batch) on `version` (default: the one
        loaded at start); outputs in order. `Encoded` JPEGs among them are decoded on the models' device; the
        first one refused raises its `ImageError` (with its `index`) once every image is answered."""
        batched = self._batcher(model, version)
        key = (model, batched.model.version)
        reports = timings if timings is not None else [None] * len(images)
        self._busy[key] += 1
        futures = [batched.submit(image, timing) for image, timing in zip(images, reports, strict=True)]
        try:
            if not any(isinstance(image, Encoded) for image in images):
                return list(await asyncio.gather(*futures))
            return in_order(await asyncio.gather(*futures, return_exceptions=True))
        finally:
            self._busy[key] -= 1
            for future in futures:  # a caller that gave up drops its images before they are batched
                future.cancel()

    def gradient_methods(self, model: str) -> tuple[str, ...]:
        """`saliency` and `gradcam` for a classifier whose `model.pt` is in the repository (whichever runtime
        answers its requests); the gradient model, once loaded, says whether gradcam fits its architecture."""
        if model in self._gradients:
            return self._gradients[model].methods
        batched = self._models.get(model)
        if batched is None or batched.model.contract.task != "classification" or not self._model_pt(model).is_file():
            return ()
        return ("saliency", "gradcam")

    async def gradients(self, model: str) -> GradientModel:
        """`model`'s `model.pt` for gradients, loaded (in a thread) the first time it is asked for."""
        async with self._gradients_lock:
            if model not in self._gradients:
                contract = self._models[model].model.contract
                self._gradients[model] = await asyncio.to_thread(
                    GradientModel, self._model_pt(model), contract.inputs[0].dims, self._device
                )
        return self._gradients[model]

    def _model_pt(self, model: str) -> Path:
        version = self._models[model].model.version
        return self._repository / model / version / "model.pt"

    async def infer_background(self, model: str, images: Sequence[np.ndarray], version: str) -> list[dict[str, np.ndarray]]:
        """`images` as one batch through `version`'s model on the low-priority background thread (on CPU;
        through its batcher on CUDA, where the device, not a core, is shared)."""
        batched = self._batcher(model, version)
        if self._device != "cpu":
            return await self.infer_many(model, images, None, version=version)
        key = (model, batched.model.version)
        self._busy[key] += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._background, batched.model.infer, list(images))
        finally:
            self._busy[key] -= 1

    def announce(self, model: str, images: int) -> None:
        """Images for `model` are being decoded: a free model waits briefly for them to share a batch."""
        for batched in self._versions[model].values():
            batched.announce(images)

    def arrived(self, model: str, images: int) -> None:
        for batched in self._versions[model].values():
            batched.arrived(images)

    def decode_counts(self) -> dict[str, dict[str, int]]:
        """Per model, how many `Encoded` JPEGs its device decoded and how many its preparer sent to the CPU
        path instead (the device rejected them), all versions together."""
        return {
            name: decode_counts([b.preparer for b in versions.values() if b.preparer is not None])
            for name, versions in self._versions.items()
        }

    async def ready(self) -> bool:
        """The models were loaded and warmed up when this backend was built."""
        return True

    def runtimes(self) -> dict[str, str]:
        """The runtime each model runs in ("torchscript" or "onnxruntime")."""
        return {name: runtime_of(batched.model) for name, batched in self._models.items()}

    def batch_sizes(self, model: str) -> dict[int, int]:
        """How many batches of each size `model` has run here, all versions together (lets tests observe batching)."""
        total: Counter[int] = Counter()
        for batched in self._versions[model].values():
            total.update(batched.batch_sizes)
        return dict(total)

    async def close(self) -> None:
        self._background.shutdown(wait=False, cancel_futures=True)
        for versions in self._versions.values():
            for model in versions.values():
                model.close()
        for gradients in self._gradients.values():
            gradients.close()


def _lowest_priority() -> None:
    """Give the calling thread the lowest CPU priority (nice 19; Linux schedules threads apart)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):  # not Linux, or not allowed: an ordinary thread
        log.debug("background thread keeps its priority")


def check_runner(model: ModelRunner, max_batch_size: int) -> None:
    """Run `model` on random images at batch 1 and `max_batch_size`; `MalformedAnswer` unless every
    image's outputs match the contract."""
    rng = np.random.default_rng(1)
    dims = model.contract.inputs[0].dims
    for size in sorted({1, max_batch_size}):
        outputs = model.infer(list(rng.integers(0, 256, (size, *dims), dtype=np.uint8)))
        if len(outputs) != size:
            raise MalformedAnswer(f"model {model.name} answered {len(outputs)} images for a batch of {size}")
        for output in outputs:
            check_outputs(model.contract, output)
