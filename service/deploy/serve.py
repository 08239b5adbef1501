"""Ray Serve's deployment of the gateway app: `build_app(settings)` composes the graph.

The HTTP app itself is `service.app.create_api` (no Ray); here it becomes the ingress deployment
(`@serve.ingress` over the late-built app), with the embedded models either inside each ingress
replica or as one deployment per model (`service.deploy.models`).
"""

from __future__ import annotations

import torch
from fastapi import FastAPI
from ray import serve
from ray.serve.config import BackpressureConfig
from ray.serve.deployment import Deployment
from ray.serve.handle import DeploymentHandle

from service.app import create_api
from service.backends.base import Backend
from service.backends.batching import model_device
from service.backends.local import LocalBackend
from service.contract import load_contract
from service.deploy.models import RAY_INSTRUMENTS, EmbeddedBackend, model_deployments
from service.imaging.images import configure_pillow
from service.settings import Settings


def make_backend(settings: Settings, models: dict[str, DeploymentHandle]) -> Backend:
    """The backend `settings` names (Triton's client is imported only when used)."""
    if settings.backend == "triton":
        from service.backends.triton import TritonBackend

        return TritonBackend(settings, models=settings.models, instruments=RAY_INSTRUMENTS)
    if settings.model_placement == "ingress":
        return LocalBackend(settings, RAY_INSTRUMENTS)
    return EmbeddedBackend(models, settings.request_timeout_s, settings.decodes_on(model_device(settings)))


@serve.deployment
@serve.ingress()
class Gateway:
    """HTTP ingress: builds the backend once per replica, then the API over it (`create_api`)."""

    def __init__(self, settings: Settings, models: dict[str, DeploymentHandle]) -> None:
        self._settings = settings
        configure_pillow(settings.max_pixels)
        if not (settings.backend == "embedded" and settings.model_placement == "ingress"):
            torch.set_num_threads(1)  # only per-image preprocessing here; leave the cores to the models
        self._backend: Backend = make_backend(settings, models)

    def __serve_build_asgi_app__(self) -> FastAPI:
        self._api = create_api(self._settings, self._backend, RAY_INSTRUMENTS)
        return self._api

    def batch_sizes(self, model: str) -> dict[int, int]:
        """Batches of each size `model` ran in this replica (embedded backend in the ingress; tests use it)."""
        return self._backend.batch_sizes(model)

    async def __del__(self) -> None:
        api = getattr(self, "_api", None)
        if api is not None:
            api.state.answerer.close()
        backend = getattr(self, "_backend", None)
        if backend is not None:
            await backend.close()


def resolve_device(settings: Settings) -> Settings:
    """Turn `device="auto"` into cuda or cpu here, where Ray can still be asked for a GPU."""
    if settings.device != "auto":
        return settings
    return settings.model_copy(update={"device": "cuda" if torch.cuda.is_available() else "cpu"})


def serve_deployments(settings: Settings) -> tuple[Deployment, dict[str, Deployment]]:
    """The graph's deployments with their options: the ingress and, for embedded models placed apart,
    one per model (what `build_app` binds and the Serve config files describe)."""
    settings = resolve_device(settings)
    for model in settings.models:
        load_contract(settings.model_repository, model)  # fail here, clearly, if the export is missing
    models_inside = settings.backend == "embedded" and settings.model_placement == "ingress"
    separate = settings.backend == "embedded" and not models_inside
    actor_options: dict[str, float] = {"num_cpus": settings.ingress_num_cpus}
    if models_inside:
        actor_options["num_cpus"] += settings.model_num_cpus * len(settings.models)
        if settings.device == "cuda":
            actor_options["num_gpus"] = settings.model_num_gpus
    ingress = Gateway.options(
        num_replicas=settings.ingress_replicas,
        max_ongoing_requests=settings.max_ongoing_requests,
        max_queued_requests=settings.max_queued_requests,
        # Serve's own 503 when its queue in front of the gateway is full: say when to retry too
        backpressure_config=BackpressureConfig(retry_after_s=settings.retry_after_s),
        ray_actor_options=actor_options,
    )
    return ingress, (model_deployments(settings) if separate else {})


def build_app(settings: Settings) -> serve.Application:
    """Compose the whole graph: the ingress and, for embedded models placed apart, one deployment per model."""
    settings = resolve_device(settings)
    ingress, models = serve_deployments(settings)
    return ingress.bind(settings, {name: model.bind(name, settings) for name, model in models.items()})
