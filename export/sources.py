"""Where weights come from: torchvision's pretrained weights, a user's checkpoint, or the demo.

Each source yields `ModelSpec`s: an eager model with its weights loaded, wrapped for Triton's
I/O, plus the class names that travel with those weights.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision.models import ResNet50_Weights, WeightsEnum

from export import archs as _torchvision_archs  # noqa: F401  (registers torchvision's architectures)
from export.errors import ExportError
from export.spec import ModelSpec
from export.wrappers import WRAPPERS
from tasks import MODELS, TASKS, Architecture, get_arch, list_archs
from training import archs as _demo_archs  # noqa: F401  (registers the demo architectures)
from training.models import DEMO_MEAN, DEMO_STD

log = logging.getLogger(__name__)

WEIGHT_SOURCES = ("demo", "pretrained", "checkpoint")
# Architectures a checkpoint may be for ("demo" is training/models.py's builder for that model),
# as registered by export.archs and training.archs (`register_arch`).
ARCHITECTURES: dict[str, tuple[str, ...]] = {model: list_archs(model) for model in MODELS}
DEMO_FILES = ("classifier.pt", "detector.pt", "segmenter.pt", "meta.json", "report.json")


@dataclass(frozen=True)
class SourceOptions:
    """The command line's choice of weights and input geometry."""

    weights: str  # one of WEIGHT_SOURCES
    arch: str = "demo"
    checkpoint: Path | None = None
    classes: Path | None = None
    demo_dir: Path = Path("artifacts/demo")
    input_size: int | None = None
    resize_size: int | None = None


@dataclass(frozen=True)
class _Geometry:
    input_size: int
    resize_size: int | None  # classifier only


def load_specs(models: Sequence[str], options: SourceOptions) -> list[ModelSpec]:
    """Load every requested model from the chosen weight source, checking inputs before heavy work."""
    if options.weights != "checkpoint" and (options.checkpoint or options.classes or options.arch != "demo"):
        raise ExportError("--checkpoint, --classes and --arch belong to --weights checkpoint")
    if options.weights == "pretrained":
        for model in models:
            if TASKS[model].pretrained_arch is None:
                raise ExportError(
                    f"torchvision has no pretrained weights for the {model} (it has no U-Net): "
                    "export it with --weights demo or --weights checkpoint"
                )
        return [_pretrained_spec(model, options) for model in models]
    if options.weights == "checkpoint":
        if len(models) != 1:
            raise ExportError(
                "--weights checkpoint exports one model at a time: name classifier, detector or segmenter"
            )
        return [_checkpoint_spec(models[0], options)]
    if options.weights == "demo":
        return _demo_specs(models, options)
    raise ExportError(f"unknown weight source {options.weights!r}: choose one of {', '.join(WEIGHT_SOURCES)}")


# --- pretrained -------------------------------------------------------------------------------


def _pretrained_spec(model: str, options: SourceOptions) -> ModelSpec:
    arch = get_arch(model, str(TASKS[model].pretrained_arch))
    weights = arch.pretrained
    assert weights is not None, f"{model}: the pretrained architecture {arch.name} has no weights"
    labels = tuple(weights.meta["categories"])
    geometry = _geometry(model, arch, options)
    eager = arch.build(len(labels), geometry.input_size)
    _load_into(eager, _pretrained_state(weights), f"{weights} ({pretrained_cache_path(weights)})")
    return _spec(model, eager, labels, geometry, f"pretrained:{weights}", _stats(arch))


