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
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from service.backends.base import Backend
from service.backends.gradients import GradientModel
from service.backends.batching import BatchedModel, model_device, warm_up
from service.backends.pipelined import PipelinedBatchedModel, batched_model
from service.backends.runtimes import load_model, runtime_of
from service.telemetry.metrics import Instruments
from service.settings import Settings
from service.timing import BatchTiming

log = logging.getLogger(__name__)


class LocalBackend(Backend):
    """`Backend` over models loaded in this process (the gateway replica); see `service.backends.base`."""

    def __init__(self, settings: Settings, instruments: Instruments | None = None) -> None:
        device = model_device(settings)
        if device == "cpu":
            torch.set_num_threads(settings.torch_threads)
        self._models: dict[str, BatchedModel] = {}
        self._repository, self._device = settings.model_repository, device
        self._gradients: dict[str, GradientModel] = {}  # loaded on the first gradient explanation
        self._gradients_lock = asyncio.Lock()
        for name in settings.models:
            model = load_model(settings, name, device)
            batched = batched_model(model, settings.max_batch_size, settings.batch_wait_timeout_s, "embedded", instruments)
            if isinstance(batched, PipelinedBatchedModel):
                batched.runner.warm_up()  # every batch bucket, the only shapes it will run
            else:
                warm_up(model, settings)
            self._models[name] = batched
            log.info(
                "model %s v%s loaded on %s in %s in the gateway replica", name, model.version, device, runtime_of(model)
            )

    async def infer(self, model: str, image: np.ndarray) -> dict[str, np.ndarray]:
        """Queue one `[3,H,W]` image for `model`'s next batch; the caller's deadline bounds the wait."""
        return await self._models[model].infer(image)

    async def infer_many(
        self, model: str, images: Sequence[np.ndarray], timings: Sequence[BatchTiming] | None = None
    ) -> list[dict[str, np.ndarray]]:
        """Queue all of one request's images at once (so they share a batch); outputs in order."""
        batched = self._models[model]
        reports = timings if timings is not None else [None] * len(images)
        futures = [batched.submit(image, timing) for image, timing in zip(images, reports, strict=True)]
        try:
            return list(await asyncio.gather(*futures))
        finally:
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

    def announce(self, model: str, images: int) -> None:
        """Images for `model` are being decoded: a free model waits briefly for them to share a batch."""
        self._models[model].announce(images)

    def arrived(self, model: str, images: int) -> None:
        self._models[model].arrived(images)

    async def ready(self) -> bool:
        """The models were loaded and warmed up when this backend was built."""
        return True

    def runtimes(self) -> dict[str, str]:
        """The runtime each model runs in ("torchscript" or "onnxruntime")."""
        return {name: runtime_of(batched.model) for name, batched in self._models.items()}

    def batch_sizes(self, model: str) -> dict[int, int]:
        """How many batches of each size `model` has run here (lets tests observe batching)."""
        return dict(self._models[model].batch_sizes)

    async def close(self) -> None:
        for model in self._models.values():
            model.close()
        for gradients in self._gradients.values():
            gradients.close()
