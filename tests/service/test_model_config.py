"""config.pbtxt without tritonclient: what `service.model_config` writes and reads agrees with Triton's own
protobuf schema (`tritonclient.grpc.model_config_pb2`) on every config the export writes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from google.protobuf import text_format
from torch import nn
from tritonclient.grpc import model_config_pb2 as pb

from export.repository import Batching, model_config
from export.spec import ModelSpec
from service.contract import ModelContract, load_contract, parse_config
from service.model_config import ConfigSyntaxError, Enum, dump, first, parse, string_map
from tasks import MODELS

_TYPES = {"uint8": pb.TYPE_UINT8, "int32": pb.TYPE_INT32, "int64": pb.TYPE_INT64, "float32": pb.TYPE_FP32}


def _reference(spec: ModelSpec, batching: Batching, cpu: bool) -> pb.ModelConfig:
    """config.pbtxt as the export built it with model_config_pb2 before it wrote text itself."""
    config = pb.ModelConfig(name=spec.name, max_batch_size=batching.max_batch_size)
    if cpu:
        config.backend = "python"
    else:
        config.platform = "pytorch_libtorch"
    for t in spec.inputs:
        config.input.append(
            pb.ModelInput(name=t.name, data_type=_TYPES[str(t.dtype).split(".")[1]], dims=t.dims)
        )
    for t in spec.outputs:
        output = pb.ModelOutput(name=t.name, data_type=_TYPES[str(t.dtype).split(".")[1]], dims=t.dims)
        if t.name == spec.task.labelled_output:
            output.label_filename = "labels.txt"
        config.output.append(output)
    config.dynamic_batching.preferred_batch_size.extend(batching.preferred_batch_sizes)
    config.dynamic_batching.max_queue_delay_microseconds = batching.max_queue_delay_us
    config.dynamic_batching.default_queue_policy.max_queue_size = batching.max_queue_size
    kind = pb.ModelInstanceGroup.KIND_CPU if cpu else pb.ModelInstanceGroup.KIND_GPU
    config.instance_group.append(pb.ModelInstanceGroup(kind=kind, count=1))
    for key, value in spec.parameters.items():
        config.parameters[key].string_value = value
    for size in (
        (batching.warmup_sizes or range(1, batching.max_batch_size + 1)) if batching.warmup_runs else ()
    ):
        warmup = config.model_warmup.add(name=f"batch {size}", batch_size=size, count=batching.warmup_runs)
        for t in spec.inputs:
            warmup.inputs[t.name].CopyFrom(
                pb.ModelWarmup.Input(
                    data_type=_TYPES[str(t.dtype).split(".")[1]], dims=t.dims, random_data=True
                )
            )
    return config


def _specs() -> list[ModelSpec]:
    labels = {
        "classifier": ("cat", "dog", 'quote " \\ é'),
        "detector": ("__background__", "a", "b"),
        "segmenter": ("bg", "x"),
    }
    specs = [ModelSpec(m, nn.Identity(), labels[m], 64, "checkpoint:/tmp/w.pt") for m in MODELS]
    return [
        *specs,
        dataclasses.replace(specs[0], input_size=224, resize_size=232, weights="pretrained:IMAGENET1K_V2"),
    ]


BUCKETS = (1, 4, 8, 16, 32, 64, 128)
BATCHINGS = [
    Batching(),
    Batching(1, (1,), 0, warmup_runs=0),
    Batching(128, BUCKETS, 500, warmup_sizes=BUCKETS),
]


@pytest.mark.parametrize("cpu", [False, True], ids=["libtorch", "python"])
@pytest.mark.parametrize("batching", BATCHINGS, ids=["default", "one", "buckets"])
def test_written_configs_are_what_triton_s_schema_builds(batching: Batching, cpu: bool) -> None:
    for spec in _specs():
        text = dump(model_config(spec, batching, cpu))
        assert parse_config(text) == _reference(spec, batching, cpu)  # unknown fields would raise


@pytest.mark.parametrize("batching", BATCHINGS, ids=["default", "one", "buckets"])
def test_contracts_read_without_tritonclient_equal_triton_s_parse(tmp_path: Path, batching: Batching) -> None:
    for spec in _specs():
        for cpu in (False, True):
            model_dir = tmp_path / spec.name
            model_dir.mkdir(exist_ok=True)
            reference = _reference(spec, batching, cpu)
            (model_dir / "config.pbtxt").write_text(text_format.MessageToString(reference))
            (model_dir / "labels.txt").write_text("".join(f"{label}\n" for label in spec.labels))
            contract = load_contract(tmp_path, spec.name)
            assert contract == _contract_via_protobuf(tmp_path, spec.name)
            assert contract.config == reference
            assert (
                contract.parameters == spec.parameters and contract.max_batch_size == batching.max_batch_size
            )
            warmups = [w.batch_size for w in contract.config.model_warmup]
            assert (
                warmups == list(batching.warmup_sizes or range(1, batching.max_batch_size + 1))
                if batching.warmup_runs
                else not warmups
            )


def _contract_via_protobuf(repository: Path, model: str) -> ModelContract:
    """The contract as service/contract.py read it with model_config_pb2 before."""
    from service.contract import TensorSpec

    dtypes = {pb.TYPE_UINT8: "uint8", pb.TYPE_INT32: "int32", pb.TYPE_INT64: "int64", pb.TYPE_FP32: "float32"}
    config = parse_config((repository / model / "config.pbtxt").read_text())
    (label_file,) = {o.label_filename for o in config.output if o.label_filename}
    return ModelContract(
        name=config.name or model,
        task=config.parameters["task"].string_value,
        inputs=tuple(TensorSpec(t.name, dtypes[t.data_type], tuple(t.dims)) for t in config.input),
        outputs=tuple(TensorSpec(t.name, dtypes[t.data_type], tuple(t.dims)) for t in config.output),
        labels=tuple((repository / model / label_file).read_text().splitlines()),
        max_batch_size=config.max_batch_size,
        parameters={k: v.string_value for k, v in config.parameters.items()},
    )


def test_reads_hand_written_triton_configs() -> None:
    text = """
    # a config as people write them
    name: "resnet"  platform: "pytorch_libtorch"
    max_batch_size: 8
    input [ { name: "IMAGE" data_type: TYPE_UINT8 dims: [ 3, 224, 224 ] } ]
    output < name: 'PROBS', data_type: TYPE_FP32, dims: [1000]; label_filename: "labels.txt" >
    dynamic_batching { preferred_batch_size: [4, 8] max_queue_delay_microseconds: 100 }
    parameters: { key: "task" value: { string_value: "classifi" "cation\\n\\303\\251" } }
    optimization { cuda { graphs: true } }
    version_policy: { latest { num_versions: 1 } }
    """
    config = parse(text)
    assert first(config, "name") == "resnet" and first(config, "max_batch_size") == 8
    (image,) = config["input"]
    assert image == {"name": ["IMAGE"], "data_type": [Enum("TYPE_UINT8")], "dims": [3, 224, 224]}
    assert isinstance(first(image, "data_type"), Enum)
    assert first(config["output"][0], "label_filename") == "labels.txt"
    assert string_map(config, "parameters") == {"task": "classification\né"}
    assert first(first(first(config, "optimization"), "cuda"), "graphs") is True
    assert parse_config(text).parameters["task"].string_value == "classification\né"


@pytest.mark.parametrize(
    "text", ['name: "x', "input { name: 1", "dims: [1, 2", "max_batch_size: 8 }", "a: $"]
)
def test_broken_text_is_a_syntax_error(text: str) -> None:
    with pytest.raises(ConfigSyntaxError):
        parse(text)
