"""Segmentation: /segment, the segmenter (per-pixel class index `MASK`)."""

from __future__ import annotations

import torch

from tasks.base import Task, TensorSpec, register_task

STRIDE = 32  # the U-Net halves its input five times: the side must be a multiple of this


def outputs(num_labels: int, input_size: int) -> tuple[TensorSpec, ...]:
    return (TensorSpec("MASK", torch.uint8, (input_size, input_size)),)


TASK = register_task(
    Task(
        name="segmentation",
        model="segmenter",
        endpoint="/segment",
        preprocess="letterbox",
        labelled_output="MASK",
        outputs=outputs,
        background="background",
        input_multiple=STRIDE,
        max_labels=256,  # MASK is uint8
    )
)
