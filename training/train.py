"""Train, evaluate and save the three demo models; reuse the saved ones when nothing changed."""

from __future__ import annotations

import ast
import copy
import hashlib
import json
import logging
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn
from tqdm import tqdm

from tasks import TASKS
from training import cache as training_cache
from training import evaluate
from training.data import (
    ClassificationSet,
    SceneSet,
    batch_indices,
    dihedral,
    eval_seeds,
    normalise,
    render_classification,
    render_scenes,
    to_unit_float,
    train_seeds,
)
from training.models import (
    DEMO_MEAN,
    DEMO_STD,
    UNet,
    build_demo_classifier,
    build_demo_detector,
    build_demo_segmenter,
    encoder_trunk,
)
from training.roi_align import TrainingRoIAlign
from training.shapes import CLASSES

log = logging.getLogger(__name__)

# The demo trains a model for every registered task (a new task brings its trainer here too).
MODELS = tuple(TASKS)
CHECKPOINTS = tuple(f"{name}.pt" for name in MODELS)


@dataclass(frozen=True)
class StepConfig:
    """How one model is optimised: steps x batch_size images, one-cycle schedule peaking at lr."""

    steps: int
    batch_size: int
    lr: float


@dataclass(frozen=True)
class DemoConfig:
    """The training recipe; with the code and `key_inputs` it decides the weights (`training_key`)."""

    seed: int = 0
    classifier_size: int = 64
    scene_size: int = 128
    min_shapes: int = 1
    max_shapes: int = 4
    classifier_train_images: int = 16_000
    scene_train_images: int = 6_400
    eval_images: int = 500
    classifier: StepConfig = field(default_factory=lambda: StepConfig(steps=1000, batch_size=64, lr=3e-3))
    detector: StepConfig = field(default_factory=lambda: StepConfig(steps=1000, batch_size=8, lr=0.02))
    segmenter: StepConfig = field(default_factory=lambda: StepConfig(steps=2000, batch_size=16, lr=3e-3))
    # The segmenter trains on random square crops of this side (a multiple of its stride) of each
    # batch's scenes: 0.56x the pixels of a whole scene per step. It is evaluated on whole scenes.
    segmenter_crop: int = 96
    # Forward passes in bfloat16 autocast (weights, optimiser and evaluation stay float32) where the
    # hardware runs it natively (`native_bf16`): training took 233-265 s instead of 282-295 s on a 2-core
    # AVX512-BF16 CPU, and met the bars and the service's correctness tests with wider margins than
    # float32 there. Elsewhere (AVX2 CPUs) training stays float32; `python -m training --fp32` forces it.
    bf16: bool = True

    def __post_init__(self) -> None:
        crop, stride = self.segmenter_crop, UNet.STRIDE
        if crop and (crop % stride or not 0 < crop <= self.scene_size):
            raise ValueError(
                f"segmenter_crop {crop}: 0 (whole scenes) or a multiple of the U-Net's stride {stride} "
                f"no larger than scene_size {self.scene_size}"
            )

    def bars(self) -> dict[str, tuple[str, float]]:
        """The metric and the minimum each model must reach on held-out scenes."""
        return {
            "classifier": ("top1_accuracy", 0.97),
            "detector": ("map_50", 0.80),
            "segmenter": ("miou", 0.85),
        }


# Files of training/ that move results around rather than decide them: editing them retrains nothing.
NOT_IN_KEY = frozenset({"cache.py"})


def key_inputs(config: DemoConfig, device: torch.device, threads: int) -> dict[str, object]:
    """Everything besides training/'s code that decides the trained weights and their report.

    The config (seeds, sizes, steps), the models trained (one per registered task), the libraries
    that compute them (torch, torchvision; numpy and Pillow draw the scenes; torchmetrics scores
    them), Python, and the hardware path: device, CPU threads (they change float sums), the CPU's
    vector instructions and whether bfloat16 autocast runs.
    """
    import PIL
    import torchmetrics

    hardware = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else torch.backends.cpu.get_cpu_capability()
    )
    return {
        "config": asdict(config),
        "models": list(MODELS),
        "versions": {
            "python": f"{sys.version_info.major}.{sys.version_info.minor}",
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "numpy": np.__version__,
            "pillow": PIL.__version__,
            "torchmetrics": torchmetrics.__version__,
        },
        "device": device.type,
        "hardware": hardware,
        "threads": threads,
        "bf16_autocast": config.bf16 and native_bf16(device),
    }


