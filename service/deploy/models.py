"""Embedded models as Serve deployments (`model_placement="deployment"`): one `ModelDeployment` per
model, holding a `BatchedModel`, and `EmbeddedBackend`, the gateway's `Backend` over their handles."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.deployment import Deployment
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponse
from ray.util import metrics as ray_metrics

from service.backends.base import Backend, BackendTimeout, BackendUnavailable
from service.backends.batching import BatchedModel, model_device, warm_up
from service.backends.runtimes import load_model, runtime_of
from service.settings import Settings
from service.telemetry.metrics import Instruments

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
        warm_up(loaded, settings)
        self._model = BatchedModel(
            loaded, settings.max_batch_size, settings.batch_wait_timeout_s, "embedded", RAY_INSTRUMENTS
        )
        log.info("model %s v%s loaded on %s in %s", model, loaded.version, device, runtime_of(loaded))

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Apply batch settings from `user_config` without redeploying."""
        self._model.configure(int(config["max_batch_size"]), float(config["batch_wait_timeout_s"]))

    async def infer(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """Run one `[3,H,W]` uint8 image in the next batch; return its outputs."""
        return await self._model.infer(image)

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

    def __init__(self, handles: Mapping[str, DeploymentHandle], request_timeout_s: float) -> None:
        self._handles = dict(handles)
        self._timeout_s = request_timeout_s

    async def infer(self, model: str, image: np.ndarray) -> dict[str, np.ndarray]:
        """Send one `[3,H,W]` image to `model`'s deployment, which batches it with concurrent ones."""
        response: DeploymentResponse = self._handles[model].infer.remote(image)
        try:
            return await asyncio.wait_for(_await(response), self._timeout_s)
        except TimeoutError as error:
            response.cancel()
            raise BackendTimeout(f"model {model} did not answer within {self._timeout_s:g} s") from error
        except _UNAVAILABLE as error:
            log.warning("model %s unavailable: %r", model, error)
            raise BackendUnavailable(f"model {model} cannot answer now; retry shortly") from error

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
