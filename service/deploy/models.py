"""Embedded models as Serve deployments (`model_placement="deployment"`): one `ModelDeployment` per
model, holding a `BatchedModel`, and `EmbeddedBackend`, the gateway's `Backend` over their handles."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.deployment import Deployment
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponse
from ray.util import metrics as ray_metrics

from service.backends.base import (
    Backend, BackendTimeout, BackendUnavailable, Encoded, decode_counts, in_order, refusal, refused,
)  # fmt: skip
from service.backends.batching import model_device, warm_up
from service.backends.pipelined import PipelinedBatchedModel, batched_model
from service.backends.runtimes import load_model, runtime_of
from service.core.device_decode import device_preparers
from service.imaging.images import ImageError
from service.settings import Settings
from service.telemetry.metrics import Instruments
from service.timing import BatchTiming

log = logging.getLogger(__name__)

# Inside Serve replicas the metrics are Ray's: its agent exports and sums them across replicas.
RAY_INSTRUMENTS = Instruments(ray_metrics.Counter, ray_metrics.Gauge, ray_metrics.Histogram)

_READY_TIMEOUT_S = 2.0
_UNAVAILABLE = (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
    RayActorError,
    ActorUnavailableError,
)


@serve.deployment
class ModelDeployment:
    """One model's replica (`model_placement="deployment"`): loads the model once, infers in batches."""

    def __init__(self, model: str, settings: Settings) -> None:
        device = model_device(settings)
        if device == "cpu":
            torch.set_num_threads(settings.torch_threads)
        loaded = load_model(settings, model, device)
        # On CUDA the pipelined runner (copies overlap compute, two batches in flight), as in LocalBackend.
        self._model = batched_model(
            loaded, settings.max_batch_size, settings.batch_wait_timeout_s, "embedded", RAY_INSTRUMENTS
        )
        if isinstance(self._model, PipelinedBatchedModel):
            self._model.runner.warm_up()  # every batch bucket, the only shapes it will run
        else:
            warm_up(loaded, settings)
        if settings.decodes_on(device):  # JPEGs arrive as files and are decoded in the batch, on the device
            self._model.preparer = device_preparers(settings)(model, loaded.contract, device)
        log.info("model %s v%s loaded on %s in %s", model, loaded.version, device, runtime_of(loaded))

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Apply batch settings from `user_config` without redeploying."""
        self._model.configure(int(config["max_batch_size"]), float(config["batch_wait_timeout_s"]))

    async def infer_many(self, images: list[np.ndarray | Encoded]) -> list[dict[str, np.ndarray]] | dict[str, Any]:
        """All of one request's images in one call, queued at once (so they share a batch); their outputs in
        order, or `{"refused": refusal}` for the first image the device's decode refused (the caller's 4xx)."""
        futures = [self._model.submit(image) for image in images]
        try:
            answers = await asyncio.gather(*futures, return_exceptions=True)
        finally:
            for future in futures:  # a call cancelled by its caller drops its images before they are batched
                future.cancel()
        try:
            return in_order(answers)
        except ImageError as error:  # the caller's 4xx, as data: Ray would wrap an exception in its own text
            return {"refused": refusal(error)}

    def decoded(self) -> dict[str, int]:
        """How many JPEGs this replica decoded on its device, and how many its CPU path took instead."""
        return decode_counts([self._model.preparer] if self._model.preparer is not None else [])

    def batch_sizes(self) -> dict[int, int]:
        """How many batches of each size this replica has run (lets tests observe batching)."""
        return dict(self._model.batch_sizes)

    def ready(self) -> bool:
        """The model is loaded (the constructor finished)."""
        return True


def model_deployments(settings: Settings) -> dict[str, Deployment]:
    """`ModelDeployment`s with their options, one per enabled model (bind each with `(model, settings)`)."""
    batch_config = {"max_batch_size": settings.max_batch_size, "batch_wait_timeout_s": settings.batch_wait_timeout_s}
    actor_options: dict[str, float] = {"num_cpus": settings.model_num_cpus}
    if settings.device == "cuda":
        actor_options["num_gpus"] = settings.model_num_gpus
    return {
        model: ModelDeployment.options(
            name=model,
            num_replicas=settings.model_replicas,
            max_ongoing_requests=settings.model_max_ongoing_requests,
            max_queued_requests=settings.max_queued_requests,
            user_config=batch_config,
            ray_actor_options=actor_options,
        )
        for model in settings.models
    }


class EmbeddedBackend(Backend):
    """`Backend` over the model deployments' handles (see `service.backends.base.Backend`)."""

    def __init__(
        self, handles: Mapping[str, DeploymentHandle], request_timeout_s: float, decodes_on_device: bool = False
    ) -> None:
        self._handles = dict(handles)
        self._timeout_s = request_timeout_s
        # The model deployments decode JPEGs (their settings' `device_decode` for their device): the gateway
        # then sends the files, which travel at their own size.
        self.decodes_on_device = decodes_on_device

    async def infer(self, model: str, image: np.ndarray) -> dict[str, np.ndarray]:
        """Send one `[3,H,W]` image to `model`'s deployment, which batches it with concurrent ones."""
        return (await self.infer_many(model, [image]))[0]

    async def infer_many(
        self,
        model: str,
        images: Sequence[np.ndarray | Encoded],
        timings: Sequence[BatchTiming] | None = None,
        version: str | None = None,
    ) -> list[dict[str, np.ndarray]]:
        """Send all of one request's images to `model`'s deployment in one call (they share its batch); the
        first image its decode refused raises that `ImageError`. `timings` get the whole call as model time."""
        began = time.perf_counter()
        response: DeploymentResponse = self._handles[model].infer_many.remote(list(images))
        try:
            answers = await asyncio.wait_for(_await(response), self._timeout_s)
        except TimeoutError as error:
            response.cancel()
            raise BackendTimeout(f"model {model} did not answer within {self._timeout_s:g} s") from error
        except _UNAVAILABLE as error:
            log.warning("model %s unavailable: %r", model, error)
            raise BackendUnavailable(f"model {model} cannot answer now; retry shortly") from error
        if isinstance(answers, dict):
            raise refused(answers["refused"])
        for timing in timings or ():
            timing.model_s = time.perf_counter() - began
        return list(answers)

    async def ready(self) -> bool:
        """Whether every model deployment answers its readiness call quickly (never raises)."""
        try:
            calls = [_await(handle.ready.remote()) for handle in self._handles.values()]
            return all(await asyncio.wait_for(asyncio.gather(*calls), _READY_TIMEOUT_S))
        except Exception as error:  # noqa: BLE001  any failure means "not ready"; the reason goes to the log
            log.warning("embedded models not ready: %r", error)
            return False

    async def close(self) -> None:
        """Nothing to release: Serve owns the deployments."""


async def _await(response: DeploymentResponse) -> Any:
    return await response
