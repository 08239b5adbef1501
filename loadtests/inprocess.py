"""The in-process limits: the TorchScript model alone at the service's batch sizes, and the whole
decode → preprocess → model → postprocess pipeline in one process without HTTP.
"""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from loadtests.baselines.pipeline import ModelPipeline
from loadtests.images import EncodedImage


@dataclass
class RawResult:
    """Images per second for one batch size (`stage` says what was timed)."""

    stage: str  # "model" or "pipeline"
    batch_size: int
    batches: int
    images_per_s: float
    batch_ms_p50: float


def _time_batches(run: Callable[[], object], duration_s: float, max_batches: int) -> list[float]:
    """Call `run()` repeatedly for `duration_s` (at most `max_batches` times); return seconds per call."""
    times: list[float] = []
    deadline = time.perf_counter() + duration_s
    while len(times) < max_batches and time.perf_counter() < deadline:
        began = time.perf_counter()
        run()
        times.append(time.perf_counter() - began)
    return times


def measure_model(
    pipeline: ModelPipeline,
    images: list[np.ndarray],
    batch_sizes: list[int],
    duration_s: float,
    max_batches: int = 10_000,
) -> list[RawResult]:
    """Throughput of the model alone on already preprocessed images, one warm-up batch per size."""
    results = []
    for size in batch_sizes:
        batch = [images[i % len(images)] for i in range(size)]
        pipeline.infer(batch)
        times = _time_batches(functools.partial(pipeline.infer, batch), duration_s, max_batches)
        results.append(
            RawResult(
                "model", size, len(times), size * len(times) / sum(times), 1000 * float(np.median(times))
            )
        )
    return results


def measure_pipeline(
    pipeline: ModelPipeline,
    images: list[EncodedImage],
    batch_size: int,
    duration_s: float,
    max_batches: int = 10_000,
) -> RawResult:
    """Throughput of decode + preprocess + model + postprocess in this process, `batch_size` at a time."""
    cursor = itertools.count()

    def run() -> None:
        files = [images[next(cursor) % len(images)].data for _ in range(batch_size)]
        prepared = [pipeline.prepare(data) for data in files]
        outputs = pipeline.infer([image for image, _ in prepared])
        for out, (_, geometry) in zip(outputs, prepared):
            pipeline.answer(out, geometry)

    run()
    times = _time_batches(run, duration_s, max_batches)
    return RawResult(
        "pipeline",
        batch_size,
        len(times),
        batch_size * len(times) / sum(times),
        1000 * float(np.median(times)),
    )
