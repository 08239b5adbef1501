"""RoIAlign with a cheap backward pass on CPU, for training the demo detector.

torchvision's CPU `roi_align` backward is a scalar loop over RoIs x channels x bins x samples that
recomputes every bilinear weight once per channel and runs on one thread: it was 37 % of a demo detector
training step (b8, 128 px, two threads) while the second core idled. With a fixed sampling ratio the
pooling is separable: RoI r's output is `Ay_r @ X[c] @ Ax_r^T`, where `Ay_r` (pooled x H) and `Ax_r`
(pooled x W) hold each bin's bilinear weights along one axis. So the gradient is `Ay_r^T @ G_r[c] @ Ax_r`
summed over each image's RoIs: one batched product along x for all RoIs, then one product along y per
image. The step went from 0.153 to 0.103 s; the detector's training from 146 to 91 s (AVX-512 CPU).

The forward pass stays torchvision's own kernel, so outputs are unchanged; the gradient equals
torchvision's up to float rounding (tests/training/test_roi_align.py). Training swaps this pooler in
(`TrainingRoIAlign`) and back out, so saved and exported detectors are plain torchvision models.
`TrainingRoIAlign` repeats torchvision's multi-level loop with its private helpers (`_filter_input`,
`_setup_scales`, `_convert_to_roi_format`; torchvision is pinned): if they change, the pooler test fails.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales


def axis_weights(start: Tensor, end: Tensor, pooled: int, ratio: int, length: int) -> Tensor:
    """Per RoI, the weight of each of `length` pixels in each of `pooled` bins along one axis.

    `start`/`end` (R,) are the RoIs' edges in feature-map pixels. Follows torchvision's CPU kernel
    (aligned=False): RoIs at least 1 px, `ratio` samples per bin at (i + 0.5) / ratio of it, samples
    beyond [-1, length] dropped, others clamped into the map and interpolated linearly; each axis
    carries 1 / ratio of the bin's 1 / ratio^2 average.
    """
    size = (end - start).clamp(min=1.0)
    step = (size / pooled)[:, None, None]
    bins = torch.arange(pooled, dtype=start.dtype, device=start.device)[None, :, None]
    samples = torch.arange(ratio, dtype=start.dtype, device=start.device)[None, None, :]
    pos = start[:, None, None] + bins * step + (samples + 0.5) * step / ratio  # (R, pooled, ratio)
    keep = ((pos >= -1.0) & (pos <= length)).to(start.dtype) / ratio
    pos = pos.clamp(min=0.0)
    low = pos.floor()
    last = low >= length - 1
    low = torch.where(last, torch.full_like(low, length - 1), low)
    pos = torch.where(last, low, pos)
    high = torch.where(last, low, low + 1)
    frac = pos - low
    weights = start.new_zeros(len(start), pooled, length)
    weights.scatter_add_(2, low.long(), (1 - frac) * keep)
    weights.scatter_add_(2, high.long(), frac * keep)
    return weights


class _SeparableRoIAlign(torch.autograd.Function):
    """torchvision's `roi_align` forward (aligned=False, fixed sampling ratio) with a matrix-product backward.

    (A forward pass by the same products was measured no faster than torchvision's kernel.)"""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, features: Tensor, rois: Tensor, output_size: tuple[int, int], scale: float, ratio: int
    ) -> Tensor:
        ctx.save_for_backward(rois)
        ctx.setup = (features.shape, features.dtype, output_size, scale, ratio)
        return roi_align(features, rois, output_size, scale, ratio, aligned=False)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None, None, None]:  # type: ignore[override]
        (rois,) = ctx.saved_tensors
        shape, dtype, (pooled_h, pooled_w), scale, ratio = ctx.setup
        count, channels, height, width = shape
        # Like torchvision's autocast rule for roi_align: coordinates and sums at least in float32 (box
        # corners in bfloat16 would be off by up to half a pixel), the gradient in the features' dtype.
        work = torch.promote_types(grad.dtype, torch.float32)
        rois, grad = rois.to(work), grad.to(work)
        batch = rois[:, 0].long()
        order = torch.argsort(batch, stable=True)  # each image's RoIs together
        rois, grad = rois[order], grad[order]
        ay = axis_weights(rois[:, 2] * scale, rois[:, 4] * scale, pooled_h, ratio, height)  # (R, ph, H)
        ax = axis_weights(rois[:, 1] * scale, rois[:, 3] * scale, pooled_w, ratio, width)  # (R, pw, W)
        # Along x for every RoI at once: (R, C*ph, pw) @ (R, pw, W), then rows (RoI, bin), columns (C, W).
        along_x = grad.reshape(len(rois), channels * pooled_h, pooled_w) @ ax
        along_x = along_x.view(len(rois), channels, pooled_h, width).transpose(1, 2)
        along_x = along_x.reshape(len(rois) * pooled_h, channels * width)
        # Along y, one matrix product per image over all its RoIs' bins: (H, n*ph) @ (n*ph, C*W).
        rows = [n * pooled_h for n in torch.bincount(batch, minlength=count).tolist()]
        grad_rows = grad.new_zeros(count, height, channels * width)
        for image, (weights, part) in enumerate(
            zip(ay.reshape(-1, height).split(rows), along_x.split(rows), strict=True)
        ):
            if len(part):
                torch.mm(weights.T, part, out=grad_rows[image])
        grad_features = grad_rows.view(count, height, channels, width).permute(0, 2, 1, 3)
        return grad_features.to(dtype, memory_format=torch.contiguous_format), None, None, None, None


def separable_roi_align(
    features: Tensor, rois: Tensor, output_size: tuple[int, int], scale: float, ratio: int
) -> Tensor:
    """`torchvision.ops.roi_align(features, rois, output_size, scale, ratio, aligned=False)` with the cheap
    backward; `rois` are (R, 5) rows of batch index, x1, y1, x2, y2 and get no gradient."""
    if ratio <= 0:
        raise ValueError("the separable backward needs a fixed sampling ratio (> 0)")
    return _SeparableRoIAlign.apply(features, rois, output_size, scale, ratio)


class TrainingRoIAlign(nn.Module):
    """Stands in for a Faster R-CNN's `MultiScaleRoIAlign` while it trains: same levels, same outputs,
    the cheap backward. (torchvision's own multi-level loop, calling `separable_roi_align`.)"""

    def __init__(self, pool: MultiScaleRoIAlign) -> None:
        super().__init__()
        self.pool = pool

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        pool = self.pool
        levels = _filter_input(x, pool.featmap_names)
        if pool.scales is None or pool.map_levels is None:
            pool.scales, pool.map_levels = _setup_scales(
                levels, image_shapes, pool.canonical_scale, pool.canonical_level
            )
        rois = _convert_to_roi_format(boxes)
        output_size = tuple(pool.output_size)
        which = pool.map_levels(boxes)
        result = levels[0].new_zeros((len(rois), levels[0].shape[1], *output_size))
        for level, (features, scale) in enumerate(zip(levels, pool.scales, strict=True)):
            index = torch.where(which == level)[0]
            pooled = separable_roi_align(features, rois[index], output_size, scale, pool.sampling_ratio)
            result[index] = pooled.to(result.dtype)
        return result
