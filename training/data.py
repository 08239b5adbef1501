"""Shapes scenes pre-rendered into tensors once per run, so every training epoch reuses them cheaply."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from tqdm import tqdm

from training.models import DEMO_MEAN, DEMO_STD
from training.shapes import Scene, make_scene

# Held-out scenes use seeds at or above this; training seeds stay below it (see `train_seeds`).
EVAL_SEED_BASE = 2**40
_TRAIN_SEEDS_PER_RUN = 10**7


def train_seeds(run_seed: int, offset: int, count: int) -> range:
    """Scene seeds for training set `offset` of run `run_seed`: disjoint from every evaluation seed."""
    start = run_seed * _TRAIN_SEEDS_PER_RUN + offset
    if run_seed < 0 or start + count > EVAL_SEED_BASE or offset + count > _TRAIN_SEEDS_PER_RUN:
        raise ValueError(
            f"seed {run_seed} with {count} scenes at offset {offset} leaves the training seed range"
        )
    return range(start, start + count)


def eval_seeds(count: int) -> range:
    """Seeds of the held-out evaluation scenes (the same for every run, so reports compare)."""
    return range(EVAL_SEED_BASE, EVAL_SEED_BASE + count)


@dataclass(frozen=True)
class ClassificationSet:
    """Single-shape images and their 0-based class indices."""

    images: torch.Tensor  # N x 3 x S x S uint8
    labels: torch.Tensor  # N int64


@dataclass(frozen=True)
class SceneSet:
    """Multi-shape scenes with per-scene boxes and 1-based labels, plus pixel masks."""

    images: torch.Tensor  # N x 3 x S x S uint8
    masks: torch.Tensor  # N x S x S uint8
    boxes: list[torch.Tensor]  # per scene: K x 4 float32 xyxy
    labels: list[torch.Tensor]  # per scene: K int64

    def __len__(self) -> int:
        return len(self.images)


def _scenes(seeds: Sequence[int], size: int, min_shapes: int, max_shapes: int, desc: str) -> Iterator[Scene]:
    """`make_scene` for each seed, in order, rendered by one worker process per CPU core."""
    workers = min(os.cpu_count() or 1, 8)
    render = partial(make_scene, size=size, min_shapes=min_shapes, max_shapes=max_shapes)
    chunk = max(1, min(256, len(seeds) // (4 * workers)))
    with ProcessPoolExecutor(workers) as pool:
        yield from tqdm(pool.map(render, seeds, chunksize=chunk), total=len(seeds), desc=desc, unit="img", leave=False)


def render_classification(seeds: Sequence[int], size: int, desc: str) -> ClassificationSet:
    """Render one-shape scenes for `seeds` at `size` px."""
    images = np.empty((len(seeds), size, size, 3), dtype=np.uint8)
    labels = np.empty(len(seeds), dtype=np.int64)
    for i, scene in enumerate(_scenes(seeds, size, 1, 1, desc)):
        images[i], labels[i] = scene.image, scene.labels[0] - 1
    return ClassificationSet(
        torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)
    )


def render_scenes(seeds: Sequence[int], size: int, min_shapes: int, max_shapes: int, desc: str) -> SceneSet:
    """Render multi-shape scenes for `seeds` at `size` px."""
    images = np.empty((len(seeds), size, size, 3), dtype=np.uint8)
    masks = np.empty((len(seeds), size, size), dtype=np.uint8)
    boxes, labels = [], []
    for i, scene in enumerate(_scenes(seeds, size, min_shapes, max_shapes, desc)):
        images[i], masks[i] = scene.image, scene.mask
        boxes.append(torch.from_numpy(scene.boxes))
        labels.append(torch.from_numpy(scene.labels))
    return SceneSet(
        images=torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        masks=torch.from_numpy(masks),
        boxes=boxes,
        labels=labels,
    )


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 N x 3 x H x W -> float in [0, 1] (what Faster R-CNN takes)."""
    return images.float().div_(255.0)


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 N x 3 x H x W -> float normalised with the demo mean/std (classifier and segmenter input)."""
    mean = torch.tensor(DEMO_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(DEMO_STD, device=images.device).view(1, 3, 1, 1)
    return (to_unit_float(images) - mean) / std


def batch_indices(
    count: int, batch_size: int, steps: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """`steps` batches of indices, walking through fresh random permutations of range(count)."""
    order = torch.randperm(count, generator=generator)
    pos = 0
    for _ in range(steps):
        if pos + batch_size > count:
            order, pos = torch.randperm(count, generator=generator), 0
        yield order[pos : pos + batch_size]
        pos += batch_size


def dihedral(
    images: torch.Tensor,
    k: int,
    flip: bool,
    masks: torch.Tensor | None = None,
    boxes: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor] | None]:
    """Rotate a square batch by k * 90 degrees (counter-clockwise), then mirror it left-right if `flip`.

    Shapes' classes do not change under these 8 symmetries, so they multiply the training data for free.
    Masks (N x S x S) and xyxy boxes (per image, K x 4 in pixels) follow the images.
    """
    size = images.shape[-1]
    images = torch.rot90(images, k, dims=(-2, -1))
    masks = torch.rot90(masks, k, dims=(-2, -1)) if masks is not None else None
    if boxes is not None:
        for _ in range(k % 4):  # (x, y) -> (y, S - x)
            boxes = [torch.stack([b[:, 1], size - b[:, 2], b[:, 3], size - b[:, 0]], dim=1) for b in boxes]
    if flip:
        images = images.flip(-1)
        masks = masks.flip(-1) if masks is not None else None
        if boxes is not None:
            boxes = [torch.stack([size - b[:, 2], b[:, 1], size - b[:, 0], b[:, 3]], dim=1) for b in boxes]
    return images, masks, boxes
