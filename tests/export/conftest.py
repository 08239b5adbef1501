"""Session fixtures: small random-init demo checkpoints and the repositories the real CLI exports."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from export.sources import ARCHITECTURES  # noqa: F401  (importing export registers every architecture)
from tasks import MODELS, TASKS, get_arch
from tests.export.support import export_in_process
from training.shapes import CLASSES

# A checkpoint of a demo architecture exports at the demo's training sizes unless told otherwise.
SIZES = {model: get_arch(model, "demo").default_size()[0] for model in MODELS}
# A long queue delay lets the CPU Triton test see concurrent requests merged into one batch.
QUEUE_DELAY_US = 200_000
BATCHING = (
    "--max-batch-size",
    "4",
    "--preferred-batch-sizes",
    "2",
    "4",
    "--max-queue-delay-us",
    str(QUEUE_DELAY_US),
)


@dataclass(frozen=True)
class Checkpoint:
    """A random-init state dict on disk, its class-names file, and the eager model it came from."""

    path: Path
    classes: Path
    labels: tuple[str, ...]
    model: nn.Module


@dataclass(frozen=True)
class Exported:
    """The repositories written by one set of CLI runs."""

    out: Path
    cpu_out: Path
    checkpoints: dict[str, Checkpoint]

    @property
    def onnx_out(self) -> Path:
        """The onnxruntime repository, which export puts beside --cpu-out unless told otherwise."""
        return self.cpu_out.parent / "triton_onnx_repository"


def _labels_for(model: str) -> tuple[str, ...]:
    background = TASKS[model].background
    return (*CLASSES,) if background is None else (background, *CLASSES)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Checkpoint]:
    """classifier.pt and detector.pt (torch.save) and segmenter.safetensors, seeded random init."""
    root = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(1234)
    models = {model: get_arch(model, "demo").build(len(_labels_for(model)), SIZES[model]) for model in MODELS}
    with torch.no_grad():
        # A fresh U-Net's logits are tiny and its head's bias picks one class everywhere; a mask
        # of one class could not show that MASK is the per-pixel argmax, so let the pixels speak.
        models["segmenter"].head.bias.zero_()
        models["segmenter"].head.weight.mul_(100)
    result = {}
    for name, model in models.items():
        labels = _labels_for(name)
        classes = root / f"{name}-classes.txt"
        classes.write_text("\n".join(labels) + "\n")
        if name == "segmenter":
            path = root / f"{name}.safetensors"
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        else:
            path = root / f"{name}.pt"
            torch.save(model.state_dict(), path)
        result[name] = Checkpoint(path, classes, labels, model.eval())
    return result


@pytest.fixture(scope="session")
def exported(checkpoints: dict[str, Checkpoint], tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """Export each model with `--weights checkpoint` (export's main, in process) into fresh repositories."""
    root = tmp_path_factory.mktemp("exported")
    out, cpu_out = root / "model_repository", root / "build" / "triton_cpu_repository"
    for name, checkpoint in checkpoints.items():
        done = export_in_process(
            name,
            "--weights",
            "checkpoint",
            "--checkpoint",
            str(checkpoint.path),
            "--classes",
            str(checkpoint.classes),
            "--out",
            str(out),
            "--cpu-out",
            str(cpu_out),
            *BATCHING,
        )
        assert done.returncode == 0, done.stderr
    return Exported(out, cpu_out, checkpoints)
