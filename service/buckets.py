"""Batch buckets: the few batch sizes a model is exported, warmed up and run at.

A GPU runs a padded batch of 16 about as fast as one of 13, while every new batch shape costs a
TorchScript re-optimisation and cuDNN's algorithm search on first use. So the embedded backend pads
each batch up to the next bucket (1, 4, 8, 16, 32, 64, 128, capped per model) and warms up each bucket:
it runs no other size. Triton cannot pad: export's `--batch-buckets` warms its models up at the same
buckets and makes those above 1 its preferred sizes; it runs another size when the oldest queued
request has waited the queue delay, and that size's first run pays the optimisation once.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BUCKETS: tuple[int, ...] = (1, 4, 8, 16, 32, 64, 128)
# The largest batch per model on one GPU (an H200 has memory for far more; these keep one batch's
# latency within ~100 ms at the model's default input size): ResNet-50 at 224, Faster R-CNN R50-FPN
# v2 at 800, the U-Net at 512.
GPU_MAX_BATCH: dict[str, int] = {"classifier": 128, "detector": 16, "segmenter": 32}


def buckets_up_to(max_batch_size: int, buckets: Sequence[int] = BUCKETS) -> tuple[int, ...]:
    """The buckets below `max_batch_size`, and `max_batch_size` itself (always the last bucket)."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
    return (*(b for b in sorted(set(buckets)) if b < max_batch_size), max_batch_size)


def bucket_for(size: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds `size` images (buckets as `buckets_up_to` makes them)."""
    for bucket in buckets:
        if bucket >= size:
            return bucket
    raise ValueError(f"a batch of {size} is larger than the largest bucket {max(buckets)}")


def pad_to_bucket(batch: np.ndarray, buckets: Sequence[int]) -> np.ndarray:
    """`batch` ([N, ...]) with zero rows appended up to its bucket; the caller drops outputs past N."""
    target = bucket_for(len(batch), buckets)
    if target == len(batch):
        return batch
    padded = np.zeros((target, *batch.shape[1:]), dtype=batch.dtype)
    padded[: len(batch)] = batch
    return padded
