"""Explanations on request (`explain=occlusion|saliency|gradcam`): why the model gave each answer.

* `occlusion` (every task, every backend): the model's input is cut into a `grid`x`grid` grid over the
  part that holds the image (the classifier's centre crop, the letterbox's content); for each cell a copy
  with that cell filled with the image's mean colour goes through the same batched model call every
  request uses (`Answerer.infer`: the embedded batcher, or Triton's dynamic batcher), and the cell's value
  is the drop of each explained answer's score (`Handler.explain_scores`). grid^2 extra passes per image.
* `saliency`, `gradcam` (the classifier on the embedded backend): gradients through the exported model
  (`service.backends.gradients`), pooled over the same grid and scaled to a largest cell of 1.

The work is bounded before it starts (`plan`): the grid by `explain_max_grid`, the answers explained by
`explain_max_targets`, the passes of one request by `explain_max_passes` (413), and admission counts the
request as that many model passes; the maps must be done within `explain_timeout_s` (504).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel

from service.backends.base import Backend, BackendTimeout
from service.core.errors import ApiError
from service.core.pipeline import TaskPipeline
from service.handlers.common import ExplainTarget, Geometry, Handler, boxes_to_original
from service.imaging.annotate import fit_image
from service.imaging.heatmap import OVERLAY_MAX_PIXELS, overlay_png
from service.imaging.images import decode_image_for_display
from service.schemas import Explanation
from service.settings import Settings
from service.telemetry.metrics import GatewayMetrics

OCCLUSION = "occlusion"
GRADIENT_PASSES = 3  # a forward and a backward pass (about two forwards), on top of the answer's own
_OPTIONS = ("explain_grid", "explain_overlay", "explain_class", "explain_top")

Outputs = dict[str, np.ndarray]
Infer = Callable[[list[np.ndarray]], Awaitable[list[Outputs]]]
InPool = Callable[..., "asyncio.Future[Any]"]


@dataclass(frozen=True)
class ExplainPlan:
    """What one request's explanation will do, checked against the limits before admission."""

    method: str
    grid: int
    top: int
    overlay: bool

    @property
    def passes_per_image(self) -> int:
        """Model passes per image, the answer's own included."""
        return self.grid * self.grid + 1 if self.method == OCCLUSION else GRADIENT_PASSES


def plan(
    settings: Settings, pipeline: TaskPipeline, backend: Backend, options: BaseModel, images: int
) -> ExplainPlan | None:
    """The request's explanation (None when it asks for none), or 422/413 past what this gateway explains."""
    handler = pipeline.handler
    method = getattr(options, "explain", None)
    if method is None:
        given = [name for name in _OPTIONS if getattr(options, name, None) not in (None, False)]
        if given:
            raise ApiError(
                422, "invalid_request", f"{', '.join(given)}: only with explain=occlusion|saliency|gradcam"
            )
        return None
    if method not in handler.explain_methods:
        has = f"only {', '.join(handler.explain_methods)}" if handler.explain_methods else "no explanations"
        raise ApiError(422, "invalid_request", f"explain={method}: {handler.endpoint} has {has}")
    if method != OCCLUSION and method not in backend.gradient_methods(handler.model):
        raise ApiError(
            422,
            "invalid_request",
            f"explain={method} needs gradients through the model, which only the embedded backend computes "
            f"(in process, model_placement=ingress); this gateway's {settings.backend} backend cannot. "
            "explain=occlusion works on every backend",
        )
    grid = getattr(options, "explain_grid", None) or settings.explain_default_grid
    if grid > settings.explain_max_grid:
        raise ApiError(
            422, "invalid_request", f"explain_grid {grid} is past this gateway's limit of {settings.explain_max_grid}"
        )
    top = getattr(options, "explain_top", None) or settings.explain_max_targets
    if top > settings.explain_max_targets:
        raise ApiError(
            422,
            "invalid_request",
            f"explain_top {top} is past this gateway's limit of {settings.explain_max_targets} answers per image",
        )
    try:
        handler.check_explain(options, pipeline.contract)
    except ValueError as error:
        raise ApiError(422, "invalid_request", str(error)) from error
    chosen = ExplainPlan(method, grid, top, bool(getattr(options, "explain_overlay", False)))
    passes = images * chosen.passes_per_image
    if passes > settings.explain_max_passes:
        raise ApiError(
            413,
            "explanation_too_large",
            f"explain={method} of {images} image(s) with a {grid}x{grid} grid costs {passes} model passes; the "
            f"limit is {settings.explain_max_passes}: send fewer images or ask for a smaller explain_grid",
        )
    return chosen


@dataclass(frozen=True)
class ExplainedImage:
    """One image of the request as the explanation sees it."""

    blob: bytes
    tensor: np.ndarray  # the model's [3,H,W] uint8 input
    geometry: Geometry
    outputs: Outputs  # the model's answer on it
    result: BaseModel  # the task's result for it


async def explain(
    chosen: ExplainPlan,
    pipeline: TaskPipeline,
    options: BaseModel,
    images: Sequence[ExplainedImage],
    infer: Infer,
    in_pool: InPool,
    backend: Backend,
    metrics: GatewayMetrics,
    timeout_s: float,
) -> list[BaseModel]:
    """Every image's result with its explanations attached (504 past `timeout_s`)."""
    began = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s):
            explained = await asyncio.gather(
                *(_explain_one(chosen, pipeline, options, image, infer, in_pool, backend) for image in images)
            )
    except TimeoutError as error:
        raise BackendTimeout(
            f"the explanation did not finish within {timeout_s:g} s; ask for a smaller explain_grid or fewer images"
        ) from error
    results = [result for result, _ in explained]
    extra = sum(passes for _, passes in explained)
    metrics.explained(pipeline.model, chosen.method, time.perf_counter() - began, extra)
    return results