def training_key(
    config: DemoConfig, device: torch.device, threads: int, sources: Path = Path(__file__).parent
) -> str:
    """Hash of `key_inputs` and of the training code in `sources` (training/ without `NOT_IN_KEY`):
    equal keys mean equal training, so a run with this key can be reused instead of trained.
    The code counts without its comments, docstrings and layout (`code_of`): editing those retrains nothing."""
    digest = hashlib.sha256(json.dumps(key_inputs(config, device, threads), sort_keys=True).encode())
    for source in sorted(sources.glob("*.py")):
        if source.name not in NOT_IN_KEY:
            digest.update(source.name.encode() + b"\0" + code_of(source.read_text()).encode())
    return digest.hexdigest()[:16]


def code_of(source: str) -> str:
    """A module's syntax tree without docstrings (no comments, line numbers or layout either), as text."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            first = node.body[0] if node.body else None
            value = first.value if isinstance(first, ast.Expr) else None
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                node.body = node.body[1:] or [ast.Pass()]
    return ast.dump(tree)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` runs bfloat16 matrix maths natively (CUDA with bf16, or a CPU with AVX512-BF16/AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    steps: StepConfig,
    loss_of_batch: Callable[[torch.Tensor, int, bool], torch.Tensor],
    batches: Iterator[torch.Tensor],
    desc: str,
    generator: torch.Generator,
    bf16: bool,
) -> None:
    """Run `steps.steps` optimiser steps with a one-cycle schedule and a tqdm bar showing the loss.

    Each batch is seen under one random symmetry of the square (`loss_of_batch(index, k, flip)`).
    """
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=steps.lr, total_steps=steps.steps, pct_start=0.15
    )
    device_type = next(model.parameters()).device.type
    model.train()
    bar = tqdm(batches, total=steps.steps, desc=desc, unit="step")
    for i, index in enumerate(bar):
        symmetry = int(torch.randint(0, 8, (1,), generator=generator))
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_of_batch(index, symmetry // 2, bool(symmetry % 2))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: loss became {loss.item()} at step {i}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 10.0, foreach=True)
        optimizer.step()
        schedule.step()
        if i % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")


def train_classifier(
    data: ClassificationSet, steps: StepConfig, device: torch.device, seed: int, bf16: bool = False
) -> nn.Module:
    """Train the ResNet-18 classifier from scratch on single-shape images."""
    model = build_demo_classifier(len(CLASSES)).to(device=device, memory_format=torch.channels_last)
    # fused: one kernel per step instead of a dozen small ops per tensor (-9 % of a segmenter step on CPU)
    optimizer = torch.optim.AdamW(model.parameters(), lr=steps.lr, weight_decay=0.05, fused=True)

    def loss_of_batch(index: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
        images, _, _ = dihedral(data.images[index].to(device), k, flip)
        logits = model(normalise(images).contiguous(memory_format=torch.channels_last))
        return nn.functional.cross_entropy(logits, data.labels[index].to(device))

    generator = torch.Generator().manual_seed(seed)
    batches = batch_indices(len(data.images), steps.batch_size, steps.steps, generator)
    _fit(model, optimizer, steps, loss_of_batch, batches, "classifier", generator, bf16)
    return model


def train_detector(
    data: SceneSet,
    steps: StepConfig,
    image_size: int,
    trunk: nn.Module | None,
    device: torch.device,
    seed: int,
    bf16: bool = False,
) -> nn.Module:
    """Train Faster R-CNN on scenes; `trunk` (a trained ResNet-18, copied) seeds its backbone."""
    backbone = copy.deepcopy(trunk) if trunk is not None else None
    model = build_demo_detector(len(CLASSES), image_size, backbone=backbone).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=steps.lr, momentum=0.9, weight_decay=1e-4, foreach=True)

    def loss_of_batch(index: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
        boxes = [data.boxes[i] for i in index.tolist()]
        images, _, boxes = dihedral(data.images[index], k, flip, boxes=boxes)
        labels = [data.labels[i].to(device) for i in index.tolist()]
        targets = [{"boxes": b.to(device), "labels": lab} for b, lab in zip(boxes, labels, strict=True)]
        return sum(model(list(to_unit_float(images.to(device))), targets).values())

    generator = torch.Generator().manual_seed(seed + 1)
    batches = batch_indices(len(data), steps.batch_size, steps.steps, generator)
    pool = model.roi_heads.box_roi_pool
    if device.type == "cpu":  # same outputs, a backward pass about 5x cheaper on CPU
        model.roi_heads.box_roi_pool = TrainingRoIAlign(pool)
    _fit(model, optimizer, steps, loss_of_batch, batches, "detector", generator, bf16)
    model.roi_heads.box_roi_pool = pool
    return model


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - mean soft Dice over classes: each shape class weighs as much as the background (~90% of pixels)."""
    probs = logits.softmax(1)
    onehot = nn.functional.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    overlap = (probs * onehot).sum((0, 2, 3))
    total = probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    return 1 - ((2 * overlap + 1) / (total + 1)).mean()


