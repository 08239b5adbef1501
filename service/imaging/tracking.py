"""Track ids for detections across the frames of one stream or video: ByteTrack, as `supervision` packages it.

One `DetectionTracker` per stream (or per uploaded video) turns each frame's `DetectionResult` into a
`TrackedDetectionResult`: every detection keeps its box, label and score and gains the `track_id` of
the ByteTrack track it belongs to (`None` while a new object is not yet confirmed: a track is
confirmed on its second frame, except on a stream's first frame).

Why supervision 0.30: its `sv.ByteTrack` is the last release of that tracker in supervision (0.31
moved it to Roboflow's `trackers` package, which needs numpy >= 2 and opencv-python; this project
keeps numpy < 2 for tritonserver). supervision 0.30 needs neither OpenCV nor numpy 2.
"""

from __future__ import annotations

import warnings

import numpy as np
from pydantic import Field

from service.schemas import Detection, DetectionResult

with warnings.catch_warnings():  # supervision says once that it draws without OpenCV; we draw nothing with it
    warnings.filterwarnings("ignore", message="OpenCV", category=UserWarning)
    import supervision as sv


class TrackedDetection(Detection):
    track_id: int | None = Field(
        None,
        description="The object's track across the stream's frames (ByteTrack); the same object keeps its id. "
        "None while a new object is not yet confirmed (its first frame).",
        examples=[3],
    )


class TrackedDetectionResult(DetectionResult):
    detections: list[TrackedDetection] = Field(
        ..., description="Highest score first, each with its track id."
    )


class DetectionTracker:
    """ByteTrack over one stream's frames; `frame_rate` sizes how long a lost track is kept (about 1 s)."""

    def __init__(self, frame_rate: float) -> None:
        with warnings.catch_warnings():  # deprecated in supervision 0.28 in favour of `trackers` (see above)
            warnings.filterwarnings("ignore", message=".*ByteTrack.*deprecated", category=FutureWarning)
            warnings.filterwarnings("ignore", message=".*ByteTrack.*deprecated", category=DeprecationWarning)
            self._tracker = sv.ByteTrack(frame_rate=max(1.0, frame_rate), lost_track_buffer=30)

    def update(self, result: DetectionResult) -> TrackedDetectionResult:
        """The next frame's detections, each with its track id."""
        found = result.detections
        detections = sv.Detections(
            xyxy=np.array([d.box for d in found], dtype=np.float32).reshape(-1, 4),
            confidence=np.array([d.score for d in found], dtype=np.float32),
            class_id=np.array([d.class_id for d in found], dtype=int),
            data={"index": np.arange(len(found))},
        )
        tracked = self._tracker.update_with_detections(detections)
        track_of = {int(i): int(t) for i, t in zip(tracked.data.get("index", []), tracked.tracker_id)}
        return TrackedDetectionResult(
            image=result.image,
            detections=[
                TrackedDetection(**d.model_dump(), track_id=track_of.get(i)) for i, d in enumerate(found)
            ],
        )
