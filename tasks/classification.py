"""Classification: /classify, the classifier (softmax `PROBS`)."""

from __future__ import annotations

import torch

from tasks.base import Task, TensorSpec, register_task


def outputs(num_labels: int, input_size: int) -> tuple[TensorSpec, ...]:
    return (TensorSpec("PROBS", torch.float32, (num_labels,)),)


TASK = register_task(
    Task(
        name="classification",
        model="classifier",
        endpoint="/classify",
        preprocess="resize_center_crop",
        labelled_output="PROBS",
        outputs=outputs,
        pretrained_arch="resnet50",
    )
)
