"""Read a model's I/O contract from `model_repository/<model>/` (config.pbtxt + labels).

The export writes this contract once; Triton and the gateway both read it from there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.model_config import Message, first, parse, string_map

if TYPE_CHECKING:
    from tritonclient.grpc import model_config_pb2

_DTYPES = {
    "TYPE_UINT8": "uint8",
    "TYPE_INT32": "int32",
    "TYPE_INT64": "int64",
    "TYPE_FP16": "float16",
    "TYPE_FP32": "float32",
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
    config_text: str = field(default="", compare=False, repr=False)  # config.pbtxt as read

    @property
    def config(self) -> model_config_pb2.ModelConfig:
        """config.pbtxt as Triton's own protobuf message (imports tritonclient: for tests and tools)."""
        return parse_config(self.config_text)

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


def _spec(tensor: Message) -> TensorSpec:
    data_type = str(first(tensor, "data_type", "TYPE_INVALID"))
    if data_type not in _DTYPES:
        raise ValueError(f"tensor {first(tensor, 'name', '')!r}: data_type {data_type} is not one the gateway reads")
    return TensorSpec(str(first(tensor, "name", "")), _DTYPES[data_type], tuple(int(d) for d in tensor.get("dims", [])))


def parse_config(text: str) -> model_config_pb2.ModelConfig:
    """Parse config.pbtxt text with Triton's own protobuf schema (unknown fields are errors).
    Needs tritonclient; the gateway itself reads configs with `service.model_config`."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


def load_contract(repository: Path | str, model: str) -> ModelContract:
    """Load `<repository>/<model>/config.pbtxt` and the labels file it references."""
    model_dir = Path(repository) / model
    config_path = model_dir / "config.pbtxt"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: run the export first (see README)")
    text = config_path.read_text()
    config = parse(text)
    outputs: list[Any] = config.get("output", [])
    label_files = {first(out, "label_filename") for out in outputs if first(out, "label_filename")}
    labels: tuple[str, ...] = ()
    if label_files:
        (label_file,) = label_files
        labels = tuple(line.rstrip("\n") for line in (model_dir / label_file).read_text().splitlines())
    parameters = string_map(config, "parameters")
    return ModelContract(
        name=str(first(config, "name", "")) or model,
        task=parameters.get("task", ""),
        inputs=tuple(_spec(t) for t in config.get("input", [])),
        outputs=tuple(_spec(t) for t in outputs),
        labels=labels,
        max_batch_size=int(first(config, "max_batch_size", 0)),
        parameters=parameters,
        config_text=text,
    )
