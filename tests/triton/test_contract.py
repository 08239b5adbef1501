"""What Triton actually serves matches the contract in model_repository/ for every model."""

from __future__ import annotations

from pathlib import Path

import pytest
import tritonclient.grpc as triton_grpc
from tritonclient.utils import triton_to_np_dtype

from service.contract import load_contract
from stack.triton import TritonServer
from tests.triton.conftest import MODELS


@pytest.mark.parametrize("model", MODELS)
def test_triton_metadata_matches_the_contract(cpu_triton: TritonServer, model_repository: Path, model: str) -> None:
    contract = load_contract(model_repository, model)
    with triton_grpc.InferenceServerClient(cpu_triton.grpc_url) as client:
        assert client.is_model_ready(model)
        metadata = client.get_model_metadata(model)
        config = client.get_model_config(model).config

    assert metadata.name == model
    served_inputs = [(t.name, str(triton_to_np_dtype(t.datatype)().dtype), tuple(t.shape)) for t in metadata.inputs]
    served_outputs = [(t.name, str(triton_to_np_dtype(t.datatype)().dtype), tuple(t.shape)) for t in metadata.outputs]
    # Metadata shapes carry the implicit batch dimension as -1.
    assert served_inputs == [(s.name, s.dtype, (-1, *s.dims)) for s in contract.inputs]
    assert sorted(served_outputs) == sorted((s.name, s.dtype, (-1, *s.dims)) for s in contract.outputs)

    assert config.max_batch_size == contract.max_batch_size > 0
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [
        (t.name, t.data_type, list(t.dims)) for t in contract.config.input
    ]
    assert [(t.name, t.data_type, list(t.dims), t.label_filename) for t in config.output] == [
        (t.name, t.data_type, list(t.dims), t.label_filename) for t in contract.config.output
    ]
    assert config.HasField("dynamic_batching"), "Triton must batch concurrent requests itself"


@pytest.mark.parametrize("model", MODELS)
def test_cpu_variant_has_the_contract_of_the_gpu_repository(
    model_repository: Path, cpu_repository: Path, model: str
) -> None:
    gpu = load_contract(model_repository, model)
    cpu = load_contract(cpu_repository, model)
    assert (cpu.inputs, cpu.outputs, cpu.labels, cpu.max_batch_size) == (
        gpu.inputs, gpu.outputs, gpu.labels, gpu.max_batch_size,
    )
    assert cpu.config.backend == "python"


@pytest.mark.parametrize("model", MODELS)
def test_gpu_repository_targets_libtorch_on_gpu_with_dynamic_batching(model_repository: Path, model: str) -> None:
    config = load_contract(model_repository, model).config
    assert config.platform == "pytorch_libtorch"
    assert config.instance_group and all(g.kind == g.KIND_GPU for g in config.instance_group)
    assert list(config.dynamic_batching.preferred_batch_size), "preferred batch sizes missing"
    assert max(config.dynamic_batching.preferred_batch_size) <= config.max_batch_size
    assert config.dynamic_batching.default_queue_policy.max_queue_size > 0, "Triton's queue is unbounded"
