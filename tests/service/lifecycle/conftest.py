"""Model repositories with two versions of the classifier that differ on purpose, and a gateway over one.

Version 1 is the exported demo classifier (hard links to model_repository's files). Version 2 is the
same network with the output rows of classes 0 and 1 swapped (weights perturbed on purpose, not a
retrained model): it answers every image of those two classes differently from version 1 and every
other image the same, so its top-1 agreement with version 1 is the share of other classes (about 3/5).
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from service.backends.torchscript import quiet_jit
from support import versions
from support.seeds import fresh_seeds
from support.serving import served_in_thread
from training.shapes import CLASSES, make_scene

MODEL = versions.CLASSIFIER
ADMIN_KEY = "admin-" + "a" * 20
API_KEY = "client-" + "c" * 20
SWAPPED = versions.SWAPPED  # version 2's swapped classes


def write_version(repository: Path, version: str, model_file: Path) -> Path:
    """`<repository>/classifier/<version>/model.pt` from `model_file` (renamed in whole)."""
    return versions.write_version(repository, MODEL, version, model_file)


@pytest.fixture(scope="session")
def swapped_classifier(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo classifier with classes 0 and 1 swapped in its last layer (a TorchScript file)."""
    return versions.swap_classes(model_repository / MODEL / "1" / "model.pt", tmp_path_factory.mktemp("swapped") / "model.pt")


@pytest.fixture(scope="session")
def broken_classifier(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two ways a version can be bad: a file that is no model, and a model that breaks the contract
    (3 probabilities where the contract says 5)."""
    folder = tmp_path_factory.mktemp("broken")
    (folder / "garbage.pt").write_bytes(b"this is not a TorchScript archive")

    class ThreeClasses(torch.nn.Module):
        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return torch.softmax(image.float().mean(dim=(2, 3)), dim=1)  # [N,3]

    with quiet_jit():
        torch.jit.save(torch.jit.script(ThreeClasses()), str(folder / "three.pt"))
    return {"garbage": folder / "garbage.pt", "contract": folder / "three.pt"}


@pytest.fixture
def repository(model_repository: Path, tmp_path: Path) -> Path:
    """A repository with the classifier's version 1 only (its config and labels, model.pt linked)."""
    return versions.one_version_repository(model_repository, tmp_path / "repository")


def scene_png(index: int) -> tuple[bytes, int]:
    """A one-shape scene the classifier never saw, as PNG, and its class index."""
    (seed,) = fresh_seeds(1, offset=500 + index)
    scene = make_scene(seed, 96, 1, 1)
    buffer = io.BytesIO()
    Image.fromarray(scene.image).save(buffer, "PNG")
    return buffer.getvalue(), int(scene.labels[0]) - 1


served = served_in_thread


__all__ = ["ADMIN_KEY", "API_KEY", "CLASSES", "MODEL", "SWAPPED", "scene_png", "served", "write_version"]