def train_segmenter(
    data: SceneSet,
    steps: StepConfig,
    trunk: nn.Module | None,
    device: torch.device,
    seed: int,
    bf16: bool = False,
    crop: int = 0,
) -> nn.Module:
    """Train the U-Net on scene masks; `trunk` (a trained classifier, copied) seeds its encoder.

    With `crop`, each batch is one random `crop` x `crop` window (the same for the whole batch) of its scenes."""
    encoder = copy.deepcopy(trunk) if trunk is not None else None
    model = build_demo_segmenter(len(CLASSES) + 1, encoder=encoder)
    model = model.to(device=device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=steps.lr, weight_decay=1e-4, fused=True)

    def loss_of_batch(index: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
        images, masks, _ = dihedral(
            data.images[index].to(device), k, flip, masks=data.masks[index].to(device)
        )
        if crop:
            y, x = (int(v) for v in torch.randint(0, images.shape[-1] - crop + 1, (2,), generator=generator))
            images, masks = images[..., y : y + crop, x : x + crop], masks[..., y : y + crop, x : x + crop]
        logits = model(normalise(images).contiguous(memory_format=torch.channels_last))
        return nn.functional.cross_entropy(logits, masks.long()) + soft_dice_loss(logits, masks.long())

    generator = torch.Generator().manual_seed(seed + 2)
    batches = batch_indices(len(data), steps.batch_size, steps.steps, generator)
    _fit(model, optimizer, steps, loss_of_batch, batches, "segmenter", generator, bf16)
    return model


def _save_state(model: nn.Module, path: Path) -> None:
    """Write a CPU state dict atomically (no half-written checkpoint survives an interruption)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _write_json(data: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def cached_report(out: Path, key: str) -> dict | None:
    """The saved report if `out` holds complete results of training key `key`, else None."""
    try:
        meta = json.loads((out / "meta.json").read_text())
        report = json.loads((out / "report.json").read_text())
    except (OSError, ValueError):
        return None
    complete = all((out / name).is_file() for name in CHECKPOINTS)
    if complete and meta.get("training_key") == key and report.get("training_key") == key:
        return report
    return None


class _Clock:
    """Wall-clock and process CPU seconds (all threads) since creation."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def seconds(self) -> dict[str, float]:
        return {
            "wall_seconds": round(time.perf_counter() - self.wall, 1),
            "cpu_seconds": round(time.process_time() - self.cpu, 1),
        }


def run(
    config: DemoConfig,
    out: Path,
    device: torch.device,
    threads: int,
    force: bool = False,
    cache: Path | None = None,
) -> dict:
    """Train and evaluate all three models into `out` and return the report, unless `out` or the
    `cache` directory (`training.cache`) already holds a complete run of the same training key.
    A run trained here, or found in `out` only, is stored in `cache` too."""
    key = training_key(config, device, threads)
    if not force:
        if (report := cached_report(out, key)) is not None:
            log.info("%s holds models of training key %s already; not retraining (--force retrains)",
                     out, key)
            if cache is not None:
                training_cache.store(out, cache, key, CHECKPOINTS)
            return report
        if cache is not None and training_cache.restore(cache, key, out, CHECKPOINTS):
            if (report := cached_report(out, key)) is not None:
                return report
            log.warning("the cache entry of %s in %s is not a complete run: training", key, cache)

    out.mkdir(parents=True, exist_ok=True)
    for stale in ("meta.json", "report.json"):  # the old run stops counting as complete from here on
        (out / stale).unlink(missing_ok=True)
    torch.set_num_threads(threads)
    seed_everything(config.seed)
    total = _Clock()
    results: dict[str, dict] = {}

    clock = _Clock()
    cls_train = render_classification(
        train_seeds(config.seed, 0, config.classifier_train_images),
        config.classifier_size,
        "render classifier set",
    )
    scene_train = render_scenes(
        train_seeds(config.seed, 5_000_000, config.scene_train_images),
        config.scene_size,
        config.min_shapes,
        config.max_shapes,
        "render scene set",
    )
    cls_eval = render_classification(
        eval_seeds(config.eval_images), config.classifier_size, "render held-out set"
    )
    scene_eval = render_scenes(
        eval_seeds(config.eval_images),
        config.scene_size,
        config.min_shapes,
        config.max_shapes,
        "render held-out set",
    )
    data_time = clock.seconds()
    log.info("rendered data in %.1fs", data_time["wall_seconds"])

    clock = _Clock()
    bf16 = config.bf16 and native_bf16(device)
    log.info("training in %s", "bfloat16 autocast" if bf16 else "float32")
    classifier = train_classifier(cls_train, config.classifier, device, config.seed, bf16)
    value = evaluate.classification_top1(classifier, cls_eval, device)
    results["classifier"] = {"value": value, **clock.seconds()}
    log.info("classifier: held-out top-1 %.4f after %s", value, results["classifier"])
    _save_state(classifier, out / "classifier.pt")

    # The segmenter learns scenes at the detector's scale with dense labels: its encoder, not the
    # single-shape classifier, seeds the detector's backbone.
    clock = _Clock()
    segmenter = train_segmenter(
        scene_train, config.segmenter, classifier, device, config.seed, bf16, config.segmenter_crop
    )
    value = evaluate.segmentation_miou(segmenter, scene_eval, len(CLASSES) + 1, device)
    results["segmenter"] = {"value": value, **clock.seconds()}
    log.info("segmenter: held-out mIoU %.4f after %s", value, results["segmenter"])
    _save_state(segmenter, out / "segmenter.pt")

    clock = _Clock()
    detector = train_detector(
        scene_train, config.detector, config.scene_size, encoder_trunk(segmenter), device, config.seed, bf16
    )
    value = evaluate.detection_map50(detector, scene_eval, device)
    results["detector"] = {"value": value, **clock.seconds()}
    log.info("detector: held-out mAP@0.5 %.4f after %s", value, results["detector"])
    _save_state(detector, out / "detector.pt")

    models = {}
    for name, (metric, bar) in config.bars().items():
        value = results[name].pop("value")
        models[name] = {
            "metric": metric,
            "value": round(value, 4),
            "bar": bar,
            "passed": value >= bar,
            **results[name],
        }
    report = {
        "passed": all(m["passed"] for m in models.values()),
        "models": models,
        "eval_images": config.eval_images,
        "data": data_time,
        "total": total.seconds(),
        "device": str(device),
        "threads": threads,
        "bf16_autocast": bf16,
        "torch": torch.__version__,
        "training_key": key,
    }
    meta = {
        "classes": list(CLASSES),
        "image_size": {
            "classifier": config.classifier_size,
            "detector": config.scene_size,
            "segmenter": config.scene_size,
        },
        "mean": list(DEMO_MEAN),
        "std": list(DEMO_STD),
        "detector_score_threshold": detector.roi_heads.score_thresh,
        "config": asdict(config),
        "training_key": key,
    }
    _write_json(report, out / "report.json")
    _write_json(meta, out / "meta.json")
    if cache is not None:
        training_cache.store(out, cache, key, CHECKPOINTS)
    return report
