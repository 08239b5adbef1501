"""Tensor sets and the square's symmetries used to augment them keep images, masks and boxes aligned."""

from __future__ import annotations

import pytest
import torch

from training.data import dihedral, eval_seeds, render_classification, render_scenes, train_seeds
from training.shapes import make_scene


def test_train_and_eval_seeds_never_meet() -> None:
    assert max(train_seeds(999, 5_000_000, 1000)) < min(eval_seeds(1000))
    assert not set(train_seeds(0, 0, 1000)) & set(train_seeds(0, 5_000_000, 1000))
    with pytest.raises(ValueError):
        train_seeds(0, 9_999_999, 2)


def test_rendered_sets_match_make_scene() -> None:
    seeds = train_seeds(0, 0, 3)
    cls = render_classification(seeds, 64, "test")
    scenes = render_scenes(seeds, 96, 1, 4, "test")
    for i, seed in enumerate(seeds):
        single, multi = make_scene(seed, 64, 1, 1), make_scene(seed, 96, 1, 4)
        assert torch.equal(cls.images[i], torch.from_numpy(single.image).permute(2, 0, 1))
        assert cls.labels[i] == single.labels[0] - 1
        assert torch.equal(scenes.images[i], torch.from_numpy(multi.image).permute(2, 0, 1))
        assert torch.equal(scenes.masks[i], torch.from_numpy(multi.mask))
        assert torch.equal(scenes.boxes[i], torch.from_numpy(multi.boxes))


def _tight_box(mask: torch.Tensor) -> list[float]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


@pytest.mark.parametrize("k", range(4))
@pytest.mark.parametrize("flip", [False, True])
def test_symmetries_move_masks_and_boxes_with_the_image(k: int, flip: bool) -> None:
    scenes = [make_scene(seed, 64, 1, 1) for seed in range(4)]
    images = torch.stack([torch.from_numpy(s.image).permute(2, 0, 1) for s in scenes])
    masks = torch.stack([torch.from_numpy(s.mask) for s in scenes])
    boxes = [torch.from_numpy(s.boxes) for s in scenes]

    images2, masks2, boxes2 = dihedral(images, k, flip, masks=masks, boxes=boxes)
    for i in range(len(scenes)):
        assert boxes2[i][0].tolist() == _tight_box(masks2[i] > 0)
        shape = masks2[i] > 0  # the image moved with the mask: same pixels under the shape
        assert torch.equal(
            images2[i][:, shape].sort(dim=1).values, images[i][:, masks[i] > 0].sort(dim=1).values
        )
    if k == 0 and not flip:
        assert torch.equal(images2, images)
    else:
        assert not torch.equal(masks2, masks)
