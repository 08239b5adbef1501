"""Read a model's I/O contract from `model_repository/<model>/` (config.pbtxt + labels).

The export writes this contract once; Triton and the gateway both read it from there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

_DTYPES = {
    model_config_pb2.TYPE_UINT8: "uint8",
    model_config_pb2.TYPE_INT32: "int32",
    model_config_pb2.TYPE_INT64: "int64",
    model_config_pb2.TYPE_FP16: "float16",
    model_config_pb2.TYPE_FP32: "float32",
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    dims: tuple[int, ...]  # without the batch dimension


@dataclass(frozen=True)
class ModelContract:
    name: str
    task: str  # classification | detection | segmentation
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    labels: tuple[str, ...]
    max_batch_size: int
    parameters: dict[str, str] = field(default_factory=dict)
    config: model_config_pb2.ModelConfig | None = field(default=None, compare=False, repr=False)

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) of the model's IMAGE input."""
        _, height, width = self.inputs[0].dims
        return height, width

    @property
    def preprocess(self) -> str:
        return self.parameters.get("preprocess", "letterbox")

    @property
    def resize_size(self) -> int | None:
        value = self.parameters.get("resize_size")
        return int(value) if value else None


def _spec(tensor: model_config_pb2.ModelInput | model_config_pb2.ModelOutput) -> TensorSpec:
    return TensorSpec(tensor.name, _DTYPES[tensor.data_type], tuple(int(d) for d in tensor.dims))


def parse_config(text: str) -> model_config_pb2.ModelConfig:
    """Parse config.pbtxt text with Triton's own protobuf schema (unknown fields are errors)."""
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def load_contract(repository: Path | str, model: str) -> ModelContract:
    """Load `<repository>/<model>/config.pbtxt` and the labels file it references."""
    model_dir = Path(repository) / model
    config_path = model_dir / "config.pbtxt"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: run the export first (see README)")
    config = parse_config(config_path.read_text())
    label_files = {out.label_filename for out in config.output if out.label_filename}
    labels: tuple[str, ...] = ()
    if label_files:
        (label_file,) = label_files
        labels = tuple(line.rstrip("\n") for line in (model_dir / label_file).read_text().splitlines())
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    return ModelContract(
        name=config.name or model,
        task=parameters.get("task", ""),
        inputs=tuple(_spec(t) for t in config.input),
        outputs=tuple(_spec(t) for t in config.output),
        labels=labels,
        max_batch_size=config.max_batch_size,
        parameters=parameters,
        config=config,
    )
