"""Second model versions that differ on purpose, for the lifecycle tests, the dashboard check and the
shadow-latency measurement (loadtests/lifecycle.py).

`swap_classes` writes the demo classifier with the output rows of two classes swapped in its last
layer: a perturbed copy of the demo weights, not a retrained model. It answers every image of those two
classes differently from the original and every other image the same, so its top-1 agreement with the
original is exactly the share of other classes among the images (about 3/5 on shapes scenes).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from service.backends.torchscript import load_torchscript, quiet_jit

CLASSIFIER = "classifier"
SWAPPED = (0, 1)


def swap_classes(model_file: Path, out: Path, classes: Sequence[int] = SWAPPED, layer: str = "model.fc") -> Path:
    """`model_file` (a TorchScript classifier) with the `layer` output rows of `classes` swapped, saved as `out`."""
    module = load_torchscript(model_file, torch.device("cpu"))
    params = dict(module.named_parameters())
    order = list(classes)
    with torch.no_grad():
        for name in (f"{layer}.weight", f"{layer}.bias"):
            value = params[name]
            value[order] = value[order[::-1]].clone()
    out.parent.mkdir(parents=True, exist_ok=True)
    with quiet_jit():
        torch.jit.save(module, str(out))
    return out


def link_or_copy(source: Path, target: Path) -> None:
    """Hard-link (same file system) or copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def write_version(repository: Path, model: str, version: str, model_file: Path) -> Path:
    """`<repository>/<model>/<version>/model.pt` from `model_file`, written beside and renamed in (as a
    deployment would, so a repository watcher never sees half a version)."""
    folder = repository / model / version
    staging = repository / model / f".{version}.staging"
    staging.mkdir(parents=True)
    link_or_copy(model_file, staging / "model.pt")
    staging.rename(folder)
    return folder


def one_version_repository(source: Path, target: Path, model: str = CLASSIFIER, version: str = "1") -> Path:
    """A repository at `target` holding `model`'s config, labels and `version`'s model.pt (linked) from `source`."""
    (target / model).mkdir(parents=True)
    for name in ("config.pbtxt", "labels.txt"):
        shutil.copy2(source / model / name, target / model / name)
    write_version(target, model, version, source / model / version / "model.pt")
    return target
