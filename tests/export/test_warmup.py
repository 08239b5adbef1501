"""Every model is warmed up at every batch size it will be asked for before it reports ready:
Triton through the exported configs' `model_warmup`, the embedded backend in its constructor
(first-request latency before/after: loadtests/RESULTS.md, `python -m loadtests.first_request`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.backends.local import LocalBackend
from service.contract import load_contract
from service.settings import Settings
from tasks import MODELS


@pytest.mark.parametrize("repository_name", ["model_repository", "build/triton_cpu_repository"])
@pytest.mark.parametrize("model", MODELS)
def test_exported_configs_warm_every_batch_size_twice(model: str, repository_name: str, model_repository: Path) -> None:
    repository = model_repository if repository_name == "model_repository" else model_repository.parent / repository_name
    contract = load_contract(repository, model)
    assert contract.config is not None
    warmups = list(contract.config.model_warmup)
    assert [w.batch_size for w in warmups] == list(range(1, contract.max_batch_size + 1))
    for warmup in warmups:
        assert warmup.count == 2
        (name,) = warmup.inputs
        (spec,) = contract.inputs
        assert name == spec.name and tuple(warmup.inputs[name].dims) == spec.dims
        assert warmup.inputs[name].random_data


def test_embedded_models_ran_every_batch_size_before_serving(model_repository: Path) -> None:
    settings = Settings(model_repository=model_repository, models=("classifier",), device="cpu", max_batch_size=5)
    backend = LocalBackend(settings)
    assert backend._models["classifier"].model.batch_sizes_run == {1, 2, 3, 4, 5}
    quick = Settings(model_repository=model_repository, models=("classifier",), device="cpu", warm_up_batch_sizes=False)
    assert LocalBackend(quick)._models["classifier"].model.batch_sizes_run == {1}