def pretrained_cache_path(weights: WeightsEnum) -> Path:
    """Where torchvision looks for (and downloads) `weights`: $TORCH_HOME/hub/checkpoints/<file>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name


def _pretrained_state(weights: WeightsEnum) -> dict[str, torch.Tensor]:
    """The state dict through torchvision's weights API (cache first, download otherwise).

    torch.hub checks the file name's hash prefix only while downloading; a file already in the
    cache is loaded as it is, which is what lets an offline machine use a pre-filled cache.
    """
    cached = pretrained_cache_path(weights)
    if not cached.is_file():
        log.info("%s not cached at %s: downloading %s", weights, cached, weights.url)
    try:
        return weights.get_state_dict(progress=False, check_hash=True, map_location="cpu", weights_only=True)
    except OSError as exc:  # URLError and friends: no network, or the cache is not writable
        raise ExportError(
            f"cannot get {weights} ({_first_line(exc)}); offline, put {weights.url} at {cached}"
        ) from exc
    except RuntimeError as exc:  # hash mismatch on download, or an unreadable cached file
        raise ExportError(f"cannot load {weights} from {cached}: {_first_line(exc)}") from exc


def _imagenet_stats() -> tuple[list[float], list[float]]:
    transforms = ResNet50_Weights.IMAGENET1K_V2.transforms()
    return list(transforms.mean), list(transforms.std)


# --- checkpoint -------------------------------------------------------------------------------


def _checkpoint_spec(model: str, options: SourceOptions) -> ModelSpec:
    if options.arch not in ARCHITECTURES[model]:
        raise ExportError(
            f"--arch {options.arch} does not fit the {model}: choose one of {', '.join(ARCHITECTURES[model])}"
        )
    if options.checkpoint is None or options.classes is None:
        raise ExportError("--weights checkpoint needs --checkpoint FILE and --classes FILE")
    arch = get_arch(model, options.arch)
    labels = read_labels(options.classes, model)
    state = read_state_dict(options.checkpoint)
    _check_class_count(arch, state, labels, options.checkpoint, options.classes)
    geometry = _geometry(model, arch, options)
    eager = arch.build(len(labels), geometry.input_size)
    _load_into(eager, state, f"checkpoint {options.checkpoint} (for --arch {options.arch} {model})")
    return _spec(model, eager, labels, geometry, f"checkpoint:{options.checkpoint.name}", _stats(arch))


def read_labels(path: Path, model: str) -> tuple[str, ...]:
    """Class names, one per line, exactly as labels.txt will hold them (line index == class index)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ExportError(f"class-names file {path} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ExportError(f"cannot read class-names file {path}: {_first_line(exc)}") from None
    while lines and not lines[-1].strip():
        lines.pop()
    labels = tuple(line.strip() for line in lines)
    if not labels:
        raise ExportError(f"class-names file {path} is empty")
    if "" in labels:
        raise ExportError(f"class-names file {path}: line {labels.index('') + 1} is empty")
    background = TASKS[model].background
    if background is not None and labels[0] != background:
        raise ExportError(
            f"class-names file {path}: line 1 must be {background!r} (the {model}'s class 0), found {labels[0]!r}"
        )
    return labels


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a torch file (weights_only) or .safetensors; unwraps {"model": ...}."""
    if not path.is_file():
        raise ExportError(f"checkpoint {path} not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch/safetensors raise many types for unreadable files
        raise ExportError(f"cannot read checkpoint {path}: {_first_line(exc)}") from None
    for wrapper_key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper_key), dict):
            state = state[wrapper_key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ExportError(f"checkpoint {path} is not a state dict (a mapping of names to tensors)")
    return state


def _check_class_count(
    arch: Architecture, state: dict[str, torch.Tensor], labels: Sequence[str], checkpoint: Path, classes: Path
) -> None:
    model, key = arch.model, arch.class_count_key
    if key not in state:
        raise ExportError(f"checkpoint {checkpoint} is not a {model} state dict (it has no {key!r})")
    outputs = state[key].shape[0]
    if outputs != len(labels):
        first = TASKS[model].background
        background = f", {first!r} first" if first is not None else ""
        raise ExportError(
            f"class-names file {classes} lists {len(labels)} names but checkpoint {checkpoint} predicts "
            f"{outputs} classes: give one name per class{background}"
        )


# --- demo -------------------------------------------------------------------------------------


def _demo_specs(models: Sequence[str], options: SourceOptions) -> list[ModelSpec]:
    demo_dir = options.demo_dir
    _ensure_demo(demo_dir)
    meta = json.loads((demo_dir / "meta.json").read_text())
    stats = (list(meta["mean"]), list(meta["std"]))
    specs = []
    for model in models:
        task, arch = TASKS[model], get_arch(model, "demo")
        classes = tuple(meta["classes"])
        labels = (task.background, *classes) if task.background is not None else classes
        size = options.input_size or int(meta["image_size"][model])
        geometry = (
            _classifier_geometry(size, size, options)
            if task.preprocess == "resize_center_crop"
            else _Geometry(size, None)
        )
        _check_size(model, geometry.input_size)
        checkpoint = demo_dir / f"{model}.pt"
        state = read_state_dict(checkpoint)
        _check_class_count(arch, state, labels, checkpoint, demo_dir / "meta.json")
        eager = arch.build(len(labels), geometry.input_size)
        if arch.tune is not None:
            arch.tune(eager, meta)
        _load_into(eager, state, f"demo checkpoint {checkpoint}")
        specs.append(_spec(model, eager, labels, geometry, "demo", stats))  # training's own statistics
    return specs


def _ensure_demo(demo_dir: Path) -> None:
    """Train the demo models if `demo_dir` lacks them (training caches), and insist they passed."""
    if not all((demo_dir / name).is_file() for name in DEMO_FILES):
        from training.__main__ import main as train_main

        log.info("demo weights missing in %s: running `python -m training --out %s`", demo_dir, demo_dir)
        train_main(["--out", str(demo_dir)])
    missing = [name for name in DEMO_FILES if not (demo_dir / name).is_file()]
    if missing:
        raise ExportError(f"demo training did not produce {', '.join(missing)} in {demo_dir}")
    report = json.loads((demo_dir / "report.json").read_text())
    if not report.get("passed", False):
        raise ExportError(
            f"demo models in {demo_dir} miss their quality bars (see {demo_dir / 'report.json'}): "
            "retrain with `python -m training --force`"
        )


# --- shared -----------------------------------------------------------------------------------


def _geometry(model: str, arch: Architecture, options: SourceOptions) -> _Geometry:
    """Input side (and the classifier's resize side) from the weights' own numbers, or overrides."""
    size, resize = arch.default_size()
    if TASKS[model].preprocess == "resize_center_crop":
        geometry = _classifier_geometry(size, resize or size, options)
    else:
        geometry = _Geometry(options.input_size or size, None)
    _check_size(model, geometry.input_size)
    return geometry


def _stats(arch: Architecture) -> tuple[list[float], list[float]]:
    """The normalisation `arch`'s weights were trained with."""
    return (list(DEMO_MEAN), list(DEMO_STD)) if arch.normalisation == "demo" else _imagenet_stats()


def _classifier_geometry(crop: int, resize: int, options: SourceOptions) -> _Geometry:
    """Centre-crop side and resize side; an --input-size alone keeps the weights' resize/crop ratio."""
    size = options.input_size or crop
    resize_size = options.resize_size or (resize if size == crop else round(size * resize / crop))
    if resize_size < size:
        raise ExportError(
            f"--resize-size {resize_size} is smaller than the crop {size}: it must be at least as large"
        )
    return _Geometry(size, resize_size)


def _check_size(model: str, size: int) -> None:
    if size < 32:
        raise ExportError(f"input size {size} is too small: use at least 32 px")
    multiple = TASKS[model].input_multiple
    if size % multiple:
        raise ExportError(f"the {model}'s input size must be a multiple of {multiple}, got {size}")


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load `state` strictly; a mismatch becomes one line counting the offending keys."""
    expected = model.state_dict()
    problems = {
        "missing": [key for key in expected if key not in state],
        "unexpected": [key for key in state if key not in expected],
        "differently shaped": [
            key for key in expected if key in state and state[key].shape != expected[key].shape
        ],
    }
    if any(problems.values()):
        summary = ", ".join(
            f"{len(keys)} {kind} keys (e.g. {keys[0]})" for kind, keys in problems.items() if keys
        )
        raise ExportError(f"{what} does not fit the architecture: {summary}")
    model.load_state_dict(state)


def _spec(
    model: str,
    eager: nn.Module,
    labels: tuple[str, ...],
    geometry: _Geometry,
    weights: str,
    stats: tuple[list[float], list[float]],
) -> ModelSpec:
    task = TASKS[model]
    if task.max_labels is not None and len(labels) > task.max_labels:
        raise ExportError(f"the {model}'s outputs carry at most {task.max_labels} classes, got {len(labels)}")
    wrap = WRAPPERS.get(model)
    if wrap is None:
        raise ExportError(f"no export wrapper is registered for the {model} (export.wrappers.register_wrapper)")
    module = wrap(eager, stats)
    return ModelSpec(model, module.eval(), labels, geometry.input_size, weights, geometry.resize_size)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
