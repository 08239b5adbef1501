"""Where one request's time went: per-stage durations, sent as `Server-Timing` and recorded as metrics.

Stages, in order: `read` (the body), `decode` and `preprocess` (each image; summed over a request's
images, which run in parallel threads), `queue` (waiting for a batch) and `model` (the batch that
ran the image; the longest over a request's images, which share batches), `postprocess` (all
images), `explain` (an explanation's extra passes and maps, only when `explain=` asks), `encode` (the answer's JSON, MessagePack or drawn image). The Triton backend reports
Triton's whole call as `model` (Triton's own queue included); so do separately placed model
deployments (the Serve hop included).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field

STAGES = ("read", "decode", "preprocess", "queue", "model", "postprocess", "encode")  # every answered request's
# ...and in order with the stages only some requests have (`explain`)
ORDERED_STAGES = ("read", "decode", "preprocess", "queue", "model", "postprocess", "explain", "encode")


@dataclass
class BatchTiming:
    """What the backend tells about one image: its wait for a batch, the batch's run, the batch's size."""

    queue_s: float = 0.0
    model_s: float = 0.0
    batch_size: int = 0


@dataclass
class Timings:
    """One request's stage durations (seconds) and the largest batch its images ran in."""

    started: float = field(default_factory=time.perf_counter)
    seconds: dict[str, float] = field(default_factory=dict)
    batch_size: int = 0

    def add(self, stage: str, seconds: float) -> None:
        """Add `seconds` to `stage` (work of several images adds up)."""
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the block as (part of) stage `name`."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - began)

    def batches(self, images: list[BatchTiming]) -> None:
        """Record the backend's report for a request's images (they wait and run together: the longest counts)."""
        if images:
            self.seconds["queue"] = max(image.queue_s for image in images)
            self.seconds["model"] = max(image.model_s for image in images)
            self.batch_size = max(image.batch_size for image in images)

    def total(self) -> float:
        return time.perf_counter() - self.started

    def header(self) -> str:
        """The `Server-Timing` value: each stage in ms, the batch size on `model`, and the total."""
        parts = []
        for stage in ORDERED_STAGES:
            if stage in self.seconds:
                entry = f"{stage};dur={self.seconds[stage] * 1000:.2f}"
                if stage == "model" and self.batch_size:
                    entry += f';desc="batch {self.batch_size}"'
                parts.append(entry)
        parts.append(f"total;dur={self.total() * 1000:.2f}")
        return ", ".join(parts)


def stage(timings: Timings | None, name: str) -> AbstractContextManager[None]:
    """`timings.stage(name)`, or nothing when timings are off."""
    return timings.stage(name) if timings is not None else nullcontext()