async def _explain_one(
    chosen: ExplainPlan,
    pipeline: TaskPipeline,
    options: BaseModel,
    image: ExplainedImage,
    infer: Infer,
    in_pool: InPool,
    backend: Backend,
) -> tuple[BaseModel, int]:
    """One image's result with its explanations, and the extra model passes they took."""
    handler, contract = pipeline.handler, pipeline.contract
    targets = handler.explain_targets(image.outputs, image.geometry, options, contract, chosen.top)
    if not targets:  # nothing answered (no detection, no class): nothing to explain, nothing run
        return image.result, 0
    if chosen.method == OCCLUSION:
        copies = await in_pool(occluded_copies, image.tensor, image.geometry, chosen.grid)
        outputs = await infer(copies)
        grids = await in_pool(_occlusion_grids, handler, contract, outputs, targets, chosen.grid)
        passes = len(copies)
    else:
        gradients = await backend.gradients(pipeline.model)
        if chosen.method not in gradients.methods:
            raise ApiError(
                422,
                "invalid_request",
                f"explain={chosen.method} is not available for {pipeline.model}'s architecture",
            )
        maps = [await gradients.heatmap(image.tensor, target.class_id, chosen.method) for target in targets]
        grids = [scaled(pool_grid(heat, image.geometry, chosen.grid)) for heat in maps]
        passes = 2 * len(targets)
    region = [round(float(v), 2) for v in content_region(image.geometry)]
    size = (image.geometry.width, image.geometry.height)
    overlays: list[str | None] = [None] * len(targets)
    if chosen.overlay:
        overlays = await in_pool(_overlays, pipeline, image.blob, grids, region, size)
    explained = [
        (
            target,
            Explanation(
                method=chosen.method,  # type: ignore[arg-type]
                target=target.label,
                target_id=target.class_id,
                score=round(target.score, 6),
                grid_size=chosen.grid,
                grid=[[round(float(v), 6) for v in row] for row in grid],
                region=region,
                passes=passes,
                overlay_png=overlay,
            ),
        )
        for target, grid, overlay in zip(targets, grids, overlays, strict=True)
    ]
    return handler.with_explanations(image.result, explained), passes


# ---- the grid ----


def cell_edges(size: int, grid: int) -> list[tuple[int, int]]:
    """`grid` cells along `size` pixels: [start, stop) each, at least one pixel (they overlap when size < grid)."""
    edges = np.linspace(0, size, grid + 1).round().astype(int)
    cells = []
    for k in range(grid):
        start = min(int(edges[k]), max(0, size - 1))
        cells.append((start, max(start + 1, int(edges[k + 1]))))
    return cells


def content_size(geometry: Geometry, tensor_shape: tuple[int, ...]) -> tuple[int, int]:
    """(height, width) of the part of the model input that holds the image (from its top-left)."""
    return min(geometry.content_height, tensor_shape[-2]), min(geometry.content_width, tensor_shape[-1])


def occluded_copies(tensor: np.ndarray, geometry: Geometry, grid: int) -> list[np.ndarray]:
    """grid^2 copies of `tensor`, row by row, each with one cell of its content filled with the content's
    mean colour."""
    height, width = content_size(geometry, tensor.shape)
    fill = np.round(tensor[:, :height, :width].reshape(3, -1).mean(axis=1)).astype(np.uint8)[:, None, None]
    copies = []
    for y0, y1 in cell_edges(height, grid):
        for x0, x1 in cell_edges(width, grid):
            copy = tensor.copy()
            copy[:, y0:y1, x0:x1] = fill
            copies.append(copy)
    return copies


def _occlusion_grids(
    handler: Handler, contract: Any, outputs: list[Outputs], targets: list[ExplainTarget], grid: int
) -> list[np.ndarray]:
    """Per target, the drop of its score in each occluded copy, as a grid x grid array."""
    base = np.array([target.score for target in targets])
    scores = np.stack([handler.explain_scores(out, targets, contract) for out in outputs])  # [cells, targets]
    drops = base[None, :] - scores
    return [drops[:, t].reshape(grid, grid) for t in range(len(targets))]


def pool_grid(heat: np.ndarray, geometry: Geometry, grid: int) -> np.ndarray:
    """A model-input-sized map averaged over the grid's cells of the content."""
    height, width = content_size(geometry, heat.shape)
    rows, cols = cell_edges(height, grid), cell_edges(width, grid)
    return np.array([[float(heat[y0:y1, x0:x1].mean()) for x0, x1 in cols] for y0, y1 in rows])


def scaled(grid: np.ndarray) -> np.ndarray:
    """`grid` divided by its largest value (all zeros stay zeros)."""
    peak = float(np.max(grid, initial=0.0))
    return grid / peak if peak > 0 else grid


def content_region(geometry: Geometry) -> np.ndarray:
    """The content of the model input (where the grid lies) in original-image pixels, xyxy."""
    box = np.array([[0.0, 0.0, geometry.content_width, geometry.content_height]])
    return boxes_to_original(box, geometry)[0]


def _overlays(
    pipeline: TaskPipeline, blob: bytes, grids: list[np.ndarray], region: list[float], size: tuple[int, int]
) -> list[str]:
    """Each grid over a display copy of the image (decoded again, at most `OVERLAY_MAX_PIXELS`)."""
    settings = pipeline.settings
    shown = fit_image(
        decode_image_for_display(blob, settings.max_pixels, settings.allowed_formats, OVERLAY_MAX_PIXELS),
        OVERLAY_MAX_PIXELS,
    )
    return [overlay_png(shown, grid, region, size) for grid in grids]
