"""Write Triton model repositories: the libtorch (GPU) one, its python-backend (CPU) twin, and the
ONNX Runtime variant (`onnxruntime_onnx`, GPU) serving the model.onnx written beside each model.pt.

Everything is built in staging directories next to the targets and moved in per model only
once every model is complete, so a failure never leaves a half-written model behind.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from export.errors import ExportError
from export.onnx_export import ONNX_FILE, write_onnx
from export.spec import ModelSpec, TensorSpec
from export.wrappers import save, script
from service.model_config import Enum, dump

log = logging.getLogger(__name__)

LABELS_FILE = "labels.txt"
MODEL_FILE = "model.pt"
VERSION = "1"
VERSION_FILE = "version.json"  # service.core.versions.VERSION_FILE: where this version's weights came from
# The python-backend model, copied verbatim beside model.pt in the CPU repository.
PYTHON_MODEL = Path(__file__).with_name("python_model.py")

_DATA_TYPES = {
    torch.uint8: Enum("TYPE_UINT8"),
    torch.int32: Enum("TYPE_INT32"),
    torch.int64: Enum("TYPE_INT64"),
    torch.float32: Enum("TYPE_FP32"),
}


@dataclass(frozen=True)
class Batching:
    """Dynamic-batching settings shared by both repositories."""

    max_batch_size: int = 8
    preferred_batch_sizes: tuple[int, ...] = (4, 8)
    max_queue_delay_us: int = 2000
    # Requests Triton queues per model before it refuses more (UNAVAILABLE → the gateway's 503),
    # instead of letting a flood grow its queue and memory without bound.
    max_queue_size: int = 256
    # Triton runs each batch size this often before it reports the model ready (model_warmup): TorchScript
    # optimises a graph per input shape on its second run, so the first real request is not the slow one.
    warmup_runs: int = 2
    # The batch sizes warmed up; None: every size 1..max_batch_size. With batch buckets
    # (`service.buckets`), the buckets: the only sizes the embedded backend runs, and Triton's preferred ones.
    warmup_sizes: tuple[int, ...] | None = None
    # Instances of each model per GPU in the libtorch repository (instance_group): with two, one instance's
    # batch is copied in and out while the other computes. The CPU repositories keep one.
    gpu_instances: int = 1

    def check(self) -> None:
        """Refuse settings Triton would reject at load time."""
        if self.max_batch_size < 1:
            raise ExportError(f"--max-batch-size must be at least 1, got {self.max_batch_size}")
        bad = [size for size in self.preferred_batch_sizes if not 1 <= size <= self.max_batch_size]
        if bad:
            raise ExportError(
                f"preferred batch sizes {bad} must lie in 1..{self.max_batch_size} (--max-batch-size)"
            )
        if self.max_queue_size < 1:
            raise ExportError(f"max_queue_size must be at least 1, got {self.max_queue_size}")
        bad_warmups = [size for size in self.warmup_sizes or () if not 1 <= size <= self.max_batch_size]
        if bad_warmups:
            raise ExportError(f"warm-up batch sizes {bad_warmups} must lie in 1..{self.max_batch_size}")
        if self.max_queue_delay_us < 0:
            raise ExportError(f"--max-queue-delay-us must not be negative, got {self.max_queue_delay_us}")
        if self.gpu_instances < 1:
            raise ExportError(f"--gpu-instances must be at least 1, got {self.gpu_instances}")


@dataclass(frozen=True)
class OnnxOptions:
    """How the ONNX Runtime repository runs model.onnx on the GPU."""

    # TensorRT as ONNX Runtime's GPU execution accelerator (Triton builds an engine per model at load;
    # nodes TensorRT cannot take stay on CUDA). Off: ONNX Runtime's CUDA provider alone.
    tensorrt: bool = False
    tensorrt_precision: str = "FP32"  # FP16 is faster and changes answers: check parity before using it
    tensorrt_workspace_bytes: int = 1 << 30


def model_config(spec: ModelSpec, batching: Batching, cpu: bool, onnx: OnnxOptions | None = None) -> dict[str, Any]:
    """config.pbtxt of `spec` (Triton's ModelConfig, as `service.model_config.dump` writes it):
    libtorch on KIND_GPU, the python backend on KIND_CPU, or (`onnx` given) ONNX Runtime on KIND_GPU,
    with TensorRT as its accelerator if `onnx.tensorrt`."""
    platform = "onnxruntime_onnx" if onnx is not None else None if cpu else "pytorch_libtorch"
    optimization = None
    if onnx is not None and onnx.tensorrt:
        tensorrt = {
            "name": "tensorrt",
            "parameters": [
                {"key": "precision_mode", "value": onnx.tensorrt_precision},
                {"key": "max_workspace_size_bytes", "value": str(onnx.tensorrt_workspace_bytes)},
            ],
        }
        optimization = {"execution_accelerators": {"gpu_execution_accelerator": [tensorrt]}}
    outputs = []
    for tensor in spec.outputs:
        output = {"name": tensor.name, "data_type": _data_type(tensor), "dims": list(tensor.dims)}
        if tensor.name == spec.task.labelled_output:
            output["label_filename"] = LABELS_FILE
        outputs.append(output)
    warmups = [
        {
            "name": f"batch {size}",
            "batch_size": size,
            "inputs": [
                {"key": t.name, "value": {"data_type": _data_type(t), "dims": list(t.dims), "random_data": True}}
                for t in spec.inputs
            ],
            "count": batching.warmup_runs,
        }
        for size in (batching.warmup_sizes or range(1, batching.max_batch_size + 1) if batching.warmup_runs else ())
    ]
    return {
        "name": spec.name,
        "platform": platform,
        "backend": "python" if cpu and onnx is None else None,
        "max_batch_size": batching.max_batch_size,
        "input": [{"name": t.name, "data_type": _data_type(t), "dims": list(t.dims)} for t in spec.inputs],
        "output": outputs,
        "instance_group": [
            {"count": 1 if cpu else batching.gpu_instances, "kind": Enum("KIND_CPU" if cpu else "KIND_GPU")}
        ],
        "dynamic_batching": {
            "preferred_batch_size": list(batching.preferred_batch_sizes),
            "max_queue_delay_microseconds": batching.max_queue_delay_us,
            "default_queue_policy": {"max_queue_size": batching.max_queue_size},
        },
        "parameters": [{"key": k, "value": {"string_value": v}} for k, v in spec.parameters.items()],
        "model_warmup": warmups,
        "optimization": optimization,
    }


def _data_type(tensor: TensorSpec) -> Enum:
    return _DATA_TYPES[tensor.dtype]


class Staging:
    """Model directories built beside a repository, moved into it together by `commit()`.

    `beside`: only version `version` is new; `commit()` moves it in next to the versions a model already
    has (and replaces its config and labels) instead of replacing the model's whole directory."""

    def __init__(self, target: Path, version: str = VERSION, beside: bool = False) -> None:
        self.target = target
        self.version = version
        self.beside = beside
        self.root = _make_staging_dir(target)
        self.models: list[str] = []

    def model_dir(self, name: str) -> Path:
        """A fresh directory for model `name` inside the staging area."""
        path = self.root / name
        path.mkdir()
        self.models.append(name)
        return path

    def commit(self) -> None:
        """Replace each target model directory with the staged one (a rename each)."""
        self.target.mkdir(exist_ok=True)
        for name in self.models:
            new, final = self.root / name, self.target / name
            if self.beside and final.is_dir():  # the new version next to the old ones
                (new / self.version).rename(final / self.version)
                for file in ("config.pbtxt", LABELS_FILE):
                    os.replace(new / file, final / file)
                log.info("wrote %s", final / self.version)
                continue
            if final.exists():
                final.rename(self.root / f"{name}.old")  # deleted with the staging area
            new.rename(final)
            log.info("wrote %s", final)

    def discard(self) -> None:
        """Delete the staging area (and the replaced model directories moved into it)."""
        shutil.rmtree(self.root, ignore_errors=True)


def _make_staging_dir(target: Path) -> Path:
    """Create a hidden staging directory in `target`'s parent; fail clearly if it is not writable."""
    if target.exists() and not target.is_dir():
        raise ExportError(f"output {target} exists and is not a directory")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
    except (FileExistsError, NotADirectoryError):
        raise ExportError(
            f"cannot write to {target.parent}: a file is in the way of that directory"
        ) from None
    except OSError as exc:
        raise ExportError(f"cannot write to {target.parent}: {exc.strerror or exc}") from None


@contextmanager
def staged(targets: Sequence[Path], version: str = VERSION, beside: bool = False) -> Iterator[list[Staging]]:
    """Staging areas for `targets` (writing `version`, `beside` the existing ones or not); committed when
    the block succeeds, always cleaned up."""
    stagings: list[Staging] = []
    try:
        for target in targets:
            stagings.append(Staging(target, version, beside))
        yield stagings
        for staging in stagings:
            staging.commit()
    finally:
        for staging in stagings:
            staging.discard()


def write_model(
    spec: ModelSpec, gpu: Staging, cpu: Staging, onnx: Staging | None, batching: Batching, onnx_options: OnnxOptions
) -> None:
    """Script `spec` once and export it to ONNX once; write the three staged repositories (model.pt shared
    by the libtorch and python-backend ones, model.onnx beside model.pt and in the ONNX Runtime one).
    Without `onnx` (export --no-onnx), no model.onnx and no ONNX Runtime repository."""
    log.info(
        "scripting %s (%s, %d px, %d labels)", spec.name, spec.weights, spec.input_size, len(spec.labels)
    )
    scripted = script(spec.module)
    version = gpu.version
    gpu_dir = gpu.model_dir(spec.name)
    _write_common(gpu_dir, spec, model_config(spec, batching, cpu=False), version)
    save(scripted, str(gpu_dir / version / MODEL_FILE))
    if onnx is not None:
        log.info("exporting %s to ONNX", spec.name)
        write_onnx(spec, gpu_dir / version / ONNX_FILE)
        onnx_dir = onnx.model_dir(spec.name)
        _write_common(onnx_dir, spec, model_config(spec, batching, cpu=False, onnx=onnx_options), version)
        _link_or_copy(gpu_dir / version / ONNX_FILE, onnx_dir / version / ONNX_FILE)

    cpu_dir = cpu.model_dir(spec.name)
    _write_common(cpu_dir, spec, model_config(spec, batching, cpu=True), version)
    _link_or_copy(gpu_dir / version / MODEL_FILE, cpu_dir / version / MODEL_FILE)
    shutil.copyfile(PYTHON_MODEL, cpu_dir / version / "model.py")


def _write_common(model_dir: Path, spec: ModelSpec, config: dict[str, Any], version: str = VERSION) -> None:
    (model_dir / version).mkdir()
    (model_dir / version / VERSION_FILE).write_text(json.dumps({"weights": spec.weights}) + "\n")
    (model_dir / "config.pbtxt").write_text(dump(config))
    (model_dir / LABELS_FILE).write_text("".join(f"{label}\n" for label in spec.labels))


def existing_versions(repository: Path, model: str) -> list[int]:
    """The numeric version directories `model` has in `repository` (none: an empty list)."""
    folder = repository / model
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit()) if folder.is_dir() else []


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard-link (same file system) or copy: the repositories serve the very same model file."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
