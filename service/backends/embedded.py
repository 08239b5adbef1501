"""Embedded backend: each model is a Ray Serve deployment running its TorchScript file in-process.

`ModelDeployment` (one per model) batches concurrent single-image calls with `@serve.batch`;
`EmbeddedBackend` lives in the ingress and calls those deployments through their handles.
"""

from __future__ import annotations

import asyncio
import logging
import time
import warnings
from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torchvision  # noqa: F401  (registers torchvision::nms & co., which scripted detectors call)
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from service.backends.base import BackendTimeout, BackendUnavailable
from service.contract import ModelContract, load_contract
from service.metrics import ModelMetrics
from service.settings import Settings

log = logging.getLogger(__name__)

_READY_TIMEOUT_S = 2.0
_UNAVAILABLE = (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
    RayActorError,
    ActorUnavailableError,
)


def load_torchscript(path: str, device: torch.device) -> torch.jit.ScriptModule:
    """Load a TorchScript file for inference (TorchScript is Triton's libtorch format: its
    deprecation notice is silenced here on purpose)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.* is deprecated", category=FutureWarning)
        module = torch.jit.load(path, map_location=device)
    return module.eval()


@serve.deployment
class ModelDeployment:
    """One model's replica: loads `<repository>/<model>/<version>/model.pt` once, infers in batches."""

    def __init__(self, model: str, settings: Settings) -> None:
        self._contract: ModelContract = load_contract(settings.model_repository, model)
        self._device = torch.device("cuda" if settings.device == "cuda" else "cpu")
        if self._device.type == "cpu":
            torch.set_num_threads(settings.torch_threads)
        version = latest_version(settings.model_repository, model)
        self._module = load_torchscript(str(settings.model_repository / model / version / "model.pt"), self._device)
        self._output_names = [spec.name for spec in self._contract.outputs]
        self._metrics = ModelMetrics(model, "embedded")
        self._batch_sizes: Counter[int] = Counter()
        self._forward(np.zeros((1, *self._contract.inputs[0].dims), dtype=np.uint8))  # warm up once
        log.info("model %s v%s loaded on %s", model, version, self._device)

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Apply batch settings from `user_config` without redeploying."""
        limit = self._contract.max_batch_size or config["max_batch_size"]
        self.infer.set_max_batch_size(min(int(config["max_batch_size"]), limit))
        self.infer.set_batch_wait_timeout_s(float(config["batch_wait_timeout_s"]))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def infer(self, images: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Run a batch of `[3,H,W]` uint8 images (one per caller); return each caller's outputs."""
        started = time.perf_counter()
        outputs = await asyncio.to_thread(self._forward, np.stack(images))
        self._metrics.observe_batch(len(images), time.perf_counter() - started)
        self._batch_sizes[len(images)] += 1
        return [{name: values[i] for name, values in outputs.items()} for i in range(len(images))]

    def _forward(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            result = self._module(torch.from_numpy(batch).to(self._device))
        tensors = [result] if isinstance(result, torch.Tensor) else list(result)
        return {name: tensor.cpu().numpy() for name, tensor in zip(self._output_names, tensors, strict=True)}

    def batch_sizes(self) -> dict[int, int]:
        """How many batches of each size this replica has run (lets tests observe batching)."""
        return dict(self._batch_sizes)

    def ready(self) -> bool:
        """The model is loaded (the constructor finished)."""
        return True


def latest_version(repository: Any, model: str) -> str:
    """The highest numeric version directory of `model` (Triton's default `latest` policy)."""
    versions = [p.name for p in (repository / model).iterdir() if p.is_dir() and p.name.isdigit()]
    if not versions:
        raise FileNotFoundError(f"{repository / model} has no version directory: run the export first")
    return max(versions, key=int)


def model_deployments(settings: Settings) -> dict[str, Any]:
    """Bound `ModelDeployment`s, one per enabled model, configured from `settings`."""
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
        ).bind(model, settings)
        for model in settings.models
    }


class EmbeddedBackend:
    """`Backend` over the model deployments' handles (see `service.backends.base.Backend`)."""

    def __init__(self, handles: Mapping[str, DeploymentHandle], request_timeout_s: float) -> None:
        self._handles = dict(handles)
        self._timeout_s = request_timeout_s

    async def infer(self, model: str, image: np.ndarray) -> dict[str, np.ndarray]:
        """Send one `[3,H,W]` image to `model`'s deployment, which batches it with concurrent ones."""
        response: DeploymentResponse = self._handles[model].infer.remote(image)
        try:
            return await asyncio.wait_for(_await(response), self._timeout_s)
        except (TimeoutError, asyncio.TimeoutError) as error:
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
        except Exception as error:  # any failure means "not ready"; the reason goes to the log
            log.warning("embedded models not ready: %r", error)
            return False

    async def close(self) -> None:
        """Nothing to release: Serve owns the deployments."""


async def _await(response: DeploymentResponse) -> Any:
    return await response
