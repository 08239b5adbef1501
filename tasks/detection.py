"""Detection: /detect, the detector (`BOXES/SCORES/LABELS/COUNT`, K rows)."""

from __future__ import annotations

import torch

from tasks.base import Task, TensorSpec, register_task

MAX_DETECTIONS = 100  # K: the detector's outputs always have this many rows; COUNT says how many are real


def outputs(num_labels: int, input_size: int) -> tuple[TensorSpec, ...]:
    return (
        TensorSpec("BOXES", torch.float32, (MAX_DETECTIONS, 4)),
        TensorSpec("SCORES", torch.float32, (MAX_DETECTIONS,)),
        TensorSpec("LABELS", torch.int64, (MAX_DETECTIONS,)),
        TensorSpec("COUNT", torch.int32, (1,)),
    )


TASK = register_task(
    Task(
        name="detection",
        model="detector",
        endpoint="/detect",
        preprocess="letterbox",
        labelled_output="LABELS",
        outputs=outputs,
        background="__background__",
        pretrained_arch="fasterrcnn_resnet50_fpn_v2",
    )
)
