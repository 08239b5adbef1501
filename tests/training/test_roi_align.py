"""Training's RoIAlign: torchvision's outputs, and torchvision's gradient computed with matrix products."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign, roi_align

from training.data import render_scenes, train_seeds
from training.models import build_demo_detector
from training.roi_align import TrainingRoIAlign, axis_weights, separable_roi_align
from training.shapes import CLASSES
from training.train import StepConfig, train_detector

SEED = 20261205


def _rois(generator: torch.Generator, count: int, images: int, side: float) -> torch.Tensor:
    """RoIs (batch index, x1, y1, x2, y2) in image pixels: some past the edges, some under a pixel,
    batch indices in no particular order."""
    corner = torch.rand(count, 2, generator=generator, dtype=torch.float64) * side * 1.4 - side * 0.2
    size = torch.rand(count, 2, generator=generator, dtype=torch.float64) * side * 0.6
    size[: count // 10] *= 0.01
    batch = torch.randint(0, images, (count, 1), generator=generator).double()
    return torch.cat([batch, corner, corner + size], dim=1)


@pytest.mark.parametrize(
    ("height", "width", "scale", "ratio"),
    [(16, 16, 1 / 8, 2), (8, 8, 1 / 16, 2), (2, 2, 1 / 64, 2), (5, 7, 0.5, 2), (9, 6, 0.25, 1), (6, 6, 1.0, 3)],
)
def test_outputs_and_gradient_are_torchvisions(height: int, width: int, scale: float, ratio: int) -> None:
    generator = torch.Generator().manual_seed(SEED)
    print(f"seed {SEED}")
    features = torch.randn(3, 5, height, width, generator=generator, dtype=torch.float64, requires_grad=True)
    rois = _rois(generator, 60, 3, max(height, width) / scale)
    grad = torch.randn(60, 5, 7, 7, generator=generator, dtype=torch.float64)
    expected = roi_align(features, rois, (7, 7), scale, ratio)
    (expected_grad,) = torch.autograd.grad(expected, features, grad)
    pooled = separable_roi_align(features, rois, (7, 7), scale, ratio)
    (pooled_grad,) = torch.autograd.grad(pooled, features, grad)
    assert torch.equal(pooled, expected), "the forward pass is torchvision's own kernel"
    assert expected_grad.abs().max() > 1, "the RoIs reach the map"
    torch.testing.assert_close(pooled_grad, expected_grad, rtol=1e-10, atol=1e-10)


def test_under_autocast_bfloat16_features_get_a_bfloat16_gradient_computed_in_float32() -> None:
    generator = torch.Generator().manual_seed(SEED)
    print(f"seed {SEED}")
    features = torch.randn(2, 4, 16, 16, generator=generator).to(torch.bfloat16).requires_grad_()
    rois = _rois(generator, 40, 2, 128).float()
    grad = torch.randn(40, 4, 7, 7, generator=generator).to(torch.bfloat16)
    exact = features.detach().float().requires_grad_()
    (expected,) = torch.autograd.grad(roi_align(exact, rois, (7, 7), 1 / 8, 2), exact, grad.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as in training: roi_align itself runs in float32
        pooled = separable_roi_align(features, rois, (7, 7), 1 / 8, 2)
    (got,) = torch.autograd.grad(pooled, features, grad)
    assert got.dtype == torch.bfloat16
    assert expected.abs().max() > 1
    # Only the final rounding to bfloat16 (8 bits of mantissa) separates them.
    torch.testing.assert_close(got.float(), expected, rtol=2**-8, atol=1e-6)


def test_each_axis_weighs_its_samples_like_roi_align() -> None:
    # One RoI from 1.0 to 3.0 on a 4-pixel axis, 2 bins of 2 samples: samples at 1.25, 1.75, 2.25, 2.75.
    weights = axis_weights(torch.tensor([1.0]), torch.tensor([3.0]), pooled=2, ratio=2, length=4)
    expected = torch.tensor([[[0.0, 0.5 * (0.75 + 0.25), 0.5 * (0.25 + 0.75), 0.0],
                              [0.0, 0.0, 0.5 * (0.75 + 0.25), 0.5 * (0.25 + 0.75)]]])
    torch.testing.assert_close(weights, expected)
    # Beyond -1 or the far edge a sample counts nothing; between -1 and 0 it is clamped onto pixel 0.
    # Samples at -1.5 (dropped) and -0.5 (onto pixel 0); at 3.5 (onto the last pixel) and 4.5 (dropped).
    edges = axis_weights(torch.tensor([-2.0, 3.0]), torch.tensor([0.0, 5.0]), pooled=1, ratio=2, length=4)
    torch.testing.assert_close(edges, torch.tensor([[[0.5, 0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0, 0.5]]]))


def test_a_ratio_chosen_per_roi_is_refused() -> None:
    with pytest.raises(ValueError, match="fixed sampling ratio"):
        separable_roi_align(torch.zeros(1, 1, 4, 4), torch.tensor([[0.0, 0, 0, 2, 2]]), (7, 7), 1.0, 0)


def test_the_training_pooler_is_the_detectors_pooler_with_its_gradient() -> None:
    detector = build_demo_detector(len(CLASSES), 128)
    pool = detector.roi_heads.box_roi_pool
    assert isinstance(pool, MultiScaleRoIAlign)
    generator = torch.Generator().manual_seed(SEED)
    print(f"seed {SEED}")
    # 512 px images, so that boxes reach every level the pooler reads (its featmap_names; not "pool").
    features = {
        name: torch.randn(2, 8, 512 // stride, 512 // stride, generator=generator, requires_grad=True)
        for name, stride in (("0", 8), ("1", 16), ("2", 32), ("pool", 64))
    }
    pooled_levels = [features[name] for name in pool.featmap_names if name in features]
    assert len(pooled_levels) == 3
    sides = torch.tensor([8.0, 40.0, 150.0, 260.0, 480.0]).repeat(8)  # levels 0, 0, 0, 1, 2
    boxes = []
    for _ in range(2):
        corner = torch.rand(40, 2, generator=generator) * (512 - sides[:, None])
        boxes.append(torch.cat([corner, corner + sides[:, None]], 1))
    shapes = [(512, 512)] * 2
    grad = torch.randn(80, 8, 7, 7, generator=generator)
    expected = pool(features, boxes, shapes)
    expected_grads = torch.autograd.grad(expected, pooled_levels, grad)
    pooled = TrainingRoIAlign(pool)(features, boxes, shapes)
    pooled_grads = torch.autograd.grad(pooled, pooled_levels, grad)
    assert torch.equal(pooled, expected)
    for level, got, want in zip(pool.featmap_names, pooled_grads, expected_grads, strict=False):
        assert want.abs().max() > 0, f"level {level} gets RoIs"
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_a_trained_detector_keeps_torchvisions_pooler() -> None:
    scenes = render_scenes(train_seeds(0, 1000, 2), 128, 1, 4, "test")
    detector = train_detector(scenes, StepConfig(steps=1, batch_size=2, lr=1e-3), 128, None, torch.device("cpu"), 0)
    assert type(detector.roi_heads.box_roi_pool) is MultiScaleRoIAlign, "export scripts torchvision's model"
